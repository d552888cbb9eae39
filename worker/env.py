"""Load and validate the worker environment (``.env.worker`` plus the process env).

The file ``<root>/.env.worker`` is read with python-dotenv and never overrides variables that
are already set in the process environment (the process env wins, as in Flask's
``cli.load_dotenv``). Validation collects every problem at once: it also refuses a
``WORKER_API_KEY`` under 16 characters and values still left as the example file has them.
Secrets (see :mod:`worker.secret_rules`, the project's one rule set) never appear in any
message: show URLs through :func:`redact_url` and free text through :func:`redact_text`.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

from dotenv import dotenv_values

from worker import secret_rules

__all__ = [
    "DEFAULTS",
    "ENV_FILE_NAME",
    "GENERATE_KEY",
    "KNOWN_VARIABLES",
    "MIN_API_KEY_LENGTH",
    "EnvReport",
    "WorkerEnv",
    "apply_to_process",
    "env_file_mode_warning",
    "is_truthy",
    "load_values",
    "redact_text",
    "redact_url",
    "secrets_of",
    "validate",
    "value_problems",
]

ENV_FILE_NAME = ".env.worker"

DEFAULTS: dict[str, str] = {
    "CELERY_QUEUES": "gpu,celery",
    "CELERY_CONCURRENCY": "2",
    "USE_GPU_QUEUE": "true",
    "TMPDIR": "/tmp",
    "WORKER_NAME": "tundra-gpu",
    "LOG_LEVEL": "info",
    "CELERY_APP": "app.tasks.celery_app",
    "SYNCAGENT_STOPWAITSECS": "600",
}

REQUIRED = ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "FLASK_APP_URL", "WORKER_API_KEY")

KNOWN_VARIABLES = (
    "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "FLASK_APP_URL", "WORKER_API_KEY",
    "MEDIA_BASE_URL", "CELERY_QUEUES", "CELERY_CONCURRENCY", "USE_GPU_QUEUE",
    "CLIPPY_INSTANCE_PATH", "HOST_INSTANCE_PATH", "TMPDIR", "FFMPEG_DISABLE_NVENC",
    "CLIPPY_DISABLE_NVENC", "WORKER_NAME", "LOG_LEVEL", "CELERY_APP", "SYNCAGENT_STOPWAITSECS",
)

MIN_API_KEY_LENGTH = 16
GENERATE_KEY = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
# What example files leave for the user to fill in: `change-me`, `your-redis-host`,
# `<generated-key>`, and the reserved example.com/.org/.net domains (RFC 2606).
_PLACEHOLDER = re.compile(r"change[-_]?me|replace[-_]?me|\byour[-_]|<[^<>]*>", re.IGNORECASE)
_EXAMPLE_HOST = re.compile(r"(^|\.)example\.(com|org|net)$", re.IGNORECASE)
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_HTTP_SCHEMES = ("http", "https")
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical", "fatal")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def is_truthy(value: str | None) -> bool:
    """Return True for 1/true/yes/on (case-insensitive)."""
    return (value or "").strip().lower() in _TRUE


@dataclass(frozen=True)
class WorkerEnv:
    """The validated worker configuration (secrets kept out of ``repr``)."""

    broker_url: str = field(repr=False)
    result_backend: str = field(repr=False)
    flask_app_url: str
    worker_api_key: str = field(repr=False)
    media_base_url: str | None
    queues: tuple[str, ...]
    concurrency: int
    use_gpu_queue: bool
    instance_path: str | None
    host_instance_path: str | None
    tmpdir: str
    nvenc_disabled_by: str | None
    worker_name: str
    log_level: str
    celery_app: str
    stopwaitsecs: int

    @property
    def secrets(self) -> tuple[str, ...]:
        """Secret strings that must never be shown (API key, URL passwords)."""
        return secrets_of({"WORKER_API_KEY": self.worker_api_key,
                           "CELERY_BROKER_URL": self.broker_url,
                           "CELERY_RESULT_BACKEND": self.result_backend,
                           "FLASK_APP_URL": self.flask_app_url,
                           "MEDIA_BASE_URL": self.media_base_url or ""})


@dataclass(frozen=True)
class EnvReport:
    """Result of :func:`validate`: ``env`` is None when ``problems`` is not empty."""

    env: WorkerEnv | None
    problems: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when there is no validation problem."""
        return not self.problems


