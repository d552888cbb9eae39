"""worker.boot: which commands bring supervisord back at boot (pure), and the unit's text."""
from __future__ import annotations

import pytest

from worker import boot
from worker import supervisor_conf as sc

LAYOUT = sc.Layout(root="/home/w/ClippyFront", venv="/home/w/ClippyFront/venv")
UNIT = boot.unit_name(LAYOUT)
ARGS = dict(unit=UNIT, system_file="/s/unit", user_file="/s/user-unit", user="w",
            home="/home/w")


def test_unit_name_is_safe_and_per_project() -> None:
    assert UNIT.startswith("syncagent-ClippyFront-worker-") and UNIT.endswith(".service")
    spaced = boot.unit_name(sc.Layout(root="/srv/Clippy Front", venv="/v"))
    assert spaced.startswith("syncagent-Clippy-Front-worker-") and spaced != UNIT


@pytest.mark.parametrize("systemd, privilege, kind, first, last", [
    (False, "none", "manual", ("sudo", "install", "-m", "644", "/s/unit",
                               f"/etc/systemd/system/{UNIT}"),
     ("loginctl", "enable-linger", "w")),
    (True, "root", "system", ("install", "-m", "644", "/s/unit", f"/etc/systemd/system/{UNIT}"),
     ("systemctl", "enable", UNIT)),
    (True, "sudo", "system", ("sudo", "-n", "install", "-m", "644", "/s/unit",
                              f"/etc/systemd/system/{UNIT}"),
     ("sudo", "-n", "systemctl", "enable", UNIT)),
    (True, "none", "user", ("install", "-D", "-m", "644", "/s/user-unit",
                            f"/home/w/.config/systemd/user/{UNIT}"),
     ("loginctl", "enable-linger", "w")),
], ids=["no-systemd-prints-both", "root-system-unit", "sudo-system-unit", "user-unit-linger"])
def test_plan(systemd, privilege, kind, first, last) -> None:
    steps = boot.plan(systemd, privilege, **ARGS)
    assert steps.kind == kind
    assert steps.commands[0] == first and steps.commands[-1] == last
    assert ("systemctl", "--user", "enable", UNIT) in steps.commands or kind == "system"
    assert not any("--now" in c for c in steps.commands)  # enabled for the next boot only
    assert bool(steps.reason) is (kind == "manual")


def test_system_and_user_units() -> None:
    system = sc.render_systemd_unit(LAYOUT, user="w")
    user = sc.render_systemd_unit(LAYOUT, wanted_by="default.target")
    for text in (system, user):
        assert (f"ExecStart={LAYOUT.venv}/bin/supervisord -n -c {LAYOUT.root}/.syncagent/"
                "supervisord.conf") in text
        assert "KillMode=process" in text and "Restart=on-failure" in text
    assert "User=w\n" in system and "WantedBy=multi-user.target" in system
    assert "User=" not in user and "WantedBy=default.target" in user


def test_state_reads_the_links_enable_makes(tmp_path, monkeypatch) -> None:
    """Enabled by provision or by hand, running systemd or not: the wants link decides."""
    monkeypatch.setattr(boot.getpass, "getuser", lambda: "w")
    root = tmp_path / "ClippyFront"
    root.mkdir()
    dirs = dict(etc=str(tmp_path / "etc"), home=str(tmp_path / "home"),
                linger_dir=str(tmp_path / "linger"))
    unit = boot.unit_name(sc.Layout(root=str(root), venv=""))
    assert boot.state(str(root), **dirs) == {"boot": "not enabled", "unit": unit, "kind": None}
    user_wants = tmp_path / "home" / ".config" / "systemd" / "user" / "default.target.wants"
    user_wants.mkdir(parents=True)
    (user_wants.parent / unit).write_text("[Unit]\n")
    (user_wants / unit).symlink_to(user_wants.parent / unit)
    assert boot.state(str(root), **dirs)["boot"] == "enabled at login only (no lingering)"
    (tmp_path / "linger").mkdir()
    (tmp_path / "linger" / "w").touch()
    assert boot.state(str(root), **dirs) == {"boot": "enabled", "unit": unit, "kind": "user"}
    (user_wants / unit).unlink()
    system_wants = tmp_path / "etc" / "multi-user.target.wants"
    system_wants.mkdir(parents=True)
    (system_wants.parent / unit).write_text("[Unit]\n")
    (system_wants / unit).symlink_to(system_wants.parent / unit)
    assert boot.state(str(root), **dirs) == {"boot": "enabled", "unit": unit, "kind": "system"}
