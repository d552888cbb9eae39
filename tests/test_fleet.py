"""Several workers on one broker: three sandboxes (each its own sshd and supervisord, one shared
Redis) pushed and watched as one group, with rolling restarts that keep capacity."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from syncagent import agent, holder, sandbox
from syncagent.cli import main
from syncagent.config import load_project, resolve_target
from syncagent.ignore import build_rules
from syncagent.plan import content_view
from syncagent.push import PushOptions, push_many
from syncagent.watch import WatchOptions, watch
from tests.helpers.hostkeys import replace_host_key
from tests.helpers.procs import children_of, wait_until
from tests.test_holder import CLIENT, holders_of
from tests.test_push import run

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


def test_a_path_one_target_blocks_is_left_alone_there_alone(fleet, project):
    """A directory the local tree turns into a file, where g2's remote copy holds a protected
    file: g1 and g3 take the file, g2 takes the rest of the batch and says what it left."""
    proj = load_project(project)
    targets = [resolve_target(n, proj) for n in NAMES]
    (project / "extras").mkdir()
    (project / "extras" / "a.txt").write_text("a\n")
    assert not push_many(proj, targets, PushOptions(restart=False)).errors
    (remote(fleet[1]) / "extras" / ".env").write_text("ONLY_ON_G2=1\n")
    try:
        shutil.rmtree(project / "extras")
        (project / "extras").write_text("now a file\n")
        set_version(project, "blocked-on-g2")
        result = push_many(proj, targets, PushOptions(restart=False))
        assert not result.errors
        assert same_tree(fleet[0], project) and same_tree(fleet[2], project)
        assert [w for w in result.results["g2"].warnings if w.startswith("not sent: extras")]
        assert not [w for n in ("g1", "g3") for w in result.results[n].warnings]
        assert "blocked-on-g2" in (remote(fleet[1]) / "app" / "version.py").read_text()
        assert (remote(fleet[1]) / "extras" / ".env").read_text() == "ONLY_ON_G2=1\n"
    finally:
        shutil.rmtree(remote(fleet[1]) / "extras", ignore_errors=True)
        (project / "extras").unlink(missing_ok=True)
    assert not push_many(proj, targets, PushOptions(restart=False)).errors
    assert all(same_tree(box, project) for box in fleet)


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


# ------------------------------------------------------------------ through a fleet holder

@pytest.fixture
def held(fleet, tmp_path, monkeypatch):
    """The demo app with the three targets as group 'gpus', each with a known_hosts of this
    test's own, holders enabled; every holder still running at the end is stopped."""
    monkeypatch.delenv("SYNCAGENT_HOLDER", raising=False)
    root = tmp_path / "app-src"
    shutil.copytree(fleet[0].project, root, ignore=shutil.ignore_patterns(".syncagent"))
    lines = ['restart_policy = "rolling"', "holder_idle = 60", "[groups]",
             'gpus = ["g1", "g2", "g3"]']
    for box in fleet:
        known = tmp_path / f"known_hosts_{box.name}"
        known.write_text(Path(box.known_hosts).read_text())
        config = tmp_path / f"ssh_config_{box.name}"
        config.write_text("\n".join(
            [ln for ln in Path(box.ssh_config).read_text().splitlines()
             if not ln.strip().startswith("UserKnownHostsFile")]
            + [f"  UserKnownHostsFile {known}"]) + "\n")
        lines += [f"[targets.{box.name}]", f'host = "{box.name}"', f'ssh_config = "{config}"',
                  f'remote_path = "{box.remote_root}/project"']
    (root / "syncagent.toml").write_text("\n".join(lines) + "\n")
    yield root
    for pid in holders_of(root):
        os.kill(pid, signal.SIGKILL)


def targets_of(root, names=NAMES):
    proj = load_project(root)
    return [resolve_target(n, proj) for n in names]


def held_ping(root, names=NAMES):
    return holder.ping(root, targets_of(root, names))


def warm(root) -> dict:
    """Wait until the fleet's holder is up, with a session on each target; its ping answer."""
    return wait_until(lambda: (held_ping(root) or {}).get("connected") and held_ping(root),
                      60, "the fleet's holder to connect to all three")


