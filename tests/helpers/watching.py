"""`syncagent watch` in a thread for the tests: its events in a list, errors re-raised."""

from __future__ import annotations

import threading
from pathlib import Path

from syncagent.push import PushOptions
from syncagent.watch import WatchOptions, watch
from tests.helpers.procs import wait_until


class Watching:
    """`watch` in a thread, its events in a list."""

    def __init__(self, project, target, push_options=PushOptions(), **options):
        self.project, self.target = project, target
        self.root = Path(project.root)
        self.events: list[dict] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(push_options, options),
                                       daemon=True)

    def _run(self, push_options, options):
        try:
            watch(self.project, self.target, self.events.append, self.stop, push_options,
                  WatchOptions(**options))
        except BaseException as e:  # reported by the test
            self.error = e

    def __enter__(self):
        self.thread.start()
        wait_until(lambda: self.error or self.of("synced"), 30, "the initial reconcile")
        assert self.error is None, self.error
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:  # the events, in the failed test's captured output
            for event in self.events[-40:]:
                print(event)
        self.stop.set()
        self.thread.join(timeout=15)
        assert not self.thread.is_alive()
        if self.error and exc[0] is None:
            raise self.error

    def of(self, kind):
        return [e for e in self.events if e["event"] == kind]

    def ready_on(self, revision_prefix=None):
        return [e for e in self.of("ready")
                if revision_prefix is None or e["revision"].startswith(revision_prefix)]
