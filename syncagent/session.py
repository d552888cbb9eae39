"""One connected target: ship the agent, then framed requests over one exec channel."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shlex
import socket
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import paramiko

from . import agent
from .config import Target
from .errors import AgentCacheError, AgentError, ConnectError, error_from_wire
from .manifest import Entry, from_wire
from .plan import Plan, Upload
from .transport import Endpoint, connect

__all__ = ["Session", "RemoteTree", "agent_source", "agent_hash"]

SEND_BUFFER = 256 * 1024
_LENGTH = struct.Struct(">I")
NEED_UPLOAD = b"syncagent-need-upload"
NO_PYTHON = b"syncagent-no-python"
UNSAFE_CACHE = b"syncagent-unsafe-cache"
AGENT_DIR = "~/.cache/syncagent"

# Runs on the remote as `python3 -I -c BOOTSTRAP NAME DIGEST`: checks the cache directory
# (ours, not writable by group or others), reads the cached agent without following a link,
# and executes exactly the bytes whose digest it checked (nothing can swap the file between
# the check and the run). Anything else: one line saying why, and the dev side acts on it.
BOOTSTRAP = r"""
import hashlib, os, stat, sys
def say(word, why=""):
    sys.stdout.write("%s %s\n" % (word, why))
    sys.stdout.flush()
    sys.exit(0)
name, want = sys.argv[1], sys.argv[2]
d = os.path.expanduser("AGENT_DIR")
try:
    st = os.lstat(d)
except FileNotFoundError:
    say("NEED_UPLOAD")
if not stat.S_ISDIR(st.st_mode):
    say("UNSAFE_CACHE", "it is not a directory")
if st.st_uid != os.getuid():
    say("UNSAFE_CACHE", "it is owned by uid %d, not by this user" % st.st_uid)
if st.st_mode & 0o022:
    say("UNSAFE_CACHE", "it is writable by group or others (mode %o)" % stat.S_IMODE(st.st_mode))
path = os.path.join(d, name)
try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
except OSError:
    say("NEED_UPLOAD")
with os.fdopen(fd, "rb") as f:
    src = f.read()
if hashlib.blake2b(src).hexdigest() != want:
    say("NEED_UPLOAD", "digest mismatch")
sys.argv = [path]
exec(compile(src, path, "exec"), {"__name__": "__main__", "__file__": path})
""".replace("AGENT_DIR", AGENT_DIR).replace("NEED_UPLOAD", NEED_UPLOAD.decode()).replace(
    "UNSAFE_CACHE", UNSAFE_CACHE.decode())
Progress = Callable[[int, int], None]  # (bytes sent, files sent)


def agent_source() -> bytes:
    return Path(agent.__file__).read_bytes()


def agent_hash() -> str:
    """The short hash in the cached agent's file name."""
    return hashlib.blake2b(agent_source(), digest_size=8).hexdigest()


def agent_digest() -> str:
    """The full digest the remote bootstrap checks before it runs the cached agent."""
    return hashlib.blake2b(agent_source()).hexdigest()


@dataclass
class RemoteTree:
    root: str  # absolute, as the agent resolved it
    exists: bool
    entries: dict[str, Entry]
    revision: str | None
    problems: list = field(default_factory=list)
    provisioned: bool = False  # a supervisord-managed worker lives under the root
    protected: list = field(default_factory=list)  # kept by the agent though the rules let them
    imports: list | None = None  # project files the serving worker imported (None: unknown)
    token: str | None = None  # names this manifest to the agent that sent it (see manifest())
    owed: dict | None = None  # a committed batch's restart that has not run (agent.restart_owed)