def push_json(capsys, root, *args) -> tuple[int, dict, str]:
    code, out, err = run(capsys, "push", *args, "--path", str(root), "--json")
    return code, json.loads(out) if out.strip() else {}, err


def sent(payload: dict) -> dict:
    return {t["target"]: t.get("files_sent") for t in payload["targets"]}


def test_a_repeated_fleet_push_goes_through_its_holder(capsys, fleet, held):
    root = held
    set_version(root, "held-1")
    assert push_json(capsys, root, "gpus", "--no-restart")[0] == 0  # direct: leaves it
    first = warm(root)
    assert first["served"] == 0
    set_version(root, "held-2")
    code, payload, err = push_json(capsys, root, "gpus", "--no-restart")
    assert code == 0, err
    assert held_ping(root) == {**first, "served": 1}  # the same holder answered
    assert sent(payload) == {n: 1 for n in NAMES}
    assert all(same_tree(box, root) for box in fleet)
    # the same set in another order, or as --all, is the same holder's
    for args in (["g3", "g1", "g2"], ["--all"]):
        set_version(root, f"held-{args[0]}")
        code, payload, err = push_json(capsys, root, *args, "--no-restart")
        assert code == 0 and sent(payload) == {n: 1 for n in NAMES}, err
    assert held_ping(root)["served"] == 3
    assert held_ping(root, ["g1"]) is None  # no single-target holder was involved
    # and it answers as a direct run does
    code, through, err = push_json(capsys, root, "gpus", "--no-restart")
    code2, direct, err2 = push_json(capsys, root, "gpus", "--no-restart", "--no-holder")
    assert held_ping(root)["served"] == 4
    for payload in (through, direct):
        for t in payload["targets"]:
            t.pop("durations")
    assert (code, through, err) == (code2, direct, err2)


def test_fleet_holder_killed_mid_push_falls_back_to_direct(capsys, fleet, held):
    root = held
    assert push_json(capsys, root, "gpus", "--no-restart")[0] == 0
    pid = warm(root)["pid"]
    for i in range(2):
        (root / f"big{i}.bin").write_bytes(os.urandom(48 << 20))
    env = {k: v for k, v in os.environ.items() if k != "SYNCAGENT_HOLDER"}
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, "push", "gpus", "--path", str(root), "--no-restart",
         "--json"], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=Path(__file__).parent.parent)
    try:
        wait_until(lambda: any(p.name.startswith(agent.TEMP_PREFIX)
                               for box in fleet for p in remote(box).iterdir()),
                   60, "the holder to be sending")
        os.kill(pid, signal.SIGKILL)
        out, err = client.communicate(timeout=300)
    finally:
        if client.poll() is None:
            client.kill()
    try:
        assert client.returncode == 0, err  # the client ran it directly
        assert all(t["changed"] for t in json.loads(out)["targets"])
        assert all(same_tree(box, root) for box in fleet)
        # the next fleet push works, and leaves a new holder
        set_version(root, "after-kill")
        assert push_json(capsys, root, "gpus", "--no-restart")[0] == 0
        assert warm(root)["pid"] != pid
    finally:
        for i in range(2):
            (root / f"big{i}.bin").unlink()
        assert push_json(capsys, root, "gpus", "--no-restart", "--no-holder")[0] == 0
    assert all(same_tree(box, root) for box in fleet)


def test_fleet_holder_after_one_remote_changed_behind_its_back(capsys, fleet, held):
    root = held
    assert push_json(capsys, root, "gpus", "--no-restart")[0] == 0
    warm(root)
    set_version(root, "behind-1")
    assert push_json(capsys, root, "gpus", "--no-restart")[0] == 0  # it holds manifests now
    assert held_ping(root)["served"] == 1
    g2 = remote(fleet[1])
    (g2 / "app" / "__init__.py").write_text("edited on the remote\n")
    os.utime(g2 / "app" / "__init__.py", ns=(10**18, 10**18))
    (g2 / "app" / "version.py").unlink()
    (g2 / "stray.py").write_text("only on g2\n")
    code, payload, err = push_json(capsys, root, "gpus", "--no-restart")
    assert code == 0, err
    assert held_ping(root)["served"] == 2
    assert sent(payload) == {"g1": 0, "g2": 2, "g3": 0}
    assert all(same_tree(box, root) for box in fleet)


