"""The worker launcher: ``python -m worker run``.

Enters the env built for the current requirements (:mod:`worker.envs`, by re-exec), computes
a unique node name carrying the pushed revision, connects the readiness marker, and runs the user's Celery app unmodified
in this process (this process IS the Celery main process) with settings that lose no task.
Secrets never go into argv: broker and backend URLs travel through the app config.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from worker import envs, ready
from worker.env import WorkerEnv, redact_url

__all__ = [
    "VISIBILITY_MARGIN",
    "apply_settings",
    "enter_requirements_env",
    "load_app",
    "node_name",
    "run_worker",
    "worker_argv",
]

log = logging.getLogger("worker.launch")
VISIBILITY_MARGIN = 300


def enter_requirements_env(root: str | os.PathLike[str], full_start: bool = False) -> int:
    """Make sure the env for the current requirements exists, then re-exec into its python.

    Builds it if needed (serialised per project, see :mod:`worker.envs`). Returns only when
    this process should run the worker as it is (no requirements, or already in the env).

    Returns:
        0 to go on here; 1 when the env could not be built (its last lines are logged).
    """
    result = envs.ensure_env(root, on_line=lambda line: log.info("install: %s", line))
    if result.action == "none":
        log.info("requirements: none, running in %s", sys.prefix)
        return 0
    if result.action == "failed":
        log.error("requirements install FAILED (%s, %.1f s); not starting: fix "
                  "requirements*.txt and push again. Last lines:\n%s", result.installer,
                  result.seconds, "\n".join(result.tail))
        return 1
    log.info("requirements: env %s %s%s", os.path.basename(result.path or ""), result.action,
             f" by {result.installer} in {result.seconds:.1f} s" if result.seconds else "")
    if result.pruned:
        log.info("pruned stale envs: %s", ", ".join(result.pruned))
    argv = [result.python or "", "-m", "worker", "run", "--no-install",
            *(["--full-start"] if full_start else [])]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)  # same pid: supervisord keeps watching this process
    return 0  # not reached


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
        install: False skips the requirements step (already in the env).
        full_start: True keeps mingle and gossip on.
        colour: blue or green (readiness marker name).

    Returns:
        The worker's exit code.
    """
    ready.ensure_state_dir(root)
    _term_with_parent()
    if install and enter_requirements_env(root, full_start) != 0:
        return 1
    revision = ready.read_revision(root)
    node = node_name(env.worker_name, colour, revision)
    log.info("starting %s revision %s broker %s queues %s", node, revision,
             redact_url(env.broker_url), ",".join(env.queues))
    app = load_app(env.celery_app, root)
    apply_settings(app, env)
    ready.connect_signals(root, colour, revision, default_node=node)
    code = app.start(argv=worker_argv(env, node, full_start))
    return int(code or 0)
