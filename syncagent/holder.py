"""A warm path for repeated commands: one background holder per project and set of targets.

The first ``push``, ``status``, ``restart`` or ``logs`` for a target leaves a small process
behind, as OpenSSH's ControlPersist does: it holds the SSH connection and the agent, and exits
after ``holder_idle`` seconds without a command. A ``push`` to several targets (a fleet:
``push a b c``, a group, ``--all``) leaves one holder for that set, holding one session per
target; it runs the very same ``push_many`` as a direct fleet push, so the rolling or parallel
restart order is the one the command line gives. A later command hands it its argv over a 0600
unix socket; the holder runs the very same command code on its held session(s) (so the safety
policy, protected paths, exit codes and ``--json`` output are those of a direct run) and answers
with the command's output and exit code. It revalidates both sides each time: the local tree is
scanned with the digest cache kept in memory (stat-level, racy entries re-hashed), and the agent
walks the remote tree again, sending only what changed since the manifest it sent last time
(``push.Warm``; the holder keeps that manifest). The digest cache is written to disk after the
answer.

The holder is never required: when none answers, or it dies mid-command, the client runs the
command directly. The client side (``forward``, ``spawn``) imports only the standard library and
``config``; a client that a route leads to its holder (``syncagent.wire``), only the standard
library. The holder process (``serve``) imports the command code.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import io
import json
import os
import socket
import struct
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Sequence, Union

from . import wire
from .config import Project, Target
from .entry import COMMANDS
from .wire import Answer, UnsafeDir, recv, send

__all__ = ["Answer", "Taken", "UnsafeDir", "forward", "spawn", "ping", "socket_path",
           "runtime_dir", "enabled", "serve", "serve_watch", "COMMANDS"]

LOOK_EVERY = 1.0  # seconds between a waiting holder's looks at its connections
SERVING = False  # true inside a holder process: its commands never forward nor spawn


class Taken(Exception):
    """Another process (a holder, a watch) serves this socket already."""


Targets = Union[Target, Sequence[Target]]  # one target, or a fleet's


# ------------------------------------------------------------------ where the socket lives

def runtime_dir() -> Path:
    """``wire.runtime_dir``: created 0700, checked private (raises UnsafeDir)."""
    return Path(wire.runtime_dir())


def _code_stamp() -> list:
    """The installed command code: a holder started before it changed never serves."""
    here = Path(__file__).parent
    return sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in here.glob("*.py"))


def _as_list(targets: Targets) -> list[Target]:
    """The set of targets a holder serves, in one order (by name): ``push b a`` and
    ``push a b`` find the same holder (which runs each in its own command line's order)."""
    if isinstance(targets, Target):
        return [targets]
    return sorted(targets, key=lambda t: t.name)


def socket_path(root: str | os.PathLike, targets: Targets) -> Path:
    """The holder's socket for this project and target, or set of targets (every field of
    each target counts)."""
    key = json.dumps([os.path.realpath(str(root)),
                      [dataclasses.asdict(t) for t in _as_list(targets)], _code_stamp()],
                     sort_keys=True, default=str)
    name = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=12).hexdigest()
    return runtime_dir() / f"{name}.sock"


def enabled(project: Project, flag_off: bool = False) -> bool:
    """The holder is wanted: not ``--no-holder``, ``SYNCAGENT_HOLDER=0`` or ``holder = false``,
    and this is not a holder process itself."""
    return not SERVING and not flag_off and project.holder and wire.env_allows()


# ------------------------------------------------------------------ client side

def forward(root: str | os.PathLike, targets: Targets, argv: list[str]) -> Answer | None:
    """Run ``argv`` (a whole ``syncagent`` command line) in the holder of its target(s), and
    remember the way for the next time (``wire.run``).

    Returns:
        the command's output and exit code; None when no holder answered in full: the
        caller runs the command directly.
    """
    try:
        path = socket_path(root, targets)
    except (OSError, UnsafeDir):
        return None
    return wire.run(str(path), argv) if path.exists() else None


def ping(root: str | os.PathLike, targets: Targets, timeout: float = 2.0) -> dict | None:
    """{"pid", "served", "connected", "warm"} of the holder of ``targets``, or None when none
    answers ("connected": it holds a session for each of them; "warm": and the manifest each
    one's agent last sent)."""
    try:
        return wire.ask(str(socket_path(root, targets)), {"op": "ping"}, timeout)
    except (OSError, ValueError, UnsafeDir, struct.error):
        return None


