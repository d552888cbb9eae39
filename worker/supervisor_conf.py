"""Render supervisord configs for the worker: daemon conf, the blue/green(/red) program slots,
systemd unit.

No I/O except :func:`write_configs` and :func:`write_reference_files`. supervisord listens on
a 0700 unix socket in the state dir only (no ``[inet_http_server]``). Regenerate the checked-in
reference files with ``python -m worker.supervisor_conf [REPO_DIR]``.

Paths are written so that supervisord reads them back unchanged: it expands ``%(...)s`` in
every value (so ``%`` is written ``%%``), splits ``command=`` with shlex (so the python path is
shell-quoted) and ``environment=`` with a non-POSIX shlex (so values are quoted with the quote
they do not contain); ``[include]`` names its files relative to the config, as the root could
hold spaces. What no quoting can carry is refused by :func:`path_problem`.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from worker.ready import COLOURS, GAVE_UP_EXIT, MAX_STARTS, STATE_DIR_NAME, ensure_state_dir

__all__ = [
    "DEFAULT_STOPWAITSECS",
    "REFERENCE",
    "reference_files",
    "Layout",
    "path_problem",
    "socket_problem",
    "program_names",
    "render_program_conf",
    "render_supervisord_conf",
    "render_systemd_unit",
    "supervisorctl_command",
    "write_configs",
    "write_reference_files",
]

DEFAULT_STOPWAITSECS = 600

# configparser ends a value at " ;" or " #" (inline comments) and strips it; a control
# character would end the line; supervisord expands "%(here)s" even when written "%%(here)s";
# [include] globs its absolute pattern; environment= cannot quote a value with both quotes.
_PATH_PROBLEMS = (
    (re.compile(r"[\x00-\x1f\x7f]"), "holds a control character (newline, tab, ...)"),
    (re.compile(r"\s[;#]"), "holds ' ;' or ' #', which supervisord reads as a comment"),
    (re.compile(r"^\s|\s$"), "starts or ends with whitespace, which supervisord strips"),
    (re.compile(r"%\("), "holds '%(', which supervisord expands"),
    (re.compile(r"[*?\[]"), "holds a glob character (* ? [), which supervisord's [include] "
                             "expands"),
    (re.compile(r"^(?=.*').*\""), "holds both ' and \", which supervisord's environment= "
                                  "cannot quote"),
)


def path_problem(path: str) -> str | None:
    """Why ``path`` (remote root or venv) cannot be written into supervisord's config, or None.

    Spaces, single or double quotes, ``%`` and non-ASCII letters are fine.
    """
    for pattern, reason in _PATH_PROBLEMS:
        if pattern.search(path):
            return reason
    return None


def socket_problem(root: str) -> str | None:
    """Why supervisord cannot listen on a unix socket under ``root`` (an absolute path), or
    None: a socket path holds at most 107 bytes."""
    size = len(os.fsencode(Layout(root=root, venv="").socket_path))
    return (f"is too long: its supervisord socket path would be {size} bytes, over the 107 a "
            "unix socket allows" if size > 107 else None)


def _value(text: str, expansions: int = 1) -> str:
    """A config value supervisord reads back as ``text`` after %-expanding it ``expansions``
    times (every value once; ``stdout_logfile`` twice)."""
    return text.replace("%", "%" * 2 ** expansions)


@dataclass(frozen=True)
class Layout:
    """Where things live on the remote.

    Attributes:
        root: project root (worker cwd).
        venv: virtualenv holding python, supervisord and supervisorctl.
        name: program group name (programs ``<name>-blue`` and ``<name>-green``).
        stopwaitsecs: grace for a warm stop (above the longest task).
    """

    root: str
    venv: str
    name: str = "worker"
    stopwaitsecs: int = DEFAULT_STOPWAITSECS

    @property
    def state(self) -> str:
        """``<root>/.syncagent``."""
        return f"{self.root.rstrip('/')}/{STATE_DIR_NAME}"

    @property
    def conf_path(self) -> str:
        """Path of supervisord.conf in the state dir."""
        return f"{self.state}/supervisord.conf"

    @property
    def program_conf_path(self) -> str:
        """Path of the program pair conf (included by supervisord.conf)."""
        return f"{self.state}/supervisor/{self.name}.conf"

    @property
    def socket_path(self) -> str:
        """The 0700 unix socket supervisord listens on."""
        return f"{self.state}/supervisor.sock"

    @property
    def python(self) -> str:
        """The venv's python."""
        return f"{self.venv.rstrip('/')}/bin/python"

    def bin(self, program: str) -> str:
        """Path of a console script in the venv."""
        return f"{self.venv.rstrip('/')}/bin/{program}"


