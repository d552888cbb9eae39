"""Test helpers: polling, free ports, owned subprocesses, redis-server, supervisord RPC.

No sleeps as synchronisation: :func:`wait_until` polls against ``time.monotonic()``.
Processes start in their own session and are stopped by pid (TERM, wait, KILL).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import xmlrpc.client
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

__all__ = [
    "REDIS_SERVER",
    "RedisServer",
    "free_port",
    "preserved_environ",
    "redis_server",
    "start_process",
    "stop_process",
    "supervisor_rpc",
    "provisioned_sandbox",
    "sandbox_broker",
    "pid_running",
    "wait_until",
]

T = TypeVar("T")
REDIS_SERVER = "/usr/bin/redis-server"


def wait_until(predicate: Callable[[], T], timeout: float, what: str,
               interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns a truthy value.

    Returns:
        The truthy value.

    Raises:
        AssertionError: naming ``what`` when ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except Exception as exc:  # predicate may fail while the thing starts
            value, last_error = None, exc
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}{extra}")
        time.sleep(interval)


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_process(args: Sequence[str], log_path: Path, **kwargs: object) -> subprocess.Popen[bytes]:
    """Start ``args`` in a new session with stdout+stderr to ``log_path``."""
    log = open(log_path, "wb")  # noqa: SIM115 (closed by the child's exit / GC)
    try:
        return subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                **kwargs)  # type: ignore[call-overload]
    finally:
        log.close()


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """TERM the process (by pid), wait, then KILL it; returns its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    return proc.returncode


class RedisServer:
    """A redis-server owned by a test (see :func:`redis_server`)."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, password: str | None,
                 log_path: Path) -> None:
        self.proc, self.port, self.password, self.log_path = proc, port, password, log_path

    def url(self, db: int = 0) -> str:
        """redis:// URL with the password, if any."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def ping(self) -> bool:
        """True when PING answers."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                             socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()


@contextlib.contextmanager
def redis_server(workdir: Path, password: str | None = None) -> Iterator[RedisServer]:
    """Run a private redis-server on a free port; stopped by pid on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir)]
    if password:
        args += ["--requirepass", password]
    log_path = workdir / "redis.log"
    server = RedisServer(start_process(args, log_path), port, password, log_path)
    try:
        wait_until(server.ping, 10, f"redis-server on port {port}")
        yield server
    finally:
        stop_process(server.proc)


def supervisor_rpc(socket_path: str) -> xmlrpc.client.ServerProxy:
    """XML-RPC proxy for supervisord's unix socket (the runtime's own transport)."""
    from worker.supervise import rpc

    return rpc(socket_path)


@contextlib.contextmanager
def preserved_environ() -> Iterator[None]:
    """Restore ``os.environ`` exactly on exit (code under test may add variables)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (e.g. sshd's per-connection processes)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


@contextlib.contextmanager
def provisioned_sandbox(name: str, directory, **up_args):
    """``sandbox.up(name, directory, provision=True)``; on failure the sandbox's logs are
    printed; always ``sandbox.down`` (which stops exactly what it started)."""
    from syncagent import sandbox

    try:
        yield sandbox.up(name, directory, provision=True, timeout=60, **up_args)
    except BaseException:
        for log in sorted(Path(directory).rglob("*.log")):
            print(f"==> {log}\n{log.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        sandbox.down(name, directory)


@contextlib.contextmanager
def sandbox_broker(box):
    """A Celery client for a provisioned sandbox's demo worker (its dbs and queue)."""
    from syncagent.sandbox import demo_client

    client = demo_client(box)
    try:
        yield client
    finally:
        client.close()


def pid_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (nothing reaps daemons' orphans here)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
