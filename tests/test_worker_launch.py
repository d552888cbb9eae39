"""worker.launch: requirements hashing, node name, settings, and a real worker run."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Iterator, Sequence

import pytest
from celery import Celery

from tests.helpers.procs import RedisServer, redis_server, start_process, stop_process, wait_until
from worker import env as envmod
from worker import launch, ready

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo_app"
REVISION = "3fa2c1d0e5b6a7980123456789abcdef01234567"
REDIS_PW = "launch-PW-secret"
KEY = "launch-KEY-secret"


class Recorder:
    """Installer double: records calls, answers a fixed result."""

    def __init__(self, ok: bool) -> None:
        self.ok, self.calls = ok, 0

    def __call__(self, root: Path, files: Sequence[Path]) -> tuple[bool, str]:
        self.calls += 1
        return self.ok, "ERROR: boom" if not self.ok else "Successfully installed"


def test_requirements_hash_covers_names_and_content(tmp_path: Path) -> None:
    assert launch.requirements_hash(tmp_path) is None
    (tmp_path / "requirements.txt").write_text("celery\n")
    first = launch.requirements_hash(tmp_path)
    (tmp_path / "requirements-gpu.txt").write_text("")
    second = launch.requirements_hash(tmp_path)
    (tmp_path / "requirements.txt").write_text("celery>=5\n")
    third = launch.requirements_hash(tmp_path)
    assert len({first, second, third}) == 3
    assert [p.name for p in launch.requirements_files(tmp_path)] == [
        "requirements-gpu.txt", "requirements.txt"]


def test_install_skipped_when_hash_matches(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("celery\n")
    installer = Recorder(ok=True)
    assert launch.ensure_requirements(tmp_path, installer).action == "installed"
    state = ready.requirements_state_path(tmp_path)
    assert state.read_text().strip() == launch.requirements_hash(tmp_path)
    assert launch.ensure_requirements(tmp_path, installer).action == "skipped"
    assert installer.calls == 1
    (tmp_path / "requirements.txt").write_text("celery\nredis\n")
    assert launch.ensure_requirements(tmp_path, installer).action == "installed"
    assert installer.calls == 2


def test_failed_install_records_nothing(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("./no-such-local-package\n")
    result = launch.ensure_requirements(tmp_path)  # real pip, fails locally and fast
    assert result.action == "failed" and result.message
    assert not ready.requirements_state_path(tmp_path).exists()
    again = launch.ensure_requirements(tmp_path, Recorder(ok=False))
    assert again.action == "failed"


def test_node_name_and_revision(tmp_path: Path) -> None:
    assert ready.read_revision(tmp_path) == "unknown"
    assert launch.node_name("tundra-gpu", "green", "unknown", "box") == "tundra-gpu-green-0000000@box"
    ready.ensure_state_dir(tmp_path)
    ready.revision_path(tmp_path).write_text(json.dumps(
        {"revision": REVISION, "time": 1.0, "files": 3}))
    assert ready.read_revision(tmp_path) == REVISION
    assert launch.node_name("w", "blue", REVISION, "h") == "w-blue-3fa2c1d@h"
    assert (tmp_path / ".syncagent").stat().st_mode & 0o777 == 0o700


def test_apply_settings_and_argv_keep_secrets_out() -> None:
    env = envmod.validate({
        "CELERY_BROKER_URL": f"redis://:{REDIS_PW}@h:1/0", "CELERY_RESULT_BACKEND": "redis://h/1",
        "FLASK_APP_URL": "http://a", "WORKER_API_KEY": KEY, "SYNCAGENT_STOPWAITSECS": "900",
        "CELERY_QUEUES": "gpu, cpu", "CELERY_CONCURRENCY": "3"}).env
    assert env is not None
    app = Celery("t", set_as_current=False)
    app.conf.broker_transport_options = {"fanout_prefix": True, "visibility_timeout": 60}
    launch.apply_settings(app, env)
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.broker_transport_options == {"fanout_prefix": True, "visibility_timeout": 1200}
    assert app.conf.result_backend_transport_options["visibility_timeout"] == 1200
    argv = launch.worker_argv(env, "n@h")
    assert argv == ["worker", "--loglevel=info", "--concurrency=3", "--queues=gpu,cpu",
                    "--hostname=n@h", "--without-mingle", "--without-gossip"]
    assert "--without-mingle" not in launch.worker_argv(env, "n@h", full_start=True)
    assert not any(REDIS_PW in a or KEY in a for a in argv)


@pytest.fixture(scope="module")
def redis_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis"), password=REDIS_PW) as server:
        yield server


def make_project(root: Path, redis_srv: RedisServer, requirements: str) -> Path:
    """Copy the demo app, write .env.worker (0600), a revision file and requirements."""
    shutil.copytree(DEMO, root)
    (root / ".env.worker").write_text(
        f"CELERY_BROKER_URL={redis_srv.url(0)}\nCELERY_RESULT_BACKEND={redis_srv.url(1)}\n"
        f"FLASK_APP_URL=http://127.0.0.1:9\nWORKER_API_KEY={KEY}\nWORKER_NAME=demo\n"
        "CELERY_CONCURRENCY=1\nMEDIA_BASE_URL=http://media.example\n")
    (root / ".env.worker").chmod(0o600)
    (root / "requirements.txt").write_text(requirements)
    ready.ensure_state_dir(root)
    ready.revision_path(root).write_text(json.dumps({"revision": REVISION, "time": 1.0,
                                                     "files": 5}))
    return root


def worker_env() -> dict[str, str]:
    """Process env for a worker child: no inherited worker variables, repo importable."""
    env = {k: v for k, v in os.environ.items() if k not in envmod.KNOWN_VARIABLES}
    env.update(PYTHONPATH=str(REPO), SYNCAGENT_COLOUR="green")
    return env


def test_launcher_runs_tasks_and_marks_ready(tmp_path: Path, redis_srv: RedisServer) -> None:
    root = make_project(tmp_path / "proj", redis_srv, "./no-such-local-package\n")
    log = tmp_path / "worker.log"
    proc = start_process([sys.executable, "-m", "worker", "run"], log, cwd=root, env=worker_env())
    client = Celery("client", broker=redis_srv.url(0), backend=redis_srv.url(1),
                    set_as_current=False)
    try:
        marker = wait_until(lambda: proc.poll() is None and ready.read_marker(root, "green"),
                            30, "readiness marker ready-green.json")
        assert marker["revision"] == REVISION and marker["pid"] == proc.pid
        assert marker["colour"] == "green"
        assert re.fullmatch(rf"demo-green-3fa2c1d@{re.escape(socket.gethostname())}",
                            marker["node"])
        assert not ready.requirements_state_path(root).exists()  # failed install, not recorded
        assert client.send_task("app.tasks.demo.add", args=(2, 3)).get(timeout=20) == 5
        assert client.send_task("app.tasks.demo.version").get(timeout=20) == "v1"
        os.kill(proc.pid, signal.SIGTERM)
        wait_until(lambda: proc.poll() is not None, 20, "worker exit after SIGTERM")
        assert proc.returncode == 0
        assert ready.read_marker(root, "green") is None
    except BaseException:
        print(log.read_text(errors="replace"))
        raise
    finally:
        client.close()
        stop_process(proc)
    text = log.read_text(errors="replace")
    assert "requirements install FAILED" in text
    assert REDIS_PW not in text and KEY not in text
