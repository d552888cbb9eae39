"""Filesystem events (watchdog) -> batches of paths to look at. Nothing else.

Events are hints: a batch only names paths; the consumer re-stats and re-hashes them. Anything
that may have lost events (inotify queue overflow, an observer that died) turns the next batch
into a full reconcile. The watchdog handler only records paths under a lock.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from watchdog import events as _events
from watchdog.events import (DirCreatedEvent, DirDeletedEvent, DirModifiedEvent, DirMovedEvent,
                             FileClosedEvent, FileCreatedEvent, FileDeletedEvent,
                             FileModifiedEvent, FileMovedEvent, FileSystemEvent,
                             FileSystemEventHandler)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from .agent import is_excluded
from .ignore import Rules

__all__ = ["Batch", "Watcher", "WATCH_LIMIT_HINT"]

log = logging.getLogger(__name__)

WATCH_LIMIT_HINT = (
    "inotify watch limit reached; falling back to polling (slower). Fix: "
    "sudo sysctl fs.inotify.max_user_watches=524288 (persist it in /etc/sysctl.d/)"
)
# What a batch is made of: every event but opens and closes without a write (watchdog asks the
# kernel for these alone, so it queues no event for a read: a first sync reads every file it
# sends, which was two events per file for the event threads to decode and drop).
# A chmod is an attrib event: its own class since watchdog 5 (a modified event before), and
# one the filter left out would be dropped after the kernel reported it (a mode change then
# reached the remote only with the next edit of that file, or the next full reconcile).
RECORDED = (FileCreatedEvent, DirCreatedEvent, FileModifiedEvent, DirModifiedEvent,
            FileDeletedEvent, DirDeletedEvent, FileMovedEvent, DirMovedEvent, FileClosedEvent,
            *(getattr(_events, name) for name in ("FileAttribEvent", "DirAttribEvent")
              if hasattr(_events, name)))
SETTLING_EVENTS = {"closed", "moved", "deleted"}
GIT_LOCK = os.path.join(".git", "index.lock")
SETTLED_QUIET = 0.005  # when every pending file has been closed, renamed or deleted


@dataclass(frozen=True)
class Batch:
    """Paths (relative, posix) whose state should be re-read, or ``full`` for everything."""

    paths: frozenset[str]
    full: bool
    first_event: float  # time.monotonic() of the first event in the batch
    # Git made it: the event stream showed ``.git/index.lock`` created during the batch, and
    # every event of the batch came while git held that lock (a checkout, switch, reset,
    # rebase, merge or stash; however fast). What git changes that way it keeps. A batch
    # never mixes such events with others: an edit just before git took the lock, or just
    # after it let go, is a batch of its own.
    by_git: bool = False


def _lock_state(event: FileSystemEvent, lock: str) -> bool | None:
    """What an event on ``.git/index.lock`` says: taken (True), released (False: renamed
    onto the index, or removed), or nothing (git writing into it)."""
    if event.event_type == "created" or getattr(event, "dest_path", "") == lock:
        return True
    if event.event_type in ("moved", "deleted"):
        return False
    return None


class _Recorder(FileSystemEventHandler):
    def __init__(self, watcher: "Watcher"):
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = [event.src_path]
        if getattr(event, "dest_path", ""):
            paths.append(event.dest_path)
        lock = self.watcher.git_lock
        if lock in paths:  # events arrive in order: what comes between these is the checkout
            self.watcher._git_lock_event(_lock_state(event, lock))
            return
        # A file still being written may get more writes; one closed, moved or deleted is done.
        settled = event.event_type in SETTLING_EVENTS or event.is_directory
        self.watcher._record(paths, settled)


class _OverflowAlarm(logging.Handler):
    """watchdog rebuilds its watches after an inotify overflow and only logs it: listen."""

    def __init__(self, watcher: "Watcher"):
        super().__init__(logging.WARNING)
        self.watcher = watcher

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.watcher.request_full("inotify queue overflowed")


class Watcher:
    """Watch ``root`` and yield coalesced :class:`Batch` es.

    Args:
        root: the local project root.
        rules: exclude rules; excluded paths (and editor temp files) produce no batch.
        quiet: a batch is cut after this long without a new event (seconds); when every
            pending file has already been closed after writing (or renamed, or deleted), a
            much shorter quiet (SETTLED_QUIET) is enough.
        max_wait: ... or this long after its first event, whatever comes first,
        git_hold: ... except that while ``.git/index.lock`` exists (a checkout, rebase or
            merge in progress) the batch is held, up to this long, so a branch switch is one
            batch.
        polling: use watchdog's polling observer (also the fallback at the inotify limit).
    """

    def __init__(self, root: str, rules: Rules, quiet: float = 0.05, max_wait: float = 1.0,
                 git_hold: float = 30.0, polling: bool = False):
        self.root = os.path.realpath(root)
        self.rules = rules.compiled()
        self.quiet, self.max_wait, self.git_hold = quiet, max_wait, git_hold
        self.polling = polling
        self.warnings: list[str] = []
        self._cond = threading.Condition()
        self._pending: set[str] = set()
        self._writing: set[str] = set()  # pending paths not yet closed after a write
        self._git_locked = False  # as the event stream tells it, in order with the file events
        # since the last cut: the stream showed the lock taken / a file event outside it
        self._git_taken = False
        self._outside_git = False
        self._sealed: list[Batch] = []  # cut at a lock boundary, not taken yet
        self.git_lock = os.path.join(self.root, GIT_LOCK)
        self._full_reason: str | None = None
        self._first = 0.0
        self._last = 0.0
        self._observer = None
        self._alarm = _OverflowAlarm(self)

    # ---------------------------------------------------------------- recording (any thread)

    def _relative(self, path: str | bytes) -> str | None:
        path = os.fsdecode(path)
        if path == self.root:
            return None
        if not path.startswith(self.root + os.sep):
            return None
        rel = path[len(self.root) + 1:].replace(os.sep, "/")
        parts = rel.split("/")
        for i in range(1, len(parts)):
            if is_excluded(self.rules, "/".join(parts[:i]), True):
                return None
        as_dir = is_excluded(self.rules, rel, True)
        if as_dir and (is_excluded(self.rules, rel, False) or os.path.isdir(path)):
            return None
        return rel

    def _git_lock_event(self, locked: bool | None) -> None:
        with self._cond:
            if locked and self._outside_git:
                self._seal()  # what came before git took the lock is not git's
            if locked is not None:
                self._git_locked = locked
                self._git_taken = self._git_taken or locked
            self._last = time.monotonic()
            self._cond.notify_all()

    def _record(self, paths: list, settled: bool = False) -> None:
        rels = [r for r in map(self._relative, paths) if r is not None]
        if not rels:
            return
        with self._cond:
            if not self._git_locked and self._git_taken and not self._outside_git:
                self._seal()  # git's batch is complete: what comes after it is not git's
            now = time.monotonic()
            if not self._pending and self._full_reason is None:
                self._first = now
            self._last = now
            self._pending.update(rels)
            self._outside_git = self._outside_git or not self._git_locked
            if settled:
                self._writing.difference_update(rels)
            else:
                self._writing.update(rels)
            self._cond.notify_all()

    def _seal(self) -> None:
        """Cut the pending paths into a batch of their own, now (at an edge of git's lock:
        taken, or let go); ``next_batch`` returns it before anything that came after."""
        if self._pending and self._full_reason is None:
            self._sealed.append(Batch(frozenset(self._pending), False, self._first,
                                      self._git_taken and not self._outside_git))
            self._pending = set()
            self._writing = set()
            self._git_taken = self._outside_git = False

    def request_full(self, reason: str) -> None:
        """Make the next batch a full reconcile (after lost events, a reconnect, ...)."""
        with self._cond:
            # events may be lost: the stream no longer says what git did
            self._git_locked = os.path.exists(self.git_lock)
            self._outside_git = True
            if self._full_reason is None:
                self._full_reason = reason
                if not self._pending:
                    self._first = time.monotonic()
            self._last = time.monotonic()
            self._cond.notify_all()

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        logging.getLogger("watchdog.observers").addHandler(self._alarm)
        if not self.polling:
            try:
                self._start(Observer())
                return
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EMFILE):
                    raise
                self.warnings.append(WATCH_LIMIT_HINT)
                log.warning(WATCH_LIMIT_HINT)
        self._start(PollingObserver(timeout=0.5))

    def _start(self, observer) -> None:
        observer.schedule(_Recorder(self), self.root, recursive=True, event_filter=RECORDED)
        try:
            observer.start()
        except BaseException:
            observer.stop()
            raise
        self._observer = observer

    def stop(self) -> None:
        logging.getLogger("watchdog.observers").removeHandler(self._alarm)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def __enter__(self) -> "Watcher":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def backend(self) -> str:
        return "polling" if isinstance(self._observer, PollingObserver) else "inotify"

    # ---------------------------------------------------------------- batches (consumer thread)

    def _check_observer(self) -> None:
        if self._observer is not None and not self._observer.is_alive():
            self.warnings.append("the file watcher stopped; restarted it")
            polling = isinstance(self._observer, PollingObserver)
            self._observer = None
            self.polling = polling
            self.start()
            self.request_full("file watcher restarted")

    def next_batch(self, timeout: float | None = None) -> Batch | None:
        """Wait for events and return one coalesced batch, or None after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._sealed and not self._pending and self._full_reason is None:
                left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if left <= 0:
                    return None
                self._cond.wait(left)
                self._cond.release()
                try:
                    self._check_observer()
                finally:
                    self._cond.acquire()
            held = False  # a hold: events may still be in flight after it
            while True:
                if self._sealed:  # cut while we waited: it came first
                    return self._sealed.pop(0)
                now = time.monotonic()
                if (self._git_locked or os.path.exists(self.git_lock)) \
                        and now - self._first < self.git_hold:
                    held = True
                    self._cond.wait(0.05)
                    continue
                # after a git hold, events may still be in flight: the full quiet window
                quiet = (self.quiet if self._writing or self.polling or held
                         else SETTLED_QUIET)
                quiet_left = quiet - (now - self._last)
                max_left = self.max_wait - (now - self._first)
                if quiet_left <= 0 or (max_left <= 0 and not held):
                    break
                self._cond.wait(max(0.001, min(quiet_left, max_left) if max_left > 0
                                    else quiet_left))
            full = self._full_reason is not None
            by_git = self._git_taken and not self._outside_git and not full
            batch = Batch(frozenset(self._pending), full, self._first, by_git)
            self._pending = set()
            self._writing = set()
            self._full_reason = None
            self._git_taken = self._outside_git = False
            return batch

    def batches(self, stop: threading.Event | None = None) -> Iterator[Batch]:
        """Yield batches until ``stop`` is set."""
        while stop is None or not stop.is_set():
            batch = self.next_batch(timeout=0.5)
            if batch is not None:
                yield batch
