"""The holder's socket as a client sees it: where it lives, its framing, and routes.

Standard library only (no pathlib, dataclasses or config): a command a holder answers spends
its own process's time here, and ``entry`` reaches a holder through this module alone when a
route knows the way.

A route remembers which holder answered a command line: its name is a hash of what the
client can read without parsing the configuration (the directory, the argv, the few
environment variables that choose a target), and it holds that holder's socket path. A routed
request says so, and the holder checks it the long way (it resolves the argv as the CLI does
and compares the socket that gives with its own, which covers a changed config and an upgraded
install); a holder that is not the right one declines, the client forgets the route and finds
the holder the long way. A route only ever saves time: it decides nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct

MAX_MESSAGE = 64 << 20
OFF = ("0", "false", "no", "off")  # values of SYNCAGENT_HOLDER that turn holders off
# The environment a target's resolution reads (config.resolve_target, user_config_dir...).
ROUTE_ENV = ("HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "REMOTE_HOST", "REMOTE_USER",
             "REMOTE_PORT", "REMOTE_PATH")


class UnsafeDir(Exception):
    """The runtime directory or the socket is not this user's alone."""


class Answer:
    """A command's exit code and output, as a holder ran it."""

    __slots__ = ("code", "out", "err")

    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


def env_allows() -> bool:
    """``SYNCAGENT_HOLDER=0`` (or false, no, off) turns holders off."""
    return os.environ.get("SYNCAGENT_HOLDER", "1") not in OFF


def user_state_dir() -> str:
    home = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return os.path.join(home, "syncagent")


def runtime_dir() -> str:
    """``$XDG_RUNTIME_DIR/syncagent``, else ``<state dir>/run``; created 0700.

    Raises:
        UnsafeDir: it is not a directory owned by this user with no group or other access.
    """
    base = os.environ.get("XDG_RUNTIME_DIR")
    d = (os.path.join(base, "syncagent") if base and os.path.isdir(base)
         else os.path.join(user_state_dir(), "run"))
    os.makedirs(d, mode=0o700, exist_ok=True)
    check_private(d, stat.S_ISDIR, "directory")
    return d


def check_private(path: str, is_kind, what: str) -> None:
    st = os.lstat(path)
    if not is_kind(st.st_mode):
        raise UnsafeDir(f"{path} is not a {what}")
    if st.st_uid != os.getuid():
        raise UnsafeDir(f"{path} is owned by uid {st.st_uid}, not by this user")
    if st.st_mode & 0o077:
        raise UnsafeDir(f"{path} is open to group or others (mode "
                        f"{stat.S_IMODE(st.st_mode):o})")


# ------------------------------------------------------------------ framing

def send(sock: socket.socket, obj: dict) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        block = sock.recv(n - len(buf))
        if not block:
            raise ConnectionResetError("holder closed the connection")
        buf += block
    return bytes(buf)


def recv(sock: socket.socket) -> dict:
    (n,) = struct.unpack(">I", _recv_exact(sock, 4))
    if n > MAX_MESSAGE:
        raise ValueError(f"message of {n} bytes")
    return json.loads(_recv_exact(sock, n))


def ask(path: str, request: dict, timeout: float | None) -> dict:
    """Send ``request`` to the socket at ``path`` (checked private, as its directory) and
    return the answer."""
    check_private(os.path.dirname(path), stat.S_ISDIR, "directory")
    check_private(path, stat.S_ISSOCK, "socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        send(sock, request)
        return recv(sock)


def run(path: str, argv: list[str], routed: bool = False) -> Answer | None:
    """Have the holder at ``path`` run ``argv`` (a whole ``syncagent`` command line) as this
    process would run it: here, with this environment.

    Returns:
        the command's output and exit code; None when no holder answered in full (none runs,
        it died, the socket is not this user's alone, it declined): the caller runs the
        command another way.
    """
    request = {"op": "run", "argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ)}
    if routed:
        request["routed"] = True
    try:
        reply = ask(path, request, timeout=None)
        if reply.get("decline"):  # a watch that cannot answer this one, a stale route
            return None
        answer = Answer(int(reply["code"]), str(reply["out"]), str(reply["err"]))
    except (OSError, ValueError, KeyError, TypeError, UnsafeDir, struct.error):
        return None
    except KeyboardInterrupt:  # this process stops waiting; the holder's command goes on
        return Answer(130, "", "syncagent: interrupted; the holder runs the command to its end "
                               "(`syncagent status` shows the result)\n")
    if reply.get("routable") and not routed:
        remember_route(argv, path)
    return answer


# ------------------------------------------------------------------ routes

def _route_file(argv: list[str], rundir: str | None = None) -> str:
    key = json.dumps([os.getcwd(), list(argv), [os.environ.get(k) for k in ROUTE_ENV]])
    name = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=12).hexdigest()
    return os.path.join(rundir or runtime_dir(), f"route-{name}")


def _read_route(route: str) -> str | None:
    """The socket path a route file holds (read through no link), or None."""
    try:
        fd = os.open(route, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            return f.read(4096).decode("utf-8", "surrogateescape")
    except OSError:
        return None


def run_routed(argv: list[str]) -> Answer | None:
    """``argv`` run by the holder a route remembers for it; None: no route, or a route that
    no longer leads to the right holder (forgotten: the long way finds it again)."""
    path = routed_socket(argv)
    if path is None:
        return None
    answer = run(path, argv, routed=True)
    if answer is None:
        forget_route(argv)
    return answer


def routed_socket(argv: list[str]) -> str | None:
    """The socket a route remembers for ``argv`` here (in the runtime directory), or None."""
    try:
        rundir = runtime_dir()
    except (OSError, UnsafeDir):
        return None
    path = _read_route(_route_file(argv, rundir))
    return path if path is not None and os.path.dirname(path) == rundir else None


def remember_route(argv: list[str], path: str) -> None:
    """Remember that the holder at ``path`` answered ``argv`` here."""
    try:
        route = _route_file(argv)
        tmp = f"{route}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(path.encode("utf-8", "surrogateescape"))
        os.replace(tmp, route)
    except (OSError, UnsafeDir):
        pass  # a route only saves time


def forget_route(argv: list[str]) -> None:
    try:
        os.unlink(_route_file(argv))
    except (OSError, UnsafeDir):
        pass


def forget_routes_to(path: str) -> None:
    """Remove every route to the socket at ``path`` (its holder is exiting)."""
    try:
        d = runtime_dir()
        names = [n for n in os.listdir(d) if n.startswith("route-")]
    except (OSError, UnsafeDir):
        return
    for name in names:
        route = os.path.join(d, name)
        if _read_route(route) == path:
            try:
                os.unlink(route)
            except OSError:
                pass
