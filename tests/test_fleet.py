"""Several workers on one broker: three sandboxes (each its own sshd and supervisord, one shared
Redis) pushed and watched as one group, with rolling restarts that keep capacity."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from syncagent import agent, sandbox
from syncagent.cli import main
from syncagent.config import load_project, resolve_target
from syncagent.ignore import build_rules
from syncagent.plan import content_view
from syncagent.push import PushOptions, push_many
from syncagent.watch import WatchOptions, watch
from tests.helpers.procs import children_of, wait_until

NAMES = ("g1", "g2", "g3")
RULES = build_rules().compiled()


@pytest.fixture(scope="module")
def fleet(hermetic_home, tmp_path_factory):
    """Three provisioned sandboxes; the first one's Redis is everyone's broker."""
    boxes = []
    try:
        for name in NAMES:
            redis_url = boxes[0].redis_url if boxes else None
            boxes.append(sandbox.up(name, tmp_path_factory.mktemp(name), provision=True,
                                    redis_url=redis_url, timeout=60))
        yield boxes
    finally:
        for box in reversed(boxes):  # the first owns the Redis: it goes last
            sandbox.down(box.name, box.dir)


@pytest.fixture
def project(fleet, tmp_path):
    """A local copy of the demo app, configured with the three targets as group 'gpus'."""
    root = tmp_path / "app-src"
    shutil.copytree(fleet[0].project, root, ignore=shutil.ignore_patterns(".syncagent"))
    lines = ['restart_policy = "rolling"', "[groups]", 'gpus = ["g1", "g2", "g3"]']
    for box in fleet:
        lines += [f"[targets.{box.name}]", f'host = "{box.name}"',
                  f'ssh_config = "{box.ssh_config}"',
                  f'remote_path = "{box.remote_root}/project"']
    (root / "syncagent.toml").write_text("\n".join(lines) + "\n")
    return root


def remote(box) -> Path:
    return Path(box.remote_root) / "project"


def same_tree(box, root) -> bool:
    return content_view(agent.scan(str(remote(box)), RULES)) == content_view(
        agent.scan(str(root), RULES))


def set_version(root: Path, version: str) -> None:
    (root / "app" / "version.py").write_text(f'VERSION = "{version}"\n')


def live_count(fleet) -> int:
    return sum(1 for box in fleet
               if (agent.worker_state(str(remote(box))) or {}).get("live") is not None)


@contextmanager
def live_samples(fleet):
    """How many of the fleet's workers are live, sampled every 10 ms while the block runs."""
    samples, stop = [], threading.Event()

    def sampler():
        while not stop.is_set():
            samples.append(live_count(fleet))
            stop.wait(0.01)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def test_push_reaches_the_whole_group_once_scanned(fleet, project, capsys):
    set_version(project, "fleet-1")
    code = main(["push", "gpus", "--path", str(project)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "3/3 targets on revision" in out
    for box in fleet:
        assert same_tree(box, project)
    client = sandbox.demo_client(fleet[0])
    try:
        nodes = [n for reply in client.control.ping(timeout=2) for n in reply]
    finally:
        client.close()
    revision = agent.read_revision(str(remote(fleet[0])))["revision"]
    for name in NAMES:  # (the old colours may still be finishing their tasks)
        assert any(n.startswith(f"{name}-") and f"-{revision[:7]}@" in n for n in nodes), nodes
    code = main(["status", "gpus", "--path", str(project)])
    table = capsys.readouterr().out
    assert code == 0 and table.count("live") >= 3 and "mixed revisions" not in table


def test_rolling_restart_keeps_two_of_three_serving(fleet, project):
    """drain mode stops a worker before its successor starts: only the rolling order keeps
    capacity, so sample how many workers are live throughout."""
    proj = load_project(project)
    targets = [resolve_target(n, proj) for n in NAMES]
    set_version(project, "rolling-1")
    with live_samples(fleet) as samples:
        fleet_result = push_many(proj, targets, PushOptions(mode="drain"), policy="rolling")
    assert not fleet_result.errors, fleet_result.errors
    assert all(fleet_result.results[n].restart["ok"] for n in NAMES)
    assert min(samples) >= 2 and max(samples) == 3, sorted(set(samples))
    ended = [agent.json.loads((remote(b) / ".syncagent" / "last-restart.json").read_text())
             ["time"] for b in fleet]
    assert ended == sorted(ended)  # g1, then g2, then g3


def test_a_target_that_goes_down_is_reconciled_on_return(fleet, project):
    proj = load_project(project)
    targets = [resolve_target(n, proj) for n in NAMES]
    events, stop = [], threading.Event()
    thread = threading.Thread(target=watch, daemon=True, args=(
        proj, targets, events.append, stop, PushOptions(restart=False),
        WatchOptions(ping_every=0.5, ping_timeout=1.0)))
    thread.start()
    try:
        wait_until(lambda: len([e for e in events if e["event"] == "synced"]) >= 3, 30,
                   "the initial reconcile of all three")
        down = fleet[2]
        sessions = children_of(down.sshd_pid)
        sandbox.stop_pid(down.sshd_pid, down.dir)  # its sshd and its connections go away
        for pid in sessions:
            os.kill(pid, signal.SIGKILL)
        (project / "notes.txt").write_text("written while g3 is down\n")
        for box in fleet[:2]:  # the others are not held up
            wait_until(lambda b=box: (remote(b) / "notes.txt").exists(), 15,
                       f"notes.txt on {box.name}")
        wait_until(lambda: any(e["event"] == "disconnected" and e["target"] == "g3"
                               for e in events), 15, "g3 marked down")
        (project / "notes.txt").write_text("edited again while g3 is down\n")
        back = sandbox.up(down.name, down.dir)  # sshd again (a new port, same ssh_config)
        fleet[2] = back
        wait_until(lambda: all(same_tree(b, project) for b in fleet), 60,
                   "every target equal to the local tree")
    finally:
        stop.set()
        thread.join(timeout=20)
        (project / "notes.txt").unlink(missing_ok=True)


def test_a_mass_delete_halts_only_its_own_target(fleet, project):
    """g2's remote holds 80 files the local tree does not: a push refuses g2 alone (exit 3),
    a watch halts g2 alone while g1 and g3 keep syncing, and confirming g2 lifts its halt."""
    proj = load_project(project)
    targets = [resolve_target(n, proj) for n in NAMES]
    assert not push_many(proj, targets, PushOptions(restart=False)).errors
    junk = remote(fleet[1]) / "junk"
    junk.mkdir()
    for i in range(80):
        (junk / f"j{i}.txt").write_text(f"only on g2 {i}\n")
    set_version(project, "halt-1")
    result = push_many(proj, targets, PushOptions(restart=False))
    assert set(result.errors) == {"g2"} and result.exit_code == 3
    assert result.errors["g2"].deletes >= 80  # (plus what earlier tests left unconfirmed)
    assert same_tree(fleet[0], project) and same_tree(fleet[2], project)
    assert len(list(junk.iterdir())) == 80
    events, stop = [], threading.Event()
    thread = threading.Thread(target=watch, daemon=True, args=(
        proj, targets, events.append, stop, PushOptions(restart=False), WatchOptions()))
    thread.start()
    try:
        wait_until(lambda: [e for e in events if e["event"] == "halted"], 30, "g2 halted")
        (project / "notes.txt").write_text("written while g2 is halted\n")
        for box in (fleet[0], fleet[2]):
            wait_until(lambda b=box: same_tree(b, project), 15, f"notes.txt on {box.name}")
        assert not (remote(fleet[1]) / "notes.txt").exists()
        assert [e["target"] for e in events if e["event"] == "halted"] == ["g2"]
        confirmed = push_many(proj, [targets[1]], PushOptions(restart=False,
                                                             allow_mass_delete=True))
        assert not confirmed.errors
        wait_until(lambda: any(e["event"] == "resumed" and e["target"] == "g2"
                               for e in events), 15, "g2 resumed")
        (project / "notes.txt").write_text("and after\n")
        wait_until(lambda: all(same_tree(b, project) for b in fleet), 30,
                   "every target equal to the local tree")
    finally:
        stop.set()
        thread.join(timeout=20)
        (project / "notes.txt").unlink(missing_ok=True)
        shutil.rmtree(junk, ignore_errors=True)


def test_restart_command_follows_the_fleet_policy(fleet, project, capsys):
    """`syncagent restart` orders a fleet as push and watch do (syncagent/restart.py): with
    restart_policy = "parallel", drain-mode restarts overlap, so at some moment no target is
    live (before, the command restarted the targets one after another whatever the policy)."""
    config = project / "syncagent.toml"
    config.write_text(config.read_text().replace('"rolling"', '"parallel"'))
    with live_samples(fleet) as samples:
        code = main(["restart", "gpus", "--path", str(project), "--mode", "drain"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("live on g") == 3, out
    assert min(samples) < 2, sorted(set(samples))
    wait_until(lambda: live_count(fleet) == 3, 30, "all three live again")