REFERENCE = Layout(root="/home/winter/ClippyFront", venv="/home/winter/ClippyFront/venv")
REFERENCE_USER = "winter"


def program_names(name: str) -> tuple[str, ...]:
    """Return ``(<name>-blue, <name>-green, <name>-red)``; supervisord addresses them as
    ``<name>:<prog>``."""
    return tuple(f"{name}-{colour}" for colour in COLOURS)


def supervisorctl_command(conf_path: str, venv: str | None = None) -> str:
    """Return the exact status command line, e.g. ``supervisorctl -c <conf> status``."""
    exe = f"{venv.rstrip('/')}/bin/supervisorctl" if venv else "supervisorctl"
    return f"{shlex.quote(exe)} -c {shlex.quote(conf_path)} status"


def render_supervisord_conf(layout: Layout) -> str:
    """Render supervisord.conf: unix socket 0700, state-dir logs/pid, include of programs.

    Returns:
        The file text.
    """
    s = _value(layout.state)
    return f"""\
; supervisord for the syncagent worker (generated by worker/supervisor_conf.py)
; Status: {supervisorctl_command(layout.conf_path, layout.venv)}
[unix_http_server]
file={_value(layout.socket_path)}
chmod=0700

[supervisord]
logfile={s}/logs/supervisord.log
logfile_maxbytes=10MB
logfile_backups=5
pidfile={s}/supervisord.pid
childlogdir={s}/logs
loglevel=info

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{_value(layout.socket_path)}

[include]
files=supervisor/*.conf
"""


def _environment(colour: str, layout: Layout, extra: Mapping[str, str]) -> str:
    pairs = {"SYNCAGENT_COLOUR": colour, "SYNCAGENT_STOPWAITSECS": str(layout.stopwaitsecs),
             "PYTHONUNBUFFERED": "1", **extra}
    return ",".join(f"{key}={_env_value(key, value)}" for key, value in pairs.items())


def _env_value(key: str, value: str) -> str:
    """``value`` quoted for environment=: split by a non-POSIX shlex (no escapes), then
    supervisord strips quotes from both ends."""
    quote = "'" if '"' in value else '"'
    if (not re.fullmatch(r"[A-Za-z_]\w*", key) or quote in value
            or value.startswith(("'", '"')) or value.endswith(("'", '"'))
            or re.search(r"[\x00-\x1f\x7f]|\s[;#]", value)):
        raise ValueError(f"environment value for {key} cannot be quoted for supervisord")
    return _value(f"{quote}{value}{quote}")


def _program(layout: Layout, colour: str, extra: Mapping[str, str]) -> str:
    program = f"{layout.name}-{colour}"
    return f"""\
[program:{program}]
command={_value(shlex.quote(layout.python))} -m worker run
directory={_value(layout.root)}
environment={_environment(colour, layout, extra)}
autostart={'true' if colour == 'blue' else 'false'}
autorestart=unexpected
exitcodes={GAVE_UP_EXIT}
startsecs=1
startretries={MAX_STARTS - 1}
stopsignal=TERM
stopwaitsecs={layout.stopwaitsecs}
stopasgroup=false
killasgroup=true
redirect_stderr=true
stdout_logfile={_value(layout.state, expansions=2)}/logs/{program}.log
stdout_logfile_maxbytes=10MB
stdout_logfile_backups=5
"""


