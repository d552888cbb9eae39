"""A local stand-in for a remote GPU box: a real OpenSSH sshd on 127.0.0.1.

``up`` generates host and user keys, writes an sshd config, its own known_hosts and ssh_config,
starts sshd on a free port and registers a target (``syncagent push sandbox`` then just works).
The sandbox's "remote home" is ``<dir>/remote`` (sshd sets HOME there), so a sandbox target's
default remote path is ``<dir>/remote/<project dir name>``.

The sandbox behaves like a machine. sshd marks every session with ``SYNCAGENT_SANDBOX=<dir>``,
which every process started through it inherits (supervisord and its workers too), so ``down``
stops all of them, wherever they were provisioned, then Redis and sshd: it never signals a
process that does not carry the marker. The demo worker keeps to its own Redis dbs and queue
(:data:`DEMO_QUEUE`), so it never takes the tasks of a project the user provisions beside it.
The test suite uses the same code as its fixture.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit, urlunsplit

from cryptography.hazmat.primitives import serialization
from dotenv import dotenv_values
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .config import (Target, load_project, load_user_targets, remove_user_target, user_state_dir,
                     write_user_target)
from .errors import ConfigError, OperationalError
from .provision import ProvisionOptions, ProvisionResult, provision, redact

__all__ = ["Sandbox", "up", "down", "status", "default_dir", "find_sshd", "free_port",
           "wait_until", "stop_pid", "provision_demo", "demo_client", "started_through",
           "DEMO_APP", "DEMO_QUEUE", "DEMO_BROKER_DB", "DEMO_RESULT_DB", "MARKER"]

STATE_FILE = "sandbox.json"
DEMO_APP = Path(__file__).resolve().parent / "demo_app"  # package data
PROJECT_DIR = "project"
MARKER = "SYNCAGENT_SANDBOX"  # set by the sandbox's sshd in every session: <MARKER>=<dir>
# The demo worker's own broker and result dbs and queue: a user's project provisioned onto the
# sandbox uses db 0 and its own queues (gpu,celery) and never meets it.
DEMO_QUEUE = "syncagent-demo"
DEMO_BROKER_DB, DEMO_RESULT_DB = 14, 15


@dataclass
class Sandbox:
    name: str
    dir: str
    host: str
    port: int
    user: str
    identity: str
    ssh_config: str
    known_hosts: str
    remote_root: str
    sshd_pid: int
    # May hold a password in memory; sandbox.json keeps it redacted (redis://:***@host:port):
    # a later `up` reads the real URL back from the remote .env.worker, where it is needed.
    redis_url: str | None = None
    redis_pid: int | None = None  # set only when the sandbox started redis-server itself
    project: str | None = None  # local demo project copy (provisioned sandboxes)
    supervisord_pidfile: str | None = None
    supervisorctl: str | None = None
    running: bool = True
    last_provision: ProvisionResult | None = field(default=None, repr=False, compare=False)

    def target(self) -> Target:
        return Target(name=self.name, host=self.name, ssh_config=self.ssh_config,
                      remote_root=self.remote_root)

    @property
    def demo_broker_url(self) -> str | None:
        return _with_db(self.redis_url, DEMO_BROKER_DB) if self.redis_url else None

    @property
    def demo_result_url(self) -> str | None:
        return _with_db(self.redis_url, DEMO_RESULT_DB) if self.redis_url else None

    def _fields(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "last_provision"}

    def to_json(self) -> dict:
        out = self._fields()
        out["redis_url"] = redact(self.redis_url) if self.redis_url else None
        if self.redis_url:
            out["demo"] = {"broker": redact(self.demo_broker_url),
                           "backend": redact(self.demo_result_url), "queue": DEMO_QUEUE}
        return out

    def _save(self) -> None:
        data = {k: v for k, v in self.to_json().items() if k not in ("running", "demo")}
        path = Path(self.dir) / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2))
        os.replace(tmp, path)


def default_dir(name: str) -> Path:
    return user_state_dir() / "sandbox" / name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll ``predicate`` until it returns something truthy; fail saying what we waited for."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise OperationalError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def find_sshd() -> str:
    for candidate in (shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError("OpenSSH sshd not found",
                      hint="sudo apt-get install -y openssh-server")


def _write_key(path: Path) -> str:
    """Write an ed25519 private key (OpenSSH format, 0600) and its .pub; return the pub line."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    fd = os.open(f"{path}.pub", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(public + " syncagent-sandbox\n")
    return public


