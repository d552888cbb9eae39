"""The warm path (syncagent.holder) against the real sshd sandbox: later commands go through
the holder left by the first, give what a direct run gives, and never depend on it."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from syncagent import agent, holder
from syncagent.config import Target, load_project, resolve_target
from syncagent.ignore import build_rules
from syncagent.manifest import find_gitignores, unchanged
from syncagent.plan import plan, revision
from syncagent.session import Session
from tests.helpers.hostkeys import replace_host_key
from tests.helpers.procs import pid_running, wait_until
from tests.test_push import run, view

CLIENT = "import sys; from syncagent.cli import main; sys.exit(main(sys.argv[1:]))"


def ssh_config(tmp_path, box, known: Path) -> Path:
    """The sandbox's ssh_config with a known_hosts of this test's own."""
    known.write_text(Path(box.known_hosts).read_text())
    lines = [ln for ln in Path(box.ssh_config).read_text().splitlines()
             if not ln.strip().startswith("UserKnownHostsFile")]
    path = tmp_path / "ssh_config"
    path.write_text("\n".join(lines + [f"  UserKnownHostsFile {known}"]) + "\n")
    return path


@pytest.fixture
def proj(tmp_path, box, monkeypatch):
    """A project with target ``t`` (the sandbox, its own known_hosts), holders enabled; every
    holder still running at the end is stopped."""
    monkeypatch.delenv("SYNCAGENT_HOLDER", raising=False)
    root = tmp_path / "proj"
    root.mkdir()
    remote = Path(box.remote_root) / f"h-{tmp_path.name}"
    cfg = ssh_config(tmp_path, box, tmp_path / "known_hosts")
    (root / "syncagent.toml").write_text(
        f'holder_idle = 60\n[targets.t]\nhost = "sbx"\nssh_config = "{cfg}"\n'
        f'remote_path = "{remote}"\n')
    for i in range(30):
        (root / f"m{i:02}.py").write_text(f"x = {i}\n")
    yield root, remote
    for pid in holders_of(root):
        os.kill(pid, signal.SIGKILL)


def holders_of(root) -> list[int]:
    """The holder processes started for this test's project (found by their command line)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"syncagent.holder" in cmd and str(root).encode() in cmd:
            pids.append(int(proc.name))
    return pids


def target_of(root):
    return resolve_target("t", load_project(root))


def warm(root) -> dict:
    """Wait until the target's holder is up and connected; its ping answer."""
    t = target_of(root)
    return wait_until(lambda: (holder.ping(root, t) or {}).get("connected") and
                      holder.ping(root, t), 30, "the holder to connect")


def served(root) -> int:
    return holder.ping(root, target_of(root))["served"]


def push(capsys, root, *extra):
    return run(capsys, "push", "t", "--path", str(root), "--no-restart", *extra)


def client(root, *args) -> subprocess.Popen:
    """`syncagent push` in its own process (the holder serves processes, not threads)."""
    env = {k: v for k, v in os.environ.items() if k != "SYNCAGENT_HOLDER"}
    return subprocess.Popen([sys.executable, "-c", CLIENT, "push", "t", "--path", str(root),
                             "--no-restart", "--json", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).parent.parent)


def without_durations(text: str) -> dict:
    out = json.loads(text)
    out.pop("durations")
    return out


def test_later_commands_go_through_the_holder_and_answer_as_a_direct_run(capsys, proj):
    root, remote = proj
    assert push(capsys, root)[0] == 0  # direct: leaves the holder
    first = warm(root)
    assert first["served"] == 0
    (root / "m00.py").write_text("x = 'changed'\n")
    code, out, err = push(capsys, root, "--json")
    assert code == 0, err
    assert served(root) == 1 and json.loads(out)["files_sent"] == 1
    assert view(remote) == view(root)
    # identical either way: a no-op push, status, logs, and an error (restart, no worker)
    for args in (["push", "t", "--no-restart", "--json"], ["status", "t", "--json"],
                 ["logs", "t"], ["restart", "t"]):
        before = served(root)
        held = run(capsys, *args, "--path", str(root))
        assert served(root) == before + 1
        direct = run(capsys, *args, "--path", str(root), "--no-holder")
        assert held[0] == direct[0] and held[2] == direct[2]
        if args[0] == "push":
            assert without_durations(held[1]) == without_durations(direct[1])
        else:
            assert held[1] == direct[1]
    assert held[0] == 1 and "no worker provisioned" in held[2]
    assert holder.ping(root, target_of(root))["pid"] == first["pid"]  # the same holder


