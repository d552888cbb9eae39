"""Secrets and permissions, end to end on a provisioned sandbox whose Redis has a password.

Every command runs with ``WORKER_API_KEY`` and a Redis password set; neither may appear in any
output, log, process command line, or file other than ``.env.worker``. Files syncagent creates
on either side are not group/world writable; the supervisord socket is 0700.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from syncagent import agent, sandbox
from syncagent.cli import main
from syncagent.config import Target
from syncagent.session import Session
from tests.helpers.procs import free_port, start_process, stop_process, wait_until

API_KEY = "wk-" + secrets.token_hex(12)
REDIS_PASSWORD = "rp-" + secrets.token_hex(12)
SECRETS = (API_KEY.encode(), REDIS_PASSWORD.encode())
SYNCAGENT = str(Path(sys.executable).with_name("syncagent"))


@pytest.fixture(scope="module")
def env(hermetic_home, tmp_path_factory):
    """sshd sandbox 'sbs' + a password-protected redis (password in a config file, not argv)
    + the demo app provisioned through the CLI with the secrets as --env pairs."""
    base = tmp_path_factory.mktemp("secrets")
    rdir = base / "redis"
    rdir.mkdir()
    port = free_port()
    conf = rdir / "redis.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\ndir {rdir}\n"
                    f"requirepass {REDIS_PASSWORD}\n")
    conf.chmod(0o600)
    redis_proc = start_process(["/usr/bin/redis-server", str(conf)], rdir / "redis.log")
    box = sandbox.up("sbs", base / "box")
    project = base / "project"
    shutil.copytree(sandbox.DEMO_APP, project,
                    ignore=shutil.ignore_patterns("__pycache__", ".env.worker"))
    remote = f"{box.remote_root}/project"
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}"
    ctx = {"box": box, "project": project, "remote": Path(remote), "redis_conf": conf,
           "argv": ["--path", str(project), "--remote-path", remote],
           "env": ["--env", f"CELERY_BROKER_URL={url}/0", "--env", f"CELERY_RESULT_BACKEND={url}/1",
                   "--env", "FLASK_APP_URL=http://127.0.0.1:9", "--env",
                   f"WORKER_API_KEY={API_KEY}", "--env", "CELERY_QUEUES=gpu,celery", "--env",
                   "CELERY_CONCURRENCY=1", "--env", "WORKER_NAME=demo"],
           "dirs": [base, Path(hermetic_home)]}
    try:
        import redis

        wait_until(lambda: redis.Redis(port=port, password=REDIS_PASSWORD).ping(), 10, "redis")
        yield ctx
    finally:
        pidfile = Path(remote) / ".syncagent" / "supervisord.pid"
        if pidfile.exists():
            sandbox.stop_pid(int(pidfile.read_text()), str(pidfile.with_name("supervisord.conf")),
                             timeout=60)
        sandbox.down("sbs", base / "box")
        stop_process(redis_proc)


def cmdlines() -> list[bytes]:
    out = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            out.append(p.read_bytes())
        except OSError:
            pass
    return out


def assert_clean(text: str | bytes, where: str) -> None:
    data = text.encode() if isinstance(text, str) else text
    for s in SECRETS:
        assert s not in data, f"a secret appears in {where}"


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_secrets_appear_in_no_output_log_command_line_or_file(capsys, env):
    argv, project = env["argv"], env["project"]
    outputs = []

    def cli(*args, ok=True):
        code, text = run(capsys, *args)
        outputs.append((" ".join(args[:2]), text))
        assert_clean(text, f"the output of `syncagent {' '.join(args)}`")
        assert_clean(b"\n".join(cmdlines()), "a process command line")
        if ok:
            assert code == 0, text
        return code, text

    cli("provision", "sbs", *argv, "--venv", sys.prefix, *env["env"])
    cli("provision", "sbs", *argv, "--venv", sys.prefix, "--json")
    version = project / "app" / "version.py"
    version.write_text('VERSION = "s1"\n')
    cli("push", "sbs", *argv, "--dry-run")
    cli("push", "sbs", *argv, "--json")
    cli("push", "sbs", *argv)
    cli("status", "sbs", *argv)
    cli("status", "sbs", *argv, "--json")
    cli("restart", "sbs", *argv)
    cli("restart", "sbs", *argv, "--json", "--mode", "drain")
    cli("logs", "sbs", *argv, "-n", "500")
    cli("sandbox", "status", "--name", "sbs", "--dir", str(env["box"].dir), "--json")
    # the failure path: code that cannot start, its log tail shown to the user
    demo = project / "app" / "tasks" / "demo.py"
    good = demo.read_text()
    demo.write_text(good + "\nraise RuntimeError('boom')\n")
    code, text = cli("push", "sbs", *argv, ok=False)
    assert code == 1 and "boom" in text
    demo.write_text(good)
    cli("push", "sbs", *argv)
    # watch, as its own process: its command line and its output
    proc = subprocess.Popen([SYNCAGENT, "watch", "sbs", *argv, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        lines = []
        while not any('"synced"' in ln for ln in lines):
            line = proc.stdout.readline().decode()
            assert line, b"".join(x.encode() for x in lines)
            lines.append(line)
        version.write_text('VERSION = "s2"\n')
        while not any('"ready"' in ln for ln in lines):
            line = proc.stdout.readline().decode()
            assert line, "".join(lines)
            lines.append(line)
        assert_clean(b"\n".join(cmdlines()), "a process command line during watch")
    finally:
        stop_process(proc)
    rest = proc.stdout.read().decode()
    proc.stdout.close()
    assert_clean("".join(lines) + rest, "the output of `syncagent watch`")
    # the remote runtime's own doctor
    target = Target("sbs", "sbs", ssh_config=env["box"].ssh_config)
    with Session.open(target) as s:
        remote = env["remote"]
        _, out, err = s.run(f"cd {remote} && PYTHONPATH={remote}/.syncagent/runtime "
                            f"{sys.executable} -m worker doctor --json", timeout=60)
    assert_clean(out + err, "the output of `python -m worker doctor`")
    assert "worker api key" in out
    # every file under the sandbox, the remote tree, the project and the user's dirs
    allowed = {".env.worker", env["redis_conf"].name}
    for top in env["dirs"]:
        for p in Path(top).rglob("*"):
            if p.is_symlink() or not p.is_file() or p.name in allowed:
                continue
            try:
                data = p.read_bytes()
            except OSError:
                continue
            assert_clean(data, f"file {p}")
    env_file = env["remote"] / ".env.worker"
    assert API_KEY in env_file.read_text() and REDIS_PASSWORD in env_file.read_text()


def writable_by_others(p: Path) -> bool:
    return bool(p.lstat().st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def test_files_syncagent_creates_are_not_group_or_world_writable(env, capsys):
    assert main(["push", "sbs", *env["argv"]]) == 0
    capsys.readouterr()
    remote, box = env["remote"], env["box"]
    created = [remote / ".syncagent", Path(box.remote_root) / ".cache" / "syncagent",
               env["project"] / ".syncagent", Path(box.dir),
               Path(os.environ["XDG_CONFIG_HOME"]) / "syncagent",
               Path(os.environ["XDG_STATE_HOME"]) / "syncagent"]
    checked = 0
    for top in created:
        if not top.exists():  # the user state dir exists only once something was recorded
            continue
        for p in [top, *top.rglob("*")]:
            if p.is_symlink() or Path(box.dir, "remote") in p.parents:
                continue  # the remote tree is checked through remote/.syncagent
            assert not writable_by_others(p), f"{p} is {oct(p.lstat().st_mode)}"
            checked += 1
    assert checked > 10
    sock = remote / ".syncagent" / "supervisor.sock"
    assert stat.S_ISSOCK(sock.lstat().st_mode) and sock.lstat().st_mode & 0o777 == 0o700
    assert (remote / ".syncagent").stat().st_mode & 0o777 == 0o700
    assert (remote / ".env.worker").stat().st_mode & 0o777 == 0o600
    for key in ("id_ed25519", "ssh_host_ed25519_key"):
        assert Path(box.dir, key).stat().st_mode & 0o777 == 0o600


def test_state_files_are_private_whatever_the_umask(tmp_path):
    """The digest cache and revision marker (both sides) do not follow a loose umask."""
    old = os.umask(0o002)
    try:
        root = tmp_path / "r"
        root.mkdir()
        (root / "a.py").write_text("a")
        cache: dict = {}
        agent.scan(str(root), agent.compile_rules([]), cache)
        agent.save_digest_cache(str(root), {"a.py": [1, 0, 0, 1, "d", 10**19]})
        agent.apply_batch(str(root), {"uploads": [], "revision": "r", "files": 1},
                          lambda up: iter(()))
    finally:
        os.umask(old)
    for p in (root / ".syncagent").rglob("*"):
        assert not writable_by_others(p), f"{p} is {oct(p.lstat().st_mode)}"
    assert json.loads((root / ".syncagent" / "revision").read_text())["revision"] == "r"