def load_values(root: str | os.PathLike[str],
                environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Merge ``<root>/.env.worker`` under the process environment.

    Args:
        root: project root.
        environ: process environment (default ``os.environ``); its values win.

    Returns:
        A new dict: file values, overridden by ``environ``.
    """
    env = dict(os.environ if environ is None else environ)
    path = Path(root) / ENV_FILE_NAME
    merged: dict[str, str] = {}
    if path.is_file():
        merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    merged.update(env)
    return merged


def apply_to_process(values: Mapping[str, str], environ: dict[str, str] | None = None) -> None:
    """Copy known variables missing from the process env into it (never override).

    Also sets the documented defaults, so the user's app sees the same values.
    """
    target = os.environ if environ is None else environ
    for name in KNOWN_VARIABLES:
        value = values.get(name, DEFAULTS.get(name))
        if value is not None and name not in target:
            target[name] = value


def env_file_mode_warning(root: str | os.PathLike[str]) -> str | None:
    """Return a warning when ``.env.worker`` is readable by group or others."""
    path = Path(root) / ENV_FILE_NAME
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    if mode & 0o077:
        return f"{ENV_FILE_NAME} has mode {mode:04o}: group/others can read the secrets"
    return None


def redact_url(url: str | None) -> str:
    """Return ``url`` with any password replaced by ``***`` (user names kept).

    Args:
        url: a URL, possibly with ``user:password@`` or ``:password@``.

    Returns:
        The redacted URL ("" for None). Unparseable input is fully masked.
    """
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        password = parts.password
        _ = parts.port
    except ValueError:
        return "***" if "@" in url else url
    if password is None and "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    shown = f"{user}:***" if password is not None else user
    return urlunsplit(parts._replace(netloc=f"{shown}@{hostport}"))


def secrets_of(values: Mapping[str, str | None]) -> tuple[str, ...]:
    """Return the secret strings in ``values`` (:func:`worker.secret_rules.secret_values`)."""
    return secret_rules.secret_values(values)


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """Mask every secret and URL password in ``text`` (:func:`worker.secret_rules.mask`)."""
    return secret_rules.mask(text, tuple(secrets))


def _check_url(name: str, value: str, schemes: tuple[str, ...]) -> str | None:
    shown = redact_url(value)
    try:
        parts = urlsplit(value)
        _ = parts.port
    except ValueError as exc:
        return f"{name} is not a valid URL ({shown}): {exc}"
    if parts.scheme not in schemes:
        wanted = ", ".join(f"{s}://" for s in schemes)
        return f"{name} must start with {wanted} (got {shown!r})"
    if parts.scheme == "unix":
        return None if parts.path else f"{name} must name a socket path (got {shown!r})"
    if not parts.hostname:
        return f"{name} has no host (got {shown!r})"
    return None


def _positive_int(name: str, value: str, problems: list[str]) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        problems.append(f"{name} must be a positive integer (got {value!r})")
        return 0
    if number < 1:
        problems.append(f"{name} must be a positive integer (got {value!r})")
    return number


def _get(values: Mapping[str, str], name: str) -> str:
    value = values.get(name)
    if value is None or not value.strip():
        return DEFAULTS.get(name, "")
    return value.strip()


def _nvenc_disabled_by(values: Mapping[str, str]) -> str | None:
    for name in ("FFMPEG_DISABLE_NVENC", "CLIPPY_DISABLE_NVENC"):
        if is_truthy(values.get(name)):
            return name
    return None


def _check_urls(values: Mapping[str, str], problems: list[str]) -> None:
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        if _get(values, name):
            msg = _check_url(name, _get(values, name), _REDIS_SCHEMES)
            problems.extend([msg] if msg else [])
    for name in ("FLASK_APP_URL", "MEDIA_BASE_URL"):
        if _get(values, name):
            msg = _check_url(name, _get(values, name), _HTTP_SCHEMES)
            problems.extend([msg] if msg else [])


def _is_placeholder(value: str) -> bool:
    if _PLACEHOLDER.search(value):
        return True
    try:
        host = urlsplit(value).hostname or ""
    except ValueError:
        return False
    return bool(_EXAMPLE_HOST.search(host))


def _check_secrets(values: Mapping[str, str], problems: list[str], warnings: list[str]) -> None:
    """Refuse example placeholders and a short API key; warn about short URL passwords."""
    for name in (*REQUIRED, "MEDIA_BASE_URL"):
        value = _get(values, name)
        if value and _is_placeholder(value):
            fix = (f"generate one with {GENERATE_KEY} and set the same key on the Flask app"
                   if name == "WORKER_API_KEY" else "set the real value")
            shown = "" if name == "WORKER_API_KEY" else f" ({redact_url(value)})"
            problems.append(f"{name} is still the example file's placeholder{shown}: {fix}")
    key = _get(values, "WORKER_API_KEY")
    if key and len(key) < MIN_API_KEY_LENGTH and not _is_placeholder(key):
        problems.append(f"WORKER_API_KEY is too short ({len(key)} characters, at least "
                        f"{MIN_API_KEY_LENGTH}): generate one with {GENERATE_KEY} and set the "
                        "same key on the Flask app")
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "FLASK_APP_URL",
                 "MEDIA_BASE_URL"):
        try:
            password = urlsplit(_get(values, name)).password
        except ValueError:
            continue
        if password and len(password) < secret_rules.MASK_FLOOR:
            warnings.append(f"{name} has a password shorter than {secret_rules.MASK_FLOOR} "
                            "characters: it is masked inside URLs only")


def value_problems(values: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """Check the values that are set (a missing one is no problem here).

    ``syncagent provision`` runs this on its ``--env`` pairs before it writes anything.

    Returns:
        ``(problems, warnings)``; no message contains a secret.
    """
    problems: list[str] = []
    warnings: list[str] = []
    _check_urls(values, problems)
    _check_secrets(values, problems, warnings)
    for name in ("CELERY_CONCURRENCY", "SYNCAGENT_STOPWAITSECS"):
        _positive_int(name, _get(values, name), problems)
    if not _queues(values):
        problems.append("CELERY_QUEUES must name at least one queue (e.g. gpu,celery)")
    level = _get(values, "LOG_LEVEL").lower()
    if level not in _LOG_LEVELS:
        problems.append(f"LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)} (got {level!r})")
    gpu = _get(values, "USE_GPU_QUEUE").lower()
    if gpu not in _TRUE + _FALSE:
        problems.append(f"USE_GPU_QUEUE must be true or false (got {gpu!r})")
    secrets = secrets_of(values)
    return [redact_text(p, secrets) for p in problems], warnings


def _queues(values: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(q.strip() for q in _get(values, "CELERY_QUEUES").split(",") if q.strip())


def validate(values: Mapping[str, str]) -> EnvReport:
    """Validate merged values and build a :class:`WorkerEnv`.

    Args:
        values: merged variables (see :func:`load_values`).

    Returns:
        An :class:`EnvReport` listing every problem at once; ``env`` is set only when valid.
    """
    problems = [f"{name} is required but not set (add it to {ENV_FILE_NAME})"
                for name in REQUIRED if not _get(values, name)]
    found, warnings = value_problems(values)
    problems += found
    if not _get(values, "MEDIA_BASE_URL"):
        warnings.append("MEDIA_BASE_URL is not set: media downloads (Clippy-Front) will fail")
    if problems:
        return EnvReport(None, tuple(problems), tuple(warnings))
    env = WorkerEnv(
        broker_url=_get(values, "CELERY_BROKER_URL"),
        result_backend=_get(values, "CELERY_RESULT_BACKEND"),
        flask_app_url=_get(values, "FLASK_APP_URL").rstrip("/"),
        worker_api_key=_get(values, "WORKER_API_KEY"),
        media_base_url=_get(values, "MEDIA_BASE_URL") or None,
        queues=_queues(values),
        concurrency=int(_get(values, "CELERY_CONCURRENCY")),
        use_gpu_queue=is_truthy(_get(values, "USE_GPU_QUEUE")),
        instance_path=_get(values, "CLIPPY_INSTANCE_PATH") or None,
        host_instance_path=_get(values, "HOST_INSTANCE_PATH") or None,
        tmpdir=_get(values, "TMPDIR"),
        nvenc_disabled_by=_nvenc_disabled_by(values),
        worker_name=_get(values, "WORKER_NAME"),
        log_level=_get(values, "LOG_LEVEL").lower(),
        celery_app=_get(values, "CELERY_APP"),
        stopwaitsecs=int(_get(values, "SYNCAGENT_STOPWAITSECS")),
    )
    return EnvReport(env, (), tuple(warnings))
