"""The live loop: initial reconcile, then one sync per event batch, surviving disconnects.

The watcher (syncagent.watcher) yields batches and nothing else; this consumer syncs them,
restarts the worker after a committed batch, and reports each step as an event dict:

    {"event": "connected" | "synced" | "disconnected" | "error" | "restart" | "ready"
              | "restart-skipped" | "warning" | "halted" | "resumed" | "stopped",
     "target": ..., ...}

A target whose plan the safety policy refuses (``plan.judge``: too many files would lose
their content) is *halted*: nothing more is applied there, one "halted" event says so with the
counts and the way out, and this machine's record (``guard``) tells ``syncagent status``. The
loop keeps reading the local tree; once the files are back, or once the user confirmed with
``push --allow-mass-delete`` (which clears the record), it says "resumed" and reconciles.

A live batch git made (a checkout, switch, reset, rebase, merge or stash, holding
``.git/index.lock``: ``Batch.by_git``) is a confirmed change: git keeps every content it
removes, so its deletions are not counted, and the tree it leaves is the guard's new base
(``plan.judge``'s ``confirmed``); its "synced" event says ``"confirmed": "git"`` when it deleted
files. It lifts no halt by itself: while halted it is noted like any batch, and the target
resumes only if the files are back. Deletions git makes without the lock (``git clean``, the
untracked files of ``stash -u``), ``rm -rf``, and every full reconcile are judged as before.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import hashlib
import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from . import agent, guard, holder
from . import restart as restart_mod
from .config import Project, Target, user_state_dir
from .errors import (ConnectError, MassDeleteError, OperationalError, SafetyError,
                     SyncAgentError, WorkerStartError)
from .manifest import local_rules
from .push import PushOptions, PushResult, Syncer
from .session import RemoteTree
from .watcher import Batch, Watcher

__all__ = ["WatchOptions", "Backoff", "Restarter", "TargetLoop", "watch"]

Emit = Callable[[dict], None]
GIT = "git"  # a "synced" event's "confirmed": git made the batch (watcher.Batch.by_git)
# A target's loop writes the shared digest cache once it has had nothing to do for this long
# (the watch writes it at its end too): at 100,000 files a write costs 0.3-0.5 s, which came
# before every batch's "synced" event.
CACHE_SAVE_QUIET_S = 2.0


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

    def __init__(self, syncer: Syncer, emit: Emit, stop: threading.Event,
                 gate: threading.Lock | None = None):
        super().__init__(name="syncagent-restarter", daemon=True)
        self.gate = gate  # shared by the targets of a rolling restart: one at a time
        self.syncer, self.emit, self.stop_event = syncer, emit, stop
        self.cond = threading.Condition()
        self.pending: tuple[str, float, str] | None = None  # (revision, time of save, why)
        self.busy = False
        self.live: str | None = None  # the revision the serving worker runs, as last seen
        self.session = None
        self.parent = None

    def request(self, revision: str, since: float, why: str = "") -> None:
        with self.cond:
            # keep the oldest save time: latency is measured from the first unserved save
            self.pending = (revision, self.pending[1] if self.pending else since,
                            why or (self.pending[2] if self.pending else ""))
            self.cond.notify_all()

    def set_live(self, revision: str | None) -> None:
        with self.cond:
            self.live = revision

    def settled_live(self) -> str | None:
        """The live revision, or None while a restart may be changing it."""
        with self.cond:
            return None if self.busy else self.live

    def drop_pending(self) -> bool:
        """Forget a queued restart (the tree is back at the live revision); False when a
        restart is running: it may change what is live, so one more must follow."""
        with self.cond:
            if self.busy:
                return False
            self.pending = None
            return True

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
                revision, since, why = self.pending
                self.pending = None
                self.busy = True
            try:
                self.emit({"event": "restart", "target": name, "revision": revision,
                           "why": why})
                session = self._channel()
                if session is None:
                    raise ConnectError("not connected")
                t0 = time.monotonic()
                if self.gate is not None:
                    with self.gate:
                        out = self.syncer.restart(revision, session=session)
                else:
                    out = self.syncer.restart(revision, session=session)
                done = time.monotonic()
                with self.cond:  # it came up on a newer push already: no need to go again
                    self.live = out["revision"]
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
                        self.pending = (revision, since, why)
                self.emit({"event": "error", "target": name,
                           "error": f"restart postponed: {e}"})
                self.stop_event.wait(1.0)
            except SyncAgentError as e:
                self.emit({"event": "error", "target": name, "error": str(e)})
            except Exception as e:  # a bug must not end the restarts for the rest of the watch
                _emit_quietly(self.emit, {"event": "error", "target": name,
                                          "error": f"restart failed: {_internal(e)}"})
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def close(self) -> None:
        self.wake()
        if self.session is not None:
            self.session.close()


def _internal(e: BaseException) -> str:
    return f"internal error ({type(e).__name__}: {e})"


def _emit_quietly(emit: Emit, event: dict) -> None:
    """Report after an unexpected error, which may have come from ``emit`` itself."""
    try:
        emit(event)
    except Exception:
        pass


def _release_memory() -> None:
    """Hand the transient peak of a full reconcile (the remote manifest as JSON, the scan's
    lists) back to the OS: a watch lives for hours and its RSS is what a user sees."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc
    except (OSError, AttributeError):
        pass