def render_program_conf(layout: Layout, extra_env: Mapping[str, str] | None = None) -> str:
    """Render the ``[group:<name>]`` with programs ``<name>-blue`` (autostart), ``-green`` and
    ``-red``.

    Args:
        layout: remote layout.
        extra_env: extra environment for every program (e.g. PYTHONPATH).

    Returns:
        The file text.
    """
    extra = dict(extra_env or {})
    return (f"; worker slots: blue autostarts, the others take turns at restarts "
            f"(generated by worker/supervisor_conf.py)\n"
            f"[group:{layout.name}]\nprograms={','.join(program_names(layout.name))}\n\n"
            + "\n".join(_program(layout, colour, extra) for colour in COLOURS))


def _systemd(text: str) -> str:
    return text.replace("%", "%%")  # systemd expands %-specifiers


def _systemd_argv(*args: str) -> str:
    """A command line for ExecStart=: double-quoted words where needed, C-style escapes."""
    def word(arg: str) -> str:
        if re.fullmatch(r"[\w@%+=:,./-]+", arg):
            return _systemd(arg)
        return '"' + _systemd(arg.replace("\\", "\\\\").replace('"', '\\"')) + '"'
    return " ".join(word(a) for a in args)


def render_systemd_unit(layout: Layout, user: str | None = None,
                        wanted_by: str = "multi-user.target") -> str:
    """Render a systemd unit that runs ``supervisord -n -c <conf>`` at boot.

    Args:
        layout: remote layout.
        user: run as this user (omit for a user unit).
        wanted_by: ``multi-user.target`` (system unit) or ``default.target`` (user unit).

    Returns:
        The unit text.
    """
    user_line = f"User={user}\n" if user else ""
    return f"""\
# syncagent worker supervisor (generated by worker/supervisor_conf.py)
# Install: `syncagent provision --boot` (or the commands it prints when it cannot)
[Unit]
Description=syncagent supervisord for the {layout.name} Celery worker
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
{user_line}WorkingDirectory={_systemd(layout.root)}
ExecStart={_systemd_argv(layout.bin('supervisord'), '-n', '-c', layout.conf_path)}
ExecStop={_systemd_argv(layout.bin('supervisorctl'), '-c', layout.conf_path, 'shutdown')}
KillMode=process
TimeoutStopSec={layout.stopwaitsecs + 60}
Restart=on-failure

[Install]
WantedBy={wanted_by}
"""


def _write(path: Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_configs(layout: Layout, extra_env: Mapping[str, str] | None = None) -> Path:
    """Write supervisord.conf and the program conf into the state dir (dirs 0700).

    Returns:
        Path of supervisord.conf (pass it to ``supervisord -c`` / ``supervisorctl -c``).
    """
    for what, path in (("root", layout.root), ("venv", layout.venv)):
        reason = path_problem(path) or (socket_problem(path) if what == "root" else None)
        if reason:
            raise ValueError(f"the {what} {path!r} {reason}")
    state = ensure_state_dir(layout.root)
    for sub in ("supervisor", "logs"):
        (state / sub).mkdir(mode=0o700, exist_ok=True)
    _write(Path(layout.conf_path), render_supervisord_conf(layout))
    _write(Path(layout.program_conf_path), render_program_conf(layout, extra_env))
    return Path(layout.conf_path)


def reference_files() -> dict[str, str]:
    """Return ``{file name: text}`` of the checked-in reference files under supervisor/."""
    return {
        "supervisord.conf": render_supervisord_conf(REFERENCE),
        "program.conf": render_program_conf(REFERENCE),
        "supervisord.service": render_systemd_unit(REFERENCE, user=REFERENCE_USER),
    }


def write_reference_files(repo_dir: str | os.PathLike[str]) -> list[Path]:
    """Write the reference files into ``<repo_dir>/supervisor/``.

    Returns:
        The written paths.
    """
    out = Path(repo_dir) / "supervisor"
    out.mkdir(exist_ok=True)
    written = []
    for name, text in reference_files().items():
        (out / name).write_text(text, encoding="utf-8")
        written.append(out / name)
    return written


if __name__ == "__main__":
    for written_path in write_reference_files(sys.argv[1] if len(sys.argv) > 1 else "."):
        print(written_path)