def test_a_new_holder_warms_up_with_a_dry_run_that_changes_nothing(capsys, proj):
    """The holder walks both trees and keeps the remote manifest before its first command
    (so that command costs what later ones do), and its warm-up sends nothing, deletes
    nothing and leaves no record: the trees differ in every way until a push is asked for."""
    root, remote = proj
    assert push(capsys, root, "--no-holder")[0] == 0
    (remote / "m01.py").write_text("edited on the remote\n")
    (remote / "stray.py").write_text("only on the remote\n")
    for i in range(2, 27):  # more than the mass-delete guard lets a push delete unasked
        (root / f"m{i:02}.py").unlink()
    (root / "new.py").write_text("only here\n")
    before = view(remote)
    project = load_project(root)
    assert holder.spawn(project, [target_of(root)], warm_up=True) is None
    ping = wait_until(lambda: (holder.ping(root, target_of(root)) or {}).get("warm")
                      and holder.ping(root, target_of(root)), 30, "the holder's warm-up")
    assert ping["served"] == 0
    assert view(remote) == before
    log = holder.socket_path(root, target_of(root)).with_suffix(".log")
    assert "warm-up" in log.read_text()  # it met the guard, said so, and sent nothing
    assert push(capsys, root)[0] == 3  # the command meets the guard itself
    assert view(remote) == before and served(root) == 1
    code, out, err = push(capsys, root, "--json", "--allow-mass-delete")
    assert code == 0, err
    assert json.loads(out)["deleted"] == 26 and view(remote) == view(root)


def test_only_a_push_leaves_a_holder_that_warms_up(capsys, proj):
    """A holder left by `status` (or `logs`, `restart`) does not walk both trees: the next
    command may well be another `status`, which would wait for the walk."""
    root, remote = proj
    assert push(capsys, root)[0] == 0
    assert wait_until(lambda: (holder.ping(root, target_of(root)) or {}).get("warm"), 30,
                      "the push's holder to warm up")
    os.kill(holder.ping(root, target_of(root))["pid"], signal.SIGTERM)
    wait_until(lambda: holder.ping(root, target_of(root)) is None, 30, "the holder to exit")
    assert run(capsys, "status", "t", "--path", str(root))[0] == 0
    ping = warm(root)
    assert ping["served"] == 0 and not ping["warm"]
    assert push(capsys, root)[0] == 0 and served(root) == 1


def test_stale_holder_after_the_remote_changed_under_it(capsys, proj):
    root, remote = proj
    assert push(capsys, root)[0] == 0
    warm(root)
    assert push(capsys, root)[0] == 0 and served(root) == 1  # the holder has seen the remote
    (remote / "m01.py").write_text("edited on the remote\n")
    os.utime(remote / "m01.py", ns=(10**18, 10**18))
    (remote / "m02.py").unlink()
    (remote / "stray.py").write_text("only on the remote\n")
    (remote / "m03.py").chmod(0o700)
    code, out, err = push(capsys, root, "--json")
    assert code == 0, err
    assert served(root) == 2 and json.loads(out)["changed"]
    assert view(remote) == view(root)


def test_stale_holder_after_every_kind_of_remote_change(capsys, proj):
    """The holder's remote manifest is only the base of the agent's answer: what changed
    behind its back (kinds, modes, same-size edits with the mtime put back) is found by the
    agent's own walk and put right."""
    root, remote = proj
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "sub" / "deep.py").write_text("deep\n")
    (root / "lib.py").write_text("lib\n")
    (root / "ln").symlink_to("lib.py")
    assert push(capsys, root)[0] == 0
    warm(root)
    assert push(capsys, root)[0] == 0 and served(root) == 1  # the holder holds a manifest
    st = (remote / "m08.py").stat()
    (remote / "m08.py").write_text("x = 8 \n"[::-1])  # same size, same mtime
    os.utime(remote / "m08.py", ns=(st.st_atime_ns, st.st_mtime_ns))
    (remote / "lib.py").unlink()
    (remote / "lib.py").mkdir()  # a file replaced by a directory
    (remote / "lib.py" / "inside").write_text("?")
    shutil.rmtree(remote / "pkg")
    (remote / "pkg").write_text("a directory replaced by a file")
    (remote / "ln").unlink()
    (remote / "ln").symlink_to("m09.py")
    (remote / "m10.py").chmod(0o600)
    code, out, err = push(capsys, root, "--json")
    assert code == 0, err
    assert served(root) == 2 and json.loads(out)["changed"]
    assert view(remote) == view(root)
    assert json.loads(push(capsys, root, "--json")[1])["changed"] is False  # and it stays so


