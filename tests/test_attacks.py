"""Attacks on the safety promises, against a real OpenSSH sshd (the sandbox): each one tries
to make the remote lose a secret, follow a link out of the root, keep a setuid bit, change a
file through a hard link, run a tampered agent or write through a symlinked state dir."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncagent import agent
from syncagent.config import Target
from syncagent.errors import AgentCacheError, PathEscapeError
from syncagent.plan import Chmod, Delete, Link, Mkdir, Plan, Upload, escaping_links
from syncagent.session import Session, agent_hash
from tests.test_push import proj, push  # noqa: F401 (proj is a fixture)


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def target(box) -> Target:
    return Target("sbx", "sbx", ssh_config=box.ssh_config, remote_root=box.remote_root)


def craft(box, remote: Path, local: Path, p: Plan) -> dict:
    """Send a batch straight to the agent, as a modified dev side would: no planning, no
    rules, no checks on this side."""
    with Session.open(target(box)) as s:
        return s.apply(str(remote), str(local), p, "crafted", 1)


# ---------------------------------------------------------------- 1. protection on the remote


def test_gitignore_negation_cannot_unprotect_remote_env_files(capsys, proj):
    root, remote = proj
    (root / "app.py").write_text("a")
    assert push(capsys, root, remote)[0] == 0
    (remote / ".env.worker").write_text("WORKER_API_KEY=remote-only")
    (remote / ".env.local").write_text("REMOTE=1")
    (root / ".gitignore").write_text("!.env.*\n!.env\n")
    (root / ".env.local").write_text("DEV=1")
    (root / ".env").write_text("DEV=1")
    code, out, err = push(capsys, root, remote, "--json")
    assert code == 0, err
    assert (remote / ".env.worker").read_text() == "WORKER_API_KEY=remote-only"
    assert (remote / ".env.local").read_text() == "REMOTE=1"
    assert not (remote / ".env").exists()
    warnings = json.loads(out)["warnings"]
    assert "kept .env.local (protected on the remote)" in warnings
    assert "kept .env.worker (protected on the remote)" in warnings
    code, _, err = push(capsys, root, remote)
    assert code == 0 and "kept .env.worker (protected on the remote)" in err
    assert (remote / ".env.worker").read_text() == "WORKER_API_KEY=remote-only"


def test_exclude_negation_and_flags_cannot_unprotect_venv_or_instance(capsys, proj):
    root, remote = proj
    (root / "syncagent.toml").write_text('exclude = ["!venv/", "!instance/", "!.venv/"]\n')
    (root / "venv" / "bin").mkdir(parents=True)
    (root / "venv" / "bin" / "python").write_text("local venv")
    (root / "app.py").write_text("a")
    (remote / "venv" / "bin").mkdir(parents=True)
    (remote / "venv" / "bin" / "python").write_text("remote venv")
    (remote / "instance").mkdir()
    (remote / "instance" / "db.sqlite").write_text("data")
    code, _, err = push(capsys, root, remote, "--allow-mass-delete")
    assert code == 0, err
    assert (remote / "venv" / "bin" / "python").read_text() == "remote venv"
    assert (remote / "instance" / "db.sqlite").read_text() == "data"
    assert "kept venv (protected on the remote)" in err


def test_config_protect_patterns_add_protection(capsys, proj):
    root, remote = proj
    (root / "syncagent.toml").write_text('protect = ["secrets/"]\nexclude = ["!secrets/"]\n')
    (root / "secrets").mkdir()
    (root / "secrets" / "k.pem").write_text("dev key")
    (root / "app.py").write_text("a")
    (remote / "secrets").mkdir(parents=True)
    (remote / "secrets" / "k.pem").write_text("remote key")
    (remote / "secrets" / "other.pem").write_text("remote only")
    code, _, err = push(capsys, root, remote)
    assert code == 0, err
    assert (remote / "secrets" / "k.pem").read_text() == "remote key"
    assert (remote / "secrets" / "other.pem").read_text() == "remote only"


def test_protect_pattern_cannot_negate(capsys, proj):
    root, remote = proj
    (root / "syncagent.toml").write_text('protect = ["!.env.worker"]\n')
    code, _, err = push(capsys, root, remote)
    assert code == 2 and "cannot un-protect" in one_line(err)
    assert not remote.exists()


def test_crafted_request_cannot_write_delete_or_chmod_protected_paths(proj, box):
    root, remote = proj
    (remote / "venv" / "bin").mkdir(parents=True)
    (remote / "venv" / "bin" / "python").write_text("remote venv")
    (remote / ".env").write_text("REMOTE=1")
    (remote / ".env.worker").write_text("WORKER_API_KEY=remote-only")
    os.chmod(remote / ".env.worker", 0o600)
    (remote / "sub").mkdir()
    (remote / "sub" / ".env.local").write_text("nested")
    for name in (".env.worker", "ok.py", "venv/bin/python"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("evil" if name != "ok.py" else "fine")
    up = lambda path: Upload(path, 0o644, 0, 4, "x")
    p = Plan(uploads=(up(".env.worker"), up("ok.py"), up("venv/bin/python")),
             links=(Link("instance", "ok.py"),),
             dirs=(Mkdir(".venv", 0o755),),
             chmods=(Chmod(".env.worker", 0o666, 0o600),),
             deletes=(Delete(".env", "f"), Delete("sub/.env.local", "f"), Delete("venv", "d")))
    out = craft(box, remote, root, p)
    refused = {(r["op"], r["path"]) for r in out["refused"]}
    assert refused == {("write", ".env.worker"), ("write", "venv/bin/python"),
                       ("link", "instance"), ("mkdir", ".venv"), ("chmod", ".env.worker"),
                       ("delete", ".env"), ("delete", "sub/.env.local"), ("delete", "venv")}
    assert (remote / "ok.py").read_text() == "fine"  # the rest of the batch applies
    assert (remote / ".env.worker").read_text() == "WORKER_API_KEY=remote-only"
    assert stat.S_IMODE((remote / ".env.worker").stat().st_mode) == 0o600
    assert (remote / ".env").read_text() == "REMOTE=1"
    assert (remote / "sub" / ".env.local").read_text() == "nested"
    assert (remote / "venv" / "bin" / "python").read_text() == "remote venv"
    assert not (remote / "instance").exists() and not (remote / ".venv").exists()


# ---------------------------------------------------------------- 3. links resolve inside


def chain(root: Path) -> None:
    """Each link harmless on its own text; together they climb out of the root."""
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "up").symlink_to("../../..")
    (root / "x").symlink_to("a/b/c/up/../..")
    (root / "app.py").write_text("a")


def test_link_chain_out_of_the_root_is_refused_and_lands_nothing(capsys, proj, tmp_path):
    root, remote = proj
    chain(root)
    code, _, err = push(capsys, root, remote, "--dry-run")
    assert code == 3 and "x -> a/b/c/up/../.." in one_line(err)
    code, _, err = push(capsys, root, remote)
    assert code == 3 and "x -> a/b/c/up/../.." in one_line(err)
    assert not remote.exists()


def test_crafted_link_chain_is_refused_by_the_agent_whole(proj, box):
    root, remote = proj
    (root / "app.py").write_text("a")
    first = Plan(dirs=(Mkdir("a", 0o755), Mkdir("a/b", 0o755), Mkdir("a/b/c", 0o755)),
                 links=(Link("a/b/c/up", "../../.."),))
    craft(box, remote, root, first)
    assert os.readlink(remote / "a" / "b" / "c" / "up") == "../../.."
    second = Plan(uploads=(Upload("app.py", 0o644, 0, 1, "x"),),
                  links=(Link("x", "a/b/c/up/../.."), Link("y", "a/b/c/up/../../etc")))
    with pytest.raises(PathEscapeError) as e:
        craft(box, remote, root, second)
    assert "x -> a/b/c/up/../.." in str(e.value)
    assert not (remote / "x").is_symlink() and not (remote / "y").is_symlink()
    assert not (remote / "app.py").exists()  # refused whole
    # the other order: a harmless-looking link first, then the one that makes it climb out
    third = Plan(links=(Link("z", "q/../.."),), dirs=(Mkdir("q", 0o755),))
    with pytest.raises(PathEscapeError):
        craft(box, remote, root, third)  # q/../.. is the root's parent already
    craft(box, remote, root, Plan(links=(Link("w", "p/.."),)))  # p missing: w is the root
    with pytest.raises(PathEscapeError) as e:
        craft(box, remote, root, Plan(links=(Link("p", "a/b/c/up"),)))  # w would climb out
    assert not (remote / "p").is_symlink()


NAMES = ["a", "b", "c"]
link_target = st.lists(st.sampled_from(NAMES + ["..", "."]), min_size=1, max_size=5).map(
    "/".join)
tree_st = st.dictionaries(
    st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join),
    st.one_of(st.just(None), link_target), max_size=8)


def build(root: Path, tree: dict) -> dict:
    """Directories (None) and links; returns the links that could be made."""
    links = {}
    for path, tgt in sorted(tree.items(), key=lambda kv: kv[0].count("/")):
        p = root / path
        if agent.under_any(path.rsplit("/", 1)[0], links) and "/" in path:
            continue  # made through a link it would land elsewhere: trees hold real paths
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            if tgt is None:
                p.mkdir()
            else:
                p.symlink_to(tgt)
                links[path] = tgt
        except OSError:  # a parent is a link or exists already
            continue
    return links


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=tree_st, probe=st.lists(st.sampled_from(NAMES + [".."]), min_size=1,
                                     max_size=4).map("/".join))
def test_resolver_agrees_with_realpath_on_real_trees(tmp_path, tree, probe):
    base = Path(os.path.realpath(tmp_path)) / "outer"
    shutil.rmtree(base, ignore_errors=True)
    root = base / "R00T"  # a name the trees never use: climbing out never comes back in
    root.mkdir(parents=True)
    links = build(root, tree)
    for path in list(links) + [probe]:
        got = agent.resolve(path, links)
        if got == agent.LOOP:
            continue
        real = os.path.realpath(root / path)
        inside = real == str(root) or real.startswith(str(root) + os.sep)
        if got is None:
            assert not inside, (path, links, real)
        else:
            assert real == os.path.join(str(root), got) if got else real == str(root), (
                path, links, real, got)


@pytest.mark.parametrize("links, bad", [
    ({"a/b/c/up": "../../..", "x": "a/b/c/up/../.."}, ["x -> a/b/c/up/../.."]),
    ({"a/b/c/up": "../../.."}, []),
    ({"l1": "l2/..", "l2": "d/l3", "d/l3": "../.."}, ["d/l3 -> ../..", "l1 -> l2/..",
                                                        "l2 -> d/l3"]),
    ({"self": "self"}, []),  # a loop reaches nothing
    ({"abs": "/etc"}, ["abs -> /etc"]),
    ({"d/up": "..", "e": "d/up/d/up/d"}, []),
    ({"d/up": "..", "e": "d/up/d/up/.."}, ["e -> d/up/d/up/.."]),
], ids=["chain", "deep-up-alone", "through-links", "loop", "absolute", "up-twice",
        "up-twice-and-out"])
def test_escaping_links_follow_the_trees_other_links(links, bad):
    manifest = {p: agent.Entry("l", link=t) for p, t in links.items()}
    assert escaping_links(manifest) == bad


# ---------------------------------------------------------------- 4. modes


def test_setuid_setgid_and_sticky_bits_never_travel(capsys, proj, box):
    root, remote = proj
    (root / "tool").write_text("#!/bin/sh\n")
    os.chmod(root / "tool", 0o6755)
    (root / "shared").mkdir()
    os.chmod(root / "shared", 0o1777)
    code, _, err = push(capsys, root, remote)
    assert code == 0, err
    assert stat.S_IMODE((remote / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((remote / "shared").stat().st_mode) == 0o777
    # crafted: the agent masks whatever it is sent
    (root / "t2").write_text("x")
    craft(box, remote, root, Plan(uploads=(Upload("t2", 0o4755, 0, 1, "x"),),
                                  chmods=(Chmod("tool", 0o6777, 0o755),),
                                  dirs=(Mkdir("d2", 0o3777),)))
    assert stat.S_IMODE((remote / "t2").stat().st_mode) == 0o755
    assert stat.S_IMODE((remote / "tool").stat().st_mode) == 0o777
    assert stat.S_IMODE((remote / "d2").stat().st_mode) == 0o777


def test_a_hard_link_to_an_outside_file_is_not_chmoded(capsys, proj, tmp_path):
    root, remote = proj
    (root / "run.sh").write_text("echo hi\n")
    os.chmod(root / "run.sh", 0o644)
    assert push(capsys, root, remote)[0] == 0
    victim = tmp_path / "victim.sh"  # outside the remote root
    victim.write_text("echo hi\n")
    os.chmod(victim, 0o644)
    (remote / "run.sh").unlink()
    os.link(victim, remote / "run.sh")
    os.chmod(root / "run.sh", 0o755)
    code, out, err = push(capsys, root, remote, "--json")
    assert code == 0, err
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert victim.read_text() == "echo hi\n"
    assert stat.S_IMODE((remote / "run.sh").stat().st_mode) == 0o755
    assert (remote / "run.sh").stat().st_nlink == 1


def test_chmod_never_goes_through_a_link(proj, box, tmp_path):
    root, remote = proj
    outside = tmp_path / "outside.txt"
    outside.write_text("o")
    os.chmod(outside, 0o600)
    remote.mkdir()
    (remote / "l").symlink_to(outside)
    craft(box, remote, root, Plan(chmods=(Chmod("l", 0o777, 0o600),)))
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600


# ---------------------------------------------------------------- 5. the agent runs as shipped


@pytest.fixture
def agent_cache(box):
    d = Path(box.remote_root) / ".cache" / "syncagent"
    d.mkdir(parents=True, exist_ok=True)
    yield d
    os.chown(d, os.getuid(), os.getgid())
    os.chmod(d, 0o700)
    (d / f"agent-{agent_hash()}.py").write_bytes(Path(agent.__file__).read_bytes())


def test_a_tampered_cached_agent_is_replaced_before_it_runs(box, agent_cache, tmp_path):
    cached = agent_cache / f"agent-{agent_hash()}.py"
    pwned = tmp_path / "pwned"
    cached.write_text(f"open({str(pwned)!r}, 'w').write('ran')\n" + cached.read_text()
                      if cached.exists() else f"open({str(pwned)!r}, 'w').write('ran')\n")
    with Session.open(target(box)) as s:
        assert s.uploaded_agent and s.banner["protocol"] == agent.PROTOCOL
    assert not pwned.exists()
    assert cached.read_bytes() == Path(agent.__file__).read_bytes()


@pytest.mark.parametrize("how", ["mode-0777", "group-writable", "other-owner", "symlink"])
def test_an_unsafe_agent_cache_dir_is_refused(capsys, box, agent_cache, tmp_path, how, proj):
    root, remote = proj
    (root / "a.py").write_text("a")
    cached = agent_cache / f"agent-{agent_hash()}.py"
    cached.write_bytes(Path(agent.__file__).read_bytes())
    moved = None
    if how == "mode-0777":
        os.chmod(agent_cache, 0o777)
    elif how == "group-writable":
        os.chmod(agent_cache, 0o770)
    elif how == "other-owner":
        if os.getuid() != 0:
            pytest.skip("needs root to give the directory away")
        os.chown(agent_cache, 65534, 65534)
    else:
        moved = tmp_path / "elsewhere"
        agent_cache.rename(moved)
        agent_cache.symlink_to(moved)
    try:
        with pytest.raises(AgentCacheError):
            Session.open(target(box))
        code, _, err = push(capsys, root, remote)
        assert code == 3 and "refusing to run the agent" in one_line(err)
        assert not remote.exists()
    finally:
        if moved is not None:
            agent_cache.unlink()
            moved.rename(agent_cache)


# ---------------------------------------------------------------- 6. the state directory


def test_a_symlinked_state_dir_is_refused_and_nothing_lands_outside(capsys, proj, tmp_path):
    root, remote = proj
    (root / "a.py").write_text("a")
    outside = tmp_path / "outside-state"
    outside.mkdir()
    remote.mkdir()
    (remote / ".syncagent").symlink_to(outside)
    code, _, err = push(capsys, root, remote)
    assert code == 3 and ".syncagent" in one_line(err) and "symlink" in err
    assert list(outside.iterdir()) == []
    assert not (remote / "a.py").exists()


def test_state_writes_never_follow_a_swapped_in_link(tmp_path):
    """Between requests (no _root check): the writers themselves refuse to follow."""
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / ".syncagent").symlink_to(outside)
    with pytest.raises(OSError):
        agent.write_state(str(root), "digests.json", "{}")
    agent.save_digest_cache(str(root), {"a": [1, 2, 3, 4, "d", 10**19]})
    assert agent.read_state(str(root), "revision") is None
    assert list(outside.iterdir()) == []
    with pytest.raises(agent.AgentFailure):
        agent.apply_batch(str(root), {"uploads": [], "revision": "r"}, lambda up: iter(()))
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("path, protected", [
    (".env", True), (".env.worker", True), ("sub/.env.local", True), (".env.example", False),
    (".env.worker.example", False), ("venv", True), ("venv/bin/python", True),
    ("a/.venv/x", True), ("instance/db", True), ("instances/db", False), ("app/env.py", False),
    (".envrc", False), (".env/x", True),
], ids=str)
def test_the_built_in_protected_set(path, protected):
    assert agent.is_protected(path) is protected
    rules = agent.compile_rules([["^.*$", False]])  # a rule that includes everything
    assert agent.is_excluded(rules, path, False) is protected


def test_links_made_by_another_agent_are_seen(tmp_path):
    """The agent keeps the remote's links in memory between batches; a batch applied by
    another agent process (a `push` beside a `watch`) must not leave it blind."""
    root = tmp_path / "root"
    nothing = lambda up: iter(())
    agent.apply_batch(str(root), {"dirs": [{"path": d, "mode": 0o755} for d in
                                            ("a", "a/b", "a/b/c")],
                                  "links": [{"path": "a/b/c/up", "target": "../../.."}],
                                  "revision": "r1"}, nothing)
    (root / "q").symlink_to("a/b/c/up")  # what the other agent's batch did ...
    (root / ".syncagent" / "revision").unlink()
    (root / ".syncagent" / "revision").write_text('{"revision": "r2"}')  # ... and its marker
    agent.apply_batch(str(root), {"uploads": [{"path": "f", "mode": 0o644, "mtime_ns": 0}],
                                  "revision": "r2b"}, lambda up: iter([b"x"]))  # no links
    with pytest.raises(agent.AgentFailure) as e:
        agent.apply_batch(str(root), {"links": [{"path": "w", "target": "q/.."}],
                                      "revision": "r3"}, nothing)
    assert e.value.kind == "PathEscape" and "w -> q/.." in e.value.message
    assert not (root / "w").is_symlink()


def test_the_protected_names_and_their_gitignore_form_agree():
    """agent.PROTECTED (gitignore syntax, the excludes build on it) and the agent's own
    matcher say the same of every name."""
    from syncagent.ignore import build_rules

    rules = build_rules(defaults=agent.PROTECTED)
    for name in (".env", ".env.worker", ".env.example", ".env.worker.example", ".envrc",
                 "venv", ".venv", "instance", "instances", "env", "x.example"):
        as_dir = name in ("venv", ".venv", "instance", "instances")
        plain = agent.compile_rules(rules.to_wire())  # the gitignore form alone
        assert agent._excluded_by_rules(plain, name, as_dir) is agent.protected_name(name), name
