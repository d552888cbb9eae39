"""The dev side's state (`.syncagent/` in the user's project) never shows in `git status`."""

from __future__ import annotations

import subprocess
from pathlib import Path

from syncagent.cli import main


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c",
                           "user.email=t@example.invalid", *args], check=True,
                          capture_output=True, text=True).stdout


def test_push_leaves_git_status_clean(tmp_path, box, capsys):
    root = tmp_path / "proj"
    (root / "app").mkdir(parents=True)
    (root / "app" / "tasks.py").write_text("x = 1\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "initial")
    (root / ".syncagent").mkdir()  # left by an older syncagent: gets its .gitignore too
    (root / ".syncagent" / "old-state").write_text("{}")

    remote = Path(box.remote_root) / f"t-{tmp_path.name}"
    code = main(["push", "sbx", "--path", str(root), "--remote-path", str(remote),
                 "--no-restart"])
    assert code == 0, capsys.readouterr().err
    assert (root / ".syncagent" / "digests.json").is_file()  # the cache was written
    assert git(root, "status", "--porcelain", "--untracked-files=all") == ""
    assert (remote / "app" / "tasks.py").read_text() == "x = 1\n"


def test_a_watch_writes_the_digest_cache_once_the_tree_is_quiet(tmp_path, box):
    """Not before each batch's "synced" (at 100,000 files a write took 0.3-0.5 s of every
    save's latency), and not only when the watch ends: once nothing has changed for a while
    (records hashed within the racy window of their file's change are left out, as always)."""
    import os
    import time

    from syncagent import agent
    from syncagent.config import load_project, resolve_target
    from syncagent.push import PushOptions
    from tests.helpers.procs import wait_until
    from tests.helpers.watching import Watching

    root = tmp_path / "proj"
    (root / "app").mkdir(parents=True)
    (root / "app" / "tasks.py").write_text("x = 1\n")
    changed = os.stat(root / "app" / "tasks.py").st_ctime_ns
    wait_until(lambda: time.time_ns() - changed > agent.RACY_NS, 10,
               "the file to be older than the racy window")
    remote = Path(box.remote_root) / f"w-{tmp_path.name}"
    project = load_project(root)
    target = resolve_target("sbx", project, remote_path=str(remote))
    with Watching(project, target, PushOptions(restart=False)):
        wait_until(lambda: "app/tasks.py" in (agent.read_state(str(root), "digests.json") or {}),
                   15, "the cache written, the watch still running")