def test_held_manifest_since_a_token_equals_a_full_one_after_random_changes(box, tmp_path):
    """One held session (as a holder keeps it), its agent answering with what changed since
    the manifest it sent last; after each round of random changes behind its back, what the
    dev side makes of that equals a full manifest from a fresh agent (which does not know the
    token and sends everything)."""
    target = Target("sbx", "sbx", ssh_config=box.ssh_config, remote_root=box.remote_root)
    remote = Path(box.remote_root) / f"delta-{tmp_path.name}"
    rules = build_rules()
    rng = random.Random(12)
    names = [f"d{i}" for i in range(3)] + [f"d{i}/f{j}" for i in range(3) for j in range(4)] + [
        f"f{i}" for i in range(6)] + ["d0/x/deep", "d1/x"]

    def change() -> None:
        path = remote / rng.choice(names)
        what = rng.choice(["write", "same", "rm", "chmod", "mkdir", "link"])
        if what != "same" and (path.is_dir() and not path.is_symlink()):
            shutil.rmtree(path)
        elif what != "same" and (path.exists() or path.is_symlink()):
            path.unlink()
        if not path.parent.is_dir():
            return
        if what == "write":
            path.write_text(rng.choice("abc") * rng.randrange(1, 5))
        elif what == "same" and path.is_file() and not path.is_symlink():
            st = path.stat()
            path.write_bytes(bytes(b ^ 1 for b in path.read_bytes()))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        elif what == "chmod":
            path.write_text("m")
            path.chmod(rng.choice([0o600, 0o755]))
        elif what == "mkdir":
            path.mkdir()
        elif what == "link":
            path.symlink_to(rng.choice(["f0", "../f1", "d0"]))

    remote.mkdir()
    for _ in range(40):
        change()
    with Session.open_new(target) as held:
        tree = held.manifest(str(remote), rules.to_wire())
        for _round in range(8):
            for _ in range(rng.randrange(1, 8)):
                change()
            known = (tree.token, dict(tree.entries))
            tree, body = answered(held, lambda s: s.manifest(str(remote), rules.to_wire(),
                                                                known=known))
            assert "delta" in body and "entries" not in body
            with Session.open_new(target) as fresh:
                full, body = answered(fresh, lambda s: s.manifest(str(remote), rules.to_wire(),
                                                                    known=known))
            assert "entries" in body and "delta" not in body  # not its token: all of it
            assert tree.entries == full.entries
            assert agent.to_wire(tree.entries) == agent.to_wire(
                agent.scan(str(remote), rules.compiled()))
    shutil.rmtree(remote, ignore_errors=True)  # an agent may still be saving its cache


def test_after_a_batch_the_next_answer_carries_only_what_the_batch_did_not_do(box, tmp_path):
    """Sender and agent both take a batch's claims into their copies of the last manifest
    (``agent.batch_claims``): after a push the next answer is empty where the batch did what
    it says, and says what it did not do (here: a protected path the agent refused)."""
    target = Target("sbx", "sbx", ssh_config=box.ssh_config, remote_root=box.remote_root)
    local, remote = tmp_path / "local", Path(box.remote_root) / f"claims-{tmp_path.name}"
    (local / "pkg").mkdir(parents=True)
    for i in range(5):
        (local / "pkg" / f"m{i}.py").write_text(f"x = {i}\n")
    (local / "run.sh").write_text("#!/bin/sh\n")
    (local / "run.sh").chmod(0o755)
    (local / "ln").symlink_to("run.sh")
    (local / "keep.txt").write_text("refused on the remote")
    remote.mkdir()
    (remote / "stale.py").write_text("deleted by the batch")
    rules = build_rules(protect=["keep.txt"])
    mine = agent.scan(str(local), build_rules().compiled())  # the sender does not protect it
    ask = lambda s, known=None: s.manifest(str(remote), rules.to_wire(), rules.protect_wire(),
                                           known)
    with Session.open_new(target) as held:
        tree = ask(held)
        for step in range(2):  # a batch that creates, then one that changes
            p = plan(mine, tree.entries)
            batch = p.to_wire(revision(mine), len(mine))
            held.apply(str(remote), str(local), p, revision(mine), len(mine),
                       protect=rules.protect_wire())
            known = (tree.token, agent.batch_claims(tree.entries, batch))
            tree, body = answered(held, lambda s: ask(s, known))
            assert body["delta"] == {"changed": {}, "removed": ["keep.txt"]}, step
            with Session.open_new(target) as fresh:
                assert tree.entries == ask(fresh).entries
            if step == 0:
                (local / "pkg" / "m1.py").write_text("x = 'one'\n")
                (local / "pkg" / "m2.py").chmod(0o700)
                (local / "pkg" / "m3.py").unlink()
                (local / "ln").unlink()
                (local / "ln").mkdir()  # a link replaced by a directory
                mine = agent.scan(str(local), build_rules().compiled())
    assert not (remote / "keep.txt").exists() and not (remote / "stale.py").exists()
    shutil.rmtree(remote, ignore_errors=True)  # an agent may still be saving its cache


