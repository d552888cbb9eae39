"""worker.supervisor_conf: reference files, and a real supervisord running the demo worker."""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import supervisor

from syncagent.cli import main
from tests.helpers.old_redis import install_old_redis
from tests.helpers.procs import (
    RedisServer, redis_server, start_process, stop_process, supervisor_rpc, wait_until,
)
from worker import env as envmod
from worker import launch, ready, supervise
from worker import supervisor_conf as sc

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo_app"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def test_reference_files_match_generated() -> None:
    for name, text in sc.reference_files().items():
        assert (REPO / "supervisor" / name).read_text() == text, (
            f"supervisor/{name} is stale: run python -m worker.supervisor_conf .")


def test_supervisor_is_the_library() -> None:
    path = Path(supervisor.__file__ or "").resolve()
    assert "site-packages" in path.parts, path
    assert not (REPO / "supervisor" / "__init__.py").exists()


def test_rendered_settings() -> None:
    layout = sc.Layout(root="/srv/p", venv="/srv/p/venv", name="w", stopwaitsecs=1200)
    daemon = sc.render_supervisord_conf(layout)
    assert "inet_http_server" not in daemon and "chmod=0700" in daemon
    assert "file=/srv/p/.syncagent/supervisor.sock" in daemon
    programs = sc.render_program_conf(layout)
    assert "[group:w]\nprograms=w-blue,w-green,w-red" in programs
    for line in ("stopwaitsecs=1200", "stopasgroup=false", "killasgroup=true",
                 "redirect_stderr=true", "command=/srv/p/venv/bin/python -m worker run"):
        assert programs.count(line) == 3, line
    assert programs.count("autostart=true") == 1
    # an exit before the readiness marker is a failed start: two retries, then the slot stays
    # down (the launcher's GAVE_UP_EXIT is the one expected code); any other exit restarts
    for line in ("autorestart=unexpected", f"exitcodes={launch.GAVE_UP_EXIT}",
                 f"startretries={launch.MAX_STARTS - 1}"):
        assert programs.count(line) == 3, line
    assert sc.supervisorctl_command("/srv/p/.syncagent/supervisord.conf") == (
        "supervisorctl -c /srv/p/.syncagent/supervisord.conf status")
    unit = sc.render_systemd_unit(layout)
    assert "ExecStart=/srv/p/venv/bin/supervisord -n -c /srv/p/.syncagent/supervisord.conf" in unit


def _project(root: Path, redis_srv: RedisServer) -> Path:
    shutil.copytree(DEMO, root)
    (root / ".env.worker").write_text(
        f"CELERY_BROKER_URL={redis_srv.url(0)}\nCELERY_RESULT_BACKEND={redis_srv.url(1)}\n"
        "FLASK_APP_URL=http://127.0.0.1:9\nWORKER_API_KEY=supervisor-test-key-0123\n"
        "CELERY_CONCURRENCY=1\n")
    (root / ".env.worker").chmod(0o600)
    ready.ensure_state_dir(root)
    ready.revision_path(root).write_text(json.dumps({"revision": REVISION, "time": 1.0,
                                                     "files": 5}))
    return root


@pytest.mark.parametrize(("root_name", "venv_name"), [("p", None), ("a b'50%é", 'v "%é')],
                         ids=["plain", "space-quotes-percent-non-ascii"])
