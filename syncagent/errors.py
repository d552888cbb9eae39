"""The typed error hierarchy. Each class carries its data and its exit code.

Exit codes (the interface contract): 0 ok, 1 operational failure (remote, network, worker),
2 usage or configuration error, 3 refused for safety. Only ``cli.py`` turns them into exits.
"""

from __future__ import annotations

__all__ = [
    "SyncAgentError",
    "OperationalError",
    "ConnectError",
    "AuthError",
    "RemoteError",
    "AgentError",
    "WorkerStartError",
    "StepError",
    "Interrupted",
    "ConfigError",
    "TargetError",
    "SafetyError",
    "UnknownHostKeyError",
    "HostKeyChangedError",
    "MassDeleteError",
    "mass_delete_counts",
    "PathEscapeError",
    "AgentCacheError",
    "error_from_wire",
]


class SyncAgentError(Exception):
    """Base class: ``str(err)`` is the one-line message shown to the user."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class OperationalError(SyncAgentError):
    """Something on the remote, the network or the worker failed (exit 1)."""

    exit_code = 1


class ConnectError(OperationalError):
    """The SSH connection could not be made or was lost."""


class AuthError(ConnectError):
    """The server refused every key we offered."""


class RemoteError(OperationalError):
    """The remote agent reported a failure (disk full, not writable, ...)."""

    def __init__(self, message: str, *, kind: str = "RemoteError", hint: str | None = None):
        super().__init__(message, hint=hint)
        self.kind = kind


class AgentError(OperationalError):
    """The agent could not be started or spoke an unexpected protocol."""


class WorkerStartError(OperationalError):
    """The worker did not become ready; carries the redacted tail of its log."""

    def __init__(self, message: str, log_tail: list[str], log_path: str):
        tail = "".join(f"\n  | {line}" for line in log_tail)
        super().__init__(f"{message}; last lines of {log_path}:{tail}" if log_tail else message)
        self.log_tail, self.log_path = log_tail, log_path


class StepError(OperationalError):
    """A remote step (of provision) failed; carries the redacted output lines before it."""

    def __init__(self, message: str, tail: list[str] | tuple[str, ...] = (), *,
                 hint: str | None = None):
        super().__init__(message, hint=hint)
        self.tail = list(tail)

    def __str__(self) -> str:
        return super().__str__() + "".join(f"\n  | {line}" for line in self.tail)


class Interrupted(OperationalError):
    """The user interrupted the command (Ctrl-C); the message says what stands on each
    target (exit 130, as a shell reports SIGINT)."""

    exit_code = 130


class ConfigError(SyncAgentError):
    """Bad configuration or usage (exit 2)."""

    exit_code = 2


class TargetError(ConfigError):
    """A TARGET could not be resolved."""


class SafetyError(SyncAgentError):
    """Refused for safety (exit 3)."""

    exit_code = 3


class UnknownHostKeyError(SafetyError):
    def __init__(self, host: str, key_type: str, fingerprint: str, trust_command: str):
        super().__init__(
            f"unknown host key for {host}: {key_type} {fingerprint}",
            hint=f"check it, then run `{trust_command}` or pass --trust-new-host",
        )
        self.host, self.key_type, self.fingerprint = host, key_type, fingerprint


class HostKeyChangedError(SafetyError):
    def __init__(self, host: str, fingerprint: str, expected: str, known_hosts: str):
        super().__init__(
            f"HOST KEY CHANGED for {host}: got {fingerprint}, known_hosts has {expected}",
            hint=f"possible man-in-the-middle; if the change is expected, remove the old "
            f"line from {known_hosts} yourself",
        )
        self.host, self.fingerprint, self.expected = host, fingerprint, expected


def mass_delete_counts(deletes: int, files: int, where: str = "") -> str:
    """What a refusal counts, in words: ``deletes`` files lost since the last confirmation,
    when the remote held ``files``. Losses add up over batches, including files that arrived
    after the confirmation, so ``deletes`` can exceed ``files``: "35 of 31" would be nonsense.
    """
    on = f" {where}" if where else ""
    if deletes <= files:
        return f"{deletes} of {files} remote files{on}"
    return f"{deletes} files{on} since the last confirmation, when the remote held {files}"


class MassDeleteError(SafetyError):
    """The safety policy refused a plan: more files would lose their content than allowed."""

    def __init__(self, deletes: int, remote_files: int, target: str | None = None,
                 hint: str | None = None, paths: tuple[str, ...] = ()):
        super().__init__(
            "refusing to delete " + mass_delete_counts(deletes, remote_files,
                                                       f"on {target}" if target else ""),
            hint=hint or "check --remote-path and --path, then pass --allow-mass-delete",
        )
        self.deletes, self.remote_files, self.target = deletes, remote_files, target
        self.paths = paths  # some of the files whose content would be lost


class PathEscapeError(SafetyError):
    """A path or a symlink would reach outside the project root."""


class AgentCacheError(SafetyError):
    """The remote's agent cache directory could let someone else change the agent we run."""

    def __init__(self, host: str, why: str):
        super().__init__(f"{host}: refusing to run the agent from ~/.cache/syncagent: {why}",
                         hint="fix it with `chmod 700 ~/.cache/syncagent` as its owner, or "
                              "remove it")
        self.host, self.why = host, why


_WIRE_TYPES = {
    "PathEscape": PathEscapeError,
    "Config": ConfigError,
}


def error_from_wire(error: dict) -> SyncAgentError:
    """Turn an agent's ``{"type", "message"}`` error back into a typed error."""
    kind = str(error.get("type", "RemoteError"))
    message = str(error.get("message", "remote error"))
    cls = _WIRE_TYPES.get(kind)
    if cls is not None:
        return cls(message)
    return RemoteError(message, kind=kind)