def spawn(project: Project, targets: Targets, warm_up: bool = False) -> str | None:
    """Start the holder of ``targets`` in the background (it detaches, then connects on its
    own; ``warm_up``: then walks both trees for the push that will likely follow, see
    ``_warm_up``).

    Returns:
        None once started; else why not (the runtime directory is not this user's alone...).
    """
    try:
        path = socket_path(project.root, targets)
    except (OSError, UnsafeDir) as e:
        return str(e)
    log = os.open(path.with_suffix(".log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
                  0o600)
    import subprocess  # here: the client side of a held command never spawns

    try:
        subprocess.run(  # returns once the holder has forked itself away from us
            [sys.executable, "-m", "syncagent.holder", str(project.root),
             json.dumps([dataclasses.asdict(t) for t in _as_list(targets)]),
             str(project.holder_idle), *(["warm-up"] if warm_up else [])],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            close_fds=True, timeout=30,
            # not the caller's directory: ``-m`` puts it first on sys.path, and a checkout
            # there (or any ``syncagent/`` in it) would be imported instead of this code
            cwd="/")
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        os.close(log)
    return None


# ------------------------------------------------------------------ the holder process

class _Held:
    """The held sessions, one per target the holder serves: each handed out while its
    connection is up, its agent answers and known_hosts still vouches for the key it was
    opened with (checked for each target on its own, in the thread that opens it: a fleet's
    targets are revalidated at once, as a direct fleet push connects them at once)."""

    def __init__(self, targets: list[Target]):
        self.targets = list(targets)
        self.sessions: dict[Target, object] = {}
        self._locks = {t: threading.Lock() for t in self.targets}

    def open(self, target: Target, *, trust_new: bool = False, timeout: float = 10.0):
        from .session import Session

        if target not in self._locks:
            return Session.open_new(target, trust_new=trust_new, timeout=timeout)
        with self._locks[target]:
            session = self.sessions.get(target)
            if session is not None and not _usable(session):
                self.drop(target)
                session = None
            if session is None:
                session = self.sessions[target] = _held_session_class().open_new(
                    target, trust_new=trust_new, timeout=timeout)
            return session

    def connect_all(self) -> None:
        """Open every target's session at once (a holder's start); a target that cannot be
        reached is said on stderr, and its first command says why on its own connection."""
        def connect(target: Target) -> None:
            try:
                self.open(target)
            except Exception as e:
                print(f"holder: {target.name}: not connected: {e}", file=sys.stderr,
                      flush=True)

        threads = [threading.Thread(target=connect, args=(t,)) for t in self.targets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    @property
    def connected(self) -> bool:
        return all(t in self.sessions for t in self.targets)

    def all_lost(self) -> bool:
        """Every session it opened has gone (the remotes went away: ``sandbox down``, a
        reboot, the network): nothing is held but what a new command builds again."""
        sessions = list(self.sessions.values())
        return bool(sessions) and not any(_alive(s) for s in sessions)

    def drop_lost(self) -> None:
        """Close the sessions whose connection or agent channel has gone: a failed command
        cuts the channel whose stream it left out of step (``session._Channel``). The others
        are revalidated before their next use (``_usable``), as every held session is: a
        fleet's target that failed does not cost the others their connections."""
        for t, session in list(self.sessions.items()):
            if not _alive(session):
                self.drop(t)

    def drop(self, target: Target | None = None) -> None:
        """Close ``target``'s held session (None: every one)."""
        for t in [target] if target is not None else list(self.sessions):
            session = self.sessions.pop(t, None)
            if session is not None:
                session.really_close()


def _alive(session) -> bool:
    """The connection is up and the agent's channel open (no round trip)."""
    transport = session.client.get_transport()
    return transport is not None and transport.is_active() and not session.channel.chan.closed


def _usable(session) -> bool:
    try:
        if not _alive(session) or not _still_trusted(session):
            return False
        session.ping(timeout=5.0)
        return True
    except Exception:
        return False


def _still_trusted(session) -> bool:
    """The key the held connection was opened with is still the one known_hosts names (the
    check a new connection makes; a changed or removed record ends the held connection)."""
    import paramiko

    from .transport import resolve_endpoint

    ep = resolve_endpoint(session.target)
    if ep != session.endpoint:
        return False
    keys = paramiko.HostKeys()
    for path in ("/etc/ssh/ssh_known_hosts", ep.known_hosts):
        if os.path.isfile(path):
            keys.load(path)
    return bool(keys.check(ep.host_key_name, session.client.get_transport()
                           .get_remote_server_key()))


@functools.lru_cache(maxsize=None)
def _held_session_class():
    from .session import Session

    class HeldSession(Session):
        """Outlives the commands that use it: their ``close()`` leaves it open."""

        def close(self) -> None:
            pass

        def really_close(self) -> None:
            Session.close(self)

    return HeldSession


def _run(request: dict, held: _Held, warm, path: Path) -> dict:
    """One client's command, run here exactly as the client would have run it (``path``:
    this holder's socket; a routed command is run only if it is the one its argv leads to)."""
    from .cli import main

    argv = [str(a) for a in request["argv"]]
    if not argv or argv[0] not in COMMANDS:
        return {"code": 2, "out": "", "err": "syncagent: error: not a holder command\n"}
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in request["env"].items()})
        os.chdir(request["cwd"])
        if request.get("routed") and not _leads_here(argv, path):
            return {"decline": True}
        with redirect_stdout(out), redirect_stderr(err):
            code = main(argv)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    if code != 0:  # after a failure: a connection it cut goes, the remotes are read afresh
        held.drop_lost()
        warm.forget()
    return {"code": code, "out": out.getvalue(), "err": err.getvalue(), "routable": True}


