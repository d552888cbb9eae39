"""Warm starts (issue 11, item 2): a parked standby slot imports ahead and starts on "go".

Real supervisord, Redis and Celery on the demo app; the restarts are the agent's own
(``syncagent.agent.restart_worker``), as `push` and `watch` call them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
from celery import Celery
from hypothesis import given, settings
from hypothesis import strategies as st

from syncagent import agent
from syncagent.cli import main
from tests.helpers.procs import redis_server, wait_until
from tests.test_worker_supervisor import REPO, REVISION, _project, supervised
from worker import ready, standby

REVISIONS = [f"{i:040x}" for i in range(1, 60)]


# ---------------------------------------------------------------- pure parts

@pytest.mark.parametrize(("name", "file", "expected"), [
    ("celery.app.base", "/venv/lib/site-packages/celery/app/base.py", False),
    ("app", "{root}/app/__init__.py", True),
    ("app.tasks.demo", "{root}/app/tasks/demo.py", True),
    ("app_ns", None, True),  # a namespace package: its name is a folder in the root
    ("local_mod", "{root}/local_mod.py", True),
    ("__main__", "/venv/lib/worker/__main__.py", True),
    ("json", "/usr/lib/python3/json/__init__.py", False),
    ("sys", None, False),
    ("sqlalchemy", "{root}/.syncagent/envs/k/lib/python3.11/site-packages/sqlalchemy/"
                   "__init__.py", False),
    ("flask", "{root}/venv/lib/python3.11/site-packages/flask/__init__.py", False),
], ids=["third-party", "project-pkg", "project-sub", "namespace", "top-module", "main",
        "stdlib", "builtin", "requirements-env-under-root", "venv-under-root"])
def test_project_modules_are_never_imported_ahead(tmp_path: Path, name: str, file: str | None,
                                                  expected: bool) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app_ns").mkdir()
    (tmp_path / "local_mod.py").write_text("")
    module = types.ModuleType(name)
    if file:
        module.__file__ = file.format(root=tmp_path)
    assert standby.project_module(name, module, tmp_path) is expected


@settings(max_examples=30, deadline=None)
@given(files=st.dictionaries(st.sampled_from(["requirements.txt", "requirements-gpu.txt",
                                              ".env.worker", ".syncagent/modules.json",
                                              "app.py"]),
                             st.binary(max_size=20), max_size=5))
def test_agent_and_standby_agree_on_the_fingerprint(tmp_path_factory, files) -> None:
    """The agent (stdlib, on its own) and the standby compute the same fingerprint."""
    root = tmp_path_factory.mktemp("fp")
    (root / ".syncagent").mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    assert agent.standby_fingerprint(str(root)) == standby.fingerprint(root)
    before = standby.fingerprint(root)
    (root / "app.py").write_bytes(b"edited")  # the project's code is not in it
    assert standby.fingerprint(root) == before
    (root / ".env.worker").write_bytes(files.get(".env.worker", b"") + b"X=1\n")
    assert standby.fingerprint(root) != before


def test_record_modules_keeps_the_project_out(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "myproj").mkdir()
    (tmp_path / "myproj" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    import myproj  # noqa: F401
    ready.ensure_state_dir(tmp_path)
    count = standby.record_modules(tmp_path)
    names = standby.recorded_modules(tmp_path)
    assert count == len(names) > 10
    assert "myproj" not in names and "json" in names
    assert not any(n.startswith("myproj") for n in names)


# ---------------------------------------------------------------- with supervisord and Celery

def _client(redis_srv) -> Celery:
    return Celery("probe", broker=redis_srv.url(0), backend=redis_srv.url(1))


def _version(client: Celery) -> str:
    return client.send_task("app.tasks.demo.version").get(timeout=30)


def _edit_version(root: Path, version: str, revision: str) -> None:
    """A task-module edit (what a push writes), and the revision the push records."""
    (root / "app" / "version.py").write_text(f'VERSION = "{version}"\n')
    ready.revision_path(root).write_text(json.dumps({"revision": revision, "time": 2.0,
                                                     "files": 5}))


def _parked(root: Path):
    """The fresh parked standby, as `syncagent status` sees it (None while there is none)."""
    state = agent.worker_state(str(root)) or {}
    found = state.get("standby")
    return found if found and found.get("state") == "parked" and found.get("fresh") else None


def _restart(root: Path, revision: str, mode: str = "blue-green") -> dict:
    out = agent.restart_worker(str(root), revision, mode=mode, timeout=90)
    assert out["ok"], out
    return out


@pytest.fixture
def demo(tmp_path: Path):
    """The demo app under supervisord, blue live; yields (root, redis, rpc)."""
    with redis_server(tmp_path / "redis") as redis_srv:
        root = _project(tmp_path / "p", redis_srv)
        with supervised(tmp_path, root, str(REPO)) as (_layout, rpc):
            wait_until(lambda: ready.read_marker(root, "blue"), 60, "blue marker")
            yield root, redis_srv, rpc


def test_task_edit_restarts_warm_from_a_standby_that_holds_nothing_open(demo) -> None:
    root, redis_srv, rpc = demo
    first = _restart(root, REVISION)  # the first restart is cold: no standby yet
    assert first["timings"]["warm"] is False
    parked = wait_until(lambda: _parked(root), 60, "a parked standby")
    # the slot the first restart replaced has finished draining (under load a warm shutdown
    # can outlast the park): then it is the one stopped slot when the next standby is parked
    drained = next(c for c in agent.COLOURS if c not in (first["colour"], parked["colour"]))
    wait_until(lambda: rpc.supervisor.getProcessInfo(f"worker:worker-{drained}")["statename"]
               in agent.DOWN_STATES, 60, f"{drained} stopped")
    # imported ahead what the worker had loaded, opened nothing, started no thread
    assert parked["modules"] > 300 and parked["threads"] == 1 and parked["sockets"] == 0
    assert "app" not in standby.recorded_modules(root)
    _edit_version(root, "v2", REVISIONS[0])
    out = _restart(root, REVISIONS[0])
    marker = ready.read_marker(root, out["colour"])
    assert out["colour"] == parked["colour"] and out["pid"] == parked["pid"]
    assert out["timings"]["warm"] is True and marker["warm"] is True
    assert marker["revision"] == REVISIONS[0]
    client = _client(redis_srv)
    try:
        assert _version(client) == "v2"
    finally:
        client.close()
    # and the next save finds the next standby parked, in the slot that was already stopped
    # (the one just replaced is still draining: a park never waits for it)
    assert wait_until(lambda: _parked(root), 60, "the next standby")["colour"] == drained


def test_standby_opens_nothing_before_go(tmp_path: Path) -> None:
    """In the process itself: after importing Celery, kombu, redis and the rest of what the
    demo worker loads, one thread and no socket."""
    root = tmp_path / "p"
    root.mkdir()
    ready.ensure_state_dir(root)
    probe = (
        "import json, sys, threading, os\n"
        "from worker import standby\n"
        "ok, failed = standby._import_all(sys.argv[1], standby.recorded_modules(sys.argv[1]))\n"
        "print(json.dumps({'ok': ok, 'threads': threading.active_count(), "
        "'sockets': standby._sockets(), 'celery': 'celery.worker.consumer' in sys.modules}))\n")
    import celery.worker.consumer  # noqa: F401  (what a worker has loaded at ready)
    import redis  # noqa: F401
    standby.record_modules(root)
    out = subprocess.run([sys.executable, "-c", probe, str(root)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    got = json.loads(out.stdout)
    assert got == {"ok": got["ok"], "threads": 1, "sockets": 0, "celery": True}, out.stderr
    assert got["ok"] > 300


def test_requirements_change_restarts_cold(demo) -> None:
    root, redis_srv, _rpc = demo
    _restart(root, REVISION)
    wait_until(lambda: _parked(root), 60, "a parked standby")
    (root / "requirements.txt").write_text("six\n")  # in the base venv already: a quick env
    _edit_version(root, "v3", REVISIONS[1])
    out = _restart(root, REVISIONS[1])
    marker = ready.read_marker(root, out["colour"])
    assert out["timings"]["warm"] is False and marker["warm"] is False
    client = _client(redis_srv)
    try:
        assert _version(client) == "v3"
    finally:
        client.close()


def test_env_worker_change_makes_the_parked_standby_start_afresh(demo) -> None:
    root, _redis, _rpc = demo
    _restart(root, REVISION)
    first = wait_until(lambda: _parked(root), 60, "a parked standby")
    with open(root / ".env.worker", "a") as f:
        f.write("# edited\n")
    again = wait_until(lambda: (p := _parked(root)) and p["pid"] != first["pid"] and p, 60,
                       "a fresh standby after the .env.worker edit")
    assert again["colour"] == first["colour"]


def test_killed_standby_is_replaced_and_status_shows_it(demo, box, tmp_path: Path,
                                                        capsys) -> None:
    root, redis_srv, _rpc = demo
    _restart(root, REVISION)
    first = wait_until(lambda: _parked(root), 60, "a parked standby")
    os.kill(first["pid"], signal.SIGKILL)
    second = wait_until(lambda: (p := _parked(root)) and p["pid"] != first["pid"] and p, 60,
                        "a new standby")
    state = agent.worker_state(str(root))
    assert state["programs"][second["colour"]]["standby"]["pid"] == second["pid"]
    local = tmp_path / "local"
    local.mkdir()
    assert main(["status", "sbx", "--path", str(local), "--remote-path", str(root),
                 "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["standby"]
    assert shown["pid"] == second["pid"] and shown["fresh"] and shown["state"] == "parked"
    main(["status", "sbx", "--path", str(local), "--remote-path", str(root)])
    assert "the next restart is warm" in capsys.readouterr().out
    _edit_version(root, "v4", REVISIONS[2])
    out = _restart(root, REVISIONS[2])
    assert out["timings"]["warm"] is True and out["pid"] == second["pid"]
    client = _client(redis_srv)
    try:
        assert _version(client) == "v4"
    finally:
        client.close()


def test_no_task_lost_or_run_twice_across_20_warm_restarts_per_mode(demo) -> None:
    """20 warm restarts blue-green, then 20 drain, on one supervisord. Right before each
    restart a burst of tasks goes in (some running, some queued as the switch happens, every
    time, rather than whatever a steady stream left there): every task runs exactly once."""
    root, redis_srv, _rpc = demo
    client = _client(redis_srv)
    import redis

    store = redis.Redis.from_url(redis_srv.url(0))
    results = []
    try:
        _restart(root, REVISION)
        warm: dict[str, int] = {}
        for i, mode in enumerate(["blue-green"] * 20 + ["drain"] * 20):
            wait_until(lambda: _parked(root), 60, f"standby before restart {i} ({mode})")
            results += [client.send_task("app.tasks.demo.work", args=(0.1,)) for _ in range(4)]
            _edit_version(root, f"w{i}", REVISIONS[3 + i])
            out = _restart(root, REVISIONS[3 + i], mode)
            warm[mode] = warm.get(mode, 0) + out["timings"]["warm"]
        ids = [r.get(timeout=120)["id"] for r in results]
        assert warm == {"blue-green": 20, "drain": 20}
        executions = [x.decode() for x in store.lrange("demo:executions", 0, -1)]
        assert sorted(executions) == sorted(ids) and len(set(executions)) == len(executions)
        assert len(ids) == 160
    finally:
        store.close()
        client.close()


def test_a_park_request_of_a_dead_supervisord_is_void(tmp_path: Path) -> None:
    """A new supervisord's autostart runs the worker, even where the old one had parked a
    standby (its request is still on disk after a kill -9 of supervisord)."""
    ready.ensure_state_dir(tmp_path)
    request = tmp_path / ".syncagent" / "park-blue"
    assert not standby.park_requested(tmp_path, "blue")
    request.write_text(json.dumps({"time": 1.0, "supervisor": os.getppid() + 100000}))
    assert not standby.park_requested(tmp_path, "blue")
    request.write_text(json.dumps({"time": 1.0, "supervisor": os.getppid()}))
    assert standby.park_requested(tmp_path, "blue")
    (tmp_path / ".syncagent" / "go-blue.json").write_text('{"revision": "r"}')
    assert not standby.park_requested(tmp_path, "blue")  # go given: it runs
