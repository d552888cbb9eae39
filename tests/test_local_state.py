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
