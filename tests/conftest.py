"""Shared fixtures: a hermetic home, and a real sshd sandbox for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from syncagent import sandbox


@pytest.fixture(scope="session", autouse=True)
def hermetic_home(tmp_path_factory):
    """HOME and XDG dirs under a temp dir: never the real ~/.ssh or ~/.config."""
    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME",
                                            "REMOTE_HOST", "REMOTE_USER", "REMOTE_PORT",
                                            "REMOTE_PATH", "SSH_AUTH_SOCK", "XDG_RUNTIME_DIR",
                                            "SYNCAGENT_HOLDER")}
    os.environ["HOME"] = str(home)
    os.environ["XDG_CONFIG_HOME"] = str(home / ".config")
    os.environ["XDG_STATE_HOME"] = str(home / ".local" / "state")
    for k in ("REMOTE_HOST", "REMOTE_USER", "REMOTE_PORT", "REMOTE_PATH", "SSH_AUTH_SOCK",
              "XDG_RUNTIME_DIR"):
        os.environ.pop(k, None)
    os.environ["SYNCAGENT_HOLDER"] = "0"  # no background holders, but in tests/test_holder.py
    yield home
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def box(hermetic_home, tmp_path_factory):
    """A running sandbox (real OpenSSH sshd on 127.0.0.1), registered as target 'sbx'."""
    directory = tmp_path_factory.mktemp("sandbox")
    b = sandbox.up("sbx", directory)
    try:
        yield b
    finally:
        if b.sshd_pid not in sandbox.down("sbx", directory):
            log = Path(directory, "sshd.log")
            print(log.read_text(errors="replace") if log.exists() else "no sshd log")
