"""Remote state paths and the readiness marker.

The state directory is ``<root>/.syncagent/`` (mode 0700). It holds:

* ``revision``: JSON ``{"revision", "time", "files"}`` written by the push;
* ``requirements.sha256``: hash of the last successfully installed requirements;
* ``ready-<colour>.json``: readiness marker ``{"revision", "pid", "node", "time", "colour",
  "warm", "parked_s"}`` (``warm``: a parked standby started, see :mod:`worker.standby`),
  written atomically from Celery's ``worker_ready`` signal and removed on ``worker_shutdown``;
* ``imports-<colour>.json``: the project files the slot's worker has imported
  ``{"pid", "revision", "files"}`` (posix paths relative to the root), written at ready and
  again after a task whenever the set grew: a batch that touches none of them needs no restart;
* ``stopped-fetching-<colour>.json``: ``{"pid", "time"}``, written by the worker once it has
  stopped fetching tasks on ``SIGUSR2`` (the marker's ``stop_fetching``): the agent sends it to
  the old colour of a switch before its TERM, so no task waits in a stopping worker;
* ``failed-<colour>.json``: the slot's failed starts ``{"revision", "error", "count",
  "supervisor", "time", "colour"}``: written by the launcher when it exits before the marker,
  removed when the slot gets ready or is started on purpose (a restart, a provision).
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "COLOURS",
    "FAILED_START_EXIT",
    "GAVE_UP_EXIT",
    "MAX_STARTS",
    "STATE_DIR_NAME",
    "UNKNOWN_REVISION",
    "colour_from_env",
    "connect_signals",
    "clear_failed_start",
    "ensure_state_dir",
    "failed_start_path",
    "imports_path",
    "project_imports",
    "read_imports",
    "record_imports",
    "marker_path",
    "read_failed_start",
    "read_marker",
    "record_failed_start",
    "read_revision",
    "remove_marker",
    "requirements_state_path",
    "revision_path",
    "short_revision",
    "state_dir",
    "STOP_FETCHING_SIGNAL",
    "stopped_fetching_path",
    "write_json_atomic",
    "write_marker",
]

STATE_DIR_NAME = ".syncagent"
# Three slots: a restart starts an idle one while the last replaced one may still be finishing
# its tasks (a warm stop), so back-to-back restarts never wait for a drain.
COLOURS = ("blue", "green", "red")
# A worker that exits before its readiness marker has failed to start (worker/launch.py): a
# start and two retries, then the slot stays down. The exit codes, here because the program
# conf (worker/supervisor_conf.py, stdlib only) names them too.
MAX_STARTS = 3
FAILED_START_EXIT = 1  # supervisord restarts it (autorestart=unexpected)
GAVE_UP_EXIT = 78  # listed in the program's exitcodes: supervisord leaves the slot down
UNKNOWN_REVISION = "unknown"
# Sent by the agent to the colour a switch replaces: cancel every task queue's consumer (the
# broker gets any message in flight back at once), then say so. Free in Celery (its remote
# debugger takes it only when CELERY_RDBSIG is set); the marker names it, so the agent never
# sends it to a worker that would die of it.
STOP_FETCHING_SIGNAL = "USR2"
_SHORT_UNKNOWN = "0000000"


def state_dir(root: str | os.PathLike[str]) -> Path:
    """Return the state directory ``<root>/.syncagent`` (not created)."""
    return Path(root) / STATE_DIR_NAME


def ensure_state_dir(root: str | os.PathLike[str]) -> Path:
    """Create the state directory with mode 0700 if needed.

    Returns:
        The state directory path.
    """
    path = state_dir(root)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def revision_path(root: str | os.PathLike[str]) -> Path:
    """Return ``<root>/.syncagent/revision`` (written by the push)."""
    return state_dir(root) / "revision"


def requirements_state_path(root: str | os.PathLike[str]) -> Path:
    """Return ``<root>/.syncagent/requirements.sha256``."""
    return state_dir(root) / "requirements.sha256"


def marker_path(root: str | os.PathLike[str], colour: str) -> Path:
    """Return the readiness marker path ``<root>/.syncagent/ready-<colour>.json``."""
    return state_dir(root) / f"ready-{colour}.json"


def failed_start_path(root: str | os.PathLike[str], colour: str) -> Path:
    """Return ``<root>/.syncagent/failed-<colour>.json`` (the slot's failed starts)."""
    return state_dir(root) / f"failed-{colour}.json"


def read_failed_start(root: str | os.PathLike[str], colour: str) -> dict[str, Any] | None:
    """Return the slot's failed-start record, or None when it has none."""
    try:
        data = json.loads(failed_start_path(root, colour).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def record_failed_start(root: str | os.PathLike[str], colour: str, revision: str, error: str,
                        supervisor: int) -> int:
    """Count one more failed start of ``colour`` and keep its error line.

    The count goes on only under the same supervisord (``supervisor``, its pid): a new
    supervisord (a reboot, a provision) starts counting afresh.

    Returns:
        The number of failed starts in a row, this one included.
    """
    previous = read_failed_start(root, colour) or {}
    count = int(previous.get("count") or 0) + 1 if previous.get("supervisor") == supervisor \
        else 1
    ensure_state_dir(root)
    write_json_atomic(failed_start_path(root, colour), {
        "revision": revision, "error": error, "count": count, "supervisor": supervisor,
        "time": time.time(), "colour": colour})
    return count


def clear_failed_start(root: str | os.PathLike[str], colour: str) -> None:
    """Forget the slot's failed starts (it got ready, or it is started on purpose)."""
    try:
        failed_start_path(root, colour).unlink()
    except FileNotFoundError:
        pass


def imports_path(root: str | os.PathLike[str], colour: str) -> Path:
    """Return ``<root>/.syncagent/imports-<colour>.json`` (the worker's imported project files)."""
    return state_dir(root) / f"imports-{colour}.json"


_THIRD_PARTY = ("site-packages", "dist-packages")


def project_imports(root: str | os.PathLike[str], modules: dict | None = None) -> set[str]:
    """The files under ``root`` that the loaded modules came from (posix, relative).

    Environments inside the root (``venv/``, ``.venv/``) are third-party code, never synced.
    No system call per module: paths are compared as strings, against the root as given and
    as resolved.
    """
    prefixes = {os.path.abspath(root) + os.sep, os.path.realpath(root) + os.sep}
    found = set()
    for module in list((sys.modules if modules is None else modules).values()):
        path = getattr(module, "__file__", None)
        if not isinstance(path, str):
            continue
        path = os.path.abspath(path)
        for prefix in prefixes:
            if path.startswith(prefix):
                rel = path[len(prefix):].replace(os.sep, "/")
                if not any(part in _THIRD_PARTY for part in rel.split("/")):
                    found.add(rel)
                break
    return found


def read_imports(root: str | os.PathLike[str], colour: str) -> dict[str, Any] | None:
    """Return the slot's imports record, or None when absent or unreadable."""
    try:
        data = json.loads(imports_path(root, colour).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def record_imports(root: str | os.PathLike[str], colour: str, revision: str, pid: int,
                   files: set[str]) -> None:
    """Add ``files`` to the slot's record for worker ``pid`` (a record of another pid is
    replaced). Pool processes of one worker add theirs under a lock: none is lost."""
    ensure_state_dir(root)
    with open(state_dir(root) / f".imports-{colour}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = read_imports(root, colour) or {}
        known = set(previous.get("files") or ()) if previous.get("pid") == pid else set()
        if files <= known and previous:
            return
        write_json_atomic(imports_path(root, colour), {
            "pid": pid, "revision": revision, "files": sorted(known | files)})


def stopped_fetching_path(root: str | os.PathLike[str], colour: str) -> Path:
    """Return ``<root>/.syncagent/stopped-fetching-<colour>.json``."""
    return state_dir(root) / f"stopped-fetching-{colour}.json"


def _stop_fetching_on_signal(root: str | os.PathLike[str], colour: str, consumer: Any,
                             main_pid: int) -> None:
    """On ``SIGUSR2``: cancel the consumer of every task queue (in-flight tasks run on), then
    write ``stopped-fetching-<colour>.json`` once nothing more can come.

    A fetch already asked of the broker (Redis: a BRPOP of up to 1 s) may still bring a
    message after the cancel; kombu hands it back to the queue at once (its consumer is gone),
    but only if the event loop reads the answer before the warm stop. So that fetch is cut
    short (``CLIENT UNBLOCK``, on another connection), and the answer is written only once the
    loop has read the fetch's reply (a short thread watches; never longer than
    ``STOP_FETCHING_WAIT_S``: the agent stops the worker then anyway).
    """

    def stopped() -> None:
        write_json_atomic(stopped_fetching_path(root, colour),
                          {"pid": main_pid, "time": time.time()})

    def stop_fetching(_signum: int, _frame: Any) -> None:
        task_consumer = getattr(consumer, "task_consumer", None)
        if task_consumer is None:
            return
        for queue in [q.name for q in task_consumer.queues]:
            consumer.cancel_task_queue(queue)
        channel = task_consumer.channel
        if not getattr(channel, "_in_poll", None):
            stopped()
            return
        _cut_fetch_short(channel)
        threading.Thread(target=_when_read, args=(channel, stopped), daemon=True,
                         name="syncagent-stop-fetching").start()

    signal.signal(getattr(signal, "SIG" + STOP_FETCHING_SIGNAL), stop_fetching)


STOP_FETCHING_WAIT_S = 1.0


def _cut_fetch_short(channel: Any) -> None:
    """Make a Redis channel's pending BRPOP answer now (nil, or a message it had taken)."""
    try:
        import redis

        addr = "%s:%s" % channel._in_poll._sock.getsockname()[:2]
        other = redis.Redis(connection_pool=channel.client.connection_pool)
        try:
            for client in other.client_list():
                if client.get("addr") == addr:
                    other.client_unblock(int(client["id"]))
        finally:
            other.close()
    except Exception:  # another transport, an old Redis: the fetch ends at its timeout
        pass


def _when_read(channel: Any, then: Callable[[], None]) -> None:
    until = time.monotonic() + STOP_FETCHING_WAIT_S
    while getattr(channel, "_in_poll", None) and time.monotonic() < until:
        time.sleep(0.002)
    if not getattr(channel, "_in_poll", None):
        then()


def colour_from_env(environ: dict[str, str] | None = None) -> str:
    """Return ``SYNCAGENT_COLOUR`` (one of COLOURS), defaulting to blue.

    Raises:
        ValueError: the variable holds another value.
    """
    value = (environ if environ is not None else os.environ).get("SYNCAGENT_COLOUR", "blue")
    value = value.strip().lower() or "blue"
    if value not in COLOURS:
        raise ValueError(f"SYNCAGENT_COLOUR must be one of {', '.join(COLOURS)}, "
                         f"got {value!r}")
    return value


def read_revision(root: str | os.PathLike[str]) -> str:
    """Read the pushed revision from the revision file.

    Returns:
        The revision string, or ``"unknown"`` when the file is absent or unreadable.
    """
    try:
        data = json.loads(revision_path(root).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return UNKNOWN_REVISION
    revision = data.get("revision") if isinstance(data, dict) else None
    return revision if isinstance(revision, str) and revision else UNKNOWN_REVISION


def short_revision(revision: str) -> str:
    """Return the first 7 characters of a hex revision, ``"0000000"`` when unknown."""
    text = revision.strip().lower()
    if len(text) >= 7 and all(c in "0123456789abcdef" for c in text):
        return text[:7]
    return _SHORT_UNKNOWN


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temp file beside ``path``, fsync, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_marker(root: str | os.PathLike[str], colour: str, revision: str, node: str,
                 pid: int | None = None, stop_fetching: str | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write the readiness marker atomically.

    Args:
        root: project root.
        colour: blue or green.
        revision: full revision the worker runs.
        node: Celery node name.
        pid: worker main pid (default: this process).
        stop_fetching: the signal that makes this worker stop fetching tasks, if it has one.
        extra: more fields (they never replace the ones above).

    Returns:
        The marker path.
    """
    ensure_state_dir(root)
    path = marker_path(root, colour)
    marker = {
        **(extra or {}),
        "revision": revision,
        "pid": pid if pid is not None else os.getpid(),
        "node": node,
        "time": time.time(),
        "colour": colour,
    }
    if stop_fetching:
        marker["stop_fetching"] = stop_fetching
    write_json_atomic(path, marker)
    return path


def read_marker(root: str | os.PathLike[str], colour: str) -> dict[str, Any] | None:
    """Return the parsed readiness marker, or None when absent or unreadable."""
    try:
        data = json.loads(marker_path(root, colour).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_marker(root: str | os.PathLike[str], colour: str, pid: int | None = None) -> bool:
    """Remove the marker if it belongs to ``pid`` (default: this process).

    Returns:
        True when a marker was removed.
    """
    owner = pid if pid is not None else os.getpid()
    data = read_marker(root, colour)
    if data is not None and data.get("pid") not in (owner, None):
        return False
    try:
        marker_path(root, colour).unlink()
    except FileNotFoundError:
        return False
    return True


def connect_signals(root: str | os.PathLike[str], colour: str, revision: str,
                    default_node: str | None = None,
                    extra: dict[str, Any] | None = None) -> tuple[Callable[..., None], ...]:
    """Connect ``worker_ready``/``worker_shutdown`` to write/remove the marker, and keep the
    imports record (``imports-<colour>.json``): at ready, then after any task that grew
    ``sys.modules`` (one ``len()`` when it did not).

    Args:
        root: project root.
        colour: blue or green.
        revision: full revision the worker runs.
        default_node: node name used when the signal sender has none.
        extra: more marker fields (the launcher's ``warm``: whether a parked standby started).

    Returns:
        The connected receivers (kept alive by strong references).
    """
    from celery import signals

    main_pid = os.getpid()
    fallback = default_node or socket.gethostname()

    seen = [0]  # len(sys.modules) at the last record, in this process

    def note_imports() -> None:
        if len(sys.modules) == seen[0]:
            return
        seen[0] = len(sys.modules)
        record_imports(root, colour, revision, main_pid, project_imports(root))

    def on_ready(sender: Any = None, **_: Any) -> None:
        node = getattr(sender, "hostname", None) or fallback
        note_imports()  # before the marker: whoever sees the worker live sees what it imports
        stop_fetching = None
        if os.getpid() == main_pid and sender is not None:
            _stop_fetching_on_signal(root, colour, sender, main_pid)
            stop_fetching = STOP_FETCHING_SIGNAL
        write_marker(root, colour, revision, node, pid=main_pid, stop_fetching=stop_fetching,
                     extra=extra)
        clear_failed_start(root, colour)

    def on_task_done(**_: Any) -> None:
        try:
            note_imports()
        except OSError:  # never a task's failure; the next task tries again
            seen[0] = 0

    def on_shutdown(sender: Any = None, **_: Any) -> None:
        if os.getpid() == main_pid:
            remove_marker(root, colour, pid=main_pid)

    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)
    signals.task_postrun.connect(on_task_done, weak=False)
    return on_ready, on_shutdown, on_task_done