def _synced(result: PushResult, latency: float | None, full: bool,
            confirmed: str | None = None) -> dict:
    event = {"event": "synced", "target": result.target, "revision": result.revision,
             "changed": result.changed, "files_sent": result.files_sent,
             "bytes_sent": result.bytes_sent, "deleted": result.deleted,
             "paths": result.paths[:20], "full": full,
             "durations": {k: round(v, 4) for k, v in result.durations.items()}}
    if latency is not None:
        event["latency"] = round(latency, 4)
    if confirmed:  # its deletes were let through without --allow-mass-delete: say why
        event["confirmed"] = confirmed
    return event


class TargetLoop(threading.Thread):
    """One target of a watch: its connection, its syncs, its restarts.

    The watch's main thread hands it batches (paths plus what the local scan found there, read
    once for all targets). A target that is down keeps no backlog: it reconciles in full once
    it is back. A refusal at the start (unknown host key, path escape...) ends this target's
    loop and is kept in ``fatal``; a mass delete, at the start or later, halts it instead.
    """

    def __init__(self, syncer: Syncer, emit: Emit, stop: threading.Event,
                 options: WatchOptions, gate: threading.Lock | None):
        super().__init__(name=f"syncagent-{syncer.target.name}", daemon=True)
        self.syncer, self.emit, self.stop_event, self.options = syncer, emit, stop, options
        self.inbox: queue.Queue = queue.Queue()
        self.restarter = Restarter(syncer, emit, stop, gate)
        self.fatal: SyncAgentError | None = None
        self.halted: dict | None = None  # the "halted" event, while the target is halted
        self.waiters: list[dict] = []  # flushes (a `push` during the watch) to answer
        self.waiters_lock = threading.Lock()
        self.connected = False
        self._carried = None  # an inbox item _next took and did not merge

    def flush(self, timeout: float = 300.0) -> PushResult | None:
        """Reconcile the tree as it is now, and return that reconcile's result (a `push` run
        during the watch, through the holder socket the watch serves).

        Returns:
            None when this loop cannot answer (halted, not connected, stopping, too slow): the
            push then runs on its own.
        Raises:
            SyncAgentError: the reconcile's own error (a refusal is the push's refusal).
        """
        if self.halted is not None or not self.connected or not self.is_alive():
            return None
        waiter = {"done": threading.Event()}
        with self.waiters_lock:
            self.waiters.append(waiter)
        self.inbox.put((Batch(frozenset(), True, time.monotonic()), None, []))
        deadline = time.monotonic() + timeout
        while not waiter["done"].wait(0.25):
            if self.stop_event.is_set() or time.monotonic() > deadline:
                with self.waiters_lock:
                    if waiter in self.waiters:
                        self.waiters.remove(waiter)
                        return None
        if "error" in waiter:
            raise waiter["error"]
        return waiter["result"]

    def _reconcile(self, remote: RemoteTree | None = None) -> PushResult:
        """A full reconcile (``remote``: the manifest the connect just read, not read again);
        the flushes waiting when it began get its result or its error (a lost connection keeps
        them for the reconcile after the reconnect)."""
        with self.waiters_lock:
            waiting, self.waiters = self.waiters, []
        try:
            result = self.syncer.reconcile(remote=remote)
        except ConnectError:
            with self.waiters_lock:
                self.waiters[:0] = waiting
            raise
        except SyncAgentError as e:
            for w in waiting:
                w["error"] = e
                w["done"].set()
            raise
        for w in waiting:
            w["result"] = result
            w["done"].set()
        return result

    def submit(self, batch: Batch, fresh: dict | None, problems: list) -> None:
        self.inbox.put((batch, fresh, problems))

    def _next(self) -> tuple[Batch, dict | None, list] | None:
        """The next batch, merged with any that queued up behind it, but never a batch git
        made with one it did not (git's deletions are confirmed, the others are judged)."""
        item = self._take(timeout=0.25)
        while item is not None:
            more = self._take()
            if more is None:
                break
            if not _mergeable(item[0], more[0]):
                self._carried = more  # the next call starts with it
                break
            item = _merged(item, more)
        return item

    def _take(self, timeout: float | None = None):
        if self._carried is not None:
            item, self._carried = self._carried, None
            return item
        try:
            return self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait()
        except queue.Empty:
            return None

    def _drop_queued(self) -> None:
        """Forget the batches waiting: the full reconcile about to run covers them."""
        self._carried = None
        while not self.inbox.empty():
            self.inbox.get_nowait()

    # ---------------------------------------------------------------- halted

    def _halt(self, e: MassDeleteError) -> None:
        """Stop applying anything to this target; say so once, and record it for status."""
        if self.halted is not None:
            return
        name = self.syncer.target.name
        self.halted = {"event": "halted", "target": name, "lost": e.deletes,
                       "files": e.remote_files, "paths": list(e.paths),
                       "since": round(time.time(), 3),
                       "message": f"halted: {e.message}; nothing is applied to {name} until "
                                  f"the files are back or you confirm",
                       "way_out": guard.way_out(name)}
        self.syncer.record(halted={k: self.halted[k] for k in
                                   ("lost", "files", "paths", "since", "way_out")})
        self.emit(self.halted)

    def _resume(self, reason: str) -> None:
        self.halted = None
        self.emit({"event": "resumed", "target": self.syncer.target.name, "reason": reason})

    def _confirmed_elsewhere(self) -> bool:
        """A `push --allow-mass-delete` (any process) cleared the halt from the record."""
        record = guard.load(self.syncer.root, self.syncer.target)
        return record is None or not record.halted

    def _while_halted(self, item) -> bool:
        """Take note of a batch while halted (nothing is sent). True: resume now."""
        syncer = self.syncer
        if item is None:
            return False
        batch, fresh, problems = item
        if batch.full:
            syncer.local = dict(syncer.scan_all().entries)
        else:
            syncer.note_paths(set(batch.paths), fresh, list(problems))
        if syncer.judge_whole().allowed:
            syncer.record()  # the losses as before the halt; the halt is over
            self._resume("files restored")
            return True
        return False

    # ---------------------------------------------------------------- the loop

    def run(self) -> None:
        self.restarter.start()
        try:
            self._loop()
        except SyncAgentError as e:
            self.fatal = e
            self.emit({"event": "error", "target": self.syncer.target.name, "error": str(e),
                       "fatal": True})
        except Exception as e:  # a bug: this target stops syncing, so the watch must say so
            # (and end, if it was the only one) rather than run on as if it were watching
            name = self.syncer.target.name
            self.fatal = OperationalError(f"{name}: stopped watching: {_internal(e)}")
            _emit_quietly(self.emit, {"event": "error", "target": name,
                                      "error": str(self.fatal), "fatal": True})
        finally:
            self.restarter.close()
            self.restarter.join(timeout=5)
            self.syncer.close()
            _emit_quietly(self.emit, {"event": "stopped", "target": self.syncer.target.name})

    def _loop(self) -> None:
        syncer, emit, stop, options = self.syncer, self.emit, self.stop_event, self.options
        name = syncer.target.name
        backoff = Backoff()
        connected, need_full, first_connect = False, True, True
        fresh = None  # the manifest a connect read: the reconcile that follows it uses it
        told_unprovisioned = False
        last_contact = last_work = time.monotonic()
        while not stop.is_set():
            if not connected:
                try:
                    fresh = syncer.connect()
                except ConnectError as e:
                    if first_connect and "authentication" in str(e):
                        raise
                    delay = backoff.next()
                    emit({"event": "disconnected", "target": name, "error": str(e),
                          "retry_in": delay})
                    stop.wait(delay)
                    continue
                connected, need_full, first_connect = True, True, False
                self.connected = True
                last_contact = time.monotonic()
                emit({"event": "connected", "target": name, "remote_root": syncer.remote_root})
                self.restarter.wake()
            try:
                if self.halted is not None and self._confirmed_elsewhere():
                    syncer.unconfirm()  # the next reconcile starts from the confirmed remote
                    self._resume("confirmed")
                    need_full = True
                if self.halted is not None and not need_full:
                    fresh = None  # older than the next reconcile: it reads its own
                    item = self._next()
                    if self._while_halted(item):
                        need_full = True
                    elif item is None and time.monotonic() - last_contact >= options.ping_every:
                        syncer.session.ping(options.ping_timeout)
                        last_contact = time.monotonic()
                    continue
                if need_full:
                    self._drop_queued()
                    t0 = time.monotonic()
                    remote, fresh = fresh, None
                    try:
                        result = self._reconcile(remote)
                    finally:
                        need_full = False  # refused: halted, no retry until something changes
                    if self.halted is not None:
                        syncer.record()
                        self._resume("files restored")
                    backoff.reset()
                    emit(_synced(result, time.monotonic() - t0, full=True))
                    last_contact = last_work = time.monotonic()
                    _release_memory()
                    if syncer.options.restart and syncer.provisioned:
                        live = (syncer.session.worker(syncer.remote_root)["worker"] or {}).get(
                            "live")
                        self.restarter.set_live((live or {}).get("revision"))
                        # code changed while we were away, or no worker is serving at all
                        self._restart_after(result, t0, nothing_serving=not live)
                    elif syncer.options.restart and not told_unprovisioned:
                        told_unprovisioned = True
                        emit({"event": "warning", "target": name,
                              "message": "no worker provisioned: syncing without restarts "
                                         f"(run `syncagent provision {name}`)"})
                    continue
                item = self._next()
                if item is None:
                    if time.monotonic() - last_contact >= options.ping_every:
                        syncer.session.ping(options.ping_timeout)
                        last_contact = time.monotonic()
                    if time.monotonic() - last_work >= CACHE_SAVE_QUIET_S:  # off the clock
                        syncer.save_cache()  # (written only if it changed)
                    continue
                batch, fresh, problems = item
                if batch.full:
                    result = self._reconcile()
                else:  # git's own changes keep their content in git: confirmed as made
                    result = syncer.sync_paths(batch.paths, fresh, problems,
                                               confirmed=GIT if batch.by_git else None)
                last_contact = last_work = time.monotonic()
                backoff.reset()
                if result.changed or batch.full:
                    emit(_synced(result, time.monotonic() - batch.first_event, batch.full,
                                 GIT if batch.by_git and result.deleted else None))
                self._restart_after(result, batch.first_event)
                for w in result.warnings:
                    emit({"event": "warning", "target": name, "message": w})
            except ConnectError as e:
                connected = self.connected = False
                syncer.close()
                emit({"event": "disconnected", "target": name, "error": str(e), "retry_in": 0})
            except MassDeleteError as e:
                self._halt(e)
            except SyncAgentError as e:
                if syncer.revision is None and e.exit_code != 1:
                    raise  # refused before anything was synced (safety, config): user acts
                emit({"event": "error", "target": name, "error": str(e)})
                need_full = True
                stop.wait(backoff.next())

    def _restart_after(self, result: PushResult, since: float,
                       nothing_serving: bool = False) -> None:
        """Queue a restart if the batch calls for one (``syncagent/restart.py`` decides); a
        batch that changed something and restarts nothing says why ("restart-skipped")."""
        syncer = self.syncer
        decision = syncer.restart_decision(result, self.restarter.settled_live(),
                                           nothing_serving)
        skipped = {"event": "restart-skipped", "target": syncer.target.name,
                   "revision": result.revision, "why": decision.why}
        if decision.restart:
            self.restarter.request(result.revision, since, decision.why)
        elif decision.back_at_live:
            if self.restarter.drop_pending():
                self.emit(skipped)
            else:  # a restart is running onto another revision: come back to this one
                self.restarter.request(result.revision, since, decision.why)
        elif result.changed and syncer.options.restart and syncer.provisioned:
            self.emit(skipped)