def test_supervisord_runs_blue_worker(tmp_path: Path, root_name: str,
                                      venv_name: str | None) -> None:
    """A real supervisord reads the generated config back unchanged, odd paths included
    (space, both quote kinds, %, non-ASCII: shlex-split command=, %-expanded values)."""
    venv = sys.prefix
    if venv_name:
        venv = str(tmp_path / venv_name)
        os.symlink(sys.prefix, venv)
    with redis_server(tmp_path / "redis") as redis_srv:
        root = _project(tmp_path / root_name, redis_srv)
        layout = sc.Layout(root=str(root), venv=venv, name="worker", stopwaitsecs=30)
        conf = sc.write_configs(layout, extra_env={"PYTHONPATH": str(REPO)})
        env = {k: v for k, v in os.environ.items() if k not in envmod.KNOWN_VARIABLES}
        log = tmp_path / "supervisord.out"
        proc = start_process([layout.bin("supervisord"), "-n", "-c", str(conf)], log, env=env)
        rpc = supervisor_rpc(layout.socket_path)
        try:
            wait_until(lambda: rpc.supervisor.getState()["statename"] == "RUNNING", 15,
                       "supervisord RUNNING")
            mode = stat.S_IMODE(os.stat(layout.socket_path).st_mode)
            assert mode & 0o077 == 0, oct(mode)
            wait_until(lambda: rpc.supervisor.getProcessInfo("worker:worker-blue")["statename"]
                       == "RUNNING", 20, "worker-blue RUNNING")
            marker = wait_until(lambda: ready.read_marker(root, "blue"), 30, "blue marker")
            assert marker["node"].startswith("tundra-gpu-blue-0123456@")
            for idle in ("green", "red"):  # only blue autostarts
                info = rpc.supervisor.getProcessInfo(f"worker:worker-{idle}")
                assert info["statename"] == "STOPPED"
            status = subprocess.run(shlex.split(sc.supervisorctl_command(str(conf), sys.prefix)),
                                    capture_output=True, text=True, timeout=20, env=env)
            assert "worker:worker-blue" in status.stdout and "RUNNING" in status.stdout
            assert rpc.supervisor.shutdown() is True
            wait_until(lambda: proc.poll() is not None, 30, "supervisord exit after shutdown")
            assert ready.read_marker(root, "blue") is None
        except BaseException:
            print(log.read_text(errors="replace"))
            worker_log = Path(layout.state) / "logs" / "worker-blue.log"
            if worker_log.exists():
                print(worker_log.read_text(errors="replace"))
            raise
        finally:
            rpc("close")()
            stop_process(proc)


@pytest.mark.parametrize(("path", "reason"), [
    ("/srv/a b", None), ("/srv/q'x", None), ('/srv/d"x', None), ("/srv/50%", None),
    ("/srv/é/ü", None), ("/srv/a;b#c", None),
    ("/srv/a\nb", "control character"), ("/srv/a\tb", "control character"),
    ("/srv/a #b", "' #'"), ("/srv/a ;b", "' ;'"), ("/srv/a ", "whitespace"),
    ("/srv/%(here)s", "'%('"), ("/srv/a*", "glob"), ("/srv/[a]", "glob"),
    ("/srv/'\"", "both ' and \""),
], ids=["space", "squote", "dquote", "percent", "non-ascii", "no-space-comment-chars",
        "newline", "tab", "hash-comment", "semicolon-comment", "trailing-space", "expansion",
        "star", "bracket", "both-quotes"])
def test_path_problem(path: str, reason: str | None) -> None:
    found = sc.path_problem(path)
    assert (found is None) if reason is None else (reason in (found or "")), found


def test_write_configs_refuses_an_unrepresentable_root_before_writing(tmp_path: Path) -> None:
    root = tmp_path / "a #b"
    with pytest.raises(ValueError, match="' #'"):
        sc.write_configs(sc.Layout(root=str(root), venv=sys.prefix))
    assert not root.exists()
    deep = tmp_path / ("d" * 120)
    with pytest.raises(ValueError, match="over the 107 a unix socket allows"):
        sc.write_configs(sc.Layout(root=str(deep), venv=sys.prefix))
    assert not deep.exists()


