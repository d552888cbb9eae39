"""The worker launcher: ``python -m worker run``.

Installs requirements only when they changed, computes a unique node name carrying the
pushed revision, connects the readiness marker, and runs the user's Celery app unmodified
in this process (this process IS the Celery main process) with settings that lose no task.
Secrets never go into argv: broker and backend URLs travel through the app config.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from worker import ready
from worker.env import WorkerEnv, redact_url

__all__ = [
    "InstallResult",
    "VISIBILITY_MARGIN",
    "apply_settings",
    "ensure_requirements",
    "load_app",
    "node_name",
    "pip_install",
    "requirements_files",
    "requirements_hash",
    "run_worker",
    "worker_argv",
]

log = logging.getLogger("worker.launch")
VISIBILITY_MARGIN = 300


@dataclass(frozen=True)
class InstallResult:
    """Outcome of :func:`ensure_requirements`: none, skipped, installed or failed."""

    action: str
    digest: str | None
    message: str = ""


def requirements_files(root: str | os.PathLike[str]) -> list[Path]:
    """Return the sorted ``requirements*.txt`` files directly in ``root``."""
    return sorted(p for p in Path(root).glob("requirements*.txt") if p.is_file())


def requirements_hash(root: str | os.PathLike[str]) -> str | None:
    """sha256 over the sorted requirement files (name and content); None when there are none."""
    files = requirements_files(root)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def pip_install(root: Path, files: Sequence[Path]) -> tuple[bool, str]:
    """Run ``<sys.executable> -m pip install -r ...`` in ``root``.

    Returns:
        (success, last output line).
    """
    args = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    for path in files:
        args += ["-r", path.name]
    proc = subprocess.run(args, cwd=root, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, check=False)
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    err_lines = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    last = (err_lines or lines or [f"exit {proc.returncode}"])[-1]
    return proc.returncode == 0, last


def ensure_requirements(root: str | os.PathLike[str],
                        installer: Callable[[Path, Sequence[Path]], tuple[bool, str]] = pip_install,
                        ) -> InstallResult:
    """Install requirements when their hash differs from the recorded one.

    The hash is recorded only after a successful install; a failure is reported and the
    caller keeps going with the existing environment (no crash loop).

    Args:
        root: project root.
        installer: function doing the install (tests inject one).

    Returns:
        An :class:`InstallResult`.
    """
    root_path = Path(root)
    digest = requirements_hash(root_path)
    if digest is None:
        return InstallResult("none", None, "no requirements*.txt")
    state = ready.requirements_state_path(root_path)
    try:
        recorded = state.read_text(encoding="utf-8").strip()
    except OSError:
        recorded = ""
    if recorded == digest:
        return InstallResult("skipped", digest, "requirements unchanged")
    ok, last = installer(root_path, requirements_files(root_path))
    if not ok:
        return InstallResult("failed", digest, last)
    ready.ensure_state_dir(root_path)
    tmp = state.with_name(state.name + ".tmp")
    tmp.write_text(digest + "\n", encoding="utf-8")
    os.replace(tmp, state)
    return InstallResult("installed", digest, last)


def node_name(worker_name: str, colour: str, revision: str, hostname: str | None = None) -> str:
    """Return ``<WORKER_NAME>-<colour>-<rev7>@<hostname>`` (no ``%h``)."""
    host = hostname or socket.gethostname()
    return f"{worker_name}-{colour}-{ready.short_revision(revision)}@{host}"


def load_app(name: str, root: str | os.PathLike[str]) -> Any:
    """Import the Celery app named like ``celery -A`` with ``root`` first on sys.path."""
    from celery.app.utils import find_app

    root_str = str(Path(root).resolve())
    if root_str not in sys.path:
        sys.path.insert(0, root_str)
    return find_app(name)


def apply_settings(app: Any, env: WorkerEnv) -> None:
    """Apply the no-task-loss settings and broker/backend URLs to ``app.conf``.

    Keeps any other transport option; the visibility timeout is at least
    ``stopwaitsecs + 300`` (a larger existing one is kept).
    """
    visibility = env.stopwaitsecs + VISIBILITY_MARGIN
    conf = app.conf
    updates: dict[str, Any] = {
        "broker_url": env.broker_url,
        "result_backend": env.result_backend,
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        "task_reject_on_worker_lost": True,
        "broker_connection_retry_on_startup": True,
    }
    for key in ("broker_transport_options", "result_backend_transport_options"):
        options = dict(conf.get(key) or {})
        options["visibility_timeout"] = max(int(options.get("visibility_timeout") or 0),
                                            visibility)
        updates[key] = options
    conf.update(updates)


def worker_argv(env: WorkerEnv, node: str, full_start: bool = False) -> list[str]:
    """Build the ``celery worker`` argv (no secrets in it)."""
    argv = ["worker", f"--loglevel={env.log_level}", f"--concurrency={env.concurrency}",
            f"--queues={','.join(env.queues)}", f"--hostname={node}"]
    if not full_start:
        argv += ["--without-mingle", "--without-gossip"]
    return argv


def _term_with_parent() -> None:
    """Ask Linux for a TERM (Celery's warm shutdown) if supervisord dies: a worker orphaned by
    a killed supervisord would otherwise keep consuming beside the ones a new one starts."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the call above
            os.kill(os.getpid(), signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: nothing to ask


def run_worker(env: WorkerEnv, root: str | os.PathLike[str], *, install: bool = True,
               full_start: bool = False, colour: str = "blue") -> int:
    """Install requirements if needed, then run the Celery worker in this process.

    Args:
        env: validated env (already applied to ``os.environ``).
        root: project root (the cwd).
        install: False skips the requirements step.
        full_start: True keeps mingle and gossip on.
        colour: blue or green (readiness marker name).

    Returns:
        The worker's exit code.
    """
    ready.ensure_state_dir(root)
    _term_with_parent()
    if install:
        result = ensure_requirements(root)
        if result.action == "failed":
            log.error("requirements install FAILED, starting with the existing environment: %s",
                      result.message)
        else:
            log.info("requirements: %s", result.action)
    revision = ready.read_revision(root)
    node = node_name(env.worker_name, colour, revision)
    log.info("starting %s revision %s broker %s queues %s", node, revision,
             redact_url(env.broker_url), ",".join(env.queues))
    app = load_app(env.celery_app, root)
    apply_settings(app, env)
    ready.connect_signals(root, colour, revision, default_node=node)
    code = app.start(argv=worker_argv(env, node, full_start))
    return int(code or 0)
