"""worker.launch: requirements hashing, node name, settings, and a real worker run."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from celery import Celery

from tests.helpers.old_redis import install_old_redis
from tests.helpers.procs import RedisServer, redis_server, start_process, stop_process, wait_until
from worker import env as envmod
from worker import envs, launch, ready

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo_app"
REVISION = "3fa2c1d0e5b6a7980123456789abcdef01234567"
REDIS_PW = "launch-PW-secret"
KEY = "launch-KEY-secret"


def test_requirements_hash_covers_names_and_content(tmp_path: Path) -> None:
    assert envs.requirements_hash(tmp_path) is None
    (tmp_path / "requirements.txt").write_text("celery\n")
    first = envs.requirements_hash(tmp_path)
    (tmp_path / "requirements-gpu.txt").write_text("")
    second = envs.requirements_hash(tmp_path)
    (tmp_path / "requirements.txt").write_text("celery>=5\n")
    third = envs.requirements_hash(tmp_path)
    assert len({first, second, third}) == 3
    assert [p.name for p in envs.requirements_files(tmp_path)] == [
        "requirements-gpu.txt", "requirements.txt"]


@pytest.mark.parametrize("text, expected", [("", False), ("# only a comment\n\n", False),
                                            ("  # indented comment\n", False),
                                            ("six\n", True), ("# c\n-r other.txt\n", True)],
                         ids=["empty", "comment", "indented", "package", "option"])
def test_has_requirements(tmp_path: Path, text: str, expected: bool) -> None:
    (tmp_path / "requirements.txt").write_text(text)
    assert envs.has_requirements(envs.requirements_files(tmp_path)) is expected


def _requirements_proc(root: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "worker", "requirements"], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_env_is_built_once_and_installs_never_overlap(tmp_path: Path) -> None:
    """A holder of the install lock (a slot building) makes every other install wait; two
    installs started together build the env once, the second finds it ready."""
    (tmp_path / "requirements.txt").write_text("six\n")  # satisfied from the base venv: fast
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from worker.envs import install_lock\n"
         "with install_lock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()",
         str(tmp_path)], env={**os.environ, "PYTHONPATH": str(REPO)}, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        first, second = _requirements_proc(tmp_path), _requirements_proc(tmp_path)
        for proc in (first, second):  # each says it waits, and does wait
            line = proc.stderr.readline()
            assert "waiting for another install in this project" in line, line
        assert first.poll() is None and second.poll() is None
        assert not list(envs.envs_dir(tmp_path).glob("*/bin"))
        holder.stdin.close()
        holder.wait(timeout=30)
        results = []
        for proc in (first, second):
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert sorted(r["action"] for r in results) == ["built", "ready"]
    assert results[0]["path"] == results[1]["path"]
    ready_file = Path(results[0]["path"], envs.READY_FILE)
    assert json.loads(ready_file.read_text())["installer"] == "pip"  # no uv in the test venv
    check = subprocess.run([results[0]["python"], "-c", "import six, celery, sys; "
                            "print(sys.prefix)"], capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip() == results[0]["path"], check.stderr


def test_requirements_change_builds_a_new_env_and_prunes_only_unused_ones(tmp_path) -> None:
    (tmp_path / "requirements.txt").write_text("six  # v1\n")
    first = envs.ensure_env(tmp_path)
    marker = Path(first.path, envs.READY_FILE).read_bytes()
    user = subprocess.Popen([first.python, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)  # a slot still running from the old env
    try:
        (tmp_path / "requirements.txt").write_text("six  # v2\n")
        second = envs.ensure_env(tmp_path)
        assert second.action == "built" and second.path != first.path
        assert Path(first.path, envs.READY_FILE).read_bytes() == marker  # untouched, kept
        assert second.pruned == ()
    finally:
        user.stdin.close()
        user.wait(timeout=10)
    again = envs.ensure_env(tmp_path)  # the old slot is gone: its env goes
    assert again.action == "ready" and again.pruned == (Path(first.path).name,)
    assert not Path(first.path).exists() and Path(second.path, envs.READY_FILE).exists()


def test_doctor_runs_in_the_env_the_worker_will_run_in(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("six\n")
    assert envs.ready_env(tmp_path) is None
    built = envs.ensure_env(tmp_path)
    assert envs.ready_env(tmp_path) == Path(built.path)
    proc = subprocess.run([sys.executable, "-m", "worker", "doctor", "--json"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=60)
    assert f"running in {built.path} (the env of the current requirements)" in proc.stderr
    assert proc.returncode == 2 and json.loads(proc.stdout)  # no .env.worker: one JSON object


def test_failed_build_leaves_no_env(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("./no-such-local-package\n")
    result = envs.ensure_env(tmp_path)  # real pip, fails locally and fast
    assert result.action == "failed" and result.installer == "pip"
    assert any("no-such-local-package" in line for line in result.tail), result.tail
    assert not Path(result.path).exists()


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
    root = make_project(tmp_path / "proj", redis_srv, "six\n")
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
        # re-exec'd (same pid) into the env built for these requirements
        argv0 = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        (env,) = [p for p in envs.envs_dir(root).iterdir() if p.is_dir()]
        assert argv0 == f"{env}/bin/python"
        assert client.send_task("app.tasks.demo.add", args=(2, 3)).get(timeout=20) == 5
        assert client.send_task("app.tasks.demo.version").get(timeout=20) == "v1"
        os.kill(proc.pid, signal.SIGTERM)
        wait_until(lambda: proc.poll() is not None, 20, "worker exit after SIGTERM")
        assert proc.returncode == 0
        assert ready.read_marker(root, "green") is None
        assert ready.read_failed_start(root, "green") is None  # stopped after ready: no failure
    except BaseException:
        print(log.read_text(errors="replace"))
        raise
    finally:
        client.close()
        stop_process(proc)
    text = log.read_text(errors="replace")
    assert f"requirements: env {env.name} built by pip" in text
    assert REDIS_PW not in text and KEY not in text


def test_launcher_with_uninstallable_requirements_does_not_start(tmp_path: Path,
                                                                 redis_srv: RedisServer) -> None:
    """Never new code on an env that lacks its requirements: the slot exits 1 with the
    installer's lines (the slot serving before keeps serving)."""
    root = make_project(tmp_path / "proj", redis_srv, "./no-such-local-package\n")
    log = tmp_path / "worker.log"
    proc = start_process([sys.executable, "-m", "worker", "run"], log, cwd=root, env=worker_env())
    try:
        assert proc.wait(timeout=60) == 1
    finally:
        stop_process(proc)
    text = log.read_text(errors="replace")
    assert "requirements install FAILED (pip" in text and "no-such-local-package" in text
    assert ready.read_marker(root, "green") is None


