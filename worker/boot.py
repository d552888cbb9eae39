"""Bring supervisord (and so the worker) back after a reboot: ``python -m worker boot``.

Writes the systemd unit for this project's supervisord into the state dir, then, where systemd
runs (``/run/systemd/system`` exists, as ``sd_booted()`` checks), enables it: as a system unit
through ``sudo -n`` when that is allowed without a password, else as a user unit with
lingering (so it starts at boot, not at login). Where it cannot, it returns the exact commands
to run. The unit is only *enabled*, not started: the supervisord running now keeps serving, and
the unit's one takes over at the next boot (two would fight over the socket).

:func:`plan` is pure (which commands, in which case); :func:`install` runs them.
"""
from __future__ import annotations

import getpass
import hashlib
import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from worker import supervisor_conf as sc

__all__ = ["BootPlan", "install", "plan", "state", "systemd_running", "unit_name"]

def unit_name(layout: sc.Layout) -> str:
    """``syncagent-<project dir>-<group>-<6 hex of the root>.service``: one per project."""
    base = "".join(c if c.isalnum() or c in "-_" else "-" for c in os.path.basename(
        layout.root.rstrip("/")))[:40] or "project"
    return (f"syncagent-{base}-{layout.name}-"
            f"{hashlib.sha256(layout.root.encode()).hexdigest()[:6]}.service")


@dataclass(frozen=True)
class BootPlan:
    """What to do: ``kind`` is ``system``, ``user`` or ``manual`` (print ``commands``)."""

    kind: str
    commands: tuple[tuple[str, ...], ...]
    reason: str = ""


def _system(unit: str, path: str, sudo: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    return ((*sudo, "install", "-m", "644", path, f"/etc/systemd/system/{unit}"),
            (*sudo, "systemctl", "daemon-reload"), (*sudo, "systemctl", "enable", unit))


def _user(unit: str, path: str, user: str, home: str) -> tuple[tuple[str, ...], ...]:
    return (("install", "-D", "-m", "644", path, f"{home}/.config/systemd/user/{unit}"),
            ("systemctl", "--user", "daemon-reload"), ("systemctl", "--user", "enable", unit),
            ("loginctl", "enable-linger", user))


def plan(systemd: bool, privilege: str, unit: str, system_file: str, user_file: str,
         user: str, home: str) -> BootPlan:
    """Which commands install the unit. No I/O.

    Args:
        systemd: systemd runs on this machine.
        privilege: ``root`` (we are), ``sudo`` (``sudo -n`` works, no password) or ``none``.
        unit: the unit's name.
        system_file, user_file: the rendered system unit (``User=``) and user unit.
        user, home: the remote user and home.
    """
    if not systemd:
        return BootPlan("manual", _system(unit, system_file, ("sudo",))
                        + _user(unit, user_file, user, home),
                        "systemd is not running on this machine")
    if privilege in ("root", "sudo"):
        return BootPlan("system", _system(unit, system_file,
                                          () if privilege == "root" else ("sudo", "-n")))
    return BootPlan("user", _user(unit, user_file, user, home))


def systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system")


def _privilege() -> str:
    if os.geteuid() == 0:
        return "root"
    try:
        ok = subprocess.run(["sudo", "-n", "true"], capture_output=True,
                            timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return "sudo" if ok else "none"


def install(layout: sc.Layout) -> dict:
    """Write the unit files into the state dir and enable one where possible.

    Returns:
        ``{"enabled": bool, "kind", "unit", "unit_file", "commands": [...], "reason"}``;
        ``commands`` are shell lines (what was run, or what to run).
    """
    unit = unit_name(layout)
    user, home = getpass.getuser(), os.path.expanduser("~")
    state = Path(layout.state)
    system_file, user_file = state / unit, state / f"user-{unit}"
    for path, text in ((system_file, sc.render_systemd_unit(layout, user=user)),
                       (user_file, sc.render_systemd_unit(layout, wanted_by="default.target"))):
        path.write_text(text, encoding="utf-8")
    systemd = systemd_running()
    steps = plan(systemd, _privilege() if systemd else "none", unit, str(system_file),
                 str(user_file), user, home)
    lines = [shlex.join(c) for c in steps.commands]
    out = {"enabled": False, "kind": steps.kind, "unit": unit, "unit_file": str(system_file),
           "commands": lines, "reason": steps.reason}
    if steps.kind == "manual":
        return out
    for command in steps.commands:
        proc = subprocess.run(list(command), capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            last = (proc.stderr.strip() or f"exit {proc.returncode}").splitlines()[-1]
            out["reason"] = f"{shlex.join(command)} failed: {last}"
            return out
    out["enabled"] = True
    return out


def state(root: str, name: str = "worker", etc: str = "/etc/systemd/system",
          home: str | None = None, linger_dir: str = "/var/lib/systemd/linger") -> dict:
    """Will the worker come back after a reboot? Read from the links ``systemctl enable``
    makes (so it also holds for a unit enabled by hand, and where systemd is not running).

    Args:
        root: project root on this machine; name: the program group.
        etc, home, linger_dir: where systemd keeps system units, the user's home, lingering.

    Returns:
        ``{"boot": "enabled" | "enabled at login only" | "not enabled", "unit", "kind"}``.
    """
    unit = unit_name(sc.Layout(root=os.path.realpath(root), venv="", name=name))
    home = home or os.path.expanduser("~")
    if os.path.exists(f"{etc}/multi-user.target.wants/{unit}"):
        return {"boot": "enabled", "unit": unit, "kind": "system"}
    if os.path.exists(f"{home}/.config/systemd/user/default.target.wants/{unit}"):
        lingering = os.path.exists(f"{linger_dir}/{getpass.getuser()}")
        return {"boot": "enabled" if lingering else "enabled at login only (no lingering)",
                "unit": unit, "kind": "user"}
    return {"boot": "not enabled", "unit": unit, "kind": None}
