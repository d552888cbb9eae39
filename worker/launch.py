"""The worker launcher: ``python -m worker run``.

Enters the env built for the current requirements (:mod:`worker.envs`, by re-exec), computes
a unique node name carrying the pushed revision, connects the readiness marker, and runs the user's Celery app unmodified
in this process (this process IS the Celery main process) with settings that lose no task.
Secrets never go into argv: broker and backend URLs travel through the app config.

A worker that exits before its readiness marker, whatever its exit code (Celery exits 0 when
kombu refuses its transport), has failed to start: the launcher records the error line and
exits with :data:`FAILED_START_EXIT`, which supervisord restarts; after :data:`MAX_STARTS`
failed starts in a row it exits with :data:`GAVE_UP_EXIT`, the one code the program conf
lists as expected, so the slot stays down.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

from worker import envs, ready, standby
from worker.env import WorkerEnv, load_values, redact_text, redact_url, secrets_of

__all__ = [
    "FAILED_START_EXIT",
    "GAVE_UP_EXIT",
    "MAX_STARTS",
    "VISIBILITY_MARGIN",
    "apply_settings",
    "enter_requirements_env",
    "error_line",
    "load_app",
    "node_name",
    "run_worker",
    "worker_argv",
]

log = logging.getLogger("worker.launch")
VISIBILITY_MARGIN = 300
MAX_STARTS, FAILED_START_EXIT, GAVE_UP_EXIT = (ready.MAX_STARTS, ready.FAILED_START_EXIT,
                                               ready.GAVE_UP_EXIT)


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


class _StartWatch(logging.Handler):
    """Whether the worker got ready or was asked to stop, and the last error Celery logged
    (Celery logs an unrecoverable error and returns instead of raising)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.ready = self.stopping = self.from_exception = False
        self.error = ""

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:  # the exception says most
            self.error, self.from_exception = error_line(record.exc_info[1]), True
        elif not self.from_exception:
            self.error = (record.getMessage().strip().splitlines() or [""])[0]

    def connect(self) -> None:
        from celery import signals

        def on_ready(**_: Any) -> None:
            self.ready = True

        def on_stopping(**_: Any) -> None:
            self.stopping = True

        def on_logging(**_: Any) -> None:  # Celery empties the root and celery handlers
            logging.getLogger("celery").addHandler(self)

        signals.worker_ready.connect(on_ready, weak=False)
        signals.worker_shutting_down.connect(on_stopping, weak=False)
        signals.after_setup_logger.connect(on_logging, weak=False)
        on_logging()


def error_line(exc: BaseException) -> str:
    """``module.Type: message``, as a traceback's last line says it."""
    lines = traceback.format_exception_only(type(exc), exc)
    return lines[-1].strip() if lines else type(exc).__name__


def _record_modules_at_ready(root: str | os.PathLike[str]) -> None:
    """At ``worker_ready``, record the modules loaded outside the project: the next standby
    imports them ahead."""
    from celery import signals

    def on_ready(**_: Any) -> None:
        try:
            standby.record_modules(root)
        except OSError as exc:
            log.warning("could not record the loaded modules: %s", exc)

    signals.worker_ready.connect(on_ready, weak=False)


def _gave_up(root: str | os.PathLike[str], colour: str) -> dict | None:
    """The slot's failed-start record when it has used up its starts under this supervisord."""
    failed = ready.read_failed_start(root, colour)
    if failed and failed.get("supervisor") == os.getppid() and \
            int(failed.get("count") or 0) >= MAX_STARTS:
        return failed
    return None


def _failed_start(env: WorkerEnv, root: str | os.PathLike[str], colour: str, revision: str,
                  error: str) -> int:
    """Record a start that ended before the readiness marker; return the exit code."""
    secrets = set(env.secrets) | set(secrets_of(load_values(root)))  # every .env.worker secret
    error = redact_text(error or "the worker exited before it was ready", secrets)
    count = ready.record_failed_start(root, colour, revision, error, os.getppid())
    if count >= MAX_STARTS:
        log.error("worker failing: %s (failed start %d of %d: the slot stays down until the "
                  "next restart)", error, count, MAX_STARTS)
        return GAVE_UP_EXIT
    log.error("worker failing: %s (failed start %d of %d)", error, count, MAX_STARTS)
    return FAILED_START_EXIT


def run_worker(env: WorkerEnv, root: str | os.PathLike[str], *, install: bool = True,
               full_start: bool = False, colour: str = "blue") -> int:
    """Install requirements if needed, then run the Celery worker in this process.

    Args:
        env: validated env (already applied to ``os.environ``).
        root: project root (the cwd).
        install: False skips the requirements step (already in the env).
        full_start: True keeps mingle and gossip on.
        colour: blue, green or red (readiness marker name).

    Returns:
        The worker's exit code; :data:`FAILED_START_EXIT` or :data:`GAVE_UP_EXIT` when it
        ended before it was ready (see the module docstring).
    """
    ready.ensure_state_dir(root)
    _term_with_parent()
    gave_up = _gave_up(root, colour)
    if gave_up:  # supervisord retries a quick exit once more: no start, no install
        log.error("not starting: %d failed starts in a row, the last: %s", gave_up["count"],
                  gave_up.get("error"))
        return GAVE_UP_EXIT
    revision = ready.read_revision(root)
    if install and enter_requirements_env(root, full_start) != 0:
        return _failed_start(env, root, colour, revision, "requirements install FAILED: fix "
                             "requirements*.txt and push again (the log has its last lines)")
    warm = standby.park_requested(root, colour)
    go = standby.park(root, colour) if warm else standby.take_go(root, colour)
    if warm and go is None:
        return standby.STALE_EXIT  # supervisord starts the slot again: it parks afresh
    revision = go["revision"] if go else revision
    node = node_name(env.worker_name, colour, revision)
    log.info("starting %s revision %s broker %s queues %s", node, revision,
             redact_url(env.broker_url), ",".join(env.queues))
    watch = _StartWatch()
    try:
        app = load_app(env.celery_app, root)
        apply_settings(app, env)
        _record_modules_at_ready(root)  # first: the marker parks the next standby
        ready.connect_signals(root, colour, revision, default_node=node,
                              extra={"warm": warm, "parked_s": (go or {}).get("parked_s")})
        watch.connect()
        code = app.start(argv=worker_argv(env, node, full_start))
    except Exception as exc:  # the user's code or a dependency: a failed start, not a crash
        if watch.ready:
            raise
        log.exception("the worker did not start")
        return _failed_start(env, root, colour, revision, error_line(exc))
    if not watch.ready and not watch.stopping:
        return _failed_start(env, root, colour, revision, watch.error)
    return int(code or 0)