@contextlib.contextmanager
def supervised(tmp_path: Path, root: Path, pythonpath: str) -> Iterator[tuple[sc.Layout, object]]:
    """supervisord (in the foreground, stopped at the end) running ``root``'s worker slots."""
    layout = sc.Layout(root=str(root), venv=sys.prefix, name="worker", stopwaitsecs=30)
    conf = sc.write_configs(layout, extra_env={"PYTHONPATH": pythonpath})
    env = {k: v for k, v in os.environ.items() if k not in envmod.KNOWN_VARIABLES}
    log = tmp_path / "supervisord.out"
    proc = start_process([layout.bin("supervisord"), "-n", "-c", str(conf)], log, env=env)
    rpc = supervisor_rpc(layout.socket_path)
    try:
        wait_until(lambda: rpc.supervisor.getState()["statename"] == "RUNNING", 15,
                   "supervisord RUNNING")
        yield layout, rpc
    except BaseException:
        print(log.read_text(errors="replace"))
        worker_log = Path(layout.state) / "logs" / "worker-blue.log"
        if worker_log.exists():
            print(worker_log.read_text(errors="replace")[-6000:])
        raise
    finally:
        rpc("close")()
        stop_process(proc)


@pytest.fixture(scope="module")
def old_redis(tmp_path_factory) -> Path:
    return install_old_redis(tmp_path_factory.mktemp("pins"))


def test_worker_that_cannot_start_stops_and_status_says_why(tmp_path: Path, box, old_redis,
                                                            capsys) -> None:
    """The real case of issue 10: redis 5.0.1 beside kombu 5.7. Celery exits 0 when kombu
    refuses its transport; supervisord used to restart it forever while status said RUNNING."""
    with redis_server(tmp_path / "redis") as redis_srv:
        root = _project(tmp_path / "p", redis_srv)
        with supervised(tmp_path, root, f"{old_redis}:{REPO}") as (layout, rpc):
            def given_up():
                info = rpc.supervisor.getProcessInfo("worker:worker-blue")
                failed = ready.read_failed_start(root, "blue") or {}
                return info if (info["statename"] in ("EXITED", "FATAL")
                                and failed.get("count") == launch.MAX_STARTS) else None

            info = wait_until(given_up, 90, "worker-blue down after its failed starts")
            assert info["statename"] == "FATAL" or info["exitstatus"] == launch.GAVE_UP_EXIT
            text = (Path(layout.state) / "logs" / "worker-blue.log").read_text()
            assert text.count("starting tundra-gpu-blue-") == launch.MAX_STARTS, text[-3000:]
            assert "Redis transport requires redis-py versions 6.1.0" in text
            failed = ready.read_failed_start(root, "blue")
            assert failed["error"] == ("kombu.exceptions.VersionMismatch: Redis transport "
                                       "requires redis-py versions 6.1.0 or later. "
                                       "You have 5.0.1")
            assert failed["revision"] == REVISION

            local = tmp_path / "local"
            local.mkdir()
            code = main(["status", "sbx", "--path", str(local), "--remote-path", str(root)])
            out = capsys.readouterr().out
            assert code == 1, out
            assert ("worker failing: kombu.exceptions.VersionMismatch: Redis transport requires "
                    "redis-py versions 6.1.0 or later. You have 5.0.1") in out
            assert main(["status", "sbx", "--path", str(local), "--remote-path", str(root),
                         "--json"]) == 1
            status = json.loads(capsys.readouterr().out)
            assert status["failing"]["count"] == launch.MAX_STARTS
            assert status["programs"]["blue"]["state"] in ("EXITED", "FATAL")
            # still down after all that: supervisord did not start it again meanwhile
            assert given_up()
            text = (Path(layout.state) / "logs" / "worker-blue.log").read_text()
            assert text.count("starting tundra-gpu-blue-") == launch.MAX_STARTS


