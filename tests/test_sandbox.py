"""The sandbox behaves like a machine: its demo worker keeps to itself, and `down` stops
everything started through it, wherever it was provisioned. Real sshd, Redis, supervisord,
Celery."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from celery import Celery

from syncagent import sandbox
from syncagent.cli import main
from tests.helpers.procs import children_of, pid_running, provisioned_sandbox, wait_until
from worker import ready


@pytest.fixture(scope="module")
def machine(hermetic_home, tmp_path_factory):
    """The provisioned sandbox 'mbx', a user task queued where a user's project listens (db 0,
    queue `celery`) before any user worker exists, then the user's project provisioned at a
    path outside the sandbox's remote root."""
    with provisioned_sandbox("mbx", tmp_path_factory.mktemp("mbx")) as box:
        user = Celery("user", broker=f"{box.redis_url}/0", backend=f"{box.redis_url}/1",
                      set_as_current=False)
        user.conf.broker_connection_retry_on_startup = True
        try:
            pending = user.send_task("app.tasks.demo.version")
            project = tmp_path_factory.mktemp("user") / "userproj"
            shutil.copytree(sandbox.DEMO_APP, project,
                            ignore=shutil.ignore_patterns("__pycache__", ".env.worker"))
            (project / "app" / "version.py").write_text('VERSION = "user-v1"\n')
            remote = tmp_path_factory.mktemp("elsewhere") / "userproj"
            code = main(["provision", "mbx", "--path", str(project), "--remote-path",
                         str(remote), "--venv", sys.prefix, "--timeout", "60",
                         "--env", f"CELERY_BROKER_URL={box.redis_url}/0",
                         "--env", f"CELERY_RESULT_BACKEND={box.redis_url}/1",
                         "--env", "FLASK_APP_URL=http://127.0.0.1:9",
                         "--env", "WORKER_API_KEY=user-key-of-the-sandbox-test",
                         "--env", "CELERY_QUEUES=gpu,celery", "--env", "WORKER_NAME=user"])
            assert code == 0
            yield box, remote, pending
        finally:
            user.close()


def test_demo_worker_never_takes_a_users_task(machine):
    box, _, pending = machine
    assert pending.get(timeout=30) == "user-v1"  # the demo worker (v1) never saw it
    with sandbox.demo_client(box) as demo:
        assert demo.send_task("app.tasks.demo.version").get(timeout=30) == "v1"
        queues = demo.control.inspect(timeout=2).active_queues()
    assert [q["name"] for qs in queues.values() for q in qs] == [sandbox.DEMO_QUEUE]


def test_down_stops_every_supervisord_and_worker_wherever_provisioned(machine):
    box, remote, _ = machine
    roots = [Path(box.remote_root) / sandbox.PROJECT_DIR, remote]
    supervisords = [int((r / ".syncagent" / "supervisord.pid").read_text()) for r in roots]
    workers = [m["pid"] for r in roots for c in ready.COLOURS
               if (m := ready.read_marker(r, c)) and pid_running(m["pid"])]
    assert len(workers) >= 2 and all(pid_running(p) for p in supervisords)
    processes = {*supervisords, *workers, *(c for p in supervisords for c in children_of(p))}
    assert processes <= set(sandbox.started_through(box.dir))

    sandbox.down("mbx", box.dir)

    assert not [p for p in processes if pid_running(p)], "left running after sandbox down"
    assert sandbox.started_through(box.dir) == []
    wait_until(lambda: not pid_running(box.sshd_pid), 5, "sshd to be gone")


def test_a_sandbox_up_in_a_directory_of_its_own_is_found_by_a_plain_status_and_down(
        hermetic_home, tmp_path):
    box = sandbox.up("dirbx", tmp_path / "box")
    try:
        assert sandbox.status("dirbx").sshd_pid == box.sshd_pid
        assert box.sshd_pid in sandbox.down("dirbx")
        wait_until(lambda: not pid_running(box.sshd_pid), 5, "sshd to be gone")
    finally:
        sandbox.down("dirbx", box.dir)


@pytest.mark.parametrize("url,db,expected", [
    ("redis://127.0.0.1:6379", 14, "redis://127.0.0.1:6379/14"),
    ("redis://127.0.0.1:6379/", 14, "redis://127.0.0.1:6379/14"),
    ("redis://127.0.0.1:6379/0", 15, "redis://127.0.0.1:6379/15"),  # a user's db is never shared
    ("redis://:pw@127.0.0.1:6379/3", 14, "redis://:pw@127.0.0.1:6379/14"),
    ("rediss://h:6380", 14, "rediss://h:6380/14"),
    ("unix:///run/redis.sock", 14, "unix:///run/redis.sock"),
], ids=["no-db", "slash", "db0", "password", "tls", "unix"])
def test_demo_dbs_replace_whatever_db_the_url_names(url, db, expected):
    assert sandbox._with_db(url, db) == expected
