"""Preflight checks for the remote worker (``python -m worker doctor``).

Each check is a small function taking the validated :class:`~worker.env.WorkerEnv` and
returning a :class:`Check`; tests call them directly. Every network call has a timeout.
No check output ever contains a secret (API key, URL passwords).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import requests

from worker.env import WorkerEnv, env_file_mode_warning, redact_text, redact_url

__all__ = [
    "Check",
    "NET_TIMEOUT",
    "NVENC_TEST_ARGS",
    "check_api_key",
    "check_celery_app",
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


_IMPORT_SNIPPET = (
    "import sys; sys.path.insert(0, sys.argv[1]);"
    "from celery.app.utils import find_app; app = find_app(sys.argv[2]);"
    "print(type(app).__name__, app.main or '')"
)


def check_celery_app(env: WorkerEnv, root: str | os.PathLike[str] | None = None) -> Check:
    """Import CELERY_APP in a subprocess with the project root on sys.path.

    Args:
        env: validated env.
        root: project root (default: cwd).

    Returns:
        ok when the app imports, fail with the exception's last line otherwise.
    """
    root_dir = str(Path(root) if root is not None else Path.cwd())
    try:
        proc = subprocess.run([sys.executable, "-c", _IMPORT_SNIPPET, root_dir, env.celery_app],
                              capture_output=True, text=True, timeout=60, cwd=root_dir,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return Check("celery app", FAIL, f"importing {env.celery_app} took over 60 s",
                     "check for blocking work at import time")
    if proc.returncode != 0:
        reason = redact_text(_last_line(proc.stderr) or f"exit {proc.returncode}", env.secrets)
        return Check("celery app", FAIL, f"cannot import {env.celery_app}: {reason}",
                     "fix the error above; install requirements (python -m worker run does)")
    return Check("celery app", OK, f"{env.celery_app} imports")


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
    results.append(check_celery_app(env, root))
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
