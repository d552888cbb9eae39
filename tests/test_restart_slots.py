"""The agent's slot controller against a real supervisord running stand-in workers.

The slots run a small script (not Celery) that writes the readiness marker the way
worker/ready.py does and records every signal it gets, so each test sees exactly what the
controller did to a process: a worker too old to name ``stop_fetching`` is never sent SIGUSR2;
a start that does not get ready in time is recorded as failing; two agent processes (a `push`
and a `watch` on the same remote) restart one at a time.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest

from syncagent import agent
from syncagent.cli import main
from tests.helpers.procs import start_process, stop_process, supervisor_rpc, wait_until

OLD, NEW = "a" * 40, "b" * 40

# A stand-in worker: the marker on start (unless the revision is the one told to hang, or a
# standby was asked of the slot), every signal written down, TERM is a clean stop.
FAKE = textwrap.dedent('''
    import json, os, signal, sys, time
    colour = os.environ["SUPERVISOR_PROCESS_NAME"].rsplit("-", 1)[1]
    state = os.path.join(os.getcwd(), ".syncagent")

    def put(name, data):
        tmp = os.path.join(state, name + ".tmp%d" % os.getpid())
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, os.path.join(state, name))

    def on(signum, frame):
        with open(os.path.join(state, "signals-%d" % os.getpid()), "a") as f:
            f.write(signal.Signals(signum).name[3:] + "\\n")
        if signum == signal.SIGUSR2:
            put("stopped-fetching-%s.json" % colour, {"pid": os.getpid()})
        if signum == signal.SIGTERM:
            sys.exit(0)

    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(s, on)
    with open(os.path.join(state, "revision")) as f:
        revision = json.load(f)["revision"]
    time.sleep(float(os.environ.get("FAKE_READY_DELAY") or 0))
    parking = os.path.exists(os.path.join(state, "park-" + colour))
    if not parking and revision != os.environ.get("FAKE_HANG_REVISION"):
        marker = {"revision": revision, "pid": os.getpid(), "node": "fake-" + colour,
                  "time": time.time(), "colour": colour}
        if os.environ.get("FAKE_STOP_FETCHING"):
            marker["stop_fetching"] = "USR2"
        put("ready-%s.json" % colour, marker)
    while True:
        signal.pause()
''')


def _conf(root: Path, tmp: Path, env: dict[str, str]) -> Path:
    state = root / ".syncagent"
    environment = ",".join(f'{k}="{v}"' for k, v in env.items())
    text = textwrap.dedent(f"""\
        [unix_http_server]
        file={state}/supervisor.sock
        chmod=0700
        [supervisord]
        nodaemon=true
        pidfile={state}/supervisord.pid
        logfile={tmp}/supervisord.log
        [rpcinterface:supervisor]
        supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
        [group:worker]
        programs=worker-blue,worker-green,worker-red
        """)
    for colour in agent.COLOURS:
        text += textwrap.dedent(f"""\
            [program:worker-{colour}]
            command={sys.executable} {tmp}/fake_worker.py
            directory={root}
            autostart={'true' if colour == 'blue' else 'false'}
            autorestart=false
            startsecs=0
            stopwaitsecs=10
            redirect_stderr=true
            stdout_logfile={state}/logs/worker-{colour}.log
            """) + (f"environment={environment}\n" if environment else "")
    path = tmp / "supervisord.conf"
    path.write_text(text)
    return path


def _set_revision(root: Path, revision: str) -> None:
    (root / ".syncagent" / "revision").write_text(json.dumps(
        {"revision": revision, "time": time.time(), "files": 1}))


@contextlib.contextmanager
def _slots(tmp_path: Path, **env: str) -> Iterator[Path]:
    """supervisord with three stand-in slots, blue serving OLD; yields the project root."""
    root = tmp_path / "p"
    (root / ".syncagent" / "logs").mkdir(parents=True)
    (tmp_path / "fake_worker.py").write_text(FAKE)
    _set_revision(root, OLD)
    conf = _conf(root, tmp_path, env)
    proc = start_process([sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)],
                         tmp_path / "supervisord.out")
    rpc = supervisor_rpc(str(root / ".syncagent" / "supervisor.sock"))
    try:
        wait_until(lambda: os.path.exists(root / ".syncagent" / "supervisor.sock")
                   and rpc.supervisor.getState()["statename"] == "RUNNING", 30,
                   "supervisord RUNNING")
        wait_until(lambda: agent._marker(str(root), "blue"), 30, "blue's marker")
        yield root
    except BaseException:
        print((tmp_path / "supervisord.out").read_text(errors="replace"))
        raise
    finally:
        rpc("close")()
        stop_process(proc, timeout=30)


def _signals(root: Path, pid: int) -> list[str]:
    path = root / ".syncagent" / f"signals-{pid}"
    return path.read_text().split() if path.exists() else []


@pytest.mark.parametrize("names_it", [False, True], ids=["older-worker", "names-USR2"])
def test_stop_fetching_goes_only_to_a_worker_whose_marker_names_it(tmp_path: Path,
                                                                   names_it: bool) -> None:
    """SIGUSR2 would kill a worker that has no handler for it: only a marker that says
    ``stop_fetching`` gets it, before the warm stop (TERM)."""
    with _slots(tmp_path, **({"FAKE_STOP_FETCHING": "1"} if names_it else {})) as root:
        old = agent._marker(str(root), "blue")
        assert ("stop_fetching" in old) is names_it
        _set_revision(root, NEW)
        out = agent.restart_worker(str(root), NEW, timeout=30)
        assert out["ok"] and out["colour"] != "blue" and out["revision"] == NEW, out
        wait_until(lambda: not agent._running(old["pid"]), 30, "the old worker to stop")
        assert _signals(root, old["pid"]) == (["USR2", "TERM"] if names_it else ["TERM"])


def test_a_start_that_times_out_is_failing_not_running(tmp_path: Path, box,
                                                       capsys) -> None:
    """The new slot never writes its marker: the restart fails at the timeout, the slot is
    stopped, and `status` says the pushed revision is failing (exit 1), as `restart` does."""
    with _slots(tmp_path, FAKE_HANG_REVISION=NEW) as root:
        old = agent._marker(str(root), "blue")
        _set_revision(root, NEW)
        local = tmp_path / "local"
        local.mkdir()
        assert main(["restart", "sbx", "--path", str(local), "--remote-path", str(root),
                     "--timeout", "2"]) == 1
        shown = capsys.readouterr()
        out = shown.out + shown.err
        assert "the new code did not start (not ready after 2s)" in out, out
        state = agent.worker_state(str(root))
        assert state["failing"]["error"] == "not ready after 2s"
        assert state["failing"]["revision"] == NEW
        assert state["live"]["pid"] == old["pid"]  # blue-green: the old one still serves
        assert main(["status", "sbx", "--path", str(local), "--remote-path", str(root),
                     "--json"]) == 1
        status = json.loads(capsys.readouterr().out)
        assert status["failing"]["error"] == "not ready after 2s" and not status["live"]
        failed = status["failing"]["colour"]
        wait_until(lambda: agent.worker_state(str(root))["programs"][failed]["state"]
                   in agent.DOWN_STATES, 30, "the slot that timed out to be stopped")


def _agent() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, agent.__file__], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    banner = json.loads(agent.read_frame(proc.stdout))
    assert banner["agent"] == agent.MAGIC
    return proc


def test_two_agent_processes_restart_one_at_a_time(tmp_path: Path) -> None:
    """A `push` agent and a `watch` agent are two processes: both restart at once, and the
    second waits for the first's restart to end (the flock on .syncagent/restart.lock)."""
    with _slots(tmp_path, FAKE_READY_DELAY="1") as root:
        _set_revision(root, NEW)
        agents = [_agent(), _agent()]
        try:
            request = json.dumps({"op": "restart", "root": str(root), "revision": NEW,
                                  "timeout": 60}).encode()
            for proc in agents:
                agent.write_frame(proc.stdin, request)
                proc.stdin.flush()
            first, second = sorted((json.loads(agent.read_frame(p.stdout)) for p in agents),
                                   key=lambda out: out["timings"]["lock_wait"])
        finally:
            for proc in agents:
                proc.stdin.close()
                proc.wait(timeout=30)
                proc.stdout.close()
        assert first["error"] is None and second["error"] is None
        assert first["ok"] and second["ok"], (first, second)
        # the second began once the first had started its slot (>= 1 s) and was done
        assert second["timings"]["lock_wait"] >= 0.8 * first["timings"]["total"] > 0.8
        assert second["colour"] != first["colour"]
        serving = [c for c, p in agent.worker_state(str(root))["programs"].items()
                   if p["ready"] and p["state"] == "RUNNING"
                   and agent._marker(str(root), c)["revision"] == NEW]
        assert second["colour"] in serving


def test_the_restart_lock_is_never_opened_through_a_link(tmp_path: Path) -> None:
    with _slots(tmp_path) as root:
        elsewhere = tmp_path / "elsewhere"
        (root / ".syncagent" / agent.LOCK_FILE).symlink_to(elsewhere)
        with pytest.raises(OSError):
            agent.restart_worker(str(root), OLD, timeout=10)
        assert not elsewhere.exists()