def _mergeable(batch: Batch, more: Batch) -> bool:
    """One sync may cover both: a full reconcile covers anything, and either git made both
    or neither."""
    return batch.full or more.full or batch.by_git == more.by_git


def _merged(item: tuple[Batch, dict | None, list], more: tuple[Batch, dict | None, list]):
    (batch, fresh, problems), (later, later_fresh, later_problems) = item, more
    full = batch.full or later.full
    fresh = None if full or fresh is None or later_fresh is None else {
        **{p: e for p, e in fresh.items() if p not in later.paths}, **later_fresh}
    problems = [p for p in problems if p[0] not in later.paths] + later_problems
    return (Batch(batch.paths | later.paths, full, batch.first_event,
                  batch.by_git and later.by_git), fresh, problems)


def _identity(root) -> tuple[int, int] | None:
    try:
        st = os.stat(root)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _root_gone(root) -> OperationalError:
    """The watched directory was renamed, deleted or replaced (``rm -rf`` and a fresh clone):
    what is at its path now is not what the watch reads events of, and syncing the tree it
    sees (empty) would delete the remote's files. Stop instead, before sending anything."""
    return OperationalError(f"the project root {root} was moved, deleted or replaced: stopped "
                            "watching; nothing was deleted on the remote because of it",
                            hint="run `syncagent watch` again where the project is now")


