"""`syncagent status` when the remote's supervisord is gone (killed, or a reboot without
--boot): before, it exited 0, showed "live -  (older than the push ...)" and
"on the remote: None", as if a restart had merely been skipped. Real sshd, supervisord and
Celery (a provisioned sandbox of its own).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from syncagent import sandbox
from syncagent.cli import main
from tests.helpers.procs import provisioned_sandbox, wait_until


@pytest.fixture(scope="module")
def sdn(hermetic_home, tmp_path_factory):
    with provisioned_sandbox("sdn", tmp_path_factory.mktemp("sdn")) as box:
        yield box


def test_status_says_the_worker_is_down_when_supervisord_is_gone(capsys, sdn):
    remote = f"{sdn.remote_root}/project"
    argv = ["status", "sdn", "--path", sdn.project, "--remote-path", remote]
    assert main(argv) == 0, capsys.readouterr()
    capsys.readouterr()
    pid = int(Path(remote, ".syncagent", "supervisord.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not sandbox._alive(pid, "supervisord"), 10, "supervisord to die")
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 1, out
    assert "DOWN: supervisord is not running" in out and "syncagent provision sdn" in out
    assert "None" not in out and "older than the push" not in out
    code = main(argv + ["--json"])
    body = json.loads(capsys.readouterr().out)
    assert code == 1 and body["exit_code"] == 1 and body["supervisord"] == "down"
