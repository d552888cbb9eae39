"""worker.preflight against real servers: redis-server, a Flask API, tmpfs, PATH tricks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest
from flask import Flask, request
from werkzeug.serving import make_server

from tests.helpers.procs import RedisServer, free_port, redis_server
from worker import env as envmod
from worker import preflight

KEY = "doctor-KEY-0123456789"
REDIS_PW = "redis-PW-secret"
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo_app"


@pytest.fixture(scope="module")
def redis_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis"), password=REDIS_PW) as server:
        yield server


def _api() -> Flask:
    app = Flask("fake_clippy")

    @app.get("/api/health")
    def health() -> tuple[dict[str, str], int]:
        return {"status": "ok"}, 200

    @app.get("/api/worker/jobs/<int:job_id>")
    def job(job_id: int) -> tuple[dict[str, str], int]:
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return {"error": "unauthorized"}, 401
        return {"error": "not found"}, 404

    return app


@pytest.fixture(scope="module")
def api_url() -> Iterator[str]:
    server = make_server("127.0.0.1", 0, _api())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=5)
        server.server_close()


def make_env(**values: str) -> envmod.WorkerEnv:
    base = {"CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
            "CELERY_RESULT_BACKEND": "redis://127.0.0.1:1/1",
            "FLASK_APP_URL": "http://127.0.0.1:1", "WORKER_API_KEY": KEY}
    report = envmod.validate({**base, **values})
    assert report.env is not None, report.problems
    return report.env


def _no_secret(check: preflight.Check) -> None:
    text = f"{check.detail} {check.fix}"
    assert KEY not in text and REDIS_PW not in text


def test_redis_up(redis_srv: RedisServer) -> None:
    env = make_env(CELERY_BROKER_URL=redis_srv.url(0), CELERY_RESULT_BACKEND=redis_srv.url(1))
    for check in (preflight.check_broker(env), preflight.check_result_backend(env)):
        assert check.status == "ok", check
        assert ":***@" in check.detail
        _no_secret(check)


def test_redis_wrong_password_and_down(redis_srv: RedisServer) -> None:
    wrong = f"redis://:not-{REDIS_PW}@127.0.0.1:{redis_srv.port}/0"
    down = f"redis://:{REDIS_PW}@127.0.0.1:{free_port()}/0"
    env = make_env(CELERY_BROKER_URL=wrong, CELERY_RESULT_BACKEND=down)
    for check in (preflight.check_broker(env), preflight.check_result_backend(env)):
        assert check.status == "fail", check
        _no_secret(check)


def test_flask_api_and_key(api_url: str) -> None:
    env = make_env(FLASK_APP_URL=api_url)
    assert preflight.check_flask_api(env).status == "ok"
    good = preflight.check_api_key(env)
    assert good.status == "ok" and "404" in good.detail
    bad = preflight.check_api_key(make_env(FLASK_APP_URL=api_url, WORKER_API_KEY="wrong-key-0123456789"))
    assert bad.status == "fail" and "401" in bad.detail and "WORKER_API_KEY" in bad.fix
    _no_secret(good)


def test_flask_api_down() -> None:
    env = make_env(FLASK_APP_URL=f"http://127.0.0.1:{free_port()}")
    assert preflight.check_flask_api(env).status == "fail"
    assert preflight.check_api_key(env).status == "fail"


def test_instance_path_and_same_filesystem(tmp_path: Path) -> None:
    inst = tmp_path / "instance"
    missing = make_env(CLIPPY_INSTANCE_PATH=str(inst), TMPDIR=str(tmp_path))
    assert preflight.check_instance_path(missing).status == "fail"
    inst.mkdir()
    env = make_env(CLIPPY_INSTANCE_PATH=str(inst), TMPDIR=str(tmp_path))
    assert preflight.check_instance_path(env).status == "ok"
    assert preflight.check_tmpdir_filesystem(env).status == "ok"
    unset = make_env()
    assert preflight.check_instance_path(unset).status == "warn"


@pytest.fixture
def tmpfs_dir(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "othertmp"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_tmpdir_on_other_filesystem(tmp_path: Path, tmpfs_dir: Path) -> None:
    inst = tmp_path / "instance"
    inst.mkdir()
    check = preflight.check_tmpdir_filesystem(
        make_env(CLIPPY_INSTANCE_PATH=str(inst), TMPDIR=str(tmpfs_dir)))
    assert check.status == "fail" and "EXDEV" in check.detail
    assert check.fix.startswith(f"set TMPDIR={inst / 'tmp'}")


def _fake_tools(bin_dir: Path, encoders: str, encode_rc: int) -> None:
    bin_dir.mkdir()
    script = f"""#!/bin/sh
