"""A local stand-in for a remote GPU box: a real OpenSSH sshd on 127.0.0.1.

``up`` generates host and user keys, writes an sshd config, its own known_hosts and ssh_config,
starts sshd on a free port and registers a target (``syncagent push sandbox`` then just works).
The sandbox's "remote home" is ``<dir>/remote`` (sshd sets HOME there), so a sandbox target's
default remote path is ``<dir>/remote/<project dir name>``. ``down`` stops exactly the processes
``up`` started, by pid. The test suite uses the same code as its fixture.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .config import Target, remove_user_target, user_state_dir, write_user_target
from .errors import ConfigError, OperationalError

__all__ = ["Sandbox", "up", "down", "status", "default_dir", "find_sshd", "free_port",
           "wait_until", "stop_pid"]

STATE_FILE = "sandbox.json"


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
    running: bool = True

    def target(self) -> Target:
        return Target(name=self.name, host=self.name, ssh_config=self.ssh_config,
                      remote_root=self.remote_root)

    def to_json(self) -> dict:
        return asdict(self)


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
    Path(f"{path}.pub").write_text(public + " syncagent-sandbox\n")
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
    box = Sandbox(**data)
    box.running = _alive(box.sshd_pid, box.dir)
    return box


def status(name: str = "sandbox", directory: str | os.PathLike | None = None) -> Sandbox | None:
    """The sandbox recorded in ``directory`` (running or not), or None if there is none."""
    return _load(Path(directory) if directory else default_dir(name))


def up(name: str = "sandbox", directory: str | os.PathLike | None = None,
       register: bool = True) -> Sandbox:
    """Start (or find running) the sandbox ``name``; idempotent.

    Raises:
        ConfigError: sshd is not installed. OperationalError: it did not come up.
    """
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
        f"SetEnv HOME={remote}\nSubsystem sftp internal-sftp\n"
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
    box = Sandbox(name=name, dir=str(d), host="127.0.0.1", port=port, user=user,
                  identity=str(user_key), ssh_config=str(d / "ssh_config"),
                  known_hosts=str(d / "known_hosts"), remote_root=str(remote),
                  sshd_pid=pid)
    (d / STATE_FILE).write_text(json.dumps({k: v for k, v in box.to_json().items()
                                            if k != "running"}, indent=2))
    if register:
        write_user_target(box.target())
    return box


def down(name: str = "sandbox", directory: str | os.PathLike | None = None) -> list[int]:
    """Stop exactly what ``up`` started; returns the pids stopped. Files are kept."""
    box = status(name, directory)
    stopped = []
    if box is not None and stop_pid(box.sshd_pid, box.dir):
        stopped.append(box.sshd_pid)
    remove_user_target(name)
    return stopped
