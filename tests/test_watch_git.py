"""A watch through git's own changes (the plain sandbox: sshd only, no worker).

The user trial: a 31-file project, a branch that adds 30 files, and the switch back halted the
watch ("refused to delete 35 of 31 remote files") until `push --allow-mass-delete`. Git keeps
every file it removes while it holds .git/index.lock, so such a batch is a confirmed change;
the same deletions made without git are still refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from syncagent import agent
from syncagent.cli import _render_event
from syncagent.config import load_project, resolve_target
from syncagent.ignore import build_rules
from syncagent.plan import content_view
from syncagent.push import PushOptions
from syncagent.watch import TargetLoop, WatchOptions
from syncagent.watcher import Batch
from tests.helpers.procs import wait_until
from tests.helpers.watching import Watching

RULES = build_rules().compiled()


def git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})


@pytest.fixture
def project(box, tmp_path):
    """A repository of 31 files on master, and its remote path in the sandbox."""
    root = tmp_path / "proj"
    (root / "app").mkdir(parents=True)
    for i in range(30):
        (root / "app" / f"m{i}.py").write_text(f"V = {i}\n")
    (root / "README.txt").write_text("the project\n")
    git(root, "init", "-q", "-b", "master")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "master")
    remote = Path(box.remote_root) / f"git-{tmp_path.name}"
    yield root, remote
    shutil.rmtree(remote, ignore_errors=True)


def watching(root: Path, remote: Path) -> Watching:
    p = load_project(root)
    return Watching(p, resolve_target("sbx", p, remote_path=str(remote)),
                    PushOptions(restart=False))


def equal(remote: Path, root: Path) -> bool:
    return content_view(agent.scan(str(remote), RULES)) == content_view(
        agent.scan(str(root), RULES))


def add_feature_branch(root: Path, files: int = 30) -> None:
    git(root, "checkout", "-q", "-b", "feature")
    (root / "feat").mkdir()
    for i in range(files):
        (root / "feat" / f"f{i}.py").write_text(f"F = {i}\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "feature")


def test_switching_back_from_a_branch_is_not_a_mass_delete(project):
    root, remote = project
    with watching(root, remote) as w:
        add_feature_branch(root)
        wait_until(lambda: equal(remote, root), 15, "the branch's files on the remote")
        git(root, "checkout", "-q", "master")  # 30 of the remote's 61 files go
        switch = wait_until(lambda: [e for e in w.of("synced") if e["deleted"]]
                            or w.of("halted"), 15, "the switch back synced")[-1]
        assert equal(remote, root) and not w.of("halted") and not w.of("error"), w.events
        assert switch["deleted"] == 31 and switch["confirmed"] == "git"  # and feat/
        line = _render_event(switch)
        assert "31 deleted by git" in line and "confirmed: git keeps what it deletes" in line
        # and again: each switch is git's, both ways
        git(root, "checkout", "-q", "feature")
        wait_until(lambda: equal(remote, root), 15, "feature again")
        git(root, "checkout", "-q", "master")
        wait_until(lambda: equal(remote, root), 15, "master again")
        assert not w.of("halted")
        # an edit after it is the user's: no "confirmed"
        (root / "README.txt").write_text("edited\n")
        edit = wait_until(lambda: [e for e in w.of("synced") if "README.txt" in e["paths"]],
                          15, "the edit synced")[-1]
        assert "confirmed" not in edit


def test_the_same_deletes_without_git_still_halt_and_say_what_they_count(project):
    """rm -rf of the branch's files (and 5 more): 35 lost since the confirmation, when the
    remote held 31. A git checkout while halted lifts nothing by itself."""
    root, remote = project
    with watching(root, remote) as w:
        add_feature_branch(root)
        wait_until(lambda: equal(remote, root), 15, "the branch's files on the remote")
        for i in range(5):
            (root / "app" / f"m{i}.py").unlink()
        wait_until(lambda: not (remote / "app" / "m4.py").exists(), 15, "5 deletes (allowed)")
        backup = root.parent / "feat-backup"
        shutil.copytree(root / "feat", backup)
        shutil.rmtree(root / "feat")
        halted = wait_until(lambda: w.of("halted"), 15, "the halt")[0]
        assert (halted["lost"], halted["files"]) == (35, 31)
        assert ("refusing to delete 35 files on sbx since the last confirmation, when the "
                "remote held 31") in halted["message"]
        assert (remote / "feat" / "f0.py").exists()  # nothing deleted
        git(root, "checkout", "-q", "master")  # git's, but the feat files went by rm -rf
        git(root, "checkout", "-q", "--", ".")  # git's too: the 5 files are back
        wait_until(lambda: (root / "app" / "m4.py").exists(), 5, "the 5 files restored")
        shutil.copytree(backup, root / "feat")  # by hand: now the files are back
        wait_until(lambda: w.of("resumed"), 15, "the resume")
        wait_until(lambda: equal(remote, root), 15, "the tree after the resume")
        # had a git batch lifted the halt, the reconcile after it would have halted again
        assert len(w.of("halted")) == 1 and len(w.of("resumed")) == 1
        assert w.of("resumed")[0]["reason"] == "files restored"


def test_a_busy_target_never_merges_git_batch_with_others():
    """Batches queue up while the target is busy syncing; the merge keeps git's apart (an
    edit queued just before a branch switch made the switch look like `rm -rf`)."""
    loop = TargetLoop(SimpleNamespace(target=SimpleNamespace(name="sbx")), lambda e: None,
                      threading.Event(), WatchOptions(), None)
    now = time.monotonic()
    for paths, by_git in [({"a.py"}, False), ({"b.py"}, False), ({"feat/f0.py"}, True),
                          ({"feat/f1.py"}, True), ({"c.py"}, False)]:
        loop.submit(Batch(frozenset(paths), False, now, by_git), {}, [])
    taken = []
    while (item := loop._next()) is not None:
        taken.append((sorted(item[0].paths), item[0].by_git))
    assert taken == [(["a.py", "b.py"], False), (["feat/f0.py", "feat/f1.py"], True),
                     (["c.py"], False)]