case "$*" in
  *-encoders*) printf '%s\\n' '{encoders}'; exit 0 ;;
esac
echo 'some noise' >&2
echo 'OpenEncodeSessionEx failed: unsupported device (2): (no details)' >&2
exit {encode_rc}
"""
    (bin_dir / "ffmpeg").write_text(script)
    (bin_dir / "ffmpeg").chmod(0o755)


@pytest.mark.parametrize(("encoders", "rc", "status", "evidence"), [
    (" V....D libx264", 0, "warn", "ffmpeg has no h264_nvenc encoder"),
    (" V....D h264_nvenc", 1, "warn",
     "test encode failed: OpenEncodeSessionEx failed: unsupported device (2): (no details)"),
    (" V....D h264_nvenc", 0, "ok", "test encode passed"),
], ids=["no-encoder", "encode-fails", "encode-passes"])
def test_nvenc_evidence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encoders: str,
                        rc: int, status: str, evidence: str) -> None:
    _fake_tools(tmp_path / "bin", encoders, rc)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    check = preflight.check_nvenc(make_env())
    assert check.status == status and evidence in check.detail, check


def test_nvenc_no_ffmpeg_and_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    check = preflight.check_nvenc(make_env())
    assert check.status == "warn" and "no ffmpeg" in check.detail
    disabled = preflight.check_nvenc(make_env(FFMPEG_DISABLE_NVENC="true"))
    assert "disabled by FFMPEG_DISABLE_NVENC" in disabled.detail
    gpu = preflight.check_gpu(make_env())
    assert gpu.status == "warn" and "nvidia-smi" in gpu.detail


def test_celery_app_import(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    shutil.copytree(DEMO, root)
    assert preflight.check_celery_app(make_env(), root).status == "ok"
    (root / "app" / "tasks" / "celery_app.py").write_text("import no_such_module_xyz\n")
    check = preflight.check_celery_app(make_env(), root)
    assert check.status == "fail"
    assert "ModuleNotFoundError: No module named 'no_such_module_xyz'" in check.detail


def _doctor(root: Path, env_text: str, path: str) -> subprocess.CompletedProcess[str]:
    (root / ".env.worker").write_text(env_text)
    (root / ".env.worker").chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in envmod.KNOWN_VARIABLES}
    env.update(PYTHONPATH=str(REPO), PATH=path)
    return subprocess.run([sys.executable, "-m", "worker", "doctor", "--json"], cwd=root,
                          capture_output=True, text=True, timeout=60, env=env)


def test_doctor_json_end_to_end(tmp_path: Path, redis_srv: RedisServer, api_url: str) -> None:
    root = tmp_path / "proj"
    shutil.copytree(DEMO, root)
    inst = tmp_path / "instance"
    inst.mkdir()
    base = (f"CELERY_RESULT_BACKEND={redis_srv.url(1)}\nFLASK_APP_URL={api_url}\n"
            f"WORKER_API_KEY={KEY}\nMEDIA_BASE_URL=http://media.example\n"
            f"CLIPPY_INSTANCE_PATH={inst}\nTMPDIR={tmp_path}\n")
    empty_bin = tmp_path / "emptybin"
    empty_bin.mkdir()
    good = _doctor(root, f"CELERY_BROKER_URL={redis_srv.url(0)}\n" + base, str(empty_bin))
    data = json.loads(good.stdout)
    statuses = {c["name"]: c["status"] for c in data["checks"]}
    assert good.returncode == 0 and data["ok"] is True, (statuses, good.stderr)
    assert statuses["nvenc"] == "warn" and statuses["celery app"] == "ok"
    down = f"redis://:{REDIS_PW}@127.0.0.1:{free_port()}/0"
    bad = _doctor(root, f"CELERY_BROKER_URL={down}\n" + base, str(empty_bin))
    bad_data = json.loads(bad.stdout)
    assert bad.returncode == 1 and bad_data["ok"] is False
    for proc in (good, bad):
        assert KEY not in proc.stdout + proc.stderr
        assert REDIS_PW not in proc.stdout + proc.stderr
