"""The watched project root moved away (a renamed folder, `rm -rf` and a fresh clone).

Before, the watch synced what it then saw at the old path, nothing: every remote file was
deleted (a small project stays under the mass-delete threshold), and the watch ran on,
silent, ignoring every edit in the moved tree. Real sshd (the session's sandbox).
"""

from __future__ import annotations

import pytest

from syncagent.config import load_project, resolve_target
from syncagent.errors import OperationalError
from syncagent.push import PushOptions
from tests.helpers.procs import wait_until
from tests.helpers.watching import Watching
from tests.test_push import proj  # noqa: F401 (fixture)


@pytest.mark.parametrize("how", ["moved", "replaced"])
def test_watch_stops_when_its_root_goes_and_deletes_nothing(proj, tmp_path, how):
    root, remote = proj
    (root / "app").mkdir()
    for i in range(3):
        (root / "app" / f"m{i}.py").write_text(f"x = {i}\n")
    project = load_project(root)
    target = resolve_target("sbx", project, remote_path=str(remote))
    with pytest.raises(OperationalError, match="was moved, deleted or replaced"):
        with Watching(project, target, PushOptions(restart=False)) as w:
            wait_until(lambda: (remote / "app" / "m2.py").exists(), 10, "the first sync")
            moved = tmp_path / "moved"
            root.rename(moved)
            if how == "replaced":  # a fresh clone at the same path, with one file so far
                (root / "app").mkdir(parents=True)
                (root / "app" / "m0.py").write_text("x = 0\n")
            (moved / "app" / "m1.py").write_text("x = 10\n")
            wait_until(lambda: w.error is not None, 10, "the watch to stop")
    assert sorted(p.name for p in (remote / "app").iterdir()) == ["m0.py", "m1.py", "m2.py"]
    assert not any(e["event"] == "synced" and e["deleted"] for e in w.events), w.events