# ---------------------------------------------------------------- failed starts (issue 10)


@pytest.fixture(scope="module")
def old_redis(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_old_redis(tmp_path_factory.mktemp("pins"))


@pytest.mark.parametrize("case", ["include-import-error", "kombu-refuses-redis",
                                  "secret-in-the-error"])
def test_exit_before_ready_is_a_failed_start(tmp_path: Path, redis_srv: RedisServer,
                                             old_redis: Path, case: str) -> None:
    """Whatever Celery's own exit code (0 when kombu refuses its transport), a worker that
    ends before its readiness marker exits FAILED_START_EXIT and records the error line."""
    root = make_project(tmp_path / "proj", redis_srv, "")
    env = worker_env()
    if case == "include-import-error":
        (root / "app" / "tasks" / "demo.py").write_text("import no_such_dep_xyz\n")
        expected = "ModuleNotFoundError: No module named 'no_such_dep_xyz'"
    elif case == "secret-in-the-error":  # any secret of .env.worker, not only the known ones
        token = "extra-token-launch-9c2e"
        with (root / ".env.worker").open("a") as fh:
            fh.write(f"EXTRA_TOKEN={token}\n")
        (root / "app" / "tasks" / "demo.py").write_text(
            "import os\nraise RuntimeError('boom ' + os.environ.get('EXTRA_TOKEN', "
            f"{token!r}))\n")
        expected = "RuntimeError: boom ***"
    else:
        env["PYTHONPATH"] = f"{old_redis}:{REPO}"
        expected = ("kombu.exceptions.VersionMismatch: Redis transport requires redis-py "
                    "versions 6.1.0 or later. You have 5.0.1")
    log = tmp_path / "worker.log"
    proc = start_process([sys.executable, "-m", "worker", "run", "--no-install"], log, cwd=root,
                         env=env)
    try:
        wait_until(lambda: proc.poll() is not None, 60, "the worker to exit")
    finally:
        stop_process(proc)
    text = log.read_text(errors="replace")
    assert proc.returncode == launch.FAILED_START_EXIT, text[-3000:]
    failed = ready.read_failed_start(root, "green")
    assert failed is not None, text[-3000:]
    assert (failed["error"], failed["count"], failed["revision"]) == (expected, 1, REVISION)
    assert failed["supervisor"] == os.getpid()  # the parent: supervisord, here the test
    assert f"worker failing: {expected} (failed start 1 of 3)" in text
    assert ready.read_marker(root, "green") is None
    assert REDIS_PW not in text + json.dumps(failed)
    assert "extra-token-launch-9c2e" not in json.dumps(failed)


def test_failed_starts_count_then_give_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    env = make_env_for_count()
    monkeypatch.setattr(os, "getppid", lambda: 4242)  # supervisord's pid, as the launcher sees it
    codes = [launch._failed_start(env, tmp_path, "red", REVISION, f"boom {REDIS_PW}")
             for _ in range(launch.MAX_STARTS)]
    assert codes == [launch.FAILED_START_EXIT] * (launch.MAX_STARTS - 1) + [launch.GAVE_UP_EXIT]
    failed = ready.read_failed_start(tmp_path, "red")
    assert failed["count"] == launch.MAX_STARTS and failed["error"] == "boom ***"
    # supervisord starts it once more anyway (a quick exit is retried): it does not start
    assert launch.run_worker(env, tmp_path, install=False, colour="red") == launch.GAVE_UP_EXIT
    assert ready.read_failed_start(tmp_path, "red")["count"] == launch.MAX_STARTS
    # another supervisord (a reboot, a provision) counts afresh
    monkeypatch.setattr(os, "getppid", lambda: 4343)
    assert launch._failed_start(env, tmp_path, "red", REVISION, "boom") == \
        launch.FAILED_START_EXIT
    assert ready.read_failed_start(tmp_path, "red")["count"] == 1
    # a start on purpose (restart, provision) and a ready worker forget them
    ready.clear_failed_start(tmp_path, "red")
    assert ready.read_failed_start(tmp_path, "red") is None


def make_env_for_count() -> envmod.WorkerEnv:
    report = envmod.validate({
        "CELERY_BROKER_URL": f"redis://:{REDIS_PW}@127.0.0.1:1/0",
        "CELERY_RESULT_BACKEND": "redis://127.0.0.1:1/1", "FLASK_APP_URL": "http://127.0.0.1:1",
        "WORKER_API_KEY": KEY, "CELERY_APP": "no_such_app_xyz.tasks"})
    assert report.env is not None, report.problems
    return report.env