def answered(session, ask):
    """``ask(session)``, and the agent's last answer body as it came."""
    bodies = []
    request = session.request
    session.request = lambda obj: bodies.append(request(obj)) or bodies[-1]
    try:
        return ask(session), bodies[-1]
    finally:
        del session.request


def test_rules_are_searched_again_after_a_change_where_the_search_went(tmp_path):
    """A holder keeps the tree's rules while the directories and .gitignore files the last
    search saw are unchanged (and were not changed just before it: the racy rule)."""
    root = tmp_path / "p"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / ".gitignore").write_text("*.log\n")
    (root / "node_modules").mkdir()  # excluded by default: the search does not go there
    edits = [lambda: (root / "a" / "b" / ".gitignore").write_text("x\n"),
             lambda: (root / "a" / ".gitignore").write_text("*.tmp\n"),
             lambda: (root / "a" / ".gitignore").unlink(),
             lambda: (root / "new").mkdir(),
             lambda: shutil.rmtree(root / "a" / "b")]
    for edit in edits:
        stamps: dict = {}
        since = time.time_ns()
        find_gitignores(str(root), build_rules(), stamps)
        assert not unchanged(stamps, since)  # just changed: the stamps vouch for nothing
        later = since + 10 * agent.RACY_NS  # as if the search had come long after
        assert unchanged(stamps, later)
        (root / "node_modules" / ".gitignore").write_text("!*\n")
        assert unchanged(stamps, later)  # where the search does not go
        edit()
        assert not unchanged(stamps, later)


def test_a_gitignore_added_while_the_holder_runs_is_honoured(capsys, proj):
    root, remote = proj
    (root / "logs2").mkdir()
    (root / "logs2" / "a.txt").write_text("a")
    assert push(capsys, root)[0] == 0
    warm(root)
    assert push(capsys, root)[0] == 0 and served(root) == 1
    (root / "logs2" / "secret.txt").write_text("never sent")
    (root / "logs2" / ".gitignore").write_text("secret.txt\n")
    assert push(capsys, root)[0] == 0 and served(root) == 2
    assert not (remote / "logs2" / "secret.txt").exists()
    assert (remote / "logs2" / ".gitignore").exists()


ENTRY = ("import sys; from syncagent.entry import main; code = main(); "
         "sys.stderr.write('LOADED ' + ' '.join(sys.modules)); sys.exit(code)")


def entry_loads(root, *args) -> tuple[int, str, str, set[str]]:
    """The console entry point in its own process, in ``root``: (code, out, err, the modules
    it loaded)."""
    env = {k: v for k, v in os.environ.items() if k != "SYNCAGENT_HOLDER"}
    done = subprocess.run([sys.executable, "-c", ENTRY, *args], env=env, text=True,
                          capture_output=True, cwd=root, timeout=120)
    err, _, loaded = done.stderr.rpartition("LOADED ")
    return done.returncode, done.stdout, err, set(loaded.split())


def entry(root, *args) -> tuple[int, str, str, bool]:
    """The console entry point in its own process: (code, out, err, whether click loaded)."""
    code, out, err, loaded = entry_loads(root, *args)
    return code, out, err, "click" in loaded


