"""`syncagent push` end to end against a real OpenSSH sshd (the sandbox), no mocks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from syncagent import agent
from syncagent.cli import main
from syncagent.ignore import build_rules
from syncagent.plan import content_view
from syncagent.sandbox import free_port
from syncagent.session import Session, agent_hash
from syncagent.config import Target

RULES = build_rules().compiled()


def run(capsys, *args):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def view(root):
    return content_view(agent.scan(str(root), RULES))


@pytest.fixture
def proj(tmp_path, box):
    """A local project and its (not yet existing) remote path inside the sandbox."""
    root = tmp_path / "proj"
    root.mkdir()
    remote = Path(box.remote_root) / f"t-{tmp_path.name}"
    yield root, remote
    shutil.rmtree(remote, ignore_errors=True)


def push(capsys, root, remote, *extra):
    return run(capsys, "push", "sbx", "--path", str(root), "--remote-path", str(remote), *extra)


def make_tree(root: Path):
    (root / "app" / "tasks").mkdir(parents=True)
    (root / "app" / "tasks" / "compile.py").write_text("def run():\n    return 1\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "secret.key").write_text("k")
    (root / "secret.key").chmod(0o600)
    (root / "données été").mkdir()
    (root / "données été" / "ünï cödé.txt").write_text("é")
    (root / "with space.txt").write_text("s")
    (root / "empty" / "nested").mkdir(parents=True)
    (root / "current").symlink_to("app/tasks/compile.py")
    (root / "tasks").symlink_to("app/tasks")
    (root / "big.bin").write_bytes(os.urandom(3 << 20))
    (root / ".env").write_text("DEV_ONLY=1\n")
    (root / "venv" / "bin").mkdir(parents=True)
    (root / "venv" / "bin" / "python").write_text("local venv")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")


def test_round_trip_of_every_kind_of_entry(capsys, proj):
    root, remote = proj
    make_tree(root)
    code, out, err = push(capsys, root, remote, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["changed"] and result["files_sent"] == 6
    assert view(remote) == view(root)
    assert os.readlink(remote / "current") == "app/tasks/compile.py"
    assert (remote / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (remote / "secret.key").stat().st_mode & 0o777 == 0o600
    assert (remote / "empty" / "nested").is_dir()
    assert not (remote / ".env").exists() and not (remote / "venv").exists()
    assert not (remote / "__pycache__").exists()
    marker = json.loads((remote / ".syncagent" / "revision").read_text())
    assert marker["revision"] == result["revision"]

    # No-op: nothing sent, same revision; a touch is not a change either.
    os.utime(root / "run.sh")
    code, out, _ = push(capsys, root, remote, "--json")
    again = json.loads(out)
    assert code == 0 and not again["changed"] and again["files_sent"] == 0
    assert again["revision"] == result["revision"]


def test_same_size_edit_with_restored_mtime_is_sent(capsys, proj):
    """rsync's quick check misses this; the content hash does not."""
    root, remote = proj
    f = root / "a.py"
    f.write_text("x = 1\n")
    os.utime(f, ns=(10**18, 10**18))
    assert push(capsys, root, remote)[0] == 0
    f.write_text("x = 2\n")
    os.utime(f, ns=(10**18, 10**18))
    code, out, _ = push(capsys, root, remote, "--json")
    assert code == 0 and json.loads(out)["files_sent"] == 1
    assert (remote / "a.py").read_text() == "x = 2\n"


def test_kind_changes_and_deletes(capsys, proj):
    root, remote = proj
    (root / "p").write_text("file")
    (root / "d").mkdir()
    (root / "d" / "x").write_text("x")
    (root / "l").symlink_to("p")
    assert push(capsys, root, remote)[0] == 0
    (root / "p").unlink()
    (root / "p").mkdir()
    (root / "p" / "inner").write_text("i")
    shutil.rmtree(root / "d")
    (root / "d").write_text("now a file")
    (root / "l").unlink()
    (root / "l").mkdir()
    code, _, err = push(capsys, root, remote)
    assert code == 0, err
    assert view(remote) == view(root)


