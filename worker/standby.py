"""The parked standby: a worker slot that has done its third-party imports before the save.

A restart then costs only the project's own imports and Celery's consumer start. The agent
asks a stopped slot to park (``park-<colour>`` in the state dir, then a normal supervisord
start); the launcher sees the request and, instead of running the worker, calls :func:`park`:

1. imports the modules the app had loaded outside the project root at its last successful
   start (``modules.json``, written by :func:`record_modules` at ``worker_ready``; never a
   module under the project root);
2. writes ``standby-<colour>.json`` (pid, fingerprint, what it imported, threads and sockets
   open) and waits, with SIGUSR1 blocked: no thread, no broker or API connection;
3. on ``go-<colour>.json`` (the revision; the agent writes it, then sends SIGUSR1) it drops its
   park request and returns the revision: the launcher goes on with the project's code.

While parked it re-checks its :func:`fingerprint` (requirements, ``.env.worker``, the module
record, the runtime's digest) and the files it was started from (the interpreter, the env's ready file); when one
changed it exits with :data:`STALE_EXIT` and supervisord starts it again, fresh. The agent
checks the same fingerprint before it says go, and starts cold when it does not match.

Stdlib only: the agent (``syncagent/agent.py``) computes the fingerprint the same way.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from worker import envs, ready

__all__ = ["STALE_EXIT", "fingerprint", "park", "park_requested", "project_module",
           "record_modules", "recorded_modules", "take_go"]

log = logging.getLogger("worker.standby")
STALE_EXIT = 75  # unexpected for supervisord: it starts the slot again, which parks afresh
CHECK_EVERY_S = 0.5
# the runtime's digest: a standby runs the launcher it was started with (provision ships a new one)
_FINGERPRINT_FILES = (".env.worker", ".syncagent/modules.json",
                      ".syncagent/runtime/worker.digest")


def _state(root: str | os.PathLike[str], name: str) -> Path:
    return ready.state_dir(root) / name


def park_requested(root: str | os.PathLike[str], colour: str) -> bool:
    """True when the agent asked ``colour`` to park under this supervisord (a request left by
    a supervisord that died is void: a new one's autostart runs the worker) and has not said
    go yet."""
    try:
        data = json.loads(_state(root, f"park-{colour}").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("supervisor") == os.getppid() and \
        not _state(root, f"go-{colour}.json").exists()


def fingerprint(root: str | os.PathLike[str]) -> str:
    """sha256 over what a standby imported from: the requirements files (names and content),
    ``.env.worker``, the module record and the runtime's digest. The agent computes it the
    same way."""
    digest = hashlib.sha256()
    root_path = Path(root)
    names = sorted(p.name for p in root_path.glob("requirements*.txt") if p.is_file())
    for name in [*names, *_FINGERPRINT_FILES]:
        try:
            data = (root_path / name).read_bytes()
        except OSError:
            data = b"\0missing"
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


def _realpath(path: str, cache: dict[Any, Any] | None) -> str:
    """``os.path.realpath``, resolving each directory once per ``cache`` (a record walks
    ~1,300 modules in a few hundred directories, at worker_ready, before the readiness marker:
    a realpath each cost the heavy app ~90 ms of every restart)."""
    if cache is None:
        return os.path.realpath(path)
    head, tail = os.path.split(path)
    if os.path.islink(path):
        return os.path.realpath(path)
    real_head = cache.get(("dir", head))
    if real_head is None:
        real_head = cache[("dir", head)] = os.path.realpath(head)
    return os.path.join(real_head, tail)


def _under(path: str | None, roots: Iterable[str],
           cache: dict[Any, Any] | None = None) -> bool:
    """True for a path under one of ``roots``, but not in an installed-packages folder (an env
    under ``.syncagent/envs``, a ``venv/`` in the project: third-party code)."""
    if not path:
        return False
    real = _realpath(path, cache)
    parts = real.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return False
    return any(real == r or real.startswith(r + os.sep) for r in roots)


def project_module(name: str, module: Any, root: str | os.PathLike[str],
                   cache: dict[Any, Any] | None = None) -> bool:
    """True for a module of the project (its file or package path under ``root``, or its
    top-level name a file or folder in ``root``), and for ``__main__``: never imported ahead.
    ``cache`` (one dict per walk over ``sys.modules``) keeps resolved paths."""
    real_root = os.path.realpath(root) if cache is None else \
        cache.setdefault(("root", str(root)), os.path.realpath(root))
    top = name.split(".", 1)[0]
    if name == "__main__" or top in ("__main__", "__mp_main__"):
        return True
    paths = [getattr(module, "__file__", None), *list(getattr(module, "__path__", None) or [])]
    paths = [p for p in paths if isinstance(p, str)]
    inside = [_under(p, [real_root], cache) for p in paths]
    if paths and not any(inside):
        return False  # installed elsewhere, whatever the project's folders are called
    if any(inside):
        return True
    named = None if cache is None else cache.get(("top", top))
    if named is None:
        named = os.path.exists(os.path.join(real_root, top)) or \
            os.path.exists(os.path.join(real_root, top + ".py"))
        if cache is not None:
            cache[("top", top)] = named
    return named


def record_modules(root: str | os.PathLike[str]) -> int:
    """Write ``modules.json``: the loaded modules outside the project, in import order.

    Rewritten only when the set changed (the fingerprint of every parked standby includes it).

    Returns:
        The number of modules recorded.
    """
    cache: dict[Any, Any] = {}
    names = [name for name, module in list(sys.modules.items())
             if module is not None and not project_module(name, module, root, cache)]
    path = _state(root, "modules.json")
    if set(recorded_modules(root)) != set(names):
        ready.write_json_atomic(path, {"modules": names, "python": sys.executable,
                                       "time": time.time()})
    return len(names)


def recorded_modules(root: str | os.PathLike[str]) -> list[str]:
    """The module record (empty when there is none, or it was made by another interpreter)."""
    try:
        data = json.loads(_state(root, "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict) or data.get("python") != sys.executable:
        return []
    return [n for n in data.get("modules") or [] if isinstance(n, str)]


def _import_all(root: str | os.PathLike[str], names: list[str]) -> tuple[int, int]:
    """Import the recorded modules (project modules refused again); return (ok, failed)."""
    ok = failed = 0
    for name in names:
        if name in sys.modules:
            ok += 1
            continue
        try:
            module = importlib.import_module(name)
        except Exception:  # a module that only imports in its app's context: skip it
            failed += 1
            continue
        if project_module(name, module, root):  # a name that turned out to be the project's
            failed += 1
        else:
            ok += 1
    return ok, failed


def _sockets() -> int:
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    count = 0
    for fd in fds:
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def _watched() -> list[list[Any]]:
    """Files whose change makes this standby stale: the interpreter and the env's ready file."""
    out = []
    for path in (os.path.realpath(sys.executable), os.path.join(sys.prefix, envs.READY_FILE)):
        try:
            out.append([path, os.stat(path).st_mtime_ns])
        except OSError:
            pass
    return out


def _stale(root: str | os.PathLike[str], marker: dict[str, Any]) -> str | None:
    if fingerprint(root) != marker["fingerprint"]:
        return "requirements, .env.worker or the module record changed"
    for path, mtime in marker["watch"]:
        try:
            if os.stat(path).st_mtime_ns != mtime:
                return f"{path} changed"
        except OSError:
            return f"{path} is gone"
    return None


def _read_go(root: str | os.PathLike[str], colour: str) -> dict[str, Any] | None:
    try:
        data = json.loads(_state(root, f"go-{colour}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("revision"), str) else None


def take_go(root: str | os.PathLike[str], colour: str) -> dict[str, Any] | None:
    """A go request left for a slot that starts cold (its standby died as it came): its
    revision wins; the request and the park request are consumed."""
    go = _read_go(root, colour)
    if go is not None:
        _forget(root, f"park-{colour}", f"go-{colour}.json")
    return go


def _forget(root: str | os.PathLike[str], *names: str) -> None:
    for name in names:
        try:
            _state(root, name).unlink()
        except FileNotFoundError:
            pass


def park(root: str | os.PathLike[str], colour: str) -> dict[str, Any] | None:
    """Import ahead, announce the standby, wait for go.

    Returns:
        The go request ``{"revision", "time"}`` plus ``"parked_s"`` (how long it waited), or
        None when the standby went stale (the caller exits with :data:`STALE_EXIT`).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # before the agent may send it
    started = time.monotonic()
    marker = {"fingerprint": fingerprint(root), "watch": _watched()}
    ok, failed = _import_all(root, recorded_modules(root))
    marker.update(pid=os.getpid(), colour=colour, time=time.time(), modules=ok,
                  failed_modules=failed, import_s=round(time.monotonic() - started, 3),
                  threads=threading.active_count(), sockets=_sockets())
    ready.write_json_atomic(_state(root, f"standby-{colour}.json"), marker)
    log.info("standby %s parked: %d modules imported ahead in %.2f s (%d failed), %d "
             "thread(s), %d socket(s)", colour, ok, marker["import_s"], failed,
             marker["threads"], marker["sockets"])
    parked = time.monotonic()
    try:
        while True:
            go = _read_go(root, colour)
            if go is not None:
                _forget(root, f"park-{colour}", f"go-{colour}.json")
                go["parked_s"] = round(time.monotonic() - parked, 3)
                return go
            reason = _stale(root, marker)
            if reason:
                log.info("standby %s is stale (%s): starting afresh", colour, reason)
                return None
            signal.sigtimedwait([signal.SIGUSR1], CHECK_EVERY_S)
    finally:
        _forget(root, f"standby-{colour}.json")
        # the agent's wake-up may still come (it writes go, then signals): ignored, not fatal
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