def test_the_entry_point_hands_a_held_command_over_before_importing_the_cli(capsys, proj):
    root, remote = proj
    assert push(capsys, root)[0] == 0
    warm(root)
    (root / "m03.py").write_text("x = 'entry'\n")
    before = served(root)
    code, out, err, click_loaded = entry(root, "push", "t", "--all", "--json")
    assert (code, json.loads(out)["files_sent"], click_loaded) == (0, 1, False)
    assert served(root) == before + 1  # --all (here: t alone) is read without the CLI
    for args in (["push", "--json", "--no-restart"],
                 ["push", "t", "--remote-path", str(remote), "--json", "--mode", "drain"],
                 ["status", "t", "--json", "--path", str(root)]):
        code, out, err, click_loaded = entry(root, *args)
        assert code == 0 and not click_loaded, (args, err)
        assert json.loads(out)
    assert served(root) == before + 4
    assert view(remote) == view(root)
    code, out, err, click_loaded = entry(root, "push", "nosuch", "--json")
    assert code != 0 and click_loaded and "nosuch" in err  # the CLI's own error
    code, out, err, click_loaded = entry(root, "push", "t", "--remote-path", "", "--json")
    assert code == 2 and click_loaded and "must not be empty" in err


def test_a_route_reaches_the_holder_without_the_config_and_never_leads_astray(capsys, proj):
    """A command line run again in the same directory finds its holder by a route: no config
    read, no dataclasses. The holder checks the route the long way, so a route
    made stale (the target moved, holders turned off, the holder gone) costs one look and
    leads nowhere wrong."""
    root, remote = proj
    assert push(capsys, root)[0] == 0
    warm(root)
    args = ("push", "t", "--no-restart", "--json")
    routes = set(holder.runtime_dir().glob("route-*"))
    code, _, err, loaded = entry_loads(root, *args)  # the long way, which leaves the route
    assert code == 0 and "syncagent.config" in loaded, err
    assert len(set(holder.runtime_dir().glob("route-*")) - routes) == 1
    (root / "m04.py").write_text("x = 'routed'\n")
    before = served(root)
    code, out, err, loaded = entry_loads(root, *args)
    assert code == 0 and json.loads(out)["files_sent"] == 1, err
    # (pathlib is not in the list: the editable install's import finder loads it here)
    assert not loaded & {"click", "syncagent.config", "syncagent.holder", "tomllib",
                         "dataclasses"}, sorted(loaded)
    assert served(root) == before + 1 and view(remote) == view(root)
    # the target moves: its old holder declines the route; the command pushes to the new place
    old = target_of(root)
    moved = remote.parent / f"{remote.name}-moved"
    text = (root / "syncagent.toml").read_text()
    (root / "syncagent.toml").write_text(text.replace(str(remote), str(moved)))
    code, out, err, loaded = entry_loads(root, *args)
    assert code == 0 and json.loads(out)["remote_root"] == str(moved), err
    assert view(moved) == view(root)
    assert holder.ping(root, old)["served"] == before + 1  # declined: not run there
    warm(root)  # the new target's holder, left by that direct run
    assert entry_loads(root, *args)[0] == 0  # the long way again: a new route
    code, _, err, loaded = entry_loads(root, *args)
    assert code == 0 and "syncagent.config" not in loaded, err
    assert served(root) == 2
    # holders turned off in the config: the route's holder declines, the command runs here
    (root / "syncagent.toml").write_text("holder = false\n" + text.replace(str(remote),
                                                                            str(moved)))
    code, _, err, loaded = entry_loads(root, *args)
    assert code == 0 and "click" in loaded and served(root) == 2, err
    # the holder gone: the route leads nowhere, and is forgotten
    (root / "syncagent.toml").write_text(text.replace(str(remote), str(moved)))
    os.kill(holder.ping(root, target_of(root))["pid"], signal.SIGKILL)
    code, _, err, loaded = entry_loads(root, *args)
    assert code == 0 and "click" in loaded, err
    assert view(moved) == view(root)


def test_the_entry_point_knows_every_option_of_the_held_commands():
    """Each option of push, status, restart and logs is one the entry point reads, passes on
    (with a value or not, as the CLI takes it) or leaves to the full CLI."""
    from syncagent import entry
    from syncagent.cli import cli as commands

    known = {**{o: "value" for o in entry.TARGET_OPTIONS + entry.VALUE_OPTIONS},
             **{o: "flag" for o in entry.PLAIN_FLAGS + entry.TARGET_FLAGS}}
    for name in holder.COMMANDS:
        for param in commands.commands[name].params:
            for opt in param.opts if param.param_type_name == "option" else ():
                if opt not in entry.FULL_CLI:
                    assert known.get(opt) == ("flag" if param.is_flag else "value"), (name, opt)