@contextmanager
def _gc_paused():
    """No cyclic garbage collection while a batch's data streams: the loop makes no cycles
    (its frames and paramiko's messages are freed as they go), but the allocations it makes
    trigger collections, and a full one over a 20,000-file push's manifests and plan costs
    ~0.1 s of the transfer. Collections resume after (if they were on: another thread of a
    holder may have paused them for its own push)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _Channel:
    """Exact reads and buffered frame writes over a paramiko channel.

    Frames are written into one fixed buffer and sent from it in slices of one memoryview
    (paramiko's ``sendall`` copies the rest of its argument after every 32 KB packet); file
    data is read from the file straight into it (``frame_from``): no copy of its own.

    A read or a send that fails (a timeout, the link gone) leaves the stream out of step:
    part of a frame sent or read. The channel is closed then, so nothing more is ever sent
    or read on it (``Session.close`` sends no "bye" on a closed channel; a holder drops a
    session whose channel is closed)."""

    def __init__(self, chan: paramiko.Channel, what: str):
        self.chan = chan
        self.what = what
        self.inbuf = bytearray()
        self.out = bytearray(SEND_BUFFER + agent.CHUNK + _LENGTH.size)
        self.used = 0  # bytes of ``out`` waiting to be sent

    def read(self, n: int) -> bytes:
        while len(self.inbuf) < n:
            try:
                block = self.chan.recv(max(n - len(self.inbuf), 65536))
            except socket.timeout as e:
                self.cut()
                raise ConnectError(f"{self.what}: no answer from the agent") from e
            if not block:
                why = self._stderr()
                self.cut()
                raise ConnectError(f"{self.what}: connection to the agent lost{why}")
            self.inbuf += block
        out = bytes(self.inbuf[:n])
        del self.inbuf[:n]
        return out

    def _stderr(self) -> str:
        err = b""
        while self.chan.recv_stderr_ready():
            err += self.chan.recv_stderr(65536)
        tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
        return f" ({tail[0]})" if tail else ""

    def frame(self, payload: bytes) -> None:
        n = len(payload)
        if self.used + _LENGTH.size + n > len(self.out):
            self.flush()
            if _LENGTH.size + n > len(self.out):  # a large request: sent as it is
                self._send(memoryview(_LENGTH.pack(n) + payload))
                return
        _LENGTH.pack_into(self.out, self.used, n)
        self.out[self.used + _LENGTH.size:self.used + _LENGTH.size + n] = payload
        self._wrote(_LENGTH.size + n)

    def frame_from(self, fd: int, n: int) -> int:
        """One data frame of up to ``n`` (<= agent.CHUNK) bytes read from ``fd``; returns
        how many it read (0: the end of the file, and no frame)."""
        if self.used + _LENGTH.size + n > len(self.out):
            self.flush()
        start = self.used + _LENGTH.size
        with memoryview(self.out) as view:
            got = os.readv(fd, [view[start:start + n]])
        if got:
            _LENGTH.pack_into(self.out, self.used, got)
            self._wrote(_LENGTH.size + got)
        return got

    def end_upload(self, vouched: bool) -> None:
        """The end frame of one upload's data (agent.VOUCHED: see the agent's module doc)."""
        if self.used + _LENGTH.size > len(self.out):
            self.flush()
        _LENGTH.pack_into(self.out, self.used, agent.VOUCHED if vouched else 0)
        self._wrote(_LENGTH.size)

    def _wrote(self, n: int) -> None:
        self.used += n
        if self.used >= SEND_BUFFER:
            self.flush()

    def flush(self) -> None:
        """Send what is buffered."""
        if self.used:
            try:
                with memoryview(self.out) as view:
                    self._send(view[:self.used])
            finally:
                self.used = 0

    def _send(self, data: memoryview) -> None:
        try:
            while data:
                n = self.chan.send(data)
                if not n:
                    raise EOFError("the channel is closed")
                data = data[n:]
        except (OSError, EOFError, paramiko.SSHException) as e:
            self.cut()
            raise ConnectError(f"{self.what}: connection lost while sending") from e

    def cut(self) -> None:
        """Close the channel: its stream is out of step (see the class doc)."""
        try:
            self.chan.close()
        except Exception:  # the transport is gone already: closed all the same
            pass

    def read_frame(self) -> bytes:
        (n,) = struct.unpack(">I", self.read(4))
        if n > agent.MAX_FRAME:
            self.cut()
            raise AgentError(f"{self.what}: bad frame from the agent ({n} bytes)")
        return self.read(n)


class Session:
    """An SSH connection to one target with the agent running on one exec channel."""

    def __init__(self, target: Target, client: paramiko.SSHClient, endpoint: Endpoint):
        self.target = target
        self.client = client
        self.endpoint = endpoint
        self.channel: _Channel | None = None
        self.banner: dict = {}
        self.uploaded_agent = False
        self.owns_client = True

    # Set in a holder process (syncagent.holder): hands out its held session for its target.
    provider: Callable[..., "Session"] | None = None

    @classmethod
    def open(cls, target: Target, *, trust_new: bool = False, timeout: float = 10.0) -> "Session":
        if Session.provider is not None:
            return Session.provider(target, trust_new=trust_new, timeout=timeout)
        return cls.open_new(target, trust_new=trust_new, timeout=timeout)

    @classmethod
    def open_new(cls, target: Target, *, trust_new: bool = False, timeout: float = 10.0
                 ) -> "Session":
        """A new connection (the host key checked as always) with the agent started."""
        client, endpoint, _ = connect(target, trust_new=trust_new, timeout=timeout)
        session = cls(target, client, endpoint)
        try:
            session.start_agent()
        except (EOFError, OSError, paramiko.SSHException) as e:  # dropped while starting
            session.close()
            raise ConnectError(f"{target.name}: connection lost while starting the agent: "
                               f"{e or type(e).__name__}") from e
        except BaseException:
            session.close()
            raise
        return session

    # ----------------------------------------------------------- agent start

    def _agent_command(self) -> str:
        py = shlex.quote(self.target.python)
        script = (
            f"command -v {py} >/dev/null 2>&1 || {{ echo {NO_PYTHON.decode()}; exit 127; }}; "
            f"exec {py} -I -c {shlex.quote(BOOTSTRAP)} agent-{agent_hash()}.py {agent_digest()}"
        )
        return "sh -c " + shlex.quote(script)

    def _exec_agent(self) -> bytes:
        transport = self.client.get_transport()
        chan = transport.open_session(window_size=8 << 20, max_packet_size=32768)
        chan.settimeout(60)
        chan.exec_command(self._agent_command())
        self.channel = _Channel(chan, self.target.name)
        return self.channel.read(4)

    def start_agent(self) -> None:
        """Run the cached agent; upload it first when it is missing or not what we ship.

        Raises:
            AgentCacheError: the remote cache directory is not safe to run code from.
            AgentError: no python there, or the agent did not start.
        """
        head = self._exec_agent()
        for attempt in range(2):
            if head != NEED_UPLOAD[:4]:  # every bootstrap line starts "sync"; a frame never
                break
            line = head + self._read_line()
            if line.startswith(NO_PYTHON):
                raise AgentError(f"{self.target.name}: no '{self.target.python}' on the remote",
                                 hint="install python3 (3.8+) there")
            if line.startswith(UNSAFE_CACHE):
                raise AgentCacheError(self.target.name,
                                      line[len(UNSAFE_CACHE):].decode(errors="replace").strip())
            if attempt:
                raise AgentError(f"{self.target.name}: the uploaded agent does not match what "
                                 f"was sent ({line.decode(errors='replace').strip()})")
            self._upload_agent()
            head = self._exec_agent()
        (n,) = struct.unpack(">I", head)
        if n > 4096:
            raise AgentError(f"{self.target.name}: the agent did not start"
                             f"{self.channel._stderr()}")
        banner = json.loads(self.channel.read(n))
        if banner.get("agent") != agent.MAGIC or banner.get("protocol") != agent.PROTOCOL:
            raise AgentError(f"{self.target.name}: unexpected agent banner {banner!r}")
        self.banner = banner

    def _read_line(self) -> bytes:
        out = b""
        while not out.endswith(b"\n"):
            out += self.channel.read(1)
        self.channel.chan.close()
        return out

    def _upload_agent(self) -> None:
        """Content-addressed: ~/.cache/syncagent/agent-<hash>.py, written atomically over an
        exec channel (the remote needs only sshd, sh and python3; no SFTP)."""
        final = f'"$HOME/.cache/syncagent/agent-{agent_hash()}.py"'
        script = (f'umask 077; mkdir -p "$HOME/.cache/syncagent" && '
                  f'cat > {final[:-1]}.$$" && mv {final[:-1]}.$$" {final}')
        chan = self.client.get_transport().open_session()
        chan.settimeout(60)
        try:
            chan.exec_command("sh -c " + shlex.quote(script))
            chan.sendall(agent_source())
            chan.shutdown_write()
            status = chan.recv_exit_status()
            err = chan.recv_stderr(4096).decode(errors="replace").strip()
        except (OSError, paramiko.SSHException) as e:
            raise AgentError(f"{self.target.name}: cannot install the agent: {e}") from e
        finally:
            chan.close()
        if status != 0:
            raise AgentError(f"{self.target.name}: cannot install the agent in "
                             f"~/.cache/syncagent: {err or f'exit {status}'}")
        self.uploaded_agent = True

    # ----------------------------------------------------------- requests

    def _send(self, obj: dict) -> None:
        self.channel.frame(json.dumps(obj).encode())

    def _response(self) -> dict:
        self.channel.flush()
        body = json.loads(self.channel.read_frame())
        if body.get("error"):
            raise error_from_wire(body["error"])
        return body

    def request(self, obj: dict) -> dict:
        self._send(obj)
        return self._response()

    def ping(self, timeout: float = 3.0) -> float:
        """One round trip to the agent; raises ConnectError if none within ``timeout``.
        Returns the round-trip time in seconds (the liveness check of an idle watch)."""
        t0 = time.monotonic()
        chan = self.channel.chan
        chan.settimeout(timeout)
        try:
            self.request({"op": "ping"})
        finally:
            if not chan.closed:
                chan.settimeout(60)
        return time.monotonic() - t0

    def manifest(self, root: str, rules_wire: list, protect: list | None = None,
                 known: tuple[str, dict[str, Entry]] | None = None) -> RemoteTree:
        """The remote tree as the agent scans it now (stat-level, with its digest cache).

        Args:
            known: (token, entries) of a manifest this session's agent sent earlier, kept as
                it came: the agent may then send only what changed since (its own walk
                decides what did). An agent that did not send it (a new session) sends all.
        """
        request = {"op": "manifest", "root": root, "rules": rules_wire,
                   "protect": protect or []}
        if known is not None:
            request["since"] = known[0]
        body = self.request(request)
        if "delta" in body and known is not None:
            delta = body["delta"]
            entries = agent.apply_delta(known[1], from_wire(delta["changed"]),
                                        delta["removed"])
        else:
            entries = from_wire(body["entries"])
        rev = body.get("revision") or {}
        return RemoteTree(body["root"], body["exists"], entries,
                          rev.get("revision"), body.get("problems", []),
                          bool(body.get("provisioned")), body.get("protected", []),
                          body.get("imports"), body.get("token"), body.get("owed"))

    def restart(self, root: str, revision: str, mode: str = "blue-green",
                timeout: float = 120.0, grace: float = 3.0) -> dict:
        """Restart the worker onto ``revision``; returns when it is live (or failed to start)."""
        chan = self.channel.chan
        chan.settimeout(timeout + 30)
        try:
            return self.request({"op": "restart", "root": root, "revision": revision,
                                 "mode": mode, "timeout": timeout, "grace": grace})
        finally:
            if not chan.closed:
                chan.settimeout(60)

    def start(self, root: str, revision: str, restart: bool = False,
              timeout: float = 120.0) -> dict:
        """provision's start of the worker through the agent's slot controller (start, wait
        for supervisord's own start, or restart onto ``revision``; then park a standby)."""
        chan = self.channel.chan
        chan.settimeout(timeout + 30)
        try:
            return self.request({"op": "start", "root": root, "revision": revision,
                                 "restart": restart, "timeout": timeout})
        finally:
            if not chan.closed:
                chan.settimeout(60)

    def worker(self, root: str) -> dict:
        """{"worker": programs, markers and the live revision (None: not provisioned),
        "revision": the pushed revision marker}."""
        return self.request({"op": "worker", "root": root})

    def logs(self, root: str, offset: int | None = None, lines: int = 200) -> dict:
        return self.request({"op": "logs", "root": root, "offset": offset, "lines": lines})

    def fork(self) -> "Session":
        """A second agent on the same SSH connection (a restart can wait there while this one
        keeps syncing). Closing the fork leaves the connection open."""
        other = Session(self.target, self.client, self.endpoint)
        other.owns_client = False
        other.start_agent()
        return other

    def apply(self, root: str, local_root: str, p: Plan, revision: str, files: int,
              progress: Progress | None = None, protect: list | None = None,
              restart: str | None = None, local: dict[str, Entry] | None = None,
              batch: dict | None = None) -> dict:
        """Send one batch and its file data in one stream; one round trip whatever its size.

        Returns the agent's result plus ``changed``: paths whose content changed while being
        sent (what was sent is what the file held then; the next push sends the rest).
        ``protect``: the config's extra protected patterns (the agent has the built-in ones).
        ``restart``: why the batch restarts the worker, if it does: the agent keeps it on
        record with the commit until a restart runs (``agent.restart_owed``).
        ``local``: the local manifest the plan was made from; a file whose record there
        vouches for it (see ``_stream_file``) is not hashed again by the agent. ``batch``:
        ``p.to_wire(revision, files)``, when the caller has made it already.
        """
        batch = dict(batch or p.to_wire(revision, files))
        if restart:
            batch["restart"] = restart
        self._send({"op": "apply", "root": root, "batch": batch, "protect": protect or []})
        changed = []
        sent = 0
        last = time.monotonic()
        local = local or {}
        try:
            with _gc_paused():
                for n, up in enumerate(p.uploads, 1):
                    size, intact = self._stream_file(os.path.join(local_root, up.path), up,
                                                     local.get(up.path))
                    if not intact:
                        changed.append(up.path)
                    sent += size
                    if progress and time.monotonic() - last > 0.1:
                        progress(sent, n)
                        last = time.monotonic()
        except BaseException:  # mid-batch (a read error, Ctrl-C): the stream is out of step,
            self.channel.cut()  # and the agent keeps nothing of a batch that ends here
            raise
        result = self._response()
        if progress:
            progress(sent, len(p.uploads))
        result["changed"] = changed
        return result

    def _stream_file(self, path: str, up: Upload, record: Entry | None = None
                     ) -> tuple[int, bool]:
        """Stream one file as data frames and an end frame; returns (bytes sent, intact).

        ``intact`` is False when the file is not what the plan saw (size, mtime) or changed
        while being read (its ctime moved). The end frame vouches for the bytes (the agent
        then records the plan's digest instead of hashing them) only when the file is intact
        and ``record``, the local record the digest came from, vouches for the file's stat
        after the read: same size, mtime, ctime and inode as when it was hashed, and hashed
        long enough after its last change (``Entry.vouches``); any write since the hash,
        before or during the read, would have moved its ctime.

        The file is read in as many reads as its size asks for (no read to find the end: a
        file that grew shows in the stat after the read, and is not intact)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            self.channel.end_upload(False)  # vanished: an empty file for now, fixed next pass
            return 0, False
        size = 0
        try:
            before = os.fstat(fd)
            want = before.st_size
            while size < want:
                got = self.channel.frame_from(fd, min(agent.CHUNK, want - size))
                if not got:
                    break
                size += got
            after = os.fstat(fd)
        finally:
            os.close(fd)
        intact = (size == up.size == after.st_size and after.st_mtime_ns == up.mtime_ns
                  and after.st_ctime_ns == before.st_ctime_ns)
        vouched = (intact and record is not None and record.digest == up.digest
                   and bool(record.vouches(after)))
        self.channel.end_upload(vouched)
        return size, intact

    # ----------------------------------------------------------- commands

    def run(self, command: str, stdin: bytes | None = None, timeout: float = 120.0,
            on_stderr_line: Callable[[str], None] | None = None) -> tuple[int, str, str]:
        """Run one shell command on a new exec channel of this connection.

        ``stdin`` is sent and then closed (this is how secrets travel: never in ``command``).
        ``on_stderr_line`` gets each stderr line as it arrives (progress of long commands).

        Returns:
            (exit status, stdout, stderr), both decoded with replacement.

        Raises:
            ConnectError: the connection failed or the command ran past ``timeout``.
        """
        try:
            chan = self.client.get_transport().open_session()
        except (OSError, EOFError, AttributeError, paramiko.SSHException) as e:
            raise ConnectError(f"{self.target.name}: cannot open a channel: {e}") from e
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        passed = 0  # bytes of err already handed to on_stderr_line

        def pass_lines(final: bool = False) -> None:
            nonlocal passed
            if on_stderr_line is None:
                return
            end = len(err) if final else err.rfind(b"\n", passed) + 1
            for line in bytes(err[passed:end]).decode(errors="replace").splitlines():
                on_stderr_line(line)
            passed = max(passed, end)

        try:
            chan.exec_command(command)
            if stdin:
                chan.settimeout(timeout)
                chan.sendall(stdin)
            chan.shutdown_write()
            chan.settimeout(0.05)  # short reads: stderr is drained between them
            while True:
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                pass_lines()
                if time.monotonic() > deadline:
                    raise ConnectError(f"{self.target.name}: remote command ran past "
                                       f"{timeout:g} s")
                try:
                    block = chan.recv(65536)
                except socket.timeout:
                    continue
                if not block:  # EOF covers both streams
                    break
                out += block
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
            pass_lines(final=True)
            if not chan.status_event.wait(max(0.0, deadline - time.monotonic())):
                raise ConnectError(f"{self.target.name}: remote command ran past {timeout:g} s")
            status = chan.recv_exit_status()
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise ConnectError(f"{self.target.name}: remote command failed: {e}") from e
        finally:
            chan.close()
        return status, out.decode(errors="replace"), err.decode(errors="replace")

    def close(self) -> None:
        try:
            if self.channel is not None and not self.channel.chan.closed:
                self._send({"op": "bye"})
                self.channel.flush()
                self.channel.chan.close()
        except Exception:
            pass
        if self.owns_client:
            self.client.close()

    def abort(self) -> None:
        """Cut the connection now, mid-batch if need be (Ctrl-C), a held one too: the agent
        sees its stream end and keeps nothing of a batch it has not committed."""
        try:
            if self.channel is not None:
                self.channel.chan.close()
        finally:
            if self.owns_client:
                self.client.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