def test_protected_remote_files_survive(capsys, proj):
    root, remote = proj
    (root / "app.py").write_text("a")
    (root / ".env").write_text("DEV=1")
    (root / "old").mkdir()
    (root / "old" / "x.py").write_text("x")
    assert push(capsys, root, remote)[0] == 0
    (remote / ".env").write_text("REMOTE=1")
    (remote / ".env.worker").write_text("WORKER_API_KEY=remote-only")
    (remote / "venv" / "bin").mkdir(parents=True)
    (remote / "venv" / "bin" / "python").write_text("remote venv")
    (remote / "instance" / "data").mkdir(parents=True)
    (remote / "old" / ".env.worker").write_text("nested")
    shutil.rmtree(root / "old")
    code, _, err = push(capsys, root, remote)
    assert code == 0
    assert (remote / ".env").read_text() == "REMOTE=1"
    assert (remote / ".env.worker").read_text() == "WORKER_API_KEY=remote-only"
    assert (remote / "venv" / "bin" / "python").read_text() == "remote venv"
    assert (remote / "instance" / "data").is_dir()
    assert (remote / "old" / ".env.worker").read_text() == "nested"
    assert not (remote / "old" / "x.py").exists()
    assert "kept remote directory old/" in err


@pytest.mark.parametrize("becomes", ["file", "link"])
def test_a_directory_that_holds_protected_files_blocks_only_what_replaces_it(
        capsys, proj, becomes):
    """The local tree turns a directory into a file (or a link) where the remote one holds a
    protected file, which is never deleted. Before, the commit stopped halfway ("Is a
    directory (errno 21)", exit 1): part of the batch in place, a temp file and no revision
    left, and every later push failed the same way. Now the rest of the batch lands, the
    blocked path is named, and it lands once the directory is moved away."""
    root, remote = proj
    (root / "old").mkdir()
    (root / "old" / "a.py").write_text("a")
    (root / "keep.py").write_text("k")
    assert push(capsys, root, remote)[0] == 0
    (remote / "old" / ".env").write_text("SECRET=1\n")
    shutil.rmtree(root / "old")
    if becomes == "file":
        (root / "old").write_text("now a file")
    else:
        (root / "old").symlink_to("keep.py")
    (root / "keep.py").write_text("k2")
    (root / "new.py").write_text("n")
    for _ in range(2):  # and the same again: nothing else to do, no failure
        code, out, err = push(capsys, root, remote, "--json")
        assert code == 0, err
        result = json.loads(out)
        assert any(w.startswith("not sent: old (a remote directory old/ stands there")
                   for w in result["warnings"]), result["warnings"]
        assert (remote / "old" / ".env").read_text() == "SECRET=1\n"
        assert not (remote / "old" / "a.py").exists()
        assert (remote / "keep.py").read_text() == "k2" and (remote / "new.py").exists()
        assert [p.name for p in remote.rglob(agent.TEMP_PREFIX + "*")] == []
        assert agent.read_revision(str(remote))["revision"] == result["revision"]
    (remote / "old" / ".env").rename(remote / "moved.env")
    assert push(capsys, root, remote)[0] == 0
    assert view(remote) == view(root)


def test_paths_the_remote_will_not_change_are_left_alone_and_the_rest_lands(capsys, proj):
    """Files made immutable on the remote (`chattr +i`: even root may not replace or delete
    them; a file of another user in a directory this user cannot write fails the same way).
    Before, the commit stopped at the first ("Operation not permitted (errno 1)", exit 1),
    with part of the batch in place and no revision, and so did every later push."""
    root, remote = proj
    for name in ("a.py", "b.py", "c.py"):
        (root / name).write_text(name)
    assert push(capsys, root, remote)[0] == 0
    stuck = [remote / "a.py", remote / "b.py"]
    subprocess.run(["chattr", "+i", *map(str, stuck)], check=True)
    try:
        (root / "a.py").write_text("edited")
        (root / "b.py").unlink()
        (root / "c.py").write_text("edited too")
        (root / "d.py").write_text("new")
        code, out, err = push(capsys, root, remote, "--json")
        assert code == 0, err
        result = json.loads(out)
        assert "not sent: a.py (on the remote: Operation not permitted)" in result["warnings"]
        assert "not deleted: b.py (on the remote: Operation not permitted)" in result["warnings"]
        assert [p.read_text() for p in stuck] == ["a.py", "b.py"]
        assert (remote / "c.py").read_text() == "edited too" and (remote / "d.py").exists()
        assert [p.name for p in remote.rglob(agent.TEMP_PREFIX + "*")] == []
        assert agent.read_revision(str(remote))["revision"] == result["revision"]
    finally:
        subprocess.run(["chattr", "-i", *map(str, stuck)], check=True)
    assert push(capsys, root, remote)[0] == 0
    assert view(remote) == view(root)


