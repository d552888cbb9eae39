"""Faults, each with its outcome asserted: the network between syncagent and sshd breaks (a
loopback fault proxy drops, stalls, cuts mid-batch and mid-restart), sshd restarts under a
watch, supervisord is killed, Redis is down during a restart, a worker is killed -9 mid-task.

After every recovery the remote tree equals the local one and no temp file remains.
One provisioned sandbox ('fbx') for the module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from syncagent import agent, sandbox
from syncagent.cli import main
from syncagent.config import Target, load_project
from syncagent.errors import WorkerStartError
from syncagent.ignore import build_rules
from syncagent.plan import content_view
from syncagent.push import PushOptions, push
from tests.helpers.faultproxy import FaultProxy
from tests.helpers.old_redis import install_old_redis
from tests.helpers.procs import (pid_running, provisioned_sandbox, sandbox_broker, supervisor_rpc,
                                 wait_until)
from tests.helpers.watching import Watching

RULES = build_rules().compiled()


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def fbx(hermetic_home, tmp_path_factory):
    """A provisioned sandbox 'fbx': sshd, its own redis-server, the demo app under supervisord."""
    with provisioned_sandbox("fbx", tmp_path_factory.mktemp("fbx")) as box:
        yield box


@pytest.fixture(scope="module")
def broker(fbx):
    with sandbox_broker(fbx) as client:
        yield client


@pytest.fixture
def proxy(fbx):
    """A fault proxy in front of fbx's sshd (bounded: it stops itself after 120 s)."""
    with FaultProxy(fbx.port, lifetime=120) as p:
        yield p


def via(box, proxy, tmp_path, remote_path: str) -> Target:
    """A target that reaches ``box`` through ``proxy`` (its own ssh_config and known_hosts)."""
    known = tmp_path / "known_hosts_proxy"
    line = Path(box.known_hosts).read_text().split()
    known.write_text(f"[127.0.0.1]:{proxy.port} {line[1]} {line[2]}\n")
    cfg = tmp_path / "ssh_config_proxy"
    text = Path(box.ssh_config).read_text()
    text = "\n".join(
        f"  Port {proxy.port}" if ln.strip().startswith("Port ") else
        f"  UserKnownHostsFile {known}" if ln.strip().startswith("UserKnownHostsFile") else ln
        for ln in text.splitlines()) + "\n"
    cfg.write_text(text)
    return Target(name="fx", host=box.name, ssh_config=str(cfg), remote_root=box.remote_root,
                  remote_path=remote_path)


def view(root) -> dict:
    return content_view(agent.scan(str(root), RULES))


def temp_files(root) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.name.startswith(agent.TEMP_PREFIX)]


def settled_equal(remote, local) -> bool:
    return view(remote) == view(local) and not temp_files(remote)


def plain_project(tmp_path, name="proj") -> Path:
    root = tmp_path / name
    (root / "pkg").mkdir(parents=True)
    for i in range(20):
        (root / "pkg" / f"m{i}.txt").write_text(f"module {i}\n" * 50)
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "link").symlink_to("pkg/m1.txt")
    return root


def set_version(root: Path, version: str) -> None:
    (root / "app" / "version.py").write_text(f'"""The demo\'s code version."""\n'
                                             f'VERSION = "{version}"\n')


def demo_remote(box) -> Path:
    return Path(box.remote_root) / "project"


def children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def rpc(box):
    return supervisor_rpc(str(demo_remote(box) / ".syncagent" / "supervisor.sock"))


def programs(box) -> dict[str, dict]:
    """{colour: supervisord's process info, plus "ready": its readiness marker names it}."""
    with rpc(box) as s:
        infos = s.supervisor.getAllProcessInfo()
    out = {}
    for info in infos:
        colour = info["name"].rsplit("-", 1)[-1]
        try:
            marker = json.loads((demo_remote(box) / ".syncagent" /
                                 f"ready-{colour}.json").read_text())
        except (OSError, ValueError):
            marker = {}
        info["ready"] = bool(info["pid"]) and marker.get("pid") == info["pid"]
        info["marker_time"] = marker.get("time", 0)
        out[colour] = info
    return out


def live_colour(box) -> str:
    ready = [(p["marker_time"], c) for c, p in programs(box).items()
             if p["ready"] and p["statename"] in ("STARTING", "RUNNING")]
    return max(ready)[1]


# ---------------------------------------------------------------- the fault proxy


