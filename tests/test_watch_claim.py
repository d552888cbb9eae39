"""One watch per remote path on this machine.

Before, a second `syncagent watch` of the same target (a forgotten one in another terminal)
ran beside the first: every save was synced twice and restarted the worker twice (green, then
red), and two watches of different local trees on one remote path would delete each other's
files. Real sshd (the session's sandbox).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from syncagent.config import load_project, resolve_target
from syncagent.errors import SafetyError
from syncagent.push import PushOptions
from syncagent.watch import watch
from tests.helpers.watching import Watching
from tests.test_push import one_line, proj  # noqa: F401 (fixture)

CLI = [sys.executable, "-c", "import sys; from syncagent.cli import main; sys.exit(main())"]


def test_a_second_watch_of_the_same_remote_path_is_refused(capsys, proj, tmp_path):
    root, remote = proj
    (root / "app.py").write_text("x = 1\n")
    other = tmp_path / "other-tree"  # a different local tree, the same remote path
    other.mkdir()
    project = load_project(root)
    target = resolve_target("sbx", project, remote_path=str(remote))
    with Watching(project, target, PushOptions(restart=False)):
        second = subprocess.run(CLI + ["watch", "sbx", "--path", str(other), "--remote-path",
                                       str(remote)], capture_output=True, text=True, timeout=30)
        assert second.returncode == 3, second
        err = second.stderr
        assert f"(pid {os.getpid()})" in one_line(err) and "already syncing to sbx" in err
        with pytest.raises(SafetyError):  # in-process too, before anything is sent
            watch(load_project(other), target, lambda e: None, threading.Event(),
                  PushOptions(restart=False))
        assert sorted(p.name for p in remote.iterdir() if p.name != ".syncagent") == ["app.py"]
    # the first one has ended: the path is free again
    with Watching(project, target, PushOptions(restart=False)) as w:
        assert w.of("synced")