def test_fleet_holder_refuses_a_changed_host_key_on_one_target(capsys, fleet, held, tmp_path):
    root = held
    assert push_json(capsys, root, "gpus", "--no-restart")[0] == 0
    warm(root)
    known = tmp_path / "known_hosts_g2"
    replace_host_key(known, tmp_path)
    set_version(root, "g2-must-not-get-this")
    code, payload, err = push_json(capsys, root, "gpus", "--no-restart")
    assert code == 3, err
    assert held_ping(root)["served"] == 1  # the holder answered, and refused g2 alone
    refused = [t for t in payload["targets"] if "error" in t]
    assert [t["target"] for t in refused] == ["g2"]
    assert "HOST KEY CHANGED" in refused[0]["error"] and refused[0]["exit_code"] == 3
    assert same_tree(fleet[0], root) and same_tree(fleet[2], root)
    assert not same_tree(fleet[1], root)
    code2, direct, _ = push_json(capsys, root, "gpus", "--no-restart", "--no-holder")
    assert code2 == code and direct["targets"][1] == refused[0]  # direct: the same refusal
    known.write_text(Path(fleet[1].known_hosts).read_text())


def agents_of(box) -> set[int]:
    """The agent processes running under ``box``'s sshd (one per open session)."""
    def ancestors(pid: int):
        while pid > 1:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return
            pid = int(stat.rsplit(")", 1)[1].split()[1])
            yield pid
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"agent-" in cmd and box.sshd_pid in ancestors(int(proc.name)):
                found.add(int(proc.name))
    return found


def test_a_target_that_fails_costs_the_others_nothing_in_the_fleet_holder(
        capsys, fleet, held, tmp_path):
    """One target refused (a changed host key): the holder keeps the other targets' sessions
    (their agents are the same processes after it); before, any failure dropped all three
    and the next push connected to every target again."""
    root = held
    assert push_json(capsys, root, "gpus", "--no-restart")[0] == 0
    warm(root)
    before = {box.name: agents_of(box) for box in fleet}
    assert all(before.values()), before
    known = tmp_path / "known_hosts_g2"
    replace_host_key(known, tmp_path)
    set_version(root, "g2-refused")
    assert push_json(capsys, root, "gpus", "--no-restart")[0] == 3
    known.write_text(Path(fleet[1].known_hosts).read_text())
    set_version(root, "all-three")
    code, payload, err = push_json(capsys, root, "gpus", "--no-restart")
    assert code == 0 and sent(payload) == {n: 1 for n in NAMES}, err
    assert held_ping(root)["served"] == 2
    assert agents_of(fleet[0]) == before["g1"] and agents_of(fleet[2]) == before["g3"]
    assert agents_of(fleet[1]) != before["g2"]  # g2's own was dropped, and opened again


def test_fleet_holder_keeps_the_rolling_order_of_the_command_line(capsys, fleet, held):
    """The holder for {g1, g2, g3} serves ``push g3 g1 g2`` in that order: drain-mode restarts
    one at a time (two of three live throughout), g3 first, then g1, then g2."""
    root = held
    assert push_json(capsys, root, "g3", "g1", "g2")[0] == 0
    wait_until(lambda: live_count(fleet) == 3, 60, "all three live")
    warm(root)
    set_version(root, "rolling-held")
    with live_samples(fleet) as samples:
        code, payload, err = push_json(capsys, root, "g3", "g1", "g2", "--mode", "drain")
    assert code == 0, err
    assert held_ping(root)["served"] == 1
    assert all(t["restart"]["ok"] for t in payload["targets"])
    assert min(samples) >= 2 and max(samples) == 3, sorted(set(samples))
    ended = {b.name: agent.json.loads((remote(b) / ".syncagent" / "last-restart.json")
                                      .read_text())["time"] for b in fleet}
    assert sorted(ended, key=ended.get) == ["g3", "g1", "g2"]