def test_two_concurrent_pushes_through_one_holder(capsys, proj):
    root, remote = proj
    assert push(capsys, root)[0] == 0
    warm(root)
    (root / "big.bin").write_bytes(os.urandom(20 << 20))
    (root / "m04.py").write_text("x = 'both'\n")
    clients = [client(root), client(root)]
    answers = [c.communicate(timeout=120) for c in clients]
    assert [c.returncode for c in clients] == [0, 0], answers
    results = [json.loads(out) for out, _ in answers]
    assert served(root) == 2  # both through the holder, one after the other
    assert sorted(r["files_sent"] for r in results) == [0, 2]  # the second found it done
    assert view(remote) == view(root)


def test_holder_killed_mid_push(capsys, proj):
    root, remote = proj
    assert push(capsys, root)[0] == 0
    pid = warm(root)["pid"]
    for i in range(4):
        (root / f"big{i}.bin").write_bytes(os.urandom(64 << 20))
    c = client(root)
    wait_until(lambda: any(p.name.startswith(agent.TEMP_PREFIX) for p in remote.iterdir()),
               60, "the holder to be sending")
    os.kill(pid, signal.SIGKILL)
    out, err = c.communicate(timeout=120)
    assert c.returncode == 0, err  # the client ran it directly
    assert json.loads(out)["changed"]
    assert view(remote) == view(root)
    wait_until(lambda: not any(p.name.startswith(agent.TEMP_PREFIX) for p in remote.iterdir()),
               30, "the killed holder's staged files to go")
    # the next command works, and leaves a new holder
    (root / "m05.py").write_text("x = 'after'\n")
    assert push(capsys, root)[0] == 0
    assert warm(root)["pid"] != pid
    assert view(remote) == view(root)


def staging(remote) -> bool:
    return any(p.name.startswith(agent.TEMP_PREFIX) for p in remote.iterdir())


def sending_directly(capsys, root, remote) -> subprocess.Popen:
    """A direct push of 256 MB more, in its own process, once it is staging files."""
    assert push(capsys, root, "--no-holder")[0] == 0
    for i in range(4):
        (root / f"big{i}.bin").write_bytes(os.urandom(64 << 20))
    c = client(root, "--no-holder")
    wait_until(lambda: staging(remote), 60, "the push to be sending")
    return c


def test_a_command_beside_a_transfer_leaves_its_staged_files_alone(capsys, proj):
    """Two agents on one root (a `push` beside a `watch`, or beside another push): the walk of
    the second sweeps the temp files of agents that are gone, never those of the batch in
    flight, which then commits."""
    root, remote = proj
    c = sending_directly(capsys, root, remote)
    code, out, err = push(capsys, root, "--no-holder", "--dry-run")  # a second agent walks
    assert code == 0, err
    assert staging(remote), "the transfer ended before the second walk: nothing was tested"
    out, err = c.communicate(timeout=120)
    assert c.returncode == 0, err
    assert json.loads(out)["files_sent"] == 4
    assert view(remote) == view(root) and not staging(remote)


def test_ctrl_c_mid_transfer_says_nothing_was_committed(capsys, proj):
    """A direct push interrupted while sending: the connection is cut at once (the batch
    does not go on to commit behind an "aborted"), and the message says what stands."""
    root, remote = proj
    c = sending_directly(capsys, root, remote)
    c.send_signal(signal.SIGINT)
    _, err = c.communicate(timeout=60)
    assert c.returncode == 130, err
    assert "interrupted; t: batch cut off while sending" in err
    assert "Traceback" not in err
    wait_until(lambda: not staging(remote), 30, "the agent to drop the staged files")
    assert not any(remote.glob("big*.bin"))  # nothing of the batch committed
    assert push(capsys, root, "--no-holder")[0] == 0
    assert view(remote) == view(root)


def test_ctrl_c_on_a_held_push_leaves_the_holder_to_finish_it(capsys, proj):
    root, remote = proj
    assert push(capsys, root)[0] == 0
    warm(root)
    for i in range(4):
        (root / f"big{i}.bin").write_bytes(os.urandom(64 << 20))
    c = client(root)
    wait_until(lambda: staging(remote), 60, "the holder to be sending")
    c.send_signal(signal.SIGINT)
    _, err = c.communicate(timeout=60)
    assert c.returncode == 130, err
    assert "the holder runs the command to its end" in err and "Traceback" not in err
    wait_until(lambda: view(remote) == view(root), 120, "the holder to finish the push")