def test_drop_mid_batch_leaves_the_remote_unchanged_then_recovers(capsys, fbx, proxy,
                                                                   tmp_path):
    root = plain_project(tmp_path)
    remote = Path(fbx.remote_root) / f"drop-{tmp_path.name}"
    target = via(fbx, proxy, tmp_path, str(remote))
    (root / "syncagent.toml").write_text(
        f'[targets.fx]\nhost = "{target.host}"\nssh_config = "{target.ssh_config}"\n'
        f'remote_path = "{remote}"\n')
    try:
        assert main(["push", "fx", "--path", str(root)]) == 0
        before = view(remote)
        # a batch of edits, creates, a delete and a 4 MiB file; the link drops after 1 MiB
        for i in range(0, 20, 2):
            (root / "pkg" / f"m{i}.txt").write_text(f"edited {i}\n")
        (root / "pkg" / "m1.txt").unlink()
        (root / "new").mkdir()
        (root / "new" / "big.bin").write_bytes(os.urandom(4 << 20))
        capsys.readouterr()
        proxy.drop_after(1 << 20)
        code = main(["push", "fx", "--path", str(root)])
        err = capsys.readouterr().err
        assert code == 1 and "connection" in err and "lost" in err, err
        assert proxy.dropped >= 1
        # the agent saw its stream end mid-batch: it discards what it staged, commits nothing
        wait_until(lambda: not temp_files(remote), 10, "the staged files to be discarded")
        assert view(remote) == before and not (remote / "new").exists()
        assert main(["push", "fx", "--path", str(root)]) == 0
        assert settled_equal(remote, root)
    finally:
        shutil.rmtree(remote, ignore_errors=True)


def test_stalled_link_is_detected_and_the_watch_recovers(fbx, proxy, tmp_path):
    root = plain_project(tmp_path)
    remote = Path(fbx.remote_root) / f"stall-{tmp_path.name}"
    target = via(fbx, proxy, tmp_path, str(remote))
    try:
        with Watching(load_project(root), target, PushOptions(restart=False),
                      ping_every=0.3, ping_timeout=0.7) as w:
            proxy.stall(4.0)  # bytes are held, not lost: on an idle link only a ping can tell
            wait_until(lambda: w.of("disconnected"), 10, "the stall to be noticed")
            for i in range(5):  # edits while the link is still stalled
                (root / f"during_stall_{i}.txt").write_text(f"edit {i}\n")
            (root / "pkg" / "m3.txt").unlink()
            wait_until(lambda: len(w.of("connected")) >= 2, 30, "the reconnect")
            wait_until(lambda: settled_equal(remote, root), 30, "the reconcile")
        assert "no answer" in w.of("disconnected")[0]["error"]
    finally:
        shutil.rmtree(remote, ignore_errors=True)


def test_cut_during_a_restart_ends_with_the_latest_code_live(fbx, broker, proxy, tmp_path):
    project = load_project(Path(fbx.project))
    root = Path(fbx.project)
    target = via(fbx, proxy, tmp_path, str(demo_remote(fbx)))
    with Watching(project, target, ping_every=0.3, ping_timeout=1.0) as w:
        wait_until(lambda: not w.of("restart") or w.of("ready"), 30, "a settled start")
        old = live_colour(fbx)
        restarts = len(w.of("restart"))
        set_version(root, "v-cut")
        wait_until(lambda: len(w.of("restart")) > restarts, 15, "the restart to begin")
        wait_until(lambda: any(p["statename"] in ("STARTING", "RUNNING")
                               for c, p in programs(fbx).items() if c != old), 15,
                   "a new colour to be starting")
        assert proxy.drop() >= 1  # the SSH connection dies while the new colour starts
        wait_until(lambda: len(w.of("connected")) >= 2, 30, "the reconnect")
        wait_until(lambda: w.of("ready") and w.of("ready")[-1]["revision"]
                   == w.of("synced")[-1]["revision"], 60, "the latest revision live")
        assert broker.send_task("app.tasks.demo.version").get(timeout=15) == "v-cut"
        assert settled_equal(demo_remote(fbx), root)
    def live_programs():  # a parked standby (warm starts) serves nothing: not counted
        state = demo_remote(fbx) / ".syncagent"
        with rpc(fbx) as s:
            return [p["statename"] for p in s.supervisor.getAllProcessInfo()
                    if p["statename"] in ("STARTING", "RUNNING", "STOPPING")
                    and not (state / f"park-{p['name'].rsplit('-', 1)[-1]}").exists()]

    # one colour serves (ready counts from its marker, possibly before supervisord's
    # startsecs call it RUNNING); the other was warm-stopped
    assert wait_until(lambda: live_programs() == ["RUNNING"], 15, "one RUNNING colour")


# ---------------------------------------------------------------- sshd, supervisord, Redis