def test_gitignore_in_the_tree_is_honoured(capsys, proj):
    root, remote = proj
    (root / ".gitignore").write_text("*.mp4\n/build/\n")
    (root / "sub").mkdir()
    (root / "sub" / ".gitignore").write_text("local.cfg\n")
    for name in ("clip.mp4", "build/out.o", "sub/local.cfg", "sub/keep.cfg", "keep.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    assert push(capsys, root, remote)[0] == 0
    assert sorted(p for p, v in view(remote).items() if v[0] == "f") == [
        ".gitignore", "keep.py", "sub/.gitignore", "sub/keep.cfg"]


def test_dry_run_changes_nothing(capsys, proj):
    root, remote = proj
    (root / "a.py").write_text("a")
    code, out, _ = push(capsys, root, remote, "--dry-run")
    assert code == 0 and "create  a.py" in out and "dry run" in out
    assert not (remote / "a.py").exists()


def test_mass_delete_needs_the_flag(capsys, proj):
    root, remote = proj
    for i in range(40):
        (root / f"f{i}.py").write_text(str(i))
    assert push(capsys, root, remote)[0] == 0
    for i in range(30):
        (root / f"f{i}.py").unlink()
    code, _, err = push(capsys, root, remote)
    assert code == 3 and "refusing to delete 30 of 40 remote files" in err
    assert len(list(remote.glob("f*.py"))) == 40
    assert push(capsys, root, remote, "--allow-mass-delete")[0] == 0
    assert len(list(remote.glob("f*.py"))) == 10


def test_symlink_out_of_the_root_is_refused(capsys, proj):
    root, remote = proj
    (root / "a.py").write_text("a")
    (root / "passwd").symlink_to("/etc/passwd")
    code, _, err = push(capsys, root, remote)
    assert code == 3 and "passwd -> /etc/passwd" in err
    assert not remote.exists()


def test_unreadable_local_file_is_skipped_and_kept_remote(capsys, proj, monkeypatch):
    root, remote = proj
    (root / "a.py").write_text("a")
    (root / "b.py").write_text("b")
    assert push(capsys, root, remote)[0] == 0
    (root / "b.py").write_text("b2")
    real = agent.hash_file

    def flaky(path):
        if str(path).endswith("b.py"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(agent, "hash_file", flaky)
    code, _, err = push(capsys, root, remote)
    assert code == 0
    assert "warning:" in err and "b.py" in err and "Permission denied" in err
    assert (remote / "b.py").read_text() == "b"


def test_agent_is_shipped_once_content_addressed(box):
    target = Target("sbx", "sbx", ssh_config=box.ssh_config, remote_root=box.remote_root)
    cached = Path(box.remote_root) / ".cache" / "syncagent" / f"agent-{agent_hash()}.py"
    cached.unlink(missing_ok=True)
    with Session.open(target) as s:
        assert s.uploaded_agent and s.banner["protocol"] == agent.PROTOCOL
    assert cached.read_bytes() == Path(agent.__file__).read_bytes()
    with Session.open(target) as s:
        assert not s.uploaded_agent


# ---------------------------------------------------------------- bad input: one line, exit code


def ssh_config(tmp_path, box, **over):
    """A copy of the sandbox's ssh_config with some settings replaced."""
    text = Path(box.ssh_config).read_text()
    for key, value in over.items():
        lines = [ln for ln in text.splitlines() if not ln.strip().startswith(key)]
        text = "\n".join(lines + [f"  {key} {value}"]) + "\n"
    path = tmp_path / "ssh_config"
    path.write_text(text)
    return path


def configured(tmp_path, box, **target):
    (tmp_path / "proj").mkdir(exist_ok=True)
    lines = ["[targets.t]"] + [f'{k} = "{v}"' for k, v in target.items()]
    (tmp_path / "proj" / "syncagent.toml").write_text("\n".join(lines) + "\n")
    return tmp_path / "proj"


def one_line(err):
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1, err
    return lines[0]


def test_unreachable_host(capsys, tmp_path):
    code, _, err = run(capsys, "push", f"root@127.0.0.1:{free_port()}", "--path", str(tmp_path))
    assert code == 1 and "cannot reach" in one_line(err) and "refused" in err


def test_refused_auth(capsys, tmp_path, box):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    root = configured(tmp_path, box, host="sbx", ssh_config=ssh_config(tmp_path, box))
    code, _, err = run(capsys, "push", "t", "--path", str(root), "--identity", str(other))
    assert code == 1 and "authentication refused" in one_line(err)


def test_unknown_host_key_is_refused_until_trusted(capsys, tmp_path, box):
    known = tmp_path / "known_hosts"
    cfg = ssh_config(tmp_path, box, UserKnownHostsFile=known)
    root = configured(tmp_path, box, host="sbx", ssh_config=cfg,
                      remote_path=f"{box.remote_root}/trust-{tmp_path.name}")
    code, _, err = run(capsys, "push", "t", "--path", str(root))
    assert code == 3 and "unknown host key" in one_line(err) and "SHA256:" in err
    assert "syncagent trust t" in err and not known.exists()
    code, out, _ = run(capsys, "trust", "t", "--path", str(root))
    assert code == 0 and "SHA256:" in out
    assert f"[127.0.0.1]:{box.port} ssh-ed25519" in known.read_text()
    assert run(capsys, "push", "t", "--path", str(root))[0] == 0


def test_changed_host_key_is_refused_even_with_trust_flag(capsys, tmp_path, box):
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    pub = Path(f"{other}.pub").read_text().split()
    known.write_text(f"[127.0.0.1]:{box.port} {pub[0]} {pub[1]}\n")
    root = configured(tmp_path, box, host="sbx",
                      ssh_config=ssh_config(tmp_path, box, UserKnownHostsFile=known))
    for extra in ([], ["--trust-new-host"]):
        code, _, err = run(capsys, "push", "t", "--path", str(root), *extra)
        assert code == 3 and "HOST KEY CHANGED" in one_line(err)
    assert known.read_text().count("\n") == 1


def test_remote_root_not_creatable(capsys, proj, box):
    root, remote = proj
    (root / "a.py").write_text("a")
    blocker = Path(box.remote_root) / f"file-{root.parent.name}"
    blocker.write_text("I am a file")
    try:
        code, _, err = push(capsys, root, blocker / "sub")
        assert code == 1 and "cannot create remote root" in one_line(err)
    finally:
        blocker.unlink()


@pytest.fixture
def small_tmpfs(box):
    """A 1 MiB tmpfs inside the sandbox's remote home (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = Path(box.remote_root) / "tmpfs"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_remote_disk_full_aborts_the_batch(capsys, tmp_path, small_tmpfs):
    root = tmp_path / "proj"
    root.mkdir()
    (root / "a.py").write_text("first")
    remote = small_tmpfs / "proj"
    assert push(capsys, root, remote)[0] == 0
    (root / "a.py").write_text("second")
    (root / "huge.bin").write_bytes(os.urandom(2 << 20))
    code, _, err = push(capsys, root, remote)
    assert code == 1 and "remote disk full" in one_line(err)
    assert (remote / "a.py").read_text() == "first"
    assert not (remote / "huge.bin").exists()
    assert [p for p in remote.rglob("*") if p.name.startswith(agent.TEMP_PREFIX)] == []


def test_remote_root_not_writable(capsys, tmp_path, small_tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    root = tmp_path / "proj"
    root.mkdir()
    (root / "a.py").write_text("a")
    code, _, err = push(capsys, root, small_tmpfs / "proj")
    assert code == 1 and "Read-only file system" in one_line(err)


def test_no_python_on_the_remote(capsys, tmp_path, box):
    root = configured(tmp_path, box, host="sbx", ssh_config=box.ssh_config,
                      python="/nonexistent/python3")
    code, _, err = run(capsys, "push", "t", "--path", str(root))
    assert code == 1 and "no '/nonexistent/python3' on the remote" in one_line(err)


@pytest.mark.parametrize("args,needle", [
    (["push", "bad target!"], "bad TARGET"),
    (["push", "h:99999"], "port must be 1-65535"),
    (["push"], "no TARGET given"),
])
def test_usage_errors_exit_2(capsys, tmp_path, args, needle):
    code, _, err = run(capsys, *args, "--path", str(tmp_path))
    assert code == 2 and needle in one_line(err)


def test_malformed_config_exit_2(capsys, tmp_path):
    (tmp_path / "syncagent.toml").write_text("[targets.x]\nhost = \"h\"\nbogus = 1\n")
    code, _, err = run(capsys, "push", "x", "--path", str(tmp_path))
    assert code == 2 and "syncagent.toml:3: unknown key 'bogus'" in one_line(err)