def _leads_here(argv: list[str], path: Path) -> bool:
    """``argv``, read here (the client's directory and environment) as the client's long way
    reads it, names this holder's project and targets, with the holder wanted, and this code
    (the socket's name says both)."""
    from .entry import resolve

    found = resolve(argv)
    return (found is not None and found[0].holder
            and socket_path(found[0].root, found[1]) == path)


def _peer_is_me(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def _listen(path: Path) -> tuple[socket.socket, int, int]:
    """Bind the socket (0600 from the start); one holder per socket, kept by a lock file."""
    lock = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        raise Taken(str(path)) from None
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock, lock, os.stat(path).st_ino


def serve(root: str, targets: Targets, idle: float, warm_up: bool = False) -> None:
    """The holder's loop: connect, then run one client command at a time (concurrent clients
    wait their turn) until ``idle`` seconds pass without one, or until every connection it
    held has gone (looked at every ``LOOK_EVERY`` seconds while idle)."""
    global SERVING
    SERVING = True
    from .push import Warm
    from .session import Session

    path = socket_path(root, targets)
    sock, _lock, inode = _listen(path)
    held = _Held(_as_list(targets))
    Session.provider = held.open
    warm = Warm.held = Warm(os.path.realpath(root), keep=True)
    served = 0
    try:
        held.connect_all()
        if warm_up:
            _warm_up(root, held, warm)
        last = time.monotonic()
        while True:
            left = idle - (time.monotonic() - last)
            if left <= 0 or held.all_lost():
                return
            sock.settimeout(min(left, LOOK_EVERY))
            try:
                conn, _ = sock.accept()
            except socket.timeout:
                continue
            last = time.monotonic()
            with conn:
                conn.settimeout(None)
                try:
                    if not _peer_is_me(conn):
                        continue
                    request = recv(conn)
                    if request.get("op") == "ping":
                        send(conn, {"pid": os.getpid(), "served": served,
                                     "connected": held.connected,
                                     "warm": all(map(warm.knows, held.targets))})
                    elif request.get("op") == "run":
                        answer = _run(request, held, warm, path)
                        served += not answer.get("decline")
                        send(conn, answer)
                except (OSError, ValueError, KeyError, struct.error) as e:
                    print(f"holder: client dropped: {e}", file=sys.stderr, flush=True)
                except Exception as e:  # no answer: the client runs the command itself
                    print(f"holder: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    held.drop()
                    warm.forget()
            warm.save()  # the client has its answer: the cache write is off its clock,
            warm.prepare()  # and so is planning for the trees as this command left them
    finally:
        if path.exists() and os.stat(path).st_ino == inode:  # not a successor's
            path.unlink()
            wire.forget_routes_to(str(path))
        sock.close()
        Session.provider = None
        Warm.held = None
        warm.save()
        held.drop()


def _warm_up(root: str, held: _Held, warm) -> None:
    """Before the first command, what a push would otherwise find cold: the command code
    imported, the digest cache read, the tree's rules found, both trees walked and each
    remote manifest kept. A dry-run push does it all and changes neither tree, so the first
    push a holder answers costs what every later one does. A client that comes meanwhile
    waits for it, as it would have waited for the same work in its own command. Only the
    targets it could connect to (another try would wait for the same timeout again); after
    a failure other than a safety refusal, a lost connection is dropped and no manifest is
    kept, as after a failed command (``_run``)."""
    targets = [t for t in held.targets if t in held.sessions]
    if not targets:
        return
    from .errors import SafetyError

    try:
        from .cli import main  # noqa: F401  (what ``_run`` imports)
        from .config import load_project
        from .push import PushOptions, push_many

        fleet = push_many(load_project(Path(root)), targets,
                          PushOptions(dry_run=True, restart=False))
        failed = dict(fleet.errors)
    except Exception as e:
        failed = {"": e}
    for name, e in failed.items():
        print(f"holder: warm-up: {name + ': ' if name else ''}{type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
    if any(not isinstance(e, SafetyError) for e in failed.values()):
        held.drop_lost()
        warm.forget()
    else:
        warm.save()


# ------------------------------------------------------------------ a watch serves the socket

def serve_watch(project: Project, target: Target, flush, options, stop) -> bool:
    """Serve the target's socket from a running ``watch`` (in a thread): a plain ``push`` of
    that target there is a flush, answered with the result of the watch's next full
    reconcile (the restart, if any, follows in the watch). Anything else is declined, and
    the client runs it on its own.

    Args:
        flush: ``TargetLoop.flush``; options: the watch's PushOptions; stop: ends serving.

    Returns:
        False when the socket could not be taken (unsafe directory, a holder serves it).
    """
    import threading

    try:
        path = socket_path(project.root, target)
        sock, lock, inode = _listen(path)
    except (OSError, UnsafeDir, Taken):
        return False
    sock.settimeout(0.25)

    def loop() -> None:
        try:
            while not stop.is_set():
                try:
                    conn, _ = sock.accept()
                except socket.timeout:
                    continue
                with conn:
                    conn.settimeout(None)
                    try:
                        if _peer_is_me(conn):
                            request = recv(conn)
                            send(conn, {"pid": os.getpid(), "served": 0, "connected": True}
                                  if request.get("op") == "ping" else
                                  _flush_answer(request, flush, options))
                    except (OSError, ValueError, KeyError, struct.error):
                        pass
        finally:
            if path.exists() and os.stat(path).st_ino == inode:
                path.unlink()
            sock.close()
            os.close(lock)

    threading.Thread(target=loop, name="syncagent-holder", daemon=True).start()
    return True


def _flush_answer(request: dict, flush, options) -> dict:
    """A push's answer from the watch, rendered as the push command renders it."""
    from .cli import _summary, push_cmd
    from .errors import SyncAgentError

    argv = [str(a) for a in request["argv"]]
    if request.get("routed"):  # routes are a holder's (its answers say "routable")
        return {"decline": True}
    try:
        params = push_cmd.make_context("push", argv[1:], resilient_parsing=True).params
    except Exception:
        return {"decline": True}
    if (argv[:1] != ["push"] or params.get("dry_run") or params.get("allow_mass_delete")
            or params.get("mode") or params.get("no_restart") != (not options.restart)):
        return {"decline": True}
    try:
        result = flush()
    except SyncAgentError as e:
        return {"code": e.exit_code, "out": "", "err": f"syncagent: error: {e}\n"}
    if result is None:
        return {"decline": True}
    warnings = "".join(f"warning: {w}\n" for w in result.warnings)
    out = json.dumps(result.to_json()) if params.get("as_json") else _summary(result)
    return {"code": 0, "out": out + "\n", "err": warnings}


def main(argv: list[str]) -> int:
    import signal

    root, targets_json, idle, *flags = argv
    targets = [Target(**t) for t in json.loads(targets_json)]
    if os.fork():  # the command that started us waits for this exit only, and reaps it
        os._exit(0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # tidy up the socket on the way
    try:
        serve(root, targets, float(idle), warm_up="warm-up" in flags)
    except Taken:  # another holder was quicker, or a watch serves the target
        pass
    return 0


if __name__ == "__main__":  # run as the package's module, so that SERVING is the one cli sees
    from syncagent.holder import main as holder_main

    sys.exit(holder_main(sys.argv[1:]))