def _banner_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            return s.recv(4) == b"SSH-"
    except OSError:
        return False


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int, marker: str) -> bool:
    """True if ``pid`` is running and its command line names ``marker`` (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return marker.encode() in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_pid(pid: int, marker: str, timeout: float = 5.0) -> bool:
    """TERM, wait, KILL one process we started (checked by its command line)."""
    if not _alive(pid, marker):
        return False
    os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not _alive(pid, marker), timeout, f"pid {pid} to exit")
    except OperationalError:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _alive(pid, marker), timeout, f"pid {pid} to die")
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child (tests)
    except ChildProcessError:
        pass
    return True


def _load(directory: Path) -> Sandbox | None:
    try:
        data = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    data.pop("running", None)
    data.pop("last_provision", None)
    box = Sandbox(**data)
    box.running = _alive(box.sshd_pid, box.dir)
    return box


def status(name: str = "sandbox", directory: str | os.PathLike | None = None) -> Sandbox | None:
    """The sandbox recorded in ``directory`` (running or not), or None if there is none. With
    no ``directory``: the default one, else the one the registered target ``name`` points to
    (``up --dir DIR`` then a plain ``down`` stops that one, rather than saying none runs)."""
    if directory:
        return _load(Path(directory))
    box = _load(default_dir(name))
    if box is None:
        registered = load_user_targets().get(name)
        if registered is not None and registered.ssh_config:
            box = _load(Path(registered.ssh_config).parent)
    return box


def up(name: str = "sandbox", directory: str | os.PathLike | None = None,
       register: bool = True, *, provision: bool = False, redis_url: str | None = None,
       env: Mapping[str, str] | None = None, timeout: float = 90.0) -> Sandbox:
    """Start (or find running) the sandbox ``name``; idempotent.

    Args:
        name: target name to register.
        directory: where keys, configs, the remote tree (and redis) live.
        register: record the target in the user's targets.
        provision: also provide Redis and provision the demo app (see :func:`provision_demo`).
        redis_url: an existing Redis (else ``REDIS_URL``, else one started on a free port).
        env: extra ``.env.worker`` settings for the demo worker (e.g. WORKER_API_KEY).
        timeout: seconds to wait for the worker to be ready.

    Returns:
        The sandbox; after provisioning, ``last_provision`` holds what was done.

    Raises:
        ConfigError: sshd (or redis-server) is not installed. OperationalError: it did not
        come up, or the worker did not start.
    """
    box = _up_sshd(name, directory, register)
    if provision:
        _ensure_redis(box, redis_url or os.environ.get("REDIS_URL") or None)
        box.last_provision = provision_demo(box, env, timeout=timeout)
    return box


def _redis_marker(url: str) -> str:
    return f":{urlsplit(url).port}"


def _redis_ping(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _ensure_redis(box: Sandbox, url: str | None) -> None:
    """Use ``url``, else the redis this sandbox started (if alive), else start one."""
    if url:
        if box.redis_pid and box.redis_url != url:
            stop_pid(box.redis_pid, _redis_marker(box.redis_url))
        box.redis_url, box.redis_pid = url, None
        box._save()
        return
    if box.redis_url and (box.redis_pid is None or _alive(box.redis_pid,
                                                          _redis_marker(box.redis_url))):
        return
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(exe, os.X_OK):
        raise ConfigError("redis-server not found", hint="sudo apt-get install -y redis-server, "
                          "or pass --redis-url / set REDIS_URL")
    rdir = Path(box.dir) / "redis"
    rdir.mkdir(mode=0o700, exist_ok=True)
    port = _reuse_port(box.redis_url) or free_port()  # a re-up keeps the worker's broker URL
    url = f"redis://127.0.0.1:{port}"
    pidfile = rdir / "redis.pid"
    pidfile.unlink(missing_ok=True)
    # Daemonized (its own pidfile): it outlives this CLI and is not our child.
    proc = subprocess.run([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--dir", str(rdir), "--daemonize", "yes",
                           "--pidfile", str(pidfile), "--logfile", str(rdir / "redis.log")],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, start_new_session=True, timeout=30,
                          check=False)
    if proc.returncode != 0:
        raise OperationalError(f"redis-server did not start: "
                               f"{proc.stderr.decode(errors='replace').strip()[-200:]}")

    def started() -> int | None:
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    box.redis_url, box.redis_pid = url, wait_until(started, 15, f"redis-server pidfile {pidfile}")
    box._save()  # recorded before the next wait: `down` stops it even if that fails
    wait_until(lambda: _redis_ping(url), 15, f"redis-server on 127.0.0.1:{port}")


def _reuse_port(url: str | None) -> int | None:
    """The port of ``url`` if it is free to bind on 127.0.0.1 again."""
    port = urlsplit(url).port if url else None
    if not port:
        return None
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return None
    return port


def _redacted(url: str) -> bool:
    """True for a URL as sandbox.json keeps it (its password replaced by ``***``)."""
    try:
        return urlsplit(url).password == "***"
    except ValueError:
        return False


def _with_db(url: str, db: int) -> str:
    """``url`` with its db set to ``db``, whatever db it named (redis:// and rediss://)."""
    parts = urlsplit(url)
    if not parts.scheme.startswith("redis"):
        return url
    return urlunsplit(parts._replace(path=f"/{db}"))


def demo_client(box: Sandbox):
    """A Celery client for the demo worker: its broker and result dbs, its queue."""
    from celery import Celery

    env_file = Path(box.remote_root, PROJECT_DIR, ".env.worker")
    # The worker's own file holds the Redis password that sandbox.json leaves out.
    env = dotenv_values(env_file) if env_file.is_file() else {}
    client = Celery("sandbox-demo-client",
                    broker=env.get("CELERY_BROKER_URL") or box.demo_broker_url,
                    backend=env.get("CELERY_RESULT_BACKEND") or box.demo_result_url,
                    set_as_current=False)
    client.conf.task_default_queue = DEMO_QUEUE
    client.conf.broker_connection_retry_on_startup = True
    return client


def provision_demo(box: Sandbox, env: Mapping[str, str] | None = None,
                   timeout: float = 90.0) -> ProvisionResult:
    """Copy the demo app to ``<dir>/project`` (once) and provision the sandbox with it.

    The worker runs in the venv syncagent runs in (``sys.prefix``: nothing to download) and
    its ``.env.worker`` points at the sandbox's Redis. ``env`` adds or overrides settings;
    like any ``.env.worker`` it is written once and never overwritten.
    """
    if not box.redis_url:
        raise ConfigError(f"sandbox '{box.name}' has no redis", hint="run `sandbox up` again")
    project_dir = Path(box.dir) / PROJECT_DIR
    if not project_dir.exists():
        if not DEMO_APP.is_dir():
            raise ConfigError(f"demo app not found at {DEMO_APP}",
                              hint="reinstall syncagent: the demo app ships in its package")
        shutil.copytree(DEMO_APP, project_dir,
                        ignore=shutil.ignore_patterns("__pycache__", ".env.worker"))
    remote_path = f"{box.remote_root}/{PROJECT_DIR}"
    env_file = Path(remote_path) / ".env.worker"
    broker = box.demo_broker_url
    kept = dotenv_values(env_file).get("CELERY_BROKER_URL") if env_file.exists() else None
    if _redacted(broker) and (kept is None or redact(kept) != broker):
        raise ConfigError(f"sandbox '{box.name}': its Redis URL has a password, which is not "
                          "stored", hint="pass --redis-url again (or set REDIS_URL)")
    if kept is not None and not _redacted(broker) and kept != broker:
        env_file.unlink()  # the sandbox's own file, for a Redis that is gone: write it anew
    settings = {"CELERY_BROKER_URL": broker,
                "CELERY_RESULT_BACKEND": box.demo_result_url,
                "FLASK_APP_URL": "http://127.0.0.1:9",  # the demo needs no Flask API
                "WORKER_API_KEY": secrets.token_urlsafe(24),
                "CELERY_QUEUES": DEMO_QUEUE, "CELERY_CONCURRENCY": "1",
                "WORKER_NAME": box.name, **(env or {})}
    target = replace(box.target(), remote_path=remote_path)
    box.project = str(project_dir)
    # Recorded before provisioning: `down` stops supervisord even if provisioning fails later.
    box.supervisord_pidfile = f"{remote_path}/.syncagent/supervisord.pid"
    box._save()
    result = provision(load_project(project_dir), target,
                       ProvisionOptions(venv=sys.prefix, env=tuple(settings.items()),
                                        timeout=timeout))
    box.supervisorctl = result.supervisorctl
    box._save()
    return result


def _up_sshd(name: str, directory: str | os.PathLike | None, register: bool) -> Sandbox:
    d = Path(directory).expanduser().resolve() if directory else default_dir(name)
    current = _load(d)
    if current is not None and current.running and _banner_ok(current.port):
        if register:
            write_user_target(current.target())
        return current
    sshd = find_sshd()
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    remote = d / "remote"
    remote.mkdir(mode=0o755, exist_ok=True)
    host_key, user_key = d / "ssh_host_ed25519_key", d / "id_ed25519"
    if not host_key.exists():
        _write_key(host_key)
    if not user_key.exists():
        _write_key(user_key)
    (d / "authorized_keys").write_text(Path(f"{user_key}.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = free_port()
    user = getpass.getuser()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {d}/sshd.pid\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nAllowUsers {user}\nPubkeyAuthentication yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nPermitRootLogin prohibit-password\nX11Forwarding no\n"
        "AllowTcpForwarding no\nPrintMotd no\nMaxSessions 64\nMaxStartups 64\n"
        f"SetEnv HOME={remote} {MARKER}={d}\nSubsystem sftp internal-sftp\n"
    )
    host_pub = Path(f"{host_key}.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    (d / "ssh_config").write_text(
        f"Host {name}\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n"
        f"  IdentityFile {user_key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {d}/known_hosts\n"
        "  StrictHostKeyChecking yes\n  BatchMode yes\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    pidfile = d / "sshd.pid"
    pidfile.unlink(missing_ok=True)
    # sshd daemonizes itself (it must outlive this command) and logs to sshd.log.
    started = subprocess.run([sshd, "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if started.returncode != 0:
        reason = (started.stderr.strip().splitlines() or [f"exit {started.returncode}"])[-1]
        raise OperationalError(f"sshd did not start: {reason}")
    pid = int(wait_until(lambda: _read_pid(pidfile), 15, "sshd's pidfile"))
    try:
        wait_until(lambda: _banner_ok(port), 15, f"sshd on 127.0.0.1:{port}")
    except OperationalError:
        stop_pid(pid, str(d))
        raise
    # What an earlier `up` started besides sshd (Redis, supervisord) stays on record, so
    # `down` still stops it after sshd alone was restarted.
    kept = {k: getattr(current, k) for k in ("redis_url", "redis_pid", "project",
                                              "supervisord_pidfile", "supervisorctl")
            } if current is not None else {}
    box = Sandbox(name=name, dir=str(d), host="127.0.0.1", port=port, user=user,
                  identity=str(user_key), ssh_config=str(d / "ssh_config"),
                  known_hosts=str(d / "known_hosts"), remote_root=str(remote),
                  sshd_pid=pid, **kept)
    box._save()
    if register:
        write_user_target(box.target())
    return box


def _recorded_supervisord(box: Sandbox) -> int | None:
    try:
        return int(Path(box.supervisord_pidfile).read_text().strip())
    except (OSError, ValueError, TypeError):
        return None


def started_through(directory: str | os.PathLike) -> list[int]:
    """Pids of the live processes started through the sandbox in ``directory``: those that
    carry its marker in their environment."""
    needle = f"{MARKER}={directory}".encode()
    return [pid for pid in _pids() if needle in _environ(pid)]


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and int(p.name) != os.getpid()]


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _stop_marked(directory: str, timeout: float) -> list[int]:
    """TERM every process started through the sandbox (supervisords first, so they warm-stop
    their workers), wait up to ``timeout``, KILL what is left; returns the pids signalled."""
    needle = f"{MARKER}={directory}".encode()

    def alive(pid: int) -> bool:
        return needle in _environ(pid) and _alive(pid, "")

    signalled: list[int] = []
    for group, wait in ((lambda pid: b"supervisord" in _cmdline(pid), timeout),
                        (lambda pid: True, 5.0)):
        pids = [pid for pid in started_through(directory) if group(pid)]
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        try:
            wait_until(lambda: not any(alive(pid) for pid in pids), wait,
                       "processes started through the sandbox to exit")
        except OperationalError:
            for pid in pids:
                if alive(pid):
                    _signal(pid, signal.SIGKILL)
            wait_until(lambda: not any(alive(pid) for pid in pids), 5.0,
                       "processes started through the sandbox to die")
        signalled += pids
    return signalled


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def down(name: str = "sandbox", directory: str | os.PathLike | None = None) -> list[int]:
    """Stop the sandbox as a machine stops; returns the pids stopped. Files are kept.

    Order: every process started through the sandbox's sshd, wherever it was provisioned
    (supervisords first: they warm-stop their workers, which still need Redis; then whatever
    is left), then the redis-server the sandbox started (never an external one), then sshd.
    A process is signalled only if it carries the sandbox's marker (or, for Redis and sshd,
    names it on its command line), so a reused pid is never signalled.
    """
    box = status(name, directory)
    stopped = []
    if box is not None:
        stopped += _stop_marked(box.dir, timeout=60)
        pid = _recorded_supervisord(box)  # a sandbox whose sshd predates the marker
        if pid and stop_pid(pid, str(Path(box.supervisord_pidfile).with_name(
                "supervisord.conf")), timeout=60):
            stopped.append(pid)
        if box.redis_pid and stop_pid(box.redis_pid, _redis_marker(box.redis_url)):
            stopped.append(box.redis_pid)
        if stop_pid(box.sshd_pid, box.dir):
            stopped.append(box.sshd_pid)
    remove_user_target(name)
    return stopped