def _claim(target: Target) -> int:
    """Be the one watch of this machine that writes to ``target``'s remote root.

    Two watches of one remote path would both sync and both restart every save, and two of
    different local trees would delete each other's files. Keyed on where the files go, not
    on the local tree; the lock goes with the process (flock), so a killed watch leaves none.

    Returns:
        the lock's file descriptor (closed by :func:`watch` when it ends).
    Raises:
        SafetyError: another watch holds it.
    """
    key = json.dumps([target.host, target.port, target.user, target.ssh_config,
                      target.remote_path])
    name = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=10).hexdigest()
    directory = user_state_dir() / "watch"
    directory.mkdir(parents=True, mode=0o700, exist_ok=True)
    fd = os.open(directory / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder_pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SafetyError(f"another `syncagent watch` (pid {holder_pid}) is already syncing to "
                          f"{target.name} ({target.remote_path})",
                          hint="stop that one first; one watch per remote path") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def watch(project: Project, targets: Target | list[Target], emit: Emit, stop: threading.Event,
          push_options: PushOptions = PushOptions(), options: WatchOptions = WatchOptions(),
          policy: str = "rolling") -> None:
    """Keep every target equal to the local tree until ``stop`` is set.

    One watcher and one local re-hash per batch serve all targets; each target syncs on its
    own connection, so one that is down or slow does not hold up the others. With the
    ``rolling`` policy, targets restart one at a time (the next once the previous is live).

    Raises:
        SafetyError, ConfigError: every target was refused at its start (unknown host key,
            path escape, ...). Connection failures are retried with backoff, never raised; a
            mass delete halts its target (see above), it does not end the watch.
        SafetyError: another watch on this machine already syncs to one of the targets.
    """
    targets = [targets] if isinstance(targets, Target) else list(targets)
    claims: list[int] = []
    try:
        for t in targets:
            claims.append(_claim(t))
        _watch(project, targets, emit, stop, push_options, options, policy)
    finally:
        for fd in claims:
            os.close(fd)


def _watch(project: Project, targets: list[Target], emit: Emit, stop: threading.Event,
           push_options: PushOptions, options: WatchOptions, policy: str) -> None:
    root_id = _identity(project.root)
    rules = local_rules(str(project.root), project.exclude, project.protect)
    watcher = Watcher(str(project.root), rules, quiet=options.quiet,
                      max_wait=options.max_wait, git_hold=options.git_hold,
                      polling=options.polling)
    watcher.start()  # before the first reconcile: an edit made during it is not lost
    gate = threading.Lock() if restart_mod.one_at_a_time(policy, len(targets)) else None
    cache = agent.load_digest_cache(str(project.root))  # one, shared by every target
    loops = [TargetLoop(Syncer(project, t, push_options, rules, cache), emit, stop, options,
                        gate) for t in targets]
    for loop in loops:
        loop.start()
    if len(loops) == 1 and holder.enabled(project):  # a `push` meanwhile is a flush
        holder.serve_watch(project, targets[0], loops[0].flush, push_options, stop)
    compiled = rules.compiled()
    warned = 0
    try:
        while not stop.is_set():
            if all(not loop.is_alive() for loop in loops):
                break
            batch = watcher.next_batch(timeout=0.25)  # wakes up for `stop` too
            while len(watcher.warnings) > warned:
                emit({"event": "warning", "target": "*", "message": watcher.warnings[warned]})
                warned += 1
            if _identity(project.root) != root_id:
                raise _root_gone(project.root)
            if batch is None:
                continue
            fresh, problems = None, []
            if not batch.full:  # read and hash once for all targets
                fresh = agent.scan_paths(str(project.root), compiled, batch.paths, cache,
                                         problems)
            for loop in loops:
                if loop.is_alive():
                    loop.submit(batch, fresh, problems)
    finally:
        stop.set()
        watcher.stop()
        for loop in loops:
            loop.join(timeout=10)
        if _identity(project.root) == root_id:  # never into a tree that replaced it
            agent.save_digest_cache(str(project.root), cache)
    fatal = [loop.fatal for loop in loops if loop.fatal is not None]
    if fatal and len(fatal) == len(loops):
        raise fatal[0]
