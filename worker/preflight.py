"""Preflight checks for the remote worker (``python -m worker doctor``).

Each check is a small function taking the validated :class:`~worker.env.WorkerEnv` and
returning a :class:`Check`; tests call them directly. Every network call has a timeout.
No check output ever contains a secret (API key, URL passwords).

The start probe (:func:`check_worker_start`) does what ``python -m worker run`` does, short of
consuming, in a subprocess: import the app and its ``include`` modules, apply the launcher's
settings, import and connect the broker transport, release. For a conflict it recognises
(:func:`conflict_fix`: kombu refusing the installed redis-py) it names the pin to change.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import requests

from worker.env import WorkerEnv, env_file_mode_warning, redact_text, redact_url

__all__ = [
    "Check",
    "NET_TIMEOUT",
    "NVENC_TEST_ARGS",
    "check_api_key",
    "check_celery_app",
    "check_worker_start",
    "conflict_fix",
    "check_env_file",
    "check_flask_api",
    "check_gpu",
    "check_instance_path",
    "check_media_base_url",
    "check_nvenc",
    "check_redis",
    "check_result_backend",
    "check_broker",
    "check_tmpdir_filesystem",
    "probe_main",
    "probe_start",
    "requirement_pins",
    "render_json",
    "render_table",
    "run_checks",
]

NET_TIMEOUT = 2.5
OK, WARN, FAIL = "ok", "warn", "fail"
NVENC_TEST_ARGS = ("-hide_banner", "-f", "lavfi", "-i", "color=size=320x180:rate=30",
                   "-frames:v", "1", "-c:v", "h264_nvenc", "-pix_fmt", "yuv420p", "-f", "null", "-")


@dataclass(frozen=True)
class Check:
    """One preflight result: ``status`` is ok, warn or fail."""

    name: str
    status: str
    detail: str
    fix: str = ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def check_redis(name: str, url: str, secrets: Iterable[str] = ()) -> Check:
    """PING a Redis URL with a short timeout.

    Args:
        name: check name shown in the table.
        url: redis://, rediss:// or unix:// URL.
        secrets: strings to redact from error text.

    Returns:
        ok when PING answers, fail otherwise.
    """
    import redis

    shown = redact_url(url)
    try:
        client = redis.Redis.from_url(url, socket_timeout=NET_TIMEOUT,
                                      socket_connect_timeout=NET_TIMEOUT)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # redis raises many types; all mean "not usable"
        reason = redact_text(_last_line(str(exc)) or type(exc).__name__, secrets)
        return Check(name, FAIL, f"{shown}: {reason}",
                     "start redis or fix the URL/password; check firewall and bind address")
    return Check(name, OK, f"{shown}: PING ok")


def check_broker(env: WorkerEnv) -> Check:
    """PING the Celery broker (CELERY_BROKER_URL)."""
    return check_redis("redis broker", env.broker_url, env.secrets)


def check_result_backend(env: WorkerEnv) -> Check:
    """PING the Celery result backend (CELERY_RESULT_BACKEND)."""
    return check_redis("redis result backend", env.result_backend, env.secrets)


def check_flask_api(env: WorkerEnv) -> Check:
    """``GET {FLASK_APP_URL}/api/health`` answers 2xx."""
    url = f"{env.flask_app_url}/api/health"
    shown = redact_url(url)
    try:
        resp = requests.get(url, timeout=NET_TIMEOUT)
    except requests.RequestException as exc:
        reason = redact_text(type(exc).__name__, env.secrets)
        return Check("flask api", FAIL, f"{shown} unreachable ({reason})",
                     "check FLASK_APP_URL and that the web app is running and reachable")
    if resp.ok:
        return Check("flask api", OK, f"{shown}: HTTP {resp.status_code}")
    return Check("flask api", FAIL, f"{shown}: HTTP {resp.status_code}",
                 "check FLASK_APP_URL points at the web app (worker API base)")


def check_api_key(env: WorkerEnv) -> Check:
    """``GET /api/worker/jobs/0`` with the Bearer key: 404 = key accepted, 401/403 = bad key."""
    url = f"{env.flask_app_url}/api/worker/jobs/0"
    shown = redact_url(url)
    headers = {"Authorization": f"Bearer {env.worker_api_key}"}
    try:
        resp = requests.get(url, headers=headers, timeout=NET_TIMEOUT)
    except requests.RequestException as exc:
        return Check("worker api key", FAIL, f"{shown} unreachable ({type(exc).__name__})",
                     "fix the flask api check first")
    code = resp.status_code
    if code in (401, 403):
        return Check("worker api key", FAIL, f"key rejected (HTTP {code})",
                     "set WORKER_API_KEY to the server's WORKER_API_KEY")
    if code in (200, 404):
        return Check("worker api key", OK, f"key accepted (HTTP {code} for job 0)")
    return Check("worker api key", WARN, f"unexpected HTTP {code} from {shown}",
                 "check the server log; the key could not be verified")


def check_media_base_url(env: WorkerEnv) -> Check:
    """MEDIA_BASE_URL is set (a warning only: non-Clippy apps may not need it)."""
    if env.media_base_url:
        return Check("media base url", OK, redact_url(env.media_base_url))
    return Check("media base url", WARN, "MEDIA_BASE_URL not set (media downloads will fail)",
                 "set MEDIA_BASE_URL in .env.worker to the server's public base URL")


def _writable(path: Path) -> str | None:
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".syncagent-probe-"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_instance_path(env: WorkerEnv) -> Check:
    """CLIPPY_INSTANCE_PATH exists, is a directory and is writable."""
    if not env.instance_path:
        return Check("instance path", WARN, "CLIPPY_INSTANCE_PATH not set",
                     "set CLIPPY_INSTANCE_PATH to the shared instance directory (Clippy-Front)")
    path = Path(env.instance_path)
    if not path.is_dir():
        return Check("instance path", FAIL, f"{path} does not exist or is not a directory",
                     f"mount the shared storage or create it: mkdir -p {path}")
    error = _writable(path)
    if error:
        return Check("instance path", FAIL, f"{path} is not writable ({error})",
                     f"give the worker user write access to {path}")
    return Check("instance path", OK, f"{path} exists and is writable")


def check_tmpdir_filesystem(env: WorkerEnv) -> Check:
    """TMPDIR is on the same filesystem as the instance path (else EXDEV on rename)."""
    if not env.instance_path:
        return Check("tmpdir filesystem", WARN, "CLIPPY_INSTANCE_PATH not set; not compared", "")
    tmp, inst = Path(env.tmpdir), Path(env.instance_path)
    try:
        tmp_dev, inst_dev = tmp.stat().st_dev, inst.stat().st_dev
    except OSError as exc:
        return Check("tmpdir filesystem", FAIL, f"cannot stat: {exc.strerror} ({exc.filename})",
                     f"create TMPDIR, e.g. TMPDIR={inst / 'tmp'}")
    if tmp_dev != inst_dev:
        return Check("tmpdir filesystem", FAIL,
                     f"TMPDIR {tmp} and instance path {inst} are on different filesystems: "
                     "final renames fail with EXDEV",
                     f"set TMPDIR={inst / 'tmp'} (and mkdir it)")
    return Check("tmpdir filesystem", OK, f"TMPDIR {tmp} on the same filesystem as {inst}")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def check_gpu(env: WorkerEnv) -> Check:
    """``nvidia-smi -L`` lists a GPU (absence is a warning: CPU-only boxes are valid)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return Check("gpu", WARN, "no nvidia-smi: no NVIDIA GPU/driver visible (CPU only)",
                     "install the NVIDIA driver if this box has a GPU")
    try:
        proc = _run([exe, "-L"], timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("gpu", WARN, f"nvidia-smi failed: {type(exc).__name__}",
                     "check the NVIDIA driver (nvidia-smi)")
    gpus = [line for line in proc.stdout.splitlines() if line.startswith("GPU ")]
    if proc.returncode != 0 or not gpus:
        reason = _last_line(proc.stderr or proc.stdout) or f"exit {proc.returncode}"
        return Check("gpu", WARN, f"nvidia-smi: {reason}", "check the NVIDIA driver")
    extra = f" (+{len(gpus) - 1} more)" if len(gpus) > 1 else ""
    return Check("gpu", OK, gpus[0].split(" (UUID")[0] + extra)


def check_nvenc(env: WorkerEnv) -> Check:
    """NVENC usable: ffmpeg lists h264_nvenc AND a one-frame test encode succeeds.

    The detail names the evidence: disabled, no ffmpeg, no encoder, test failed/passed.
    """
    if env.nvenc_disabled_by:
        return Check("nvenc", OK, f"disabled by {env.nvenc_disabled_by} (CPU encoding)", "")
    exe = shutil.which("ffmpeg")
    if not exe:
        return Check("nvenc", WARN, "no ffmpeg on PATH", "install ffmpeg (with NVENC support)")
    try:
        listing = _run([exe, "-hide_banner", "-encoders"], timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("nvenc", WARN, f"ffmpeg -encoders failed: {type(exc).__name__}", "")
    if "h264_nvenc" not in listing.stdout:
        return Check("nvenc", WARN, "ffmpeg has no h264_nvenc encoder (CPU encoding fallback)",
                     "use an ffmpeg build with --enable-nvenc")
    try:
        test = _run([exe, *NVENC_TEST_ARGS], timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("nvenc", WARN, f"test encode failed: {type(exc).__name__}", "")
    if test.returncode != 0:
        return Check("nvenc", WARN,
                     f"test encode failed: {_last_line(test.stderr) or f'exit {test.returncode}'}"
                     " (GPU present, NVENC not usable: CPU encoding fallback)",
                     "check the driver's NVENC support; data-centre GPUs (H100) have no NVENC")
    return Check("nvenc", OK, "test encode passed (h264_nvenc)")


_REDIS_PY_TOO_OLD = re.compile(r"requires redis-py versions? ([0-9.]+) or later\. "
                               r"You have ([0-9A-Za-z.+-]+)")
_PIN_LINE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([<>=!~][^;#]*)?")


def requirement_pins(root: str | os.PathLike[str]) -> dict[str, tuple[str, str]]:
    """``{normalised name: (file name, version spec)}`` of the ``requirements*.txt`` lines in
    ``root`` (the files ``python -m worker run`` installs)."""
    pins: dict[str, tuple[str, str]] = {}
    for path in sorted(Path(root).glob("requirements*.txt")):
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            match = _PIN_LINE.match(line)
            if match and not line.lstrip().startswith(("-", "#")):
                name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
                pins[name] = (path.name, (match.group(3) or "").strip())
    return pins


def conflict_fix(error: str, versions: dict[str, str],
                 pins: dict[str, tuple[str, str]]) -> str | None:
    """Name the fix for a dependency conflict that ``error`` shows, or None.

    Pure. Recognised: kombu's Redis transport refusing the installed redis-py.

    Args:
        error: the error line.
        versions: installed versions, e.g. ``{"kombu": "5.7.0", "redis": "5.0.1"}``.
        pins: :func:`requirement_pins` of the project.

    Returns:
        One line: which pin to change and to what.
    """
    match = _REDIS_PY_TOO_OLD.search(error)
    if not match:
        return None
    needed, have = match.groups()
    kombu = versions.get("kombu", "")
    major_minor = ".".join(kombu.split(".")[:2])
    older_kombu = f"pin kombu<{major_minor}" if major_minor else "pin an older kombu"
    if "redis" in pins:
        where, spec = pins["redis"]
        pinned = f"{where} pins redis{spec}" if spec else f"{where} names redis"
    else:
        pinned = f"redis {have} is installed (no requirements pin names it)"
    return (f"{pinned} but kombu {kombu or '(installed)'} needs redis>={needed}: raise the "
            f"redis pin (redis>={needed}) or {older_kombu} (an older kombu that accepts "
            f"redis {have})")


def _installed_versions(*names: str) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _fail(name: str, detail: str, fix: str, env: WorkerEnv, root: str | os.PathLike[str]
          ) -> Check:
    conflict = conflict_fix(detail, _installed_versions("kombu", "redis", "celery"),
                            requirement_pins(root))
    return Check(name, FAIL, redact_text(detail, env.secrets), conflict or fix)


def probe_start(env: WorkerEnv, root: str | os.PathLike[str]) -> list[Check]:
    """What the worker's start does, short of consuming (in this process: run it in a child).

    Returns:
        Checks ``celery app``, ``app modules`` and ``broker transport``; the first that fails
        ends the list.
    """
    from worker import launch

    try:
        app = launch.load_app(env.celery_app, root)
    except Exception as exc:  # whatever the user's import raises
        return [_fail("celery app", f"cannot import {env.celery_app}: "
                      f"{launch.error_line(exc)}", "fix the error above; install requirements "
                      "(python -m worker run does)", env, root)]
    launch.apply_settings(app, env)
    checks = [Check("celery app", OK, f"{env.celery_app} imports")]
    for step in (_import_modules, _connect_transport):
        checks.append(step(app, env, root))
        if checks[-1].status == FAIL:
            break
    return checks


def _import_modules(app: Any, env: WorkerEnv, root: str | os.PathLike[str]) -> Check:
    """Import the app's ``include`` and ``imports`` modules, as the worker does at its start."""
    from worker.launch import error_line

    modules = list(app.loader.default_modules)
    for module in modules:
        try:
            app.loader.import_task_module(module)
        except Exception as exc:  # whatever the user's import raises
            return _fail("app modules", f"cannot import {module}: {error_line(exc)}",
                         f"fix {module} (the app's include/imports): the worker would not "
                         "start", env, root)
    listed = f" ({', '.join(modules[:4])}{' ...' if len(modules) > 4 else ''})" if modules else ""
    return Check("app modules", OK, f"{len(modules)} imported{listed}")


def _connect_transport(app: Any, env: WorkerEnv, root: str | os.PathLike[str]) -> Check:
    """Import the broker transport and connect it with the worker's settings, then release."""
    from worker.launch import error_line

    shown = redact_url(env.broker_url)
    conn = app.connection_for_read(connect_timeout=NET_TIMEOUT)
    try:
        transport = type(conn.transport).__module__
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                               timeout=NET_TIMEOUT)
    except Exception as exc:  # the transport import, its version checks, the connection
        return _fail("broker transport", f"{shown}: {error_line(exc)}",
                     "start the broker or fix CELERY_BROKER_URL; check firewall and bind "
                     "address", env, root)
    finally:
        conn.release()
    return Check("broker transport", OK, f"{shown}: connected with {transport}")


def probe_main(argv: list[str]) -> int:
    """Child entry of :func:`check_worker_start`: ``probe_main([root])`` prints the checks as
    one JSON list (the env comes from ``.env.worker`` and the process, as for the worker)."""
    from worker import env as envmod

    root = argv[0]
    report = envmod.validate(envmod.load_values(root))
    if report.env is None:
        print(json.dumps([asdict(Check("worker start", FAIL, "; ".join(report.problems),
                                       "fix .env.worker"))]))
        return 1
    _quiet_logging()
    print(json.dumps([asdict(c) for c in probe_start(report.env, root)]))
    return 0


def _quiet_logging() -> None:
    """Keep kombu's and the app's import-time logging off the probe's JSON stdout."""
    import logging

    logging.basicConfig(level=logging.CRITICAL, stream=sys.stderr)


_PROBE_SNIPPET = ("import sys; sys.path.insert(0, sys.argv[1]);"
                  "from worker.preflight import probe_main; sys.exit(probe_main(sys.argv[1:]))")


def check_worker_start(env: WorkerEnv, root: str | os.PathLike[str] | None = None
                       ) -> list[Check]:
    """Run :func:`probe_start` in a child process with the project root on sys.path.

    Args:
        env: validated env.
        root: project root (default: cwd).

    Returns:
        The probe's checks (a single failed ``worker start`` check when the child dies).
    """
    root_dir = str(Path(root) if root is not None else Path.cwd())
    # the child builds the same env from these (never from its command line)
    environ = {**os.environ, "CELERY_BROKER_URL": env.broker_url,
               "CELERY_RESULT_BACKEND": env.result_backend, "FLASK_APP_URL": env.flask_app_url,
               "WORKER_API_KEY": env.worker_api_key, "CELERY_APP": env.celery_app,
               "SYNCAGENT_STOPWAITSECS": str(env.stopwaitsecs)}
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE_SNIPPET, root_dir],
                              capture_output=True, text=True, timeout=60, cwd=root_dir,
                              stdin=subprocess.DEVNULL, check=False, env=environ)
    except subprocess.TimeoutExpired:
        return [Check("worker start", FAIL, "the start probe took over 60 s",
                      "check for blocking work at import time")]
    try:
        return [Check(**c) for c in json.loads(proc.stdout.strip().splitlines()[-1])]
    except (ValueError, IndexError, TypeError):
        reason = redact_text(_last_line(proc.stderr) or f"exit {proc.returncode}", env.secrets)
        return [Check("worker start", FAIL, f"the start probe failed: {reason}",
                      "run python -m worker run by hand to see the traceback")]


def check_celery_app(env: WorkerEnv, root: str | os.PathLike[str] | None = None) -> Check:
    """Import CELERY_APP (and its modules) as the worker does; the ``celery app`` check of
    :func:`check_worker_start`, or the first failure before it."""
    checks = check_worker_start(env, root)
    return next((c for c in checks if c.name == "celery app"), checks[0])


def check_env_file(root: str | os.PathLike[str]) -> Check:
    """``.env.worker`` is not readable by group/others."""
    warning = env_file_mode_warning(root)
    if warning:
        return Check("env file", WARN, warning,
                     f"chmod 600 {Path(root) / '.env.worker'}")
    return Check("env file", OK, "private or absent (process env only)")


def run_checks(env: WorkerEnv, root: str | os.PathLike[str]) -> list[Check]:
    """Run every check in order.

    Returns:
        The list of checks (never raises for a failing check).
    """
    checks: list[Callable[[WorkerEnv], Check]] = [
        check_broker, check_result_backend, check_flask_api, check_api_key,
        check_media_base_url, check_instance_path, check_tmpdir_filesystem,
        check_gpu, check_nvenc,
    ]
    results = [check_env_file(root)]
    results += [fn(env) for fn in checks]
    results += check_worker_start(env, root)
    return [Check(c.name, c.status, redact_text(c.detail, env.secrets),
                  redact_text(c.fix, env.secrets)) for c in results]


def render_json(checks: list[Check], problems: Iterable[str] = ()) -> str:
    """Return one JSON object ``{"checks": [...], "ok": bool}`` (plus ``problems``)."""
    items = list(problems)
    data: dict[str, object] = {"checks": [asdict(c) for c in checks],
                               "ok": not items and all(c.status != FAIL for c in checks)}
    if items:
        data["problems"] = items
    return json.dumps(data)


def render_table(checks: list[Check]) -> None:
    """Print the checks as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    colours = {OK: "green", WARN: "yellow", FAIL: "red"}
    table = Table(title="worker doctor")
    for column in ("check", "status", "detail", "fix"):
        table.add_column(column, overflow="fold")
    for c in checks:
        table.add_row(Text(c.name), Text(c.status, style=colours[c.status]), Text(c.detail),
                      Text(c.fix))
    Console().print(table)