def test_a_syncagent_directory_where_the_user_stands_does_not_replace_the_holders_code(
        capsys, proj, tmp_path):
    """The holder is started with ``python -m``, which puts the current directory first on
    sys.path: run from a checkout of syncagent (or beside any ``syncagent/``), it imported that
    code, computed another socket name, and no push ever reached it."""
    root, remote = proj
    decoy = tmp_path / "elsewhere"
    (decoy / "syncagent").mkdir(parents=True)
    (decoy / "syncagent" / "__init__.py").write_text("raise SystemExit('decoy imported')\n")
    script = Path(sys.executable).with_name("syncagent")  # the console script, as a user runs it
    env = {k: v for k, v in os.environ.items() if k != "SYNCAGENT_HOLDER"}

    def user_push():
        return subprocess.run([str(script), "push", "t", "--path", str(root), "--no-restart"],
                              cwd=decoy, env=env, capture_output=True, text=True, timeout=120)

    assert user_push().returncode == 0
    before = warm(root)["served"]
    (root / "m00.py").write_text("x = 'changed'\n")
    done = user_push()
    assert done.returncode == 0, done.stderr
    assert served(root) == before + 1  # answered by the holder
    assert view(remote) == view(root)


def test_holder_for_a_target_whose_host_key_changed_is_refused(capsys, proj, tmp_path):
    root, remote = proj
    assert push(capsys, root)[0] == 0
    warm(root)
    replace_host_key(tmp_path / "known_hosts", tmp_path)
    (root / "m06.py").write_text("x = 'must not arrive'\n")
    code, _, err = push(capsys, root)
    assert code == 3 and "HOST KEY CHANGED" in err
    assert served(root) == 1  # the holder answered, and refused like any connection
    assert (remote / "m06.py").read_text() == "x = 6\n"
    code2, _, err2 = push(capsys, root, "--no-holder")  # direct: the same refusal
    assert (code2, err2) == (code, err)


def test_mass_delete_through_the_holder_is_refused_as_directly(capsys, proj):
    root, remote = proj
    assert push(capsys, root)[0] == 0
    warm(root)
    for i in range(25):
        (root / f"m{i:02}.py").unlink()
    held = push(capsys, root)
    assert served(root) == 1
    direct = push(capsys, root, "--no-holder")
    assert held == direct and held[0] == 3
    assert len(list(remote.glob("m*.py"))) == 30


def test_socket_and_directory_are_private(capsys, proj):
    root, remote = proj
    assert push(capsys, root)[0] == 0
    warm(root)
    sock = holder.socket_path(root, target_of(root))
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    # a directory another user owns, or one opened to others: not used at all
    (root / "m07.py").write_text("x = 'direct'\n")
    changes = [(lambda: os.chmod(sock.parent, 0o755), "open to group or others")]
    if os.geteuid() == 0:
        changes.append((lambda: os.chown(sock.parent, 65534, 65534), "owned by uid 65534"))
    for change, why in changes:
        change()
        try:
            assert holder.forward(root, target_of(root), ["push", "t"]) is None
            assert why in holder.spawn(load_project(root), target_of(root))
            code, _, err = push(capsys, root)
            assert code == 0, err
            assert "warning: no holder for the next commands" in err
        finally:
            os.chown(sock.parent, os.getuid(), os.getgid())
            os.chmod(sock.parent, 0o700)
        assert served(root) == 0  # never through the holder
    assert view(remote) == view(root)
    # a socket opened to others is refused as well
    os.chmod(sock, 0o666)
    try:
        assert holder.forward(root, target_of(root), ["status", "t"]) is None
    finally:
        os.chmod(sock, 0o600)


def test_idle_holder_exits(capsys, proj):
    """... and takes the routes to it along (a route is written by the command it answers)."""
    root, _ = proj
    text = (root / "syncagent.toml").read_text().replace("holder_idle = 60", "holder_idle = 2")
    (root / "syncagent.toml").write_text(text)
    assert push(capsys, root)[0] == 0
    info = warm(root)
    sock = holder.socket_path(root, target_of(root))
    assert push(capsys, root)[0] == 0 and served(root) == 1

    def routes_to_it() -> int:
        return sum(1 for r in holder.runtime_dir().glob("route-*") if r.read_text() == str(sock))

    assert routes_to_it() == 1
    wait_until(lambda: not pid_running(info["pid"]), 30, "the idle holder to exit")
    assert not sock.exists() and routes_to_it() == 0


