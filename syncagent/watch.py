"""The live loop: initial reconcile, then one sync per event batch, surviving disconnects.

The watcher (syncagent.watcher) yields batches and nothing else; this consumer syncs them,
restarts the worker after a committed batch, and reports each step as an event dict:

    {"event": "connected" | "synced" | "disconnected" | "error" | "restart" | "ready"
              | "warning" | "stopped", "target": ..., ...}
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from .config import Project, Target
from .errors import ConnectError, SyncAgentError, WorkerStartError
from .push import PushOptions, PushResult, Syncer
from .watcher import Watcher

__all__ = ["WatchOptions", "Backoff", "Restarter", "watch"]

Emit = Callable[[dict], None]


@dataclass(frozen=True)
class WatchOptions:
    quiet: float = 0.05
    max_wait: float = 1.0
    git_hold: float = 30.0
    polling: bool = False
    ping_every: float = 2.0  # an idle connection is checked this often (dead within ~5 s)
    ping_timeout: float = 3.0


class Backoff:
    """0.5 s, 1 s, 2 s ... capped; reset after a success."""

    def __init__(self, first: float = 0.5, cap: float = 10.0):
        self.first, self.cap, self.next_delay = first, cap, first

    def next(self) -> float:
        delay = self.next_delay
        self.next_delay = min(self.cap, delay * 2)
        return delay

    def reset(self) -> None:
        self.next_delay = self.first


class Restarter(threading.Thread):
    """Restarts the worker on a second agent channel, so syncing never waits for a restart.

    Requests coalesce: while a restart runs, newer requests replace each other, and exactly one
    more restart (onto the newest revision) follows. A request that fails for lack of a
    connection is kept and retried once the main loop has reconnected.
    """

    def __init__(self, syncer: Syncer, emit: Emit, stop: threading.Event):
        super().__init__(name="syncagent-restarter", daemon=True)
        self.syncer, self.emit, self.stop_event = syncer, emit, stop
        self.cond = threading.Condition()
        self.pending: tuple[str, float] | None = None  # (revision, time of the save)
        self.busy = False
        self.session = None
        self.parent = None

    def request(self, revision: str, since: float) -> None:
        with self.cond:
            # keep the oldest save time: latency is measured from the first unserved save
            self.pending = (revision, self.pending[1] if self.pending else since)
            self.cond.notify_all()

    def idle(self) -> bool:
        with self.cond:
            return self.pending is None and not self.busy

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def _channel(self):
        parent = self.syncer.session
        if parent is None:
            return None
        if self.session is None or self.parent is not parent:
            self.session = parent.fork()
            self.parent = parent
        return self.session

    def run(self) -> None:
        name = self.syncer.target.name
        while not self.stop_event.is_set():
            with self.cond:
                while self.pending is None and not self.stop_event.is_set():
                    self.cond.wait(0.5)
                if self.stop_event.is_set():
                    return
                revision, since = self.pending
                self.pending = None
                self.busy = True
            try:
                self.emit({"event": "restart", "target": name, "revision": revision})
                session = self._channel()
                if session is None:
                    raise ConnectError("not connected")
                t0 = time.monotonic()
                out = self.syncer.restart(revision, session=session)
                done = time.monotonic()
                with self.cond:  # it came up on a newer push already: no need to go again
                    if self.pending and self.pending[0] == out["revision"]:
                        self.pending = None
                self.emit({"event": "ready", "target": name, "revision": out["revision"],
                           "colour": out["colour"], "node": out.get("node"),
                           "pid": out.get("pid"), "mode": out["mode"],
                           "latency": round(done - since, 4),
                           "restart": round(done - t0, 4),
                           "timings": {k: round(v, 4) for k, v in out["timings"].items()}})
            except WorkerStartError as e:
                self.emit({"event": "error", "target": name, "error": str(e),
                           "revision": revision})
            except ConnectError as e:
                self.session = None
                with self.cond:  # retried after the main loop reconnects
                    if self.pending is None:
                        self.pending = (revision, since)
                self.emit({"event": "error", "target": name,
                           "error": f"restart postponed: {e}"})
                self.stop_event.wait(1.0)
            except SyncAgentError as e:
                self.emit({"event": "error", "target": name, "error": str(e)})
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def close(self) -> None:
        self.wake()
        if self.session is not None:
            self.session.close()


def _synced(result: PushResult, latency: float | None, full: bool) -> dict:
    event = {"event": "synced", "target": result.target, "revision": result.revision,
             "changed": result.changed, "files_sent": result.files_sent,
             "bytes_sent": result.bytes_sent, "deleted": result.deleted,
             "paths": result.paths[:20], "full": full,
             "durations": {k: round(v, 4) for k, v in result.durations.items()}}
    if latency is not None:
        event["latency"] = round(latency, 4)
    return event


def watch(project: Project, target: Target, emit: Emit, stop: threading.Event,
          push_options: PushOptions = PushOptions(), options: WatchOptions = WatchOptions()
          ) -> None:
    """Keep ``target`` equal to the local tree until ``stop`` is set.

    Raises:
        SafetyError, ConfigError: refused at the initial reconcile (unknown host key, mass
            delete, ...). Connection failures are retried with backoff, never raised.
    """
    syncer = Syncer(project, target, push_options)
    watcher = Watcher(syncer.root, syncer.rules, quiet=options.quiet, max_wait=options.max_wait,
                      git_hold=options.git_hold, polling=options.polling)
    watcher.start()  # before the first reconcile: an edit made during it is not lost
    warned = 0
    restarter = Restarter(syncer, emit, stop)
    restarter.start()
    told_unprovisioned = False
    backoff = Backoff()
    connected = False
    need_full = True
    first_connect = True
    last_contact = time.monotonic()
    try:
        while not stop.is_set():
            if not connected:
                try:
                    syncer.connect()
                except ConnectError as e:
                    if first_connect and "authentication" in str(e):
                        raise
                    delay = backoff.next()
                    emit({"event": "disconnected", "target": target.name, "error": str(e),
                          "retry_in": delay})
                    stop.wait(delay)
                    continue
                connected, need_full, first_connect = True, True, False
                last_contact = time.monotonic()
                emit({"event": "connected", "target": target.name,
                      "remote_root": syncer.remote_root})
            try:
                if need_full:
                    t0 = time.monotonic()
                    result = syncer.reconcile()
                    need_full = False
                    backoff.reset()
                    emit(_synced(result, time.monotonic() - t0, full=True))
                    last_contact = time.monotonic()
                    if push_options.restart and syncer.provisioned:
                        live = (syncer.session.worker(syncer.remote_root)["worker"] or {}).get(
                            "live")
                        # code changed while we were away, or no worker is serving at all
                        if syncer.restart_wanted(result) or not live:
                            restarter.request(result.revision, t0)
                    elif push_options.restart and not told_unprovisioned:
                        told_unprovisioned = True
                        emit({"event": "warning", "target": target.name,
                              "message": "no worker provisioned: syncing without restarts "
                                         f"(run `syncagent provision {target.name}`)"})
                    continue
                batch = watcher.next_batch(timeout=0.25)  # wakes up for `stop` too
                while len(watcher.warnings) > warned:
                    emit({"event": "warning", "target": target.name,
                          "message": watcher.warnings[warned]})
                    warned += 1
                if batch is None:
                    if time.monotonic() - last_contact >= options.ping_every:
                        syncer.session.ping(options.ping_timeout)
                        last_contact = time.monotonic()
                    continue
                if batch.full:
                    result = syncer.reconcile()
                else:
                    result = syncer.sync_paths(batch.paths)
                last_contact = time.monotonic()
                backoff.reset()
                if result.changed or batch.full:
                    emit(_synced(result, time.monotonic() - batch.first_event, batch.full))
                if syncer.restart_wanted(result):
                    restarter.request(result.revision, batch.first_event)
                for w in result.warnings:
                    emit({"event": "warning", "target": target.name, "message": w})
            except ConnectError as e:
                connected = False
                syncer.close()
                emit({"event": "disconnected", "target": target.name, "error": str(e),
                      "retry_in": 0})
            except SyncAgentError as e:
                if syncer.revision is None and e.exit_code != 1:
                    raise  # refused before anything was synced (safety, config): user acts
                emit({"event": "error", "target": target.name, "error": str(e)})
                need_full = True
                stop.wait(backoff.next())
    finally:
        stop.set()
        watcher.stop()
        restarter.close()
        restarter.join(timeout=5)
        syncer.close()
        emit({"event": "stopped", "target": target.name})
