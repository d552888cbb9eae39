"""A remote path that is not a project's own directory is refused before anything is sent.

A push makes the remote root equal to the local tree. With `--remote-path ~` (or
REMOTE_PATH=~, `/home/winter`, `/`), it deleted everything else in the remote home when that
held 20 files or fewer (below the mass-delete threshold): `.bashrc`, `.ssh/authorized_keys`.
A relative remote path means "below the remote home", as it does for ssh; it used to resolve
against the ssh session's working directory, which on the sandbox is the real user's home.
"""

from __future__ import annotations

import getpass
import os
import pwd
import shutil
import uuid
from pathlib import Path

import pytest

from syncagent.config import load_project, remote_path_problem, resolve_target
from syncagent.errors import SafetyError
from tests.test_push import one_line, proj, push, run  # noqa: F401 (fixture)


@pytest.mark.parametrize("path", ["~", "~/", "~/.", "./", ".", "~/app/..", "~/../other",
                                  "~winter", "/", "//", "/home", "/home/winter", "/root",
                                  "/etc", "/usr/", "/var/tmp", "/Users/winter", "",
                                  "/srv/box/remote"])
def test_not_a_project_directory(path):
    assert remote_path_problem(path, home="/srv/box/remote")


@pytest.mark.parametrize("path", ["~/ClippyFront", "ClippyFront", "work/cf", "~winter/cf",
                                  "/home/winter/ClippyFront", "/app", "/srv/clippy",
                                  "/tmp/cf", "~/a/../ClippyFront", "/srv/box/remote/cf"])
def test_a_project_directory(path):
    assert remote_path_problem(path, home="/srv/box/remote") is None


def test_remote_path_from_the_environment_is_checked(tmp_path):
    project = load_project(tmp_path)
    with pytest.raises(SafetyError) as info:
        resolve_target("winter@gpu:2222", project, env={"REMOTE_PATH": "~"})
    assert info.value.exit_code == 3 and "remote home" in str(info.value)
    target = resolve_target("winter@gpu:2222", project, env={"REMOTE_PATH": "ClippyFront"})
    assert target.remote_path == "~/ClippyFront"
    # `trust` only records a host key: an exported REMOTE_PATH=~ does not stop it
    assert resolve_target("winter@gpu:2222", project, env={"REMOTE_PATH": "~"},
                          check_path=False).remote_path == "~"


def test_push_into_the_remote_home_is_refused_and_deletes_nothing(capsys, proj, box):
    root, _remote = proj
    (root / "app.py").write_text("x = 1\n")
    home = Path(box.remote_root)
    before = sorted(p.name for p in home.iterdir())
    for spec in (str(home), "~", "~/"):
        code, out, err = push(capsys, root, spec)
        assert code == 3, (spec, out, err)
        assert "refusing remote path" in one_line(err) and "home" in err
    assert sorted(p.name for p in home.iterdir()) == before


def test_relative_remote_path_lands_below_the_remote_home(capsys, proj, box):
    root, _remote = proj
    (root / "app.py").write_text("x = 1\n")
    name = f"rel-{uuid.uuid4().hex[:8]}"
    login_home = Path(pwd.getpwnam(getpass.getuser()).pw_dir)  # the session's working dir
    try:
        code, _, err = push(capsys, root, name, "--no-restart")
        assert code == 0, err
        assert (Path(box.remote_root) / name / "app.py").read_text() == "x = 1\n"
        assert not (login_home / name).exists()
    finally:
        shutil.rmtree(Path(box.remote_root) / name, ignore_errors=True)
        if os.path.realpath(login_home) != os.path.realpath(box.remote_root):
            shutil.rmtree(login_home / name, ignore_errors=True)
