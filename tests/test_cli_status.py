"""`syncagent status` when the worker cannot serve. Real sshd, supervisord and Celery (a
provisioned sandbox of its own).

- A .env.worker missing a required key: the new slot exited 2 before the launcher could record
  a failed start, so `status` showed nothing wrong (exit 0) and a restart said only
  "did not start (backoff)".
- supervisord gone (killed, or a reboot without --boot): `status` exited 0, showed
  "live -  (older than the push ...)" and "on the remote: None", as if a restart had merely
  been skipped.
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


def test_a_missing_env_key_is_a_failed_start_status_reports(capsys, sdn):
    remote = Path(sdn.remote_root, "project")
    argv = ["--path", sdn.project, "--remote-path", str(remote)]
    env_file = remote / ".env.worker"
    good = env_file.read_text()
    assert "CELERY_RESULT_BACKEND=" in good
    env_file.write_text("".join(line for line in good.splitlines(keepends=True)
                                if not line.startswith("CELERY_RESULT_BACKEND=")))
    try:
        capsys.readouterr()
        assert main(["restart", "sdn", *argv, "--timeout", "30"]) == 1
        err = capsys.readouterr().err
        assert "did not start: invalid .env.worker: CELERY_RESULT_BACKEND is required" in err
        assert main(["status", "sdn", *argv]) == 1
        out = capsys.readouterr().out
        assert "worker failing: invalid .env.worker: CELERY_RESULT_BACKEND" in out, out
    finally:
        env_file.write_text(good)
    assert main(["restart", "sdn", *argv, "--timeout", "30"]) == 0, capsys.readouterr()
    assert main(["status", "sdn", *argv]) == 0, capsys.readouterr()


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