def test_sshd_restarted_mid_watch(fbx, tmp_path):
    root = plain_project(tmp_path)
    remote = Path(fbx.remote_root) / f"sshd-{tmp_path.name}"
    target = Target(name="fbx", host="fbx", ssh_config=fbx.ssh_config,
                    remote_root=fbx.remote_root, remote_path=str(remote))
    try:
        with Watching(load_project(root), target, PushOptions(restart=False),
                      ping_every=0.3, ping_timeout=1.0) as w:
            old = fbx.sshd_pid
            children = children_of(old)
            os.kill(old, signal.SIGKILL)  # down: connections refused for a while
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda: any("refused" in e["error"] for e in w.of("disconnected")),
                       15, "a refused reconnect while sshd is down")
            for i in range(5):
                (root / f"while_down_{i}.txt").write_text(f"edit {i}\n")
            shutil.rmtree(root / "pkg")
            restart_sshd_after_kill(fbx, old)
            wait_until(lambda: len(w.of("connected")) >= 2, 30, "the reconnect")
            wait_until(lambda: settled_equal(remote, root), 30, "the reconcile")
    finally:
        shutil.rmtree(remote, ignore_errors=True)


def restart_sshd_after_kill(box, old: int) -> None:
    wait_until(lambda: not sandbox._alive(old, box.dir), 10, "the old sshd to die")
    d = Path(box.dir)
    (d / "sshd.pid").unlink(missing_ok=True)
    subprocess.run([sandbox.find_sshd(), "-f", str(d / "sshd_config"), "-E",
                    str(d / "sshd.log")], check=True, stdin=subprocess.DEVNULL)
    box.sshd_pid = wait_until(lambda: sandbox._read_pid(d / "sshd.pid"), 10, "sshd's pidfile")
    box._save()  # `sandbox down` stops the new one
    wait_until(lambda: sandbox._banner_ok(box.port), 10, "sshd to listen again")


def demo_target(box) -> Target:
    return Target(name="fbx", host="fbx", ssh_config=box.ssh_config,
                  remote_root=box.remote_root, remote_path=str(demo_remote(box)))


def test_supervisord_killed_is_a_clear_error_and_provision_brings_it_back(capsys, fbx, broker):
    root = Path(fbx.project)
    sock = demo_remote(fbx) / ".syncagent" / "supervisor.sock"
    pid = int((demo_remote(fbx) / ".syncagent" / "supervisord.pid").read_text())
    with supervisor_rpc(str(sock)) as s:
        workers = [p["pid"] for p in s.supervisor.getAllProcessInfo() if p["pid"]]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not sandbox._alive(pid, "supervisord"), 10, "supervisord to die")
    # Orphaned workers would keep consuming beside the ones a new supervisord starts: the
    # launcher asked Linux for a TERM when its parent dies, so they shut down warm by
    # themselves.
    wait_until(lambda: not any(pid_running(w) for w in workers), 30, "the orphaned workers to go")
    set_version(root, "v-after-supervisord")
    argv = ["--path", str(root), "--remote-path", str(demo_remote(fbx))]
    capsys.readouterr()
    code = main(["push", "fbx", *argv])
    err = capsys.readouterr().err
    assert code == 1, err
    line = err.strip().splitlines()[-1]
    assert "supervisord is not running" in line and "syncagent provision" in line, err
    assert view(demo_remote(fbx)) == view(root)  # the files landed; only the restart failed
    assert main(["provision", "fbx", *argv, "--venv", sys.prefix]) == 0
    assert broker.send_task("app.tasks.demo.version").get(timeout=20) == "v-after-supervisord"
    fbx_state = sandbox.status("fbx", fbx.dir)
    new = sandbox._recorded_supervisord(fbx_state)
    assert new != pid and new in sandbox.started_through(fbx.dir)  # `down` stops it


