"""Configuration: ``syncagent.toml`` (or ``[tool.syncagent]``), user targets, TARGET specs.

Precedence, resolved once per field: command-line flag, then ssh_config (in transport), then the
project config, then the environment fallbacks of sync-to-remote.sh, then the default.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from .errors import ConfigError, SafetyError, TargetError

__all__ = [
    "CONFIG_NAME", "Target", "Project", "find_root", "load_project", "parse_target_spec",
    "resolve_target", "user_config_dir", "user_state_dir", "write_user_target",
    "remove_user_target", "remote_path_problem", "unknown_name_hint", "INIT_TEMPLATE", "RESTART_MODES", "RESTART_POLICIES", "RESTART_SCOPES", "expand_specs",
]

CONFIG_NAME = "syncagent.toml"
TOP_KEYS = {"exclude", "protect", "restart_on", "default_target", "mass_delete_ratio", "targets", "groups",
            "restart_policy", "restart_scope", "holder", "holder_idle"}
RESTART_POLICIES = ("rolling", "parallel")
RESTART_SCOPES = ("imports", "any")  # restart for the worker's code only, or for any change
TARGET_KEYS = {"host", "user", "port", "remote_path", "identity", "ssh_config", "remote_root",
               "python", "restart_mode"}
RESTART_MODES = ("blue-green", "drain", "requeue")
SPEC = re.compile(
    r"^(?:(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@)?"
    r"(?P<host>[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?$"
)

# A push makes its remote root equal to the local tree: whatever else is there goes. These can
# never be a project's root (a home holds .ssh/authorized_keys; the rest belong to the system).
SYSTEM_DIRS = frozenset({"/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32",
                         "/lib64", "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin",
                         "/srv", "/sys", "/tmp", "/usr", "/usr/local", "/var", "/var/tmp",
                         "/Users"})
_HOME_DIR = re.compile(r"/(?:home|Users)/[^/]+")


@dataclass(frozen=True)
class Target:
    """One remote: where to connect and which directory is the project root there."""

    name: str
    host: str
    user: str | None = None
    port: int | None = None
    remote_path: str | None = None
    identity: str | None = None
    ssh_config: str | None = None
    remote_root: str = "~"  # parent of the default remote path (the sandbox's stand-in home)
    python: str = "python3"
    restart_mode: str = "blue-green"
    # for a bare name that is no configured target: what to add if it does not resolve either
    # (a typo of a target name reads like a hostname; see transport.connect)
    name_hint: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Project:
    root: Path
    config_file: Path | None = None
    exclude: tuple[str, ...] = ()
    protect: tuple[str, ...] = ()  # more paths the remote keeps (on top of .env*, venv/, ...)
    restart_on: tuple[str, ...] | None = None
    default_target: str | None = None
    mass_delete_ratio: float = 0.5
    targets: Mapping[str, Target] = field(default_factory=dict)  # the project's and the user's
    project_targets: tuple[str, ...] = ()  # names defined by the project file itself
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    restart_policy: str = "rolling"  # across targets: one at a time, or all at once
    restart_scope: str = "imports"  # restart for files the worker imported, or for any change
    holder: bool = True  # leave a warm holder behind for later commands (syncagent.holder)
    holder_idle: float = 300.0  # seconds the holder waits for a command before it exits


def user_config_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "syncagent"


def user_state_dir() -> Path:
    from .wire import user_state_dir as state_dir  # the holder's client reads it without us

    return Path(state_dir())


def find_root(start: str | os.PathLike | None = None, explicit: str | None = None) -> Path:
    """The local project root: ``--path``, else the nearest directory holding syncagent.toml,
    else the current directory."""
    if explicit is not None:
        root = Path(explicit).expanduser().resolve()
        if not root.is_dir():
            raise ConfigError(f"--path {explicit}: not a directory")
        return root
    here = Path(start or os.getcwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    return here


def _line_of(text: str, key: str) -> int:
    pattern = re.compile(rf"^[ \t]*\"?{re.escape(key)}\"?[ \t]*=", re.M)
    m = pattern.search(text)
    return text.count("\n", 0, m.start()) + 1 if m else 0


def _read_toml(path: Path) -> tuple[dict, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e


def _where(path: Path, text: str, key: str) -> str:
    line = _line_of(text, key)
    return f"{path}:{line}" if line else str(path)


def _targets(data: dict, path: Path, text: str) -> dict[str, Target]:
    raw = data.get("targets", {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{_where(path, text, 'targets')}: 'targets' must be a table")
    out = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{_where(path, text, name)}: [targets.{name}] must be a table")
        unknown = set(spec) - TARGET_KEYS
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(f"{_where(path, text, key)}: unknown key '{key}' in "
                              f"[targets.{name}] (known: {', '.join(sorted(TARGET_KEYS))})")
        if "host" not in spec:
            raise ConfigError(f"{path}: [targets.{name}] needs a 'host'")
        port = spec.get("port")
        if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
            raise ConfigError(f"{_where(path, text, 'port')}: [targets.{name}] port must be "
                              f"an integer 1-65535")
        for key in TARGET_KEYS - {"port"}:
            if key in spec and not isinstance(spec[key], str):
                raise ConfigError(f"{_where(path, text, key)}: [targets.{name}] {key} must be "
                                  f"a string")
        if spec.get("restart_mode", "blue-green") not in RESTART_MODES:
            raise ConfigError(f"{_where(path, text, 'restart_mode')}: [targets.{name}] "
                              f"restart_mode must be one of {', '.join(RESTART_MODES)}")
        out[name] = Target(name=name, **spec)
    return out


def _str_list(data: dict, key: str, path: Path, text: str) -> tuple[str, ...] | None:
    if key not in data:
        return None
    value = data[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{_where(path, text, key)}: '{key}' must be a list of strings")
    return tuple(value)


def _protect(data: dict, path: Path, text: str) -> tuple[str, ...]:
    """The ``protect`` patterns: they can only add protection, so no ``!`` negation."""
    patterns = _str_list(data, "protect", path, text) or ()
    for p in patterns:
        if p.startswith("!"):
            raise ConfigError(f"{_where(path, text, 'protect')}: protect pattern '{p}' cannot "
                              f"un-protect anything; remove the '!'")
    return patterns


def _parse_project(data: dict, path: Path, text: str) -> dict:
    unknown = set(data) - TOP_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{_where(path, text, key)}: unknown key '{key}' "
                          f"(known: {', '.join(sorted(TOP_KEYS))})")
    ratio = data.get("mass_delete_ratio", 0.5)
    if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ConfigError(f"{_where(path, text, 'mass_delete_ratio')}: mass_delete_ratio must "
                          f"be a number in (0, 1]")
    default = data.get("default_target")
    if default is not None and not isinstance(default, str):
        raise ConfigError(f"{_where(path, text, 'default_target')}: must be a string")
    groups = data.get("groups", {})
    if not isinstance(groups, dict):
        raise ConfigError(f"{_where(path, text, 'groups')}: [groups] must be a table")
    for name in groups:
        _str_list(groups, name, path, text)
    policy = data.get("restart_policy", "rolling")
    if policy not in RESTART_POLICIES:
        raise ConfigError(f"{_where(path, text, 'restart_policy')}: restart_policy must be one "
                          f"of {', '.join(RESTART_POLICIES)}")
    scope = data.get("restart_scope", "imports")
    if scope not in RESTART_SCOPES:
        raise ConfigError(f"{_where(path, text, 'restart_scope')}: restart_scope must be one "
                          f"of {', '.join(RESTART_SCOPES)}")
    holder = data.get("holder", True)
    if not isinstance(holder, bool):
        raise ConfigError(f"{_where(path, text, 'holder')}: holder must be true or false")
    idle = data.get("holder_idle", 300)
    if isinstance(idle, bool) or not isinstance(idle, (int, float)) or not 0 < idle <= 86400:
        raise ConfigError(f"{_where(path, text, 'holder_idle')}: holder_idle must be a number "
                          f"of seconds in (0, 86400]")
    return {
        "holder": holder,
        "holder_idle": float(idle),
        "groups": {k: tuple(v) for k, v in groups.items()},
        "restart_policy": policy,
        "restart_scope": scope,
        "exclude": _str_list(data, "exclude", path, text) or (),
        "protect": _protect(data, path, text),
        "restart_on": _str_list(data, "restart_on", path, text),
        "default_target": default,
        "mass_delete_ratio": float(ratio),
        "targets": _targets(data, path, text),
    }


def load_user_targets() -> dict[str, Target]:
    """Targets registered for this user (``<config>/syncagent/targets.d/*.toml``), e.g. by
    ``syncagent sandbox up``."""
    out: dict[str, Target] = {}
    directory = user_config_dir() / "targets.d"
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.toml")):
        data, text = _read_toml(path)
        out.update(_targets(data, path, text))
    return out


def load_project(root: Path) -> Project:
    """Read ``syncagent.toml`` or ``pyproject.toml [tool.syncagent]`` under ``root``; user
    targets are included, project targets win on a name clash."""
    targets = load_user_targets()
    config = root / CONFIG_NAME
    pyproject = root / "pyproject.toml"
    if config.is_file():
        data, text = _read_toml(config)
        source = config
    elif pyproject.is_file():
        full, text = _read_toml(pyproject)
        data = full.get("tool", {}).get("syncagent")
        if data is None:
            return Project(root=root, targets=targets)
        source = pyproject
    else:
        return Project(root=root, targets=targets)
    fields = _parse_project(data, source, text)
    own = fields.pop("targets")
    targets.update(own)
    for group, members in fields["groups"].items():
        unknown = [m for m in members if m not in targets]
        if unknown:
            raise ConfigError(f"{_where(source, text, group)}: group '{group}' names unknown "
                              f"target '{unknown[0]}'")
    return Project(root=root, config_file=source, targets=targets, project_targets=tuple(own),
                   **fields)


def parse_target_spec(spec: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` -> (user, host, port); raises TargetError on anything else."""
    m = SPEC.match(spec or "")
    if not m:
        raise TargetError(f"bad TARGET '{spec}': expected a configured name or "
                          f"[user@]host[:port]")
    port = m.group("port")
    if port is not None and not 0 < int(port) < 65536:
        raise TargetError(f"bad TARGET '{spec}': port must be 1-65535")
    return m.group("user"), m.group("host").strip("[]"), int(port) if port else None


_BARE_NAME = re.compile(r"[A-Za-z0-9_-]+")  # no user@, :port or dot: maybe a target's name


def unknown_name_hint(spec: str, project: Project) -> str | None:
    """What to say when ``spec`` may be a misspelt (or removed) target name rather than a
    host: it is a bare name and there are targets; None otherwise. The project's names come
    first, then the user's (``targets.d``, e.g. a sandbox)."""
    names = list(project.targets)
    if not names or not _BARE_NAME.fullmatch(spec) or spec in names:
        return None
    own = [n for n in names if n in project.project_targets]
    users = [n for n in names if n not in project.project_targets]
    import difflib  # only for a name that is not known

    close = difflib.get_close_matches(spec, own + users, n=1)
    guess = f"did you mean '{close[0]}'? " if close else ""
    listed = [f"configured: {', '.join(own)}" if own else "",
              f"user targets: {', '.join(users)}" if users else ""]
    return (f"no target named '{spec}' in {CONFIG_NAME}; {guess}"
            + "; ".join(part for part in listed if part))


def resolve_target(
    spec: str | None,
    project: Project,
    *,
    remote_path: str | None = None,
    identity: str | None = None,
    env: Mapping[str, str] | None = None,
    check_path: bool = True,
) -> Target:
    """Turn a TARGET argument (or its absence) into a Target with its remote path decided.

    Args:
        spec: a configured target name, ``[user@]host[:port]``, or None.
        project: the loaded project configuration.
        remote_path: ``--remote-path``; wins over everything.
        identity: ``--identity``; wins over the configured key.
        env: the environment for the REMOTE_HOST/USER/PORT/PATH fallbacks.
        check_path: refuse a remote path that cannot be a project root (off for ``trust``,
            which never touches it).

    Raises:
        TargetError: no target, or a bad spec. SafetyError: the remote path is a home, ``/``
            or a system directory (see :func:`remote_path_problem`).
    """
    env = os.environ if env is None else env
    if spec is None:
        spec = project.default_target
    if spec is None and len(project.project_targets) == 1 and not env.get("REMOTE_HOST"):
        spec = project.project_targets[0]
    if spec is None:
        host = env.get("REMOTE_HOST")
        if not host:
            raise TargetError("no TARGET given: name one, configure [targets] in "
                              "syncagent.toml, or set REMOTE_HOST")
        port = env.get("REMOTE_PORT")
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            raise TargetError(f"REMOTE_PORT={port!r} is not a port number")
        target = Target(name=host, host=host, user=env.get("REMOTE_USER") or None,
                        port=int(port) if port else None)
    elif spec in project.targets:
        target = project.targets[spec]
    else:
        user, host, port = parse_target_spec(spec)
        target = Target(name=spec, host=host, user=user or env.get("REMOTE_USER") or None,
                        port=port, name_hint=unknown_name_hint(spec, project))
    chosen = (remote_path or target.remote_path or env.get("REMOTE_PATH")
              or f"{target.remote_root.rstrip('/')}/{project.root.name}")
    problem = remote_path_problem(chosen, target.remote_root) if check_path else None
    if problem:
        raise SafetyError(f"refusing remote path '{chosen}' for {target.name}: {problem}",
                          hint="a push deletes whatever else is there; name the project's own "
                               f"directory, e.g. ~/{project.root.name or 'project'}")
    if not chosen.startswith(("/", "~")):  # sshd starts in the home: say so, so that a
        chosen = f"~/{chosen}"  # remote whose HOME is not the login directory agrees
    return replace(target, remote_path=chosen, identity=identity or target.identity)


def _depth(relative: str) -> int | None:
    """How many directories below its start ``relative`` ends; None if it climbs above it."""
    depth = 0
    for part in relative.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return None
        elif part not in ("", "."):
            depth += 1
    return depth


def remote_path_problem(path: str, home: str = "~") -> str | None:
    """Why ``path`` cannot be a remote project root, or None. No I/O.

    Args:
        path: the remote path as given (``~/x``, ``/srv/x``; relative means below the home).
        home: the target's stand-in home as well (the sandbox's ``<dir>/remote``).
    """
    if not path.strip():
        return "it is empty"
    if path.startswith("~"):
        head, _, rest = path.partition("/")
        depth = _depth(rest)
        if depth is None:
            return f"it climbs out of the remote home ({head})"
        return f"it is the remote home directory ({head})" if depth == 0 else None
    if not path.startswith("/"):
        return remote_path_problem("~/" + path, home)
    norm = posixpath.normpath("/" + path.lstrip("/"))
    if norm in SYSTEM_DIRS or _HOME_DIR.fullmatch(norm):
        return f"{norm} is a system or home directory"
    if home.startswith("/") and norm == posixpath.normpath(home):
        return "it is the remote home directory"
    return None


def expand_specs(project: Project, specs: tuple[str, ...], all_: bool) -> list[str | None]:
    """TARGET arguments -> target specs: group names expand to their members, ``--all`` to
    every target of the project (else every known one); no argument -> [None] (the default)."""
    if all_:
        names = list(project.project_targets or project.targets)
        if not names:
            raise ConfigError("--all: no targets configured")
        return names
    out: list[str | None] = []
    for spec in specs:
        for name in project.groups.get(spec, (spec,)):
            if name not in out:
                out.append(name)
    return out or [None]


def write_user_target(target: Target) -> Path:
    """Register a target for this user (used by the sandbox); returns the file written."""
    directory = user_config_dir() / "targets.d"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{target.name}.toml"
    lines = [f"# written by syncagent; remove with `syncagent sandbox down --name {target.name}`",
             f'[targets."{target.name}"]']
    for key in ("host", "user", "port", "remote_path", "identity", "ssh_config", "remote_root",
                "python", "restart_mode"):
        value = getattr(target, key)
        if value is None:
            continue
        lines.append(f"{key} = {value}" if isinstance(value, int)
                     else f"{key} = {_toml_str(value)}")
    directory.chmod(0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # whatever the umask
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def remove_user_target(name: str) -> bool:
    path = user_config_dir() / "targets.d" / f"{name}.toml"
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


INIT_TEMPLATE = '''\
# syncagent configuration. Docs: README.md. Paths use gitignore syntax.
# Every commented setting below works as it is once uncommented (with its [table] line).

# Extra patterns, after the built-in excludes (venv/, .venv/, .git/, __pycache__/, .env,
# .env.* except *.example, instance/, data/, logs/, tmp/, uploads/, node_modules/, *.log,
# editor temp files, ...) and the tree's .gitignore files. "!pattern" re-includes.
# Excluded paths are also left alone on the remote: never overwritten or deleted.
exclude = [
    # "media/",
    # "!data/fixtures/",
]

# Protected on the remote: the agent there refuses to write, delete or chmod them, whatever
# is sent, and no exclude or .gitignore line un-protects them. Built in: .env, .env.* except
# *.example, venv/, .venv/, instance/. These patterns add to them.
# protect = ["secrets/", "*.pem"]

# Changes matching these restart the worker (the default list); anything else only syncs.
# restart_on = ["*.py", "requirements*.txt", "*.toml", "*.cfg", "*.ini", "*.yaml", "*.yml"]
# A Python file restarts it only when the live worker has imported it (a web-only edit just
# syncs); "any" restarts for every change matching restart_on (--restart-on-any-change).
# restart_scope = "imports"

# A push that would delete more than this share of the remote files (and more than 20)
# stops unless --allow-mass-delete is given.
# mass_delete_ratio = 0.5

# default_target = "gpu"

# Several targets at once: restart one at a time (the fleet never loses all capacity), or
# all at once with "parallel".
# restart_policy = "rolling"

# The first push, status, restart or logs for a target leaves a holder process behind (the
# SSH connection and the agent) so that later commands skip the handshake; it exits after
# holder_idle seconds without a command. Off: holder = false, --no-holder, SYNCAGENT_HOLDER=0.
# holder = true
# holder_idle = 300

# Name targets together, then push and watch them all at once: `syncagent watch gpus`.
# [groups]
# gpus = ["gpu", "gpu2"]

# [targets.gpu]
# host = "192.168.1.119"        # or an alias from ~/.ssh/config
# user = "winter"
# port = 2222
# remote_path = "~/ClippyFront"
# identity = "~/.ssh/id_ed25519"
# restart_mode = "blue-green"   # or "drain" (one GPU user at a time) or "requeue"

# [targets.gpu2]
# host = "192.168.1.120"
'''