def test_off_by_flag_setting_or_environment(capsys, proj, monkeypatch):
    root, _ = proj
    t = target_of(root)
    assert push(capsys, root, "--no-holder")[0] == 0
    text = (root / "syncagent.toml").read_text()
    (root / "syncagent.toml").write_text("holder = false\n" + text)
    assert push(capsys, root)[0] == 0
    (root / "syncagent.toml").write_text(text)
    monkeypatch.setenv("SYNCAGENT_HOLDER", "0")
    assert push(capsys, root)[0] == 0
    assert holder.ping(root, t, timeout=0.5) is None
    assert not holder.socket_path(root, t).with_suffix(".lock").exists()


@pytest.mark.parametrize("line", ['holder = "yes"', "holder_idle = 0", "holder_idle = true"],
                         ids=["holder-not-bool", "idle-zero", "idle-bool"])
def test_bad_holder_settings(capsys, tmp_path, line):
    (tmp_path / "syncagent.toml").write_text(line + "\n")
    code, _, err = run(capsys, "status", "--path", str(tmp_path))
    assert code == 2 and "holder" in err


def test_a_push_during_watch_is_a_flush_of_the_watch(capsys, proj):
    root, remote = proj
    env = {k: v for k, v in os.environ.items() if k != "SYNCAGENT_HOLDER"}
    w = subprocess.Popen([sys.executable, "-c", CLIENT, "watch", "t", "--path", str(root),
                          "--no-restart", "--json"], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=Path(__file__).parent.parent)
    try:
        assert json.loads(w.stdout.readline())["event"] == "connected"
        assert json.loads(w.stdout.readline())["event"] == "synced"
        assert holder.ping(root, target_of(root))["pid"] == w.pid  # the watch serves it
        for i in range(5):
            (root / f"m{i:02}.py").write_text(f"x = 'burst {i}'\n")
        (root / "m05.py").unlink()
        code, out, err = push(capsys, root, "--json")
        assert code == 0, err
        assert view(remote) == view(root)  # answered once the watch had sent it all
        assert json.loads(out)["revision"] == json.loads(
            push(capsys, root, "--json", "--no-holder")[1])["revision"]
        # what the watch cannot answer for (here --dry-run) runs on its own
        code, out, _ = push(capsys, root, "--dry-run")
        assert code == 0 and "dry run" in out
    finally:
        w.send_signal(signal.SIGINT)
        w.communicate(timeout=30)
    assert w.returncode == 0
    (root / "m06.py").write_text("x = 'after the watch'\n")
    assert push(capsys, root)[0] == 0  # the socket the watch served is no obstacle
    assert view(remote) == view(root)


def test_sandbox_down_stops_the_holders_it_leaves_without_a_remote(capsys, tmp_path,
                                                                   monkeypatch):
    """A holder whose every connection has gone (here: ``sandbox down``) exits, a fleet's
    once all of its targets' have; one that still holds a live connection stays."""
    monkeypatch.delenv("SYNCAGENT_HOLDER", raising=False)
    from syncagent import sandbox

    boxes = [sandbox.up(name, tmp_path / name) for name in ("hd1", "hd2")]
    root = tmp_path / "proj"
    root.mkdir()
    (root / "m.py").write_text("x = 1\n")
    lines = ["holder_idle = 600"]
    for b in boxes:
        lines += [f"[targets.{b.name}]", f'host = "{b.name}"', f'ssh_config = "{b.ssh_config}"',
                  f'remote_path = "{b.remote_root}/p"']
    (root / "syncagent.toml").write_text("\n".join(lines) + "\n")
    proj = load_project(root)
    one, both = [resolve_target("hd1", proj)], [resolve_target(n, proj) for n in ("hd1", "hd2")]
    try:
        for names in (["hd1"], ["hd1", "hd2"]):
            assert run(capsys, "push", *names, "--path", str(root), "--no-restart")[0] == 0
        pids = [wait_until(lambda ts=ts: (holder.ping(root, ts) or {}).get("connected")
                           and holder.ping(root, ts)["pid"], 30, "the holder to connect")
                for ts in (one, both)]
        sandbox.down("hd1", boxes[0].dir)
        wait_until(lambda: not pid_running(pids[0]), 30, "hd1's holder to exit")
        assert pid_running(pids[1])  # it still holds hd2
        assert holder.ping(root, both)["pid"] == pids[1]
        sandbox.down("hd2", boxes[1].dir)
        wait_until(lambda: not pid_running(pids[1]), 30, "the fleet's holder to exit")
        assert not holder.socket_path(root, both).exists()
    finally:
        for pid in holders_of(root):
            os.kill(pid, signal.SIGKILL)
        for b in boxes:
            sandbox.down(b.name, b.dir)
