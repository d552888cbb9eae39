"""syncagent provision and the provisioned sandbox: real sshd, Redis, supervisord and Celery.

One module-scoped sandbox "wbx" is brought up through the CLI (``sandbox up``: sshd, a private
redis-server, the demo app pushed and provisioned, a supervisord-managed worker). Tasks go
through the real broker; the last test stops it all and checks every process is gone.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery import Celery
from click.testing import CliRunner
from dotenv import dotenv_values

from syncagent import cli as cli_mod
from syncagent import provision as prov
from syncagent import sandbox
from syncagent.errors import ConfigError
from tests.helpers.procs import pid_running, wait_until
from tests.helpers.wheels import write_wheel
from worker import ready

SECRET = "wbx-api-key-5b1f0e7c2d9a"  # WORKER_API_KEY given with --env: must never be shown
OTHER = "wbx-other-key-93c1d47e"  # a second --env value: must not overwrite .env.worker
OUTPUTS: list[str] = []  # everything the CLI printed in this module


def syncagent(*args: str) -> tuple[int, str]:
    """Run the console entry point in-process; returns (exit code, stdout + stderr)."""
    runner = CliRunner()
    with runner.isolation() as streams:
        code = cli_mod.main(list(args))
    text = streams[-1].getvalue().decode(errors="replace")  # click 8.2+: stdout + stderr
    OUTPUTS.append(text)
    return code, text


@pytest.fixture(scope="module")
def wbx(hermetic_home, tmp_path_factory):
    """A provisioned sandbox: the CLI's `sandbox up --json` output, plus its directory."""
    directory = tmp_path_factory.mktemp("wbx")
    code, out = syncagent("sandbox", "up", "--name", "wbx", "--dir", str(directory), "--env",
                          f"WORKER_API_KEY={SECRET}", "--timeout", "60", "--json")
    try:
        assert code == 0, out
        info = json.loads(out.strip().splitlines()[-1])
        info["directory"] = directory
        yield info
    except BaseException:
        for log in sorted(Path(directory).rglob("*.log")):
            print(f"==> {log}\n{log.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        sandbox.down("wbx", directory)


def demo_client(info: dict) -> Celery:
    """A client for the demo worker, from `sandbox up --json` (its own dbs and queue)."""
    client = Celery("client", broker=info["demo"]["broker"], backend=info["demo"]["backend"],
                    set_as_current=False)
    client.conf.task_default_queue = info["demo"]["queue"]
    client.conf.broker_connection_retry_on_startup = True
    return client


def _root(info: dict) -> Path:
    return Path(info["remote_root"]) / "project"


def _live_marker(root: Path) -> dict:
    """The readiness marker of the slot serving now (the newest of a running process)."""
    markers = [m for c in ready.COLOURS if (m := ready.read_marker(root, c))
               and pid_running(m["pid"])]
    return max(markers, key=lambda m: m["time"])


def test_up_reports_redis_project_and_status_command(wbx) -> None:
    assert wbx["redis_url"].startswith("redis://127.0.0.1:") and wbx["redis_pid"]
    assert Path(wbx["project"], "app", "tasks", "demo.py").is_file()
    assert wbx["supervisorctl"] == (f"{sys.prefix}/bin/supervisorctl -c "
                                    f"{_root(wbx)}/.syncagent/supervisord.conf status")


def test_task_runs_in_the_supervised_worker_on_the_pushed_revision(wbx) -> None:
    root = _root(wbx)
    revision = ready.read_revision(root)
    assert revision != ready.UNKNOWN_REVISION
    marker = ready.read_marker(root, "blue")
    assert marker and marker["revision"] == revision
    supervisord_pid = int((root / ".syncagent" / "supervisord.pid").read_text())
    ppid = int(Path(f"/proc/{marker['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid == supervisord_pid  # the worker is supervisord's child, not ours
    client = demo_client(wbx)
    try:
        assert client.send_task("app.tasks.demo.add", args=(2, 3)).get(timeout=30) == 5
        assert client.send_task("app.tasks.demo.version").get(timeout=30) == "v1"
        replies = client.control.ping(timeout=1)
    finally:
        client.close()
    nodes = [node for reply in replies for node in reply]
    assert nodes == [marker["node"]] and f"-blue-{revision[:7]}@" in marker["node"]


def test_supervisorctl_status_command_works(wbx) -> None:
    proc = subprocess.run(shlex.split(wbx["supervisorctl"]), capture_output=True, text=True,
                          timeout=30)
    assert "worker:worker-blue" in proc.stdout and "RUNNING" in proc.stdout, proc.stdout
    assert stat.S_IMODE(os.stat(_root(wbx) / ".syncagent" / "supervisor.sock").st_mode) \
        & 0o077 == 0


def test_second_provision_changes_nothing_and_never_overwrites_env(wbx) -> None:
    root = _root(wbx)
    env_file = root / ".env.worker"
    before = env_file.read_bytes()
    pid = ready.read_marker(root, "blue")["pid"]
    code, out = syncagent("provision", "wbx", "--path", wbx["project"], "--venv", sys.prefix,
                          "--env", f"WORKER_API_KEY={OTHER}")
    assert code == 0, out
    assert "wbx: nothing changed" in out
    assert "not overwritten" in out
    assert f"status: {wbx['supervisorctl']}" in out
    assert env_file.read_bytes() == before
    assert dotenv_values(env_file)["WORKER_API_KEY"] == SECRET
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert ready.read_marker(root, "blue")["pid"] == pid  # nothing restarted


def test_provision_json_after_a_code_change_restarts_on_the_new_revision(wbx) -> None:
    root = _root(wbx)
    old = ready.read_marker(root, "blue")
    version = Path(wbx["project"], "app", "version.py")
    version.write_text(version.read_text().replace('"v1"', '"v2"'))
    code, out = syncagent("provision", "wbx", "--path", wbx["project"], "--venv", sys.prefix,
                          "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["changed"] and result["revision"] != old["revision"]
    # through the agent's slot controller, warm: provision parked a standby after its start
    colour = result["worker"]["colour"]
    assert f"restarted worker ({colour}, warm) on the new revision" in result["changes"], result
    marker = ready.read_marker(root, colour)
    assert colour != "blue" and marker["warm"] is True
    assert marker["revision"] == result["revision"] and marker["pid"] != old["pid"]
    assert result["worker"]["pid"] == marker["pid"]
    wait_until(lambda: not pid_running(old["pid"]), 60, "the old slot to drain and exit")
    client = demo_client(wbx)
    try:
        assert client.send_task("app.tasks.demo.version").get(timeout=30) == "v2"
    finally:
        client.close()


def test_missing_env_file_and_bad_venv(wbx, tmp_path) -> None:
    project = tmp_path / "other"
    shutil.copytree(sandbox.DEMO_APP, project)
    remote = f"{wbx['remote_root']}/other"
    code, out = syncagent("provision", "wbx", "--path", str(project), "--remote-path", remote,
                          "--venv", f"{wbx['remote_root']}/no-venv")
    assert code == 2 and "no-venv/bin/python" in out, out
    code, out = syncagent("provision", "wbx", "--path", str(project), "--remote-path", remote,
                          "--venv", sys.prefix)
    assert code == 1, out
    assert f"no {remote}/.env.worker: the worker cannot start" in out
    assert f"cp {remote}/.env.worker.example {remote}/.env.worker" in out
    assert not Path(remote, ".syncagent", "supervisord.conf").exists()
    code, out = syncagent("provision", "wbx", "--path", str(project), "--env", "NOEQUALS")
    assert code == 2 and "--env NOEQUALS: not set in the environment" in out


def test_worker_that_cannot_start_shows_its_log_tail(wbx, tmp_path) -> None:
    project = tmp_path / "broken"
    shutil.copytree(sandbox.DEMO_APP, project)
    remote = Path(wbx["remote_root"], "broken")
    conf = remote / ".syncagent" / "supervisord.conf"
    try:
        code, out = syncagent("provision", "wbx", "--path", str(project), "--remote-path",
                              str(remote), "--venv", sys.prefix, "--timeout", "4",
                              "--env", f"WORKER_API_KEY={SECRET}", "--env",
                              f"CELERY_BROKER_URL={wbx['redis_url']}/0", "--env",
                              f"CELERY_RESULT_BACKEND={wbx['redis_url']}/1", "--env",
                              "FLASK_APP_URL=http://127.0.0.1:9", "--env",
                              "CELERY_APP=no_such_module.celery_app")
        assert code == 1, out
        assert f"last lines of {remote}/.syncagent/logs/worker-blue.log" in out
        assert "no_such_module" in out
    finally:
        if conf.exists():
            subprocess.run([f"{sys.prefix}/bin/supervisorctl", "-c", str(conf), "shutdown"],
                           capture_output=True, timeout=60)


def test_odd_remote_and_venv_paths_work_end_to_end(wbx) -> None:
    """A remote path with a space, a quote, % and a non-ASCII letter, and a venv path with a
    double quote and %, are provisioned and run (supervisord reads them back unchanged)."""
    remote = Path(wbx["remote_root"], "odd p'q 50%é")
    venv = Path(wbx["remote_root"], 'v "x" 5%é')
    venv.symlink_to(sys.prefix)
    conf = remote / ".syncagent" / "supervisord.conf"
    try:
        code, out = syncagent("provision", "wbx", "--path", wbx["project"], "--remote-path",
                              str(remote), "--venv", str(venv), "--timeout", "60", "--json",
                              "--env", f"WORKER_API_KEY={SECRET}", "--env",
                              f"CELERY_BROKER_URL={wbx['redis_url']}/0", "--env",
                              f"CELERY_RESULT_BACKEND={wbx['redis_url']}/1", "--env",
                              "FLASK_APP_URL=http://127.0.0.1:9", "--env", "WORKER_NAME=odd")
        assert code == 0, out
        result = json.loads(out)
        marker = ready.read_marker(remote, "blue")
        assert marker and marker["pid"] == result["worker"]["pid"]
        assert Path(f"/proc/{marker['pid']}/cwd").resolve() == remote
        def blue_running() -> bool:  # ready (its marker) may come before startsecs
            status = subprocess.run(shlex.split(result["supervisorctl"]), capture_output=True,
                                    text=True, timeout=30)
            return re.search(r"worker:worker-blue +RUNNING", status.stdout) is not None

        wait_until(blue_running, 30, "supervisorctl to say worker-blue RUNNING")
    finally:
        if conf.exists():
            subprocess.run([f"{sys.prefix}/bin/supervisorctl", "-c", str(conf), "shutdown"],
                           capture_output=True, timeout=60)


@pytest.mark.parametrize(("remote_name", "reason"), [
    ("new\nline", "holds a control character"), ("a #b", "' #'"), ("x;y ;z", "' ;'"),
    ("star*", "glob character"), ("both'\"q", "both ' and \""), ("pct%(here)s", "'%('"),
    ("long-" + "é" * 40, "over the 107 a unix socket allows")],
    ids=["newline", "comment", "semicolon", "glob", "both-quotes", "expansion", "too-long"])
def test_unrepresentable_remote_path_is_refused_before_anything_is_written(
        wbx, remote_name: str, reason: str) -> None:
    remote = Path(wbx["remote_root"], remote_name)
    code, out = syncagent("provision", "wbx", "--path", wbx["project"], "--remote-path",
                          str(remote), "--venv", sys.prefix)
    assert code == 2 and reason in out and len(out.strip().splitlines()) <= 2, out
    assert not remote.exists()
    code, out = syncagent("provision", "wbx", "--path", wbx["project"], "--remote-path",
                          str(Path(wbx["remote_root"], "fine")), "--venv",
                          str(Path(wbx["remote_root"], remote_name)))
    if "unix socket" not in reason:  # a venv path may be long
        assert code == 2 and "--venv" in out and reason in out, out
        assert not Path(wbx["remote_root"], "fine").exists()


@pytest.mark.parametrize(("pair", "message"), [
    ("WORKER_API_KEY=short-key-9", "WORKER_API_KEY is too short (11 characters, at least 16): "
     'generate one with python -c "import secrets; print(secrets.token_urlsafe(32))"'),
    ("WORKER_API_KEY=your-secure-key-here", "WORKER_API_KEY is still the example file's "
     "placeholder"),
    ("CELERY_BROKER_URL=redis://your-redis-host:6379/0", "CELERY_BROKER_URL is still the "
     "example file's placeholder")], ids=["short-key", "example-key", "example-host"])
def test_invalid_env_pair_is_refused_before_anything_is_written(wbx, pair, message) -> None:
    remote = Path(wbx["remote_root"], "never")
    code, out = syncagent("provision", "wbx", "--path", wbx["project"], "--remote-path",
                          str(remote), "--venv", sys.prefix, "--env", pair)
    assert code == 2 and message in out, out
    assert "short-key-9" not in out and not remote.exists()


def _settings(info: dict, db: int) -> list[str]:
    """--env arguments for a second worker on its own Redis dbs (never the wbx worker's)."""
    return ["--env", f"WORKER_API_KEY={SECRET}",
            "--env", f"CELERY_BROKER_URL={info['redis_url']}/{db}",
            "--env", f"CELERY_RESULT_BACKEND={info['redis_url']}/{db + 1}",
            "--env", "FLASK_APP_URL=http://127.0.0.1:9"]


def _shutdown(remote: Path) -> None:
    conf = remote / ".syncagent" / "supervisord.conf"
    if conf.exists():
        subprocess.run([f"{sys.prefix}/bin/supervisorctl", "-c", str(conf), "shutdown"],
                       capture_output=True, timeout=60)


def _env_of(pid: int) -> str:
    """The env a worker process was started from: argv[0]'s ``envs/<name>`` (or its venv)."""
    argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    mark = "/.syncagent/envs/"
    return argv0.split(mark, 1)[1].split("/")[0] if mark in argv0 else argv0


def test_provision_prints_each_step_as_it_starts_and_ends(wbx, tmp_path) -> None:
    """Read from a real CLI process: every step's lines, in order, as they happen."""
    project = tmp_path / "steps"
    shutil.copytree(sandbox.DEMO_APP, project)
    (project / "requirements.txt").write_text("six\n")  # an env to build (six: from the venv)
    remote = Path(wbx["remote_root"], "steps")
    seen: list[tuple[float, str]] = []
    try:
        with subprocess.Popen(
                [sys.executable, "-m", "syncagent.cli", "provision", "wbx", "--path",
                 str(project), "--remote-path", str(remote), "--venv", sys.prefix,
                 *_settings(wbx, 2)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:
                seen.append((time.monotonic(), line.rstrip()))
        assert proc.returncode == 0, "\n".join(text for _, text in seen)
    finally:
        _shutdown(remote)
    text = "\n".join(line for _, line in seen)
    OUTPUTS.append(text)
    steps = [name for name, _ in prov.STEPS]
    events = [(m.group(1), "..." if m.group(2) == "..." else "done") for _, line in seen
              if (m := re.match(r"wbx: (.+?) (\.\.\.|done in [\d.]+ s)", line))]
    assert events == [(s, e) for s in steps for e in ("...", "done")], text
    assert re.search(r"wbx: requirements done in [\d.]+ s: built env \w+ with pip", text)
    assert re.search(r"wbx: \.env\.worker done in [\d.]+ s: created .*/steps/\.env\.worker",
                     text)
    assert "wbx: worker ready done in" in text and "-blue-" in text
    times = {line.split(" done in")[0]: t for t, line in seen if " done in " in line}
    # as they happen: the push was on screen long before the worker was ready
    assert times["wbx: worker ready"] - times["wbx: push"] > 0.5, seen


def test_failing_requirements_say_what_was_done_what_failed_and_next(wbx, tmp_path) -> None:
    project = tmp_path / "badreq"
    shutil.copytree(sandbox.DEMO_APP, project)
    (project / "requirements.txt").write_text("./no-such-local-package\n")
    remote = Path(wbx["remote_root"], "badreq")
    code, out = syncagent("provision", "wbx", "--path", str(project), "--remote-path",
                          str(remote), "--venv", sys.prefix, *_settings(wbx, 2))
    assert code == 1, out
    assert "wbx: requirements FAILED after" in out
    assert ("wbx: provision stopped at requirements; done before it: push, venv, runtime, "
            "dependencies") in out
    assert "installing requirements failed (pip, " in out
    assert re.search(r"\n  \| .*no-such-local-package", out), out  # the installer's lines
    assert "fix requirements*.txt locally, then run provision again" in out
    assert not (remote / ".env.worker").exists()  # later steps did not run
    assert not (remote / ".syncagent" / "supervisord.conf").exists()
    assert not list((remote / ".syncagent" / "envs").glob("*/bin"))  # no half-built env


def _venv_with_uv(directory: Path) -> Path:
    """The test venv seen from another directory, with a real uv beside its python (where
    worker.envs looks first): what ``provision`` makes, without a download of its runtime."""
    venv = directory / "uv-venv"
    (venv / "bin").mkdir(parents=True)
    shutil.copy(Path(sys.prefix, "pyvenv.cfg"), venv / "pyvenv.cfg")
    (venv / "lib").symlink_to(Path(sys.prefix, "lib"))
    (venv / "bin" / "python").symlink_to(sys.executable)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "--target", str(directory / "uv"), "uv"],
                   check=True, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    (venv / "bin" / "uv").symlink_to(directory / "uv" / "bin" / "uv")
    return venv


def test_conflicting_pins_fail_on_uv_s_account_without_a_pip_retry(wbx, tmp_path) -> None:
    """The trial's redis==5.0.1 beside celery, offline: sa-top 1.0 needs sa-dep 2.0, the
    requirements pin sa-dep 1.0 (the index options ride in requirements.txt, which both
    installers read)."""
    wheels = tmp_path / "wheels"
    write_wheel(wheels, "sa-top", "1.0", ["sa-dep==2.0"])
    write_wheel(wheels, "sa-dep", "1.0")
    write_wheel(wheels, "sa-dep", "2.0")
    project = tmp_path / "conflict"
    shutil.copytree(sandbox.DEMO_APP, project)
    (project / "requirements.txt").write_text(f"--no-index\n--find-links {wheels}\n"
                                              "sa-top==1.0\nsa-dep==1.0\n")
    venv = _venv_with_uv(tmp_path)
    remote = Path(wbx["remote_root"], "conflict")
    code, out = syncagent("provision", "wbx", "--path", str(project), "--remote-path",
                          str(remote), "--venv", str(venv), *_settings(wbx, 3))
    assert code == 1, out
    assert "wbx: provision stopped at requirements; done before it: push" in out
    failed = next(line for line in out.splitlines() if "installing requirements failed" in line)
    assert re.search(r"installing requirements failed \(uv, [0-9.]+ s\): the requirements "
                     r"conflict: Because .*you require sa-top==1\.0.* you require "
                     r"sa-dep==1\.0, we can conclude that your requirements are unsatisfiable\."
                     r" \(fix requirements\*\.txt locally", failed), failed
    assert "pip" not in out, out  # no fallback, no pip error as the last word
    assert not (remote / ".env.worker").exists()


def test_invalid_first_env_writes_nothing_and_a_corrected_one_works(wbx, tmp_path) -> None:
    """The issue's typo: no CELERY_RESULT_BACKEND. Nothing is written, so the corrected
    provision is not refused."""
    project = tmp_path / "typo"
    shutil.copytree(sandbox.DEMO_APP, project)
    remote = Path(wbx["remote_root"], "typo")
    settings = _settings(wbx, 6)
    i = next(i for i, a in enumerate(settings) if a.startswith("CELERY_RESULT_BACKEND="))
    without_backend = settings[:i - 1] + settings[i + 1:]
    try:
        code, out = syncagent("provision", "wbx", "--path", str(project), "--remote-path",
                              str(remote), "--venv", sys.prefix, *without_backend)
        assert code == 2, out
        assert ".env.worker would be invalid, nothing written" in out
        assert "CELERY_RESULT_BACKEND" in out
        assert not (remote / ".env.worker").exists()
        code, out = syncagent("provision", "wbx", "--path", str(project), "--remote-path",
                              str(remote), "--venv", sys.prefix, *settings)
        assert code == 0, out
        assert dotenv_values(remote / ".env.worker")["CELERY_RESULT_BACKEND"].endswith("/7")
    finally:
        _shutdown(remote)


def test_update_env_changes_one_key_keeps_the_rest_and_restarts(wbx) -> None:
    root = _root(wbx)
    env_file = root / ".env.worker"
    with env_file.open("a") as f:
        f.write("# a comment of the user's\n")
    before = dotenv_values(env_file)
    old = _live_marker(root)
    code, out = syncagent("provision", "wbx", "--path", wbx["project"], "--venv", sys.prefix,
                          "--update-env", "LOG_LEVEL=debug", "--json")
    assert code == 0, out
    result = json.loads(out)
    after = dotenv_values(env_file)
    assert after == {**before, "LOG_LEVEL": "debug"}
    assert "# a comment of the user's" in env_file.read_text()
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert any("updated LOG_LEVEL in" in c for c in result["changes"]), result
    marker = ready.read_marker(root, result["worker"]["colour"])
    assert marker["pid"] != old["pid"]  # a changed .env.worker restarts the worker
    # an invalid merge writes nothing and restarts nothing
    text = env_file.read_bytes()
    code, out = syncagent("provision", "wbx", "--path", wbx["project"], "--venv", sys.prefix,
                          "--update-env", "CELERY_BROKER_URL=ftp://nowhere/0")
    assert code == 2, out
    assert "would be invalid, nothing written" in out and "CELERY_BROKER_URL" in out
    assert env_file.read_bytes() == text
    assert ready.read_marker(root, result["worker"]["colour"])["pid"] == marker["pid"]
    # a bare KEY takes its value from the local environment (never a command line)
    os.environ["LOG_LEVEL"] = "info"
    try:
        code, out = syncagent("provision", "wbx", "--path", wbx["project"], "--venv",
                              sys.prefix, "--update-env", "LOG_LEVEL")
    finally:
        del os.environ["LOG_LEVEL"]
    assert code == 0, out
    assert dotenv_values(env_file) == {**before, "LOG_LEVEL": "info"}



def test_requirements_change_starts_the_next_slot_on_a_new_env(wbx, tmp_path) -> None:
    """The slot serving keeps its env, untouched, while it drains a task; the next slot starts
    on a new env; the old env goes once nothing runs from it."""
    import redis

    project = tmp_path / "envs"
    shutil.copytree(sandbox.DEMO_APP, project)
    (project / "requirements.txt").write_text("six  # first\n")
    remote = Path(wbx["remote_root"], "envs")
    client = Celery("client", broker=f"{wbx['redis_url']}/8", backend=f"{wbx['redis_url']}/9",
                    set_as_current=False)
    client.conf.broker_connection_retry_on_startup = True
    broker = redis.Redis.from_url(f"{wbx['redis_url']}/8")
    try:
        code, out = syncagent("provision", "wbx", "--path", str(project), "--remote-path",
                              str(remote), "--venv", sys.prefix, *_settings(wbx, 8))
        assert code == 0, out
        old = ready.read_marker(remote, "blue")
        env_a = _env_of(old["pid"])
        ready_a = remote / ".syncagent" / "envs" / env_a / ".syncagent-env-ready"
        assert ready_a.is_file(), env_a
        before = ready_a.read_bytes()
        task = client.send_task("app.tasks.demo.work", args=(4,))
        wait_until(lambda: task.id.encode() in broker.lrange("demo:started", 0, -1), 30,
                   "the task to start on the old slot")
        (project / "requirements.txt").write_text("six  # second\n")
        code, out = syncagent("push", "wbx", "--path", str(project), "--remote-path",
                              str(remote))
        assert code == 0, out
        (new,) = [m for c in ready.COLOURS if (m := ready.read_marker(remote, c))
                  and m["pid"] != old["pid"]]
        assert _env_of(new["pid"]) != env_a
        assert pid_running(old["pid"]) and _env_of(old["pid"]) == env_a  # still draining
        assert ready_a.read_bytes() == before
        assert task.get(timeout=30)["seconds"] >= 4  # finished on the old slot, not cut
        wait_until(lambda: not pid_running(old["pid"]), 30, "the old slot to exit")
        version = project / "app" / "version.py"
        version.write_text(version.read_text().replace('"v1"', '"v3"'))
        code, out = syncagent("push", "wbx", "--path", str(project), "--remote-path",
                              str(remote))
        assert code == 0, out
        def envs_left():
            return {p.name for p in (remote / ".syncagent" / "envs").iterdir() if p.is_dir()}

        # the next start pruned the drained env (with warm starts: the standby parked next)
        wait_until(lambda: envs_left() == {_env_of(new["pid"])}, 60, "the drained env pruned")
    finally:
        client.close()
        broker.close()
        _shutdown(remote)


def test_boot_without_systemd_prints_the_commands_and_the_unit_starts_the_worker(
        wbx, tmp_path) -> None:
    """This machine runs no systemd: provision --boot says so with the exact commands, status
    says the worker will not come back, and the unit's own ExecStart/ExecStop (what systemd
    would run at boot) bring the worker up and down."""
    project = tmp_path / "boot"
    shutil.copytree(sandbox.DEMO_APP, project)
    remote = Path(wbx["remote_root"], "boot")
    try:
        code, out = syncagent("provision", "wbx", "--path", str(project), "--remote-path",
                              str(remote), "--venv", sys.prefix, "--boot", *_settings(wbx, 10))
        assert code == 0, out
        (unit_file,) = remote.joinpath(".syncagent").glob("syncagent-boot-worker-*.service")
        unit = unit_file.name
        assert re.search(rf"wbx: boot done in [\d.]+ s: not installed \(systemd is not "
                         rf"running on this machine\); the unit is in {unit_file}", out), out
        assert f"sudo install -m 644 {unit_file} /etc/systemd/system/{unit}" in out
        assert f"sudo systemctl enable {unit}" in out
        assert f"systemctl --user enable {unit}" in out and "loginctl enable-linger" in out
        text = unit_file.read_text()
        conf = remote / ".syncagent" / "supervisord.conf"
        assert f"ExecStart={sys.prefix}/bin/supervisord -n -c {conf}\n" in text
        assert "WantedBy=multi-user.target" in text and "User=" in text
        code, out = syncagent("status", "wbx", "--path", str(project), "--remote-path",
                              str(remote))
        assert code == 0, out
        assert (f"boot    will NOT come back after a reboot ({unit} not enabled; run "
                "`syncagent provision --boot`)") in out
        # a "reboot": supervisord gone, then the unit's ExecStart as systemd would run it
        old = ready.read_marker(remote, "blue")
        subprocess.run([f"{sys.prefix}/bin/supervisorctl", "-c", str(conf), "shutdown"],
                       capture_output=True, timeout=60, check=True)
        wait_until(lambda: not pid_running(old["pid"]), 30, "the worker to stop")
        exec_start = re.search(r"^ExecStart=(.*)$", text, re.M).group(1).split()
        exec_stop = re.search(r"^ExecStop=(.*)$", text, re.M).group(1).split()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        with subprocess.Popen(exec_start, cwd=remote, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as daemon:
            try:
                marker = wait_until(lambda: (m := ready.read_marker(remote, "blue"))
                                    and m["pid"] != old["pid"] and m, 60,
                                    "the worker started by the unit's ExecStart")
                assert pid_running(marker["pid"])
                subprocess.run(exec_stop, capture_output=True, timeout=60, check=True)
                assert daemon.wait(timeout=60) == 0
            finally:
                if daemon.poll() is None:
                    daemon.kill()
    finally:
        _shutdown(remote)


def test_no_secret_in_output_files_or_command_lines(wbx) -> None:
    assert OUTPUTS and not any(SECRET in text or OTHER in text for text in OUTPUTS)
    holders = []
    for path in Path(wbx["directory"]).rglob("*"):
        if path.is_file() and not path.is_symlink():
            if SECRET.encode() in path.read_bytes() or OTHER.encode() in path.read_bytes():
                holders.append(path)
    assert _root(wbx) / ".env.worker" in holders
    assert {p.name for p in holders} == {".env.worker"}, holders
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            data = cmdline.read_bytes()
        except OSError:
            continue
        assert SECRET.encode() not in data and OTHER.encode() not in data, cmdline


def test_down_stops_supervisord_worker_redis_and_sshd(wbx) -> None:
    root = _root(wbx)
    pids = {"supervisord": int((root / ".syncagent" / "supervisord.pid").read_text()),
            "worker": ready.read_marker(root, "blue")["pid"],
            "redis": wbx["redis_pid"], "sshd": wbx["sshd_pid"]}
    assert all(pid_running(pid) for pid in pids.values()), pids
    code, out = syncagent("sandbox", "down", "--name", "wbx", "--dir", str(wbx["directory"]))
    assert code == 0, out
    for what, pid in pids.items():
        wait_until(lambda p=pid: not pid_running(p), 10, f"{what} (pid {pid}) to be gone")
    assert ready.read_marker(root, "blue") is None  # warm shutdown removed it


# ------------------------------------------------------------------ pure helpers

@pytest.mark.parametrize("value", ["plain", "with space", "quote'd", 'dq"x', "back\\slash",
                                   "a#b", "=eq=", "$HOME", ""],
                         ids=["plain", "space", "squote", "dquote", "backslash", "hash", "eq",
                              "dollar", "empty"])
def test_env_file_text_reads_back_literally(tmp_path, value) -> None:
    path = tmp_path / ".env.worker"
    path.write_text(prov.env_file_text([("K", value)]))
    assert dotenv_values(path)["K"] == value


@pytest.mark.parametrize("pair", ["NOEQUALS", "1BAD=zq7", "K=a\nzq7", "K=${zq7}"],
                         ids=["no-equals", "bad-key", "newline", "interpolation"])
def test_parse_env_pairs_refuses_without_showing_the_value(pair) -> None:
    with pytest.raises(ConfigError) as info:
        prov.parse_env_pairs([pair])
    value = pair.partition("=")[2]
    assert not value or value not in str(info.value)


def test_secret_values_and_redact() -> None:
    key, password, s3 = "k1-0123456789abcdef", "pw9-long-password", "s3s-secret-value"
    pairs = [("WORKER_API_KEY", key), ("CELERY_BROKER_URL", f"redis://:{password}@h:1/0"),
             ("CELERY_CONCURRENCY", "1"), ("S3_SECRET", s3), ("TINY_TOKEN", "t")]
    secrets = prov.secret_values(pairs)
    assert set(secrets) == {key, password, s3}  # "t" is under the masking floor
    assert prov.redact(f"redis://:{password}@h:1/0 {key} {s3} 1 {password} t", secrets) == \
        "redis://:***@h:1/0 *** *** 1 *** t"
    assert prov.redact("redis://u:pw@h/0 SyntaxError", ["t", "x"]) == \
        "redis://u:***@h/0 SyntaxError"


def test_bare_env_key_takes_its_value_from_the_environment() -> None:
    """`--env WORKER_API_KEY`: the secret never has to be on a command line."""
    assert prov.parse_env_pairs(["WORKER_API_KEY", "X=1"], {"WORKER_API_KEY": "s3"}) == (
        ("WORKER_API_KEY", "s3"), ("X", "1"))
    with pytest.raises(ConfigError, match="not set in the environment"):
        prov.parse_env_pairs(["WORKER_API_KEY"], {})
