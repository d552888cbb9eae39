"""A TARGET that is neither a configured name nor a resolvable host: the connection failure
says which targets exist (a misspelt or removed name read like a hostname). Real CLI, real
name resolution (``.invalid`` never resolves, RFC 2606), real ~/.ssh/config parsing."""
from __future__ import annotations

from pathlib import Path

import pytest

from syncagent.cli import main
from syncagent.config import Target, write_user_target

CONFIG = """
[targets.sandbox]
host = "sandbox.invalid"

[targets.gpu]
host = "gpu.invalid"
"""


@pytest.fixture
def project(tmp_path, hermetic_home, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # no user targets
    root = tmp_path / "proj"
    root.mkdir()
    (root / "syncagent.toml").write_text(CONFIG)
    (root / "app.py").write_text("x = 1\n")
    yield root
    ssh_config = hermetic_home / ".ssh" / "config"
    ssh_config.unlink(missing_ok=True)


def _status(capsys, spec: str, root: Path) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["status", spec, "--path", str(root), "--no-holder"])
    captured = capsys.readouterr()
    lines = (captured.err + captured.out).splitlines()
    return code, next((line for line in lines if "cannot reach" in line), "\n".join(lines))


def test_a_misspelt_target_name_lists_the_configured_ones(capsys, project) -> None:
    code, err = _status(capsys, "sandbx", project)
    assert code == 1, err
    assert err.endswith(": Name or service not known (no target named 'sandbx' in "
                        "syncagent.toml; did you mean 'sandbox'? configured: sandbox, gpu)"), err
    assert "unreachable" in err and "cannot reach root@sandbx:22" in err


def test_a_removed_name_without_a_close_match_lists_them_all(capsys, project) -> None:
    code, err = _status(capsys, "staging", project)
    assert code == 1, err
    assert err.endswith("(no target named 'staging' in syncagent.toml; configured: "
                        "sandbox, gpu)"), err


@pytest.mark.parametrize("spec", ["sandbx.invalid", "root@sandbx", "sandbx:2222"])
def test_a_spelled_out_host_gets_no_target_hint(capsys, project, spec) -> None:
    code, err = _status(capsys, spec, project)
    assert code == 1 and "cannot reach" in err, err
    assert "no target named" not in err, err


def test_an_ssh_config_alias_gets_no_target_hint(capsys, project, hermetic_home) -> None:
    ssh = hermetic_home / ".ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    (ssh / "config").write_text("Host sandbx\n    HostName sandbx.invalid\n")
    code, err = _status(capsys, "sandbx", project)
    assert code == 1 and "cannot reach" in err and "sandbx.invalid" in err, err
    assert "no target named" not in err, err


def test_push_to_a_misspelt_name_is_one_error_line_with_the_hint(capsys, project) -> None:
    capsys.readouterr()
    assert main(["push", "gpuu", "--path", str(project), "--no-holder"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("syncagent: error: cannot reach ") and err.count("\n") == 1, err
    assert err.rstrip().endswith("(no target named 'gpuu' in syncagent.toml; did you mean "
                                 "'gpu'? configured: sandbox, gpu)"), err


@pytest.mark.parametrize("command", ["push", "watch", "status", "provision", "restart", "logs",
                                     "doctor"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_remote_path_is_a_usage_error(capsys, project, command, value) -> None:
    """It used to mean the default path silently (an unset variable in --remote-path "$DIR")."""
    capsys.readouterr()
    assert main([command, "sandbox", "--path", str(project), "--remote-path", value]) == 2
    err = capsys.readouterr().err
    assert err == (f"syncagent: error: Invalid value for '--remote-path': must not be empty "
                   f"(leave the option out for the default) (see `syncagent {command} "
                   f"--help`)\n"), err


def test_user_targets_are_listed_after_the_project_s(capsys, project, tmp_path) -> None:
    write_user_target(Target("mybox", "mybox.invalid"))
    code, err = _status(capsys, "mybx", project)
    assert code == 1, err
    assert err.endswith("(no target named 'mybx' in syncagent.toml; did you mean 'mybox'? "
                        "configured: sandbox, gpu; user targets: mybox)"), err