def restart_redis(box, port: int) -> None:
    rdir = Path(box.dir) / "redis"
    pidfile = rdir / "redis.pid"
    pidfile.unlink(missing_ok=True)
    subprocess.run(["/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--dir", str(rdir), "--daemonize",
                    "yes", "--pidfile", str(pidfile), "--logfile", str(rdir / "redis.log")],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    box.redis_pid = wait_until(lambda: sandbox._read_pid(pidfile), 10, "redis's pidfile")
    box._save()
    wait_until(lambda: sandbox._redis_ping(box.redis_url), 10, "redis to answer")


def test_redis_down_during_a_restart_keeps_the_old_colour(fbx, broker):
    root = Path(fbx.project)
    project, target = load_project(root), demo_target(fbx)
    set_version(root, "v-before-redis")
    assert push(project, target, PushOptions(restart_timeout=60)).restart["ok"]
    old = live_colour(fbx)
    old_pid = programs(fbx)[old]["pid"]
    port = int(fbx.redis_url.rsplit(":", 1)[1])
    sandbox.stop_pid(fbx.redis_pid, f":{port}")
    try:
        set_version(root, "v-no-redis")
        with pytest.raises(WorkerStartError) as e:
            push(project, target, PushOptions(restart_timeout=6))
        message = str(e.value)
        assert "did not start (not ready after 6s)" in message
        assert f"previous worker still serving: {old}" in message
        assert "Cannot connect to redis" in message and "Connection refused" in message
        assert live_colour(fbx) == old and programs(fbx)[old]["pid"] == old_pid
        # the failed colour is stopped: it must not come up later beside the old one
        wait_until(lambda: all(p["statename"] in agent.DOWN_STATES
                               for c, p in programs(fbx).items() if c != old), 30,
                   "every colour but the old one to be stopped")
    finally:
        restart_redis(fbx, port)
    # the old colour reconnects and serves the old code until the next push restarts it
    assert broker.send_task("app.tasks.demo.version").get(timeout=30) == "v-before-redis"
    assert push(project, target, PushOptions(restart_timeout=60)).restart is None
    out = main(["restart", "fbx", "--path", str(root), "--remote-path", str(demo_remote(fbx))])
    assert out == 0
    assert broker.send_task("app.tasks.demo.version").get(timeout=30) == "v-no-redis"


KOMBU_REFUSES = ("kombu.exceptions.VersionMismatch: Redis transport requires redis-py "
                 "versions 6.1.0 or later. You have 5.0.1")


def test_worker_that_exits_0_before_ready_is_reported_at_once(fbx, broker, tmp_path, capsys):
    """Issue 10's conflict brought in by a push: the app's new code puts redis 5.0.1 first on
    sys.path, kombu refuses it and Celery exits 0. The restart says so with the error line at
    once, the old colour serves, `status` exits 1; pushing the fix back restarts nothing."""
    old_redis = install_old_redis(tmp_path)
    root = Path(fbx.project)
    project, target = load_project(root), demo_target(fbx)
    argv = ["--path", str(root), "--remote-path", str(demo_remote(fbx))]
    set_version(root, "v-before-pin")
    assert push(project, target, PushOptions(restart_timeout=60)).restart["ok"]
    old = live_colour(fbx)
    old_pid = programs(fbx)[old]["pid"]
    app = root / "app" / "tasks" / "celery_app.py"
    good = app.read_text()
    app.write_text(f"import sys\nsys.path.insert(0, {str(old_redis)!r})\n" + good)
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkerStartError) as e:
            push(project, target, PushOptions(restart_timeout=60))
        took = time.monotonic() - t0
        print(f"push -> failed start reported in {took:.2f} s")
        message = str(e.value)
        assert f"the new code did not start: {KOMBU_REFUSES}" in message
        assert f"previous worker still serving: {old}" in message
        assert took < 30, took  # told when it exits, not after the 60 s timeout
        assert live_colour(fbx) == old and programs(fbx)[old]["pid"] == old_pid
        assert broker.send_task("app.tasks.demo.version").get(timeout=20) == "v-before-pin"
        wait_until(lambda: all(p["statename"] in agent.DOWN_STATES
                               for c, p in programs(fbx).items() if c != old), 30,
                   "the failed colour to stay down")
        capsys.readouterr()
        assert main(["status", "fbx", *argv]) == 1
        assert f"worker failing: {KOMBU_REFUSES}" in capsys.readouterr().out
    finally:
        app.write_text(good)
    # the fix returns the tree to the live revision: nothing to restart, nothing failing
    assert push(project, target, PushOptions(restart_timeout=60)).restart is None
    assert programs(fbx)[old]["pid"] == old_pid
    capsys.readouterr()
    assert main(["status", "fbx", *argv]) == 0
    assert "worker failing" not in capsys.readouterr().out


def test_worker_killed_9_mid_task_is_redelivered(fbx, broker):
    """task_acks_late + task_reject_on_worker_lost: the pool process that runs the task dies,
    the main process sees WorkerLostError and requeues the message at once."""
    r = redis.Redis.from_url(fbx.demo_broker_url)
    r.delete("demo:started", "demo:executions")
    main_pid = programs(fbx)[live_colour(fbx)]["pid"]
    res = broker.send_task("app.tasks.demo.work", args=(2.0,))
    wait_until(lambda: r.lrange("demo:started", 0, -1) == [res.id.encode()], 20,
               "the task to start")
    (child,) = children_of(main_pid)  # the prefork pool process running it
    os.kill(child, signal.SIGKILL)
    t_kill = time.monotonic()
    wait_until(lambda: r.llen("demo:started") == 2, 30, "the task to be redelivered")
    delay = time.monotonic() - t_kill
    assert res.get(timeout=30)["id"] == res.id
    assert [x.decode() for x in r.lrange("demo:executions", 0, -1)] == [res.id]
    print(f"redelivered {delay:.2f} s after kill -9 of the pool process")
    assert delay < 10
    r.close()