def test_worker_killed_after_ready_is_restarted(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as redis_srv:
        root = _project(tmp_path / "p", redis_srv)
        with supervised(tmp_path, root, str(REPO)) as (_layout, rpc):
            first = wait_until(lambda: ready.read_marker(root, "blue"), 30, "blue marker")
            os.kill(first["pid"], signal.SIGKILL)
            second = wait_until(lambda: (m := ready.read_marker(root, "blue")) and
                                m["pid"] != first["pid"] and m, 30, "blue ready again")
            info = wait_until(lambda: (i := rpc.supervisor.getProcessInfo("worker:worker-blue"))
                              ["statename"] == "RUNNING" and i, 20, "worker-blue RUNNING")
            assert info["pid"] == second["pid"]
            assert ready.read_failed_start(root, "blue") is None


def test_provisions_first_start_reports_a_failed_start_at_once(tmp_path: Path,
                                                               old_redis) -> None:
    """provision's first start: ``python -m worker configure`` starts supervisord (its
    autostart runs blue), then the agent's slot controller waits for it; the worker that exits
    before it is ready is reported when it exits, with its error line, not after the timeout,
    and an earlier supervisord's failed starts do not count."""
    from syncagent import agent

    with redis_server(tmp_path / "redis") as redis_srv:
        root = _project(tmp_path / "p", redis_srv)
        layout = sc.Layout(root=str(root), venv=sys.prefix, name="worker", stopwaitsecs=30)
        ready.record_failed_start(root, "blue", REVISION, "an older supervisord's", 1)
        rpc = supervisor_rpc(layout.socket_path)
        t0 = time.monotonic()
        try:
            with pytest.MonkeyPatch.context() as mp:
                for key in envmod.KNOWN_VARIABLES:  # supervisord must not inherit the test's
                    mp.delenv(key, raising=False)
                conf = supervise.configure(layout, {"PYTHONPATH": f"{old_redis}:{REPO}"},
                                           timeout=60)
            assert conf["ok"] and conf["fresh"] and "started supervisord" in conf["actions"]
            out = agent.start_worker(str(root), REVISION, timeout=60)
            took = time.monotonic() - t0
            print(f"configure + start -> failed start reported in {took:.2f} s")
            assert out["ok"] is False and out["action"] == "wait" and out["colour"] == "blue"
            assert out["failure"] == ("the new code did not start: kombu.exceptions."
                                      "VersionMismatch: Redis transport requires redis-py "
                                      "versions 6.1.0 or later. You have 5.0.1")
            assert took < 30, took
            assert any("VersionMismatch" in line for line in out["log_tail"])
            assert ready.read_failed_start(root, "blue")["count"] == 1  # this supervisord's
        finally:
            with contextlib.suppress(OSError):
                pid = rpc.supervisor.getPID()
                rpc.supervisor.shutdown()
                wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, "supervisord to exit")
            rpc("close")()


def _failed(revision: str, at: float, count: int = 1) -> dict:
    return {"revision": revision, "time": at, "count": count, "error": f"E{at:g}"}


A, B = "a" * 40, "b" * 40


@pytest.mark.parametrize("programs, live, pushed, expected", [
    ({"blue": {"failed": _failed(B, 5)}}, None, B, ("blue", "E5")),
    ({"blue": {"ready": True}, "green": {"failed": _failed(B, 5)}}, {"time": 3}, B,
     ("green", "E5")),
    ({"blue": {"ready": True}, "green": {"failed": _failed(B, 5)}}, {"time": 7}, B, None),
    ({"blue": {"ready": True}, "green": {"failed": _failed(B, 5)}}, {"time": 3}, A, None),
    ({"blue": {"failed": _failed(B, 5), "ready": True}}, {"time": 3}, B, None),
    ({"blue": {"failed": _failed(B, 5)}, "red": {"failed": _failed(B, 9)}}, None, B,
     ("red", "E9")),
    ({"blue": {}, "green": {}}, None, B, None),
], ids=["nothing-live", "newer-than-live", "older-than-live", "not-the-pushed-revision",
        "slot-ready-since", "newest-of-two", "no-failure"])
def test_which_failure_status_reports(programs, live, pushed, expected) -> None:
    """``status`` says "worker failing" for the pushed revision's newest failed start that no
    later ready worker has overtaken (syncagent/agent.py, stdlib-only, so tested here)."""
    from syncagent import agent

    found = agent.failing(programs, live, pushed)
    assert (found and (found["colour"], found["error"])) == (expected or None)
