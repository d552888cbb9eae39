"""SSH connections with paramiko: ssh_config, keys and agent, known_hosts, keepalive.

Unknown host keys are refused (paramiko's RejectPolicy, with the fingerprint in the error);
only an explicit trust step records one. A changed host key is always refused.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import paramiko

from .config import Target
from .errors import (AuthError, ConnectError, HostKeyChangedError, UnknownHostKeyError)

__all__ = ["Endpoint", "resolve_endpoint", "connect", "fingerprint", "KEEPALIVE_S"]

KEEPALIVE_S = 2
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom to connect, after ssh_config."""

    alias: str
    hostname: str
    port: int
    user: str
    identities: tuple[str, ...]
    identities_only: bool
    known_hosts: str
    proxy_command: str | None

    @property
    def host_key_name(self) -> str:
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _ssh_config(target: Target) -> paramiko.SSHConfigDict:
    path = Path(target.ssh_config or "~/.ssh/config").expanduser()
    if not path.is_file():
        return paramiko.SSHConfigDict()
    return paramiko.SSHConfig.from_path(str(path)).lookup(target.host)


def _ssh_alias(target: Target) -> bool:
    """True when ``target.host`` is a ``Host`` entry of the ssh_config (not only a pattern's
    match): then it is the user's name for a host, not a misspelt target."""
    path = Path(target.ssh_config or "~/.ssh/config").expanduser()
    return path.is_file() and target.host in paramiko.SSHConfig.from_path(str(path)).get_hostnames()


def resolve_endpoint(target: Target) -> Endpoint:
    """Apply flag > ssh_config > project config > default, one line per field."""
    cfg = _ssh_config(target)
    hostname = cfg.get("hostname", target.host)
    port = int(target.port or cfg.get("port", 22))
    user = target.user or cfg.get("user") or os.environ.get("USER") or "root"
    identities = tuple(os.path.expanduser(p) for p in (
        [target.identity] if target.identity else cfg.get("identityfile", [])))
    known = cfg.get("userknownhostsfile", DEFAULT_KNOWN_HOSTS).split()[0]
    return Endpoint(
        alias=target.host, hostname=hostname, port=port, user=user, identities=identities,
        identities_only=cfg.get("identitiesonly", "no").lower() == "yes" or bool(target.identity),
        known_hosts=os.path.expanduser(known), proxy_command=cfg.get("proxycommand"),
    )


class _Transport(paramiko.Transport):
    """paramiko's transport with the AEAD ciphers (AES-GCM) offered first: no separate MAC
    per packet. Sending a push's data through paramiko costs ~40 % less CPU with
    aes128-gcm@openssh.com than with its default aes128-ctr + hmac-sha2-256 (bench/README.md,
    issue 12 third pass), and sshd's side is cheaper too. A server without them still gets
    the rest of paramiko's list, in paramiko's order."""

    _preferred_ciphers = tuple(sorted(paramiko.Transport._preferred_ciphers,
                                      key=lambda c: not c.endswith("-gcm@openssh.com")))


class _Refuse(paramiko.MissingHostKeyPolicy):
    def __init__(self, trust_command: str):
        self.trust_command = trust_command

    def missing_host_key(self, client, hostname, key):
        raise UnknownHostKeyError(hostname, key.get_name(), fingerprint(key), self.trust_command)


class _Record(paramiko.MissingHostKeyPolicy):
    """The explicit trust step: append the new key to known_hosts (never replaces one)."""

    def __init__(self, known_hosts: str):
        self.known_hosts = known_hosts
        self.recorded: tuple[str, str] | None = None

    def missing_host_key(self, client, hostname, key):
        path = Path(self.known_hosts)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.recorded = (key.get_name(), fingerprint(key))


def connect(target: Target, *, trust_new: bool = False, timeout: float = 10.0
            ) -> tuple[paramiko.SSHClient, Endpoint, tuple[str, str] | None]:
    """Open an authenticated SSH connection to ``target``.

    Returns:
        (client, endpoint, recorded) where ``recorded`` is (key type, fingerprint) when an
        unknown host key was trusted by this call, else None.

    Raises:
        UnknownHostKeyError, HostKeyChangedError (exit 3); AuthError, ConnectError (exit 1).
    """
    ep = resolve_endpoint(target)
    client = paramiko.SSHClient()
    try:
        client.load_system_host_keys("/etc/ssh/ssh_known_hosts")
    except OSError:
        pass
    if os.path.isfile(ep.known_hosts):
        client.load_host_keys(ep.known_hosts)
    recorder = _Record(ep.known_hosts) if trust_new else None
    client.set_missing_host_key_policy(recorder or _Refuse(f"syncagent trust {target.name}"))
    sock = paramiko.ProxyCommand(ep.proxy_command) if ep.proxy_command else None
    where = f"{ep.user}@{ep.hostname}:{ep.port}"
    try:
        client.connect(
            ep.hostname, port=ep.port, username=ep.user, key_filename=list(ep.identities) or None,
            look_for_keys=not ep.identities_only, allow_agent=True, timeout=timeout,
            banner_timeout=timeout, auth_timeout=timeout, sock=sock,
            transport_factory=_Transport,
        )
    except paramiko.BadHostKeyException as e:
        client.close()
        raise HostKeyChangedError(ep.host_key_name, fingerprint(e.key),
                                  fingerprint(e.expected_key), ep.known_hosts) from None
    except (UnknownHostKeyError, HostKeyChangedError):
        client.close()
        raise
    except paramiko.AuthenticationException as e:
        client.close()
        tried = ", ".join(ep.identities) or "default keys and ssh-agent"
        raise AuthError(f"authentication refused for {where} (tried {tried})") from e
    except (socket.timeout, TimeoutError) as e:
        client.close()
        raise ConnectError(f"cannot reach {where}: timed out") from e
    except (OSError, paramiko.SSHException, EOFError) as e:
        client.close()
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError):
            reason = "connection refused"
        unresolved = isinstance(e, socket.gaierror) and not _ssh_alias(target)
        raise ConnectError(f"cannot reach {where}: {reason}",
                           hint=target.name_hint if unresolved else None) from e
    transport = client.get_transport()
    transport.set_keepalive(KEEPALIVE_S)
    return client, ep, recorder.recorded if recorder else None
