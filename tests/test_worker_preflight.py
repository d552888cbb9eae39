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

from tests.helpers.old_redis import install_old_redis
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


@pytest.fixture(scope="module")
def old_redis(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_old_redis(tmp_path_factory.mktemp("pins"))


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


# ---------------------------------------------------------------- the start probe (issue 10)

KOMBU_REFUSES = ("kombu.exceptions.VersionMismatch: Redis transport requires redis-py versions "
                 "6.1.0 or later. You have 5.0.1")


@pytest.mark.parametrize("error, versions, pins, expected", [
    (KOMBU_REFUSES, {"kombu": "5.7.0"}, {"redis": ("requirements.txt", "==5.0.1")},
     "requirements.txt pins redis==5.0.1 but kombu 5.7.0 needs redis>=6.1.0: raise the redis "
     "pin (redis>=6.1.0) or pin kombu<5.7 (an older kombu that accepts redis 5.0.1)"),
    (KOMBU_REFUSES, {"kombu": "5.7.2"}, {"redis": ("requirements-gpu.txt", "")},
     "requirements-gpu.txt names redis but kombu 5.7.2 needs redis>=6.1.0: raise the redis "
     "pin (redis>=6.1.0) or pin kombu<5.7 (an older kombu that accepts redis 5.0.1)"),
    (KOMBU_REFUSES, {}, {},
     "redis 5.0.1 is installed (no requirements pin names it) but kombu (installed) needs "
     "redis>=6.1.0: raise the redis pin (redis>=6.1.0) or pin an older kombu (an older kombu "
     "that accepts redis 5.0.1)"),
    ("ModuleNotFoundError: No module named 'flask'", {"kombu": "5.7.0"}, {}, None),
    ("Error 111 connecting to 127.0.0.1:6379. Connection refused.", {}, {}, None),
], ids=["pinned", "named-unpinned", "not-in-requirements", "other-import-error", "redis-down"])
def test_conflict_fix(error: str, versions: dict, pins: dict, expected: str | None) -> None:
    assert preflight.conflict_fix(error, versions, pins) == expected


def test_requirement_pins(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text(
        "# web\nFlask==3.0.0\ncelery[redis]==5.3.4  # the worker\nRedis == 5.0.1\n"
        "-r requirements-gpu.txt\nkombu>=5.3; python_version >= '3.8'\n\nsqlalchemy\n")
    (tmp_path / "requirements-gpu.txt").write_text("torch_audio>=2\n")
    assert preflight.requirement_pins(tmp_path) == {
        "flask": ("requirements.txt", "==3.0.0"), "celery": ("requirements.txt", "==5.3.4"),
        "redis": ("requirements.txt", "== 5.0.1"), "kombu": ("requirements.txt", ">=5.3"),
        "sqlalchemy": ("requirements.txt", ""), "torch-audio": ("requirements-gpu.txt", ">=2")}


def _checks(proc: subprocess.CompletedProcess[str]) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(proc.stdout)["checks"]}


def _doctor_env(tmp_path: Path, api_url: str, broker: str) -> str:
    inst = tmp_path / "instance"
    inst.mkdir(exist_ok=True)
    return (f"CELERY_BROKER_URL={broker}\nCELERY_RESULT_BACKEND={broker[:-1]}1\n"
            f"FLASK_APP_URL={api_url}\nWORKER_API_KEY={KEY}\nMEDIA_BASE_URL=http://m.example\n"
            f"CLIPPY_INSTANCE_PATH={inst}\nTMPDIR={tmp_path}\n")


def test_doctor_imports_the_include_modules(tmp_path: Path, redis_srv: RedisServer,
                                            api_url: str) -> None:
    root = tmp_path / "proj"
    shutil.copytree(DEMO, root)
    # the app imports; a module of its `include` does not (the worker would not start)
    (root / "app" / "tasks" / "demo.py").write_text("import no_such_dep_xyz\n")
    proc = _doctor(root, _doctor_env(tmp_path, api_url, redis_srv.url(0)), os.environ["PATH"])
    checks = _checks(proc)
    assert proc.returncode == 1, proc.stdout
    assert checks["celery app"]["status"] == "ok"
    assert checks["app modules"]["status"] == "fail"
    assert checks["app modules"]["detail"] == (
        "cannot import app.tasks.demo: ModuleNotFoundError: No module named 'no_such_dep_xyz'")
    assert "broker transport" not in checks  # the probe stops at the first failure


def test_doctor_connects_the_broker_transport(tmp_path: Path, redis_srv: RedisServer,
                                              api_url: str) -> None:
    root = tmp_path / "proj"
    shutil.copytree(DEMO, root)
    good = _checks(_doctor(root, _doctor_env(tmp_path, api_url, redis_srv.url(0)),
                           os.environ["PATH"]))
    assert good["app modules"]["status"] == "ok" and "app.tasks.demo" in good["app modules"][
        "detail"]
    assert good["broker transport"]["status"] == "ok"
    assert "kombu.transport.redis" in good["broker transport"]["detail"]
    down = f"redis://:{REDIS_PW}@127.0.0.1:{free_port()}/0"
    proc = _doctor(root, _doctor_env(tmp_path, api_url, down), os.environ["PATH"])
    bad = _checks(proc)
    assert proc.returncode == 1
    assert bad["broker transport"]["status"] == "fail"
    assert "Connection refused" in bad["broker transport"]["detail"]
    assert REDIS_PW not in proc.stdout + proc.stderr


def test_doctor_names_the_pin_when_kombu_refuses_redis(tmp_path: Path, redis_srv: RedisServer,
                                                       api_url: str, old_redis: Path) -> None:
    """Issue 10's project: its pins give kombu 5.7 with redis 5.0.1. The broker answers PING
    (redis-py 5 can PING), yet the worker cannot start: the doctor says so and which pin."""
    root = tmp_path / "proj"
    shutil.copytree(DEMO, root)
    (root / "requirements.txt").write_text("celery==5.3.4\nredis==5.0.1\n")
    text = _doctor_env(tmp_path, api_url, redis_srv.url(0))
    (root / ".env.worker").write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in envmod.KNOWN_VARIABLES}
    env.update(PYTHONPATH=f"{old_redis}:{REPO}")
    proc = subprocess.run([sys.executable, "-m", "worker", "doctor", "--json"], cwd=root,
                          capture_output=True, text=True, timeout=60, env=env)
    checks = _checks(proc)
    assert proc.returncode == 1
    assert checks["redis broker"]["status"] == "ok"  # what the old doctor looked at
    transport = checks["broker transport"]
    assert transport["status"] == "fail"
    assert transport["detail"].endswith(KOMBU_REFUSES)
    kombu = preflight._installed_versions("kombu")["kombu"]
    assert transport["fix"] == (
        f"requirements.txt pins redis==5.0.1 but kombu {kombu} needs redis>=6.1.0: raise the "
        f"redis pin (redis>=6.1.0) or pin kombu<{'.'.join(kombu.split('.')[:2])} (an older "
        "kombu that accepts redis 5.0.1)")
