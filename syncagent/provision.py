"""Idempotent set-up of a remote worker over the target's SSH connection.

A list of named steps (:data:`STEPS`), each doing something only when it differs, each
reporting as it starts, prints output and ends (a progress callback; the CLI renders it):
push the project (no restart), create the venv (or reuse ``--venv``), ship the ``worker``
runtime to ``<root>/.syncagent/runtime/worker``, install its Python dependencies (and ``uv``),
build the env for the project's requirements (``worker/envs.py``), create ``.env.worker`` from
``--env`` or update chosen keys with ``--update-env`` (merged and validated on the remote before
anything is written; values travel on stdin, never on a command line), then
``python -m worker configure`` writes the supervisord configs and starts or reloads
supervisord, then the agent's slot controller (the one every restart uses) brings the worker up
on the pushed revision, waits for its readiness marker and parks a standby for the next restart.

The remote needs only sshd and python3. No secret is ever printed: remote output shown to the
user goes through :func:`redact`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import worker
from worker import secret_rules
from worker.env import value_problems
from worker.supervisor_conf import path_problem, socket_problem
from worker.env_file import merge_text

from .config import Project, Target
from .errors import (ConfigError, OperationalError, StepError, SyncAgentError,
                     WorkerStartError)
from .push import PushOptions, PushResult, push
from .session import Session

__all__ = ["ProvisionOptions", "ProvisionResult", "STEPS", "StepError", "StepEvent",
           "WorkerStartError", "check_before_writing", "parse_env_pairs", "provision", "redact",
           "runtime_files", "secret_values", "runtime_digest", "ENV_FILE", "RUNTIME_MODULES",
           "RUNTIME_REQUIREMENTS"]

ENV_FILE = ".env.worker"
RUNTIME_MODULES = ("celery", "redis", "dotenv", "requests", "rich", "supervisor")
RUNTIME_REQUIREMENTS = ("celery[redis]", "redis", "python-dotenv", "requests", "rich",
                        "supervisor")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_PROBE = r"""
import json, os, sys
root, venv = sys.argv[1], sys.argv[2] or os.path.join(sys.argv[1], "venv")
venv = os.path.abspath(os.path.expanduser(venv))
try:
    with open(os.path.join(root, ".syncagent", "runtime", "worker.digest")) as f:
        digest = f.read().strip()
except OSError:
    digest = None
print(json.dumps({"venv": venv, "digest": digest,
                  "python": os.access(os.path.join(venv, "bin", "python"), os.X_OK),
                  "env": os.path.lexists(os.path.join(root, ".env.worker")),
                  "example": os.path.exists(os.path.join(root, ".env.worker.example"))}))
"""

_SHIP_RUNTIME = r"""
import json, os, shutil, sys
rt, digest = sys.argv[1], sys.argv[2]
files = json.loads(sys.stdin.buffer.read().decode("utf-8"))
os.makedirs(rt, mode=0o700, exist_ok=True)
new, cur, old = (os.path.join(rt, n) for n in ("worker.new", "worker", "worker.old"))
shutil.rmtree(new, ignore_errors=True)
os.mkdir(new)
for name, text in files.items():
    if "/" in name or name.startswith("."):
        sys.exit("bad runtime file name %r" % name)
    with open(os.path.join(new, name), "w", encoding="utf-8") as f:
        f.write(text)
shutil.rmtree(old, ignore_errors=True)
if os.path.exists(cur):
    os.rename(cur, old)
os.rename(new, cur)
shutil.rmtree(old, ignore_errors=True)
with open(os.path.join(rt, "worker.digest.tmp"), "w") as f:
    f.write(digest + "\n")
os.replace(os.path.join(rt, "worker.digest.tmp"), os.path.join(rt, "worker.digest"))
"""

TAIL_LINES = 15  # output lines shown with a failed step

# pip into the venv, holding the project's install lock (worker/envs.py): never beside a
# worker slot that is building its requirements env
_LOCKED_PIP = ("import subprocess, sys; from worker.envs import install_lock\n"
               "with install_lock('.', lambda m: print(m, file=sys.stderr, flush=True)):\n"
               "    sys.exit(subprocess.call([sys.executable, '-m', 'pip', 'install', "
               "'--disable-pip-version-check', '--progress-bar', 'off', *sys.argv[1:]]))")
_VALIDATE_ENV = ("import json; from worker import env as e; "
                 "r = e.validate(e.load_values('.')); print(json.dumps(list(r.problems)))")


@dataclass(frozen=True)
class ProvisionOptions:
    """What ``syncagent provision`` was asked for.

    Attributes:
        venv: an existing remote virtualenv to reuse (default ``<root>/venv``, created).
        env: ``.env.worker`` content as (KEY, VALUE) pairs, used only if there is no file.
        update_env: (KEY, VALUE) pairs set in ``.env.worker`` (created if missing), every other
            line kept; a change restarts the worker.
        timeout: seconds to wait for the worker's readiness marker.
        boot: install the systemd unit that brings supervisord back after a reboot (else the
            last step only says whether one is enabled).
    """

    venv: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    update_env: tuple[tuple[str, str], ...] = ()
    trust_new_host: bool = False
    allow_mass_delete: bool = False
    timeout: float = 90.0
    boot: bool = False


@dataclass
class ProvisionResult:
    target: str
    remote_root: str
    venv: str
    revision: str
    changes: list[str]
    env_file: str  # created | updated | unchanged | kept
    conf: str
    supervisorctl: str
    worker: dict = field(default_factory=dict)  # colour, pid, node, supervisord_pid
    warnings: list[str] = field(default_factory=list)
    boot: dict = field(default_factory=dict)  # enabled, kind, unit, commands, reason

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def to_json(self) -> dict:
        return {**self.__dict__, "changed": self.changed}


def parse_env_pairs(pairs: Iterable[str], environ: Mapping[str, str] | None = None,
                    option: str = "--env") -> tuple[tuple[str, str], ...]:
    """``KEY=VALUE`` strings -> pairs; a bare ``KEY`` takes its value from the environment
    (as ``docker run -e KEY`` does), so a secret need not appear on a command line.
    Messages name the key, never the value.

    Raises:
        ConfigError: a pair is malformed, a bare KEY is not set, or a value cannot be written
            literally.
    """
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not _ENV_KEY.match(key):
            raise ConfigError(f"{option} expects KEY=VALUE or KEY, got a malformed pair "
                              f"(key {key[:40]!r})")
        if not sep:
            if key not in environ:
                raise ConfigError(f"{option} {key}: not set in the environment",
                                  hint=f"export {key}=... first, or pass {key}=VALUE")
            value = environ[key]
        if any(c in value for c in "\n\r\0") or "${" in value:
            raise ConfigError(f"{option} {key}: newlines and '${{' cannot be written to "
                              f"{ENV_FILE}", hint="edit the file on the remote instead")
        out[key] = value
    return tuple(out.items())


def env_file_text(pairs: Iterable[tuple[str, str]]) -> str:
    """The ``.env.worker`` text (single-quoted values, as python-dotenv reads them)."""
    return merge_text(None, pairs)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask URL passwords and the given secret values in ``text`` (the one rule set,
    :mod:`worker.secret_rules`)."""
    return secret_rules.mask(text, tuple(secrets))


def secret_values(pairs: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """The values among ``pairs`` that are secrets (:func:`worker.secret_rules.secret_values`)."""
    return secret_rules.secret_values(dict(pairs))


def check_before_writing(target: Target, options: ProvisionOptions) -> None:
    """Refuse, before anything is written, what provision could only half do.

    Raises:
        ConfigError: the remote path or ``--venv`` cannot be written into supervisord's
            config; an ``--env`` value is invalid (a short or example ``WORKER_API_KEY``, a
            malformed URL, ...).
    """
    for what, path in (("remote path", target.remote_path), ("--venv", options.venv)):
        reason = path_problem(path) if path else None
        if not reason and what == "remote path" and path and path.startswith("/"):
            reason = socket_problem(path)
        if reason:
            raise ConfigError(f"{target.name}: {what} {path!r} {reason}",
                              hint="choose a path without it")
    problems, _ = value_problems(dict(options.env))
    if problems:
        raise ConfigError(f"{target.name}: invalid --env: " + "; ".join(problems))


def runtime_files() -> dict[str, str]:
    """The ``worker`` package's modules, ``{file name: text}``, as shipped to the remote."""
    package = Path(worker.__file__).parent
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(package.glob("*.py"))}


def runtime_digest(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name, text in sorted(files.items()):
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


class _Remote:
    """Commands on one session; failures typed, with redacted messages."""

    def __init__(self, session: Session, secrets: Iterable[str]):
        self.session, self.secrets = session, tuple(secrets)
        self.name = session.target.name

    def run(self, argv: list[str], *, cwd: str | None = None, env: dict | None = None,
            stdin: bytes | None = None, timeout: float = 120.0,
            on_stderr_line: Callable[[str], None] | None = None) -> tuple[int, str, str]:
        command = " ".join(shlex.quote(a) for a in argv)
        if env:
            command = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + command
        if cwd:
            command = f"cd {shlex.quote(cwd)} && {command}"
        return self.session.run(command, stdin=stdin, timeout=timeout,
                                on_stderr_line=on_stderr_line)

    def check(self, what: str, argv: list[str], hint: str | None = None, **kw) -> str:
        rc, out, err = self.run(argv, **kw)
        if rc != 0:
            lines = (err.strip() or out.strip() or f"exit {rc}").splitlines()
            raise StepError(f"{self.name}: {what} failed: {redact(lines[-1], self.secrets)}",
                            [redact(line, self.secrets) for line in lines[-TAIL_LINES:-1]],
                            hint=hint)
        return out

    def json(self, what: str, argv: list[str], **kw):
        out = self.check(what, argv, **kw)
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise OperationalError(f"{self.name}: {what}: unexpected output") from e


# ------------------------------------------------------------------ the steps

@dataclass(frozen=True)
class StepEvent:
    """One line of provision's progress.

    Attributes:
        step: the step's name (see :data:`STEPS`).
        state: ``start``, ``line`` (output of a long step, e.g. the installer), ``done`` or
            ``failed``.
        detail: what was done (``done``), the output line (``line``) or the error (``failed``).
        seconds: the step's duration (``done`` and ``failed``).
    """

    step: str
    state: str
    detail: str = ""
    seconds: float = 0.0


Progress = Callable[[StepEvent], None]


@dataclass
class _Run:
    """What the steps share: inputs, the remote, and what has been done so far."""

    project: Project
    target: Target
    options: ProvisionOptions
    report: Progress
    secrets: tuple[str, ...]
    remote: _Remote | None = None
    root: str = ""
    revision: str = ""
    venv: str = ""
    state: dict = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    restart: bool = False  # runtime, packages or .env.worker changed: a running worker restarts
    env_status: str = "kept"
    result: dict = field(default_factory=dict)
    boot: dict = field(default_factory=dict)

    @property
    def vpy(self) -> str:
        return f"{self.venv}/bin/python"

    @property
    def runtime(self) -> str:
        return f"{self.root}/.syncagent/runtime"

    @property
    def pyenv(self) -> dict:
        return {"PYTHONPATH": self.runtime}

    def line(self, step: str, text: str) -> None:
        self.report(StepEvent(step, "line", redact(text, self.secrets)))

    def change(self, text: str) -> str:
        self.changes.append(text)
        return text


def _push(run: _Run) -> str:
    pushed: PushResult = push(run.project, run.target, PushOptions(
        restart=False, trust_new_host=run.options.trust_new_host,
        allow_mass_delete=run.options.allow_mass_delete))
    run.root, run.revision = pushed.remote_root, pushed.revision
    run.warnings += pushed.warnings
    if pushed.changed:
        return run.change(f"pushed revision {run.revision[:7]} ({pushed.files_sent} files)")
    return f"revision {run.revision[:7]} already there"


def _venv(run: _Run) -> str:
    remote, py = run.remote, run.target.python
    run.state = remote.json("inspecting the remote",
                            [py, "-c", _PROBE, run.root, run.options.venv or ""])
    run.venv = run.state["venv"]
    if run.state["python"]:
        return f"{run.venv} (kept)"
    if run.options.venv:
        raise ConfigError(f"{run.target.name}: --venv {run.options.venv}: no {run.vpy}",
                          hint="create it, or leave --venv out to get <root>/venv")
    remote.check("creating the venv", [py, "-m", "venv", run.venv], timeout=300,
                 hint="install python3-venv on the remote")
    return run.change(f"created venv {run.venv}")


def _runtime(run: _Run) -> str:
    files = runtime_files()
    digest = runtime_digest(files)
    if run.state["digest"] == digest:
        return "up to date"
    run.remote.check("installing the worker runtime",
                     [run.target.python, "-c", _SHIP_RUNTIME, run.runtime, digest],
                     stdin=json.dumps(files).encode())
    run.restart = True
    return run.change(f"installed the worker runtime in {run.runtime}")


def _dependencies(run: _Run) -> str:
    """The runtime's packages in the venv, under the project's install lock; and uv (builds
    requirement envs faster) in a venv provision made (a ``--venv`` of yours uses it if there).
    """
    rc, _, _ = run.remote.run([run.vpy, "-c", f"import {', '.join(RUNTIME_MODULES)}"])
    skip_uv = (run.options.venv is not None
               or run.remote.run(["test", "-x", f"{run.venv}/bin/uv"])[0] == 0)
    if rc == 0 and skip_uv:
        return "present"
    done = []
    if rc != 0:
        run.remote.check("installing the worker's dependencies",
                         [run.vpy, "-c", _LOCKED_PIP, *RUNTIME_REQUIREMENTS], cwd=run.root,
                         env=run.pyenv, timeout=900,
                         on_stderr_line=lambda text: run.line("dependencies", text))
        run.restart = True
        done.append(run.change("installed the worker's dependencies"))
    if not skip_uv:
        code, _, err = run.remote.run([run.vpy, "-c", _LOCKED_PIP, "uv"], cwd=run.root,
                                      env=run.pyenv, timeout=600)
        if code == 0:
            done.append(run.change("installed uv (builds requirement envs)"))
        else:
            run.warnings.append("uv could not be installed; pip builds requirement envs: "
                                + redact((err.strip() or "?").splitlines()[-1], run.secrets))
    return "; ".join(done) or "present"


def _requirements(run: _Run) -> str:
    """Build the env for the project's requirements (see worker/envs.py), streaming the
    installer's lines."""
    rc, out, err = run.remote.run([run.vpy, "-m", "worker", "requirements"], cwd=run.root,
                                  env=run.pyenv, timeout=1800,
                                  on_stderr_line=lambda text: run.line("requirements", text))
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        lines = (err.strip() or f"exit {rc}").splitlines()
        raise StepError(f"{run.target.name}: installing requirements failed: "
                        f"{redact(lines[-1], run.secrets)}",
                        [redact(line, run.secrets) for line in lines[-TAIL_LINES:-1]])
    env = os.path.basename(result.get("path") or "")
    if result["action"] == "failed":
        tail = [redact(line, run.secrets) for line in result.get("tail", [])]
        # the installer's own account of a conflict is the error; its lines stay below it
        why = redact(result.get("reason") or "", run.secrets)
        raise StepError(f"{run.target.name}: installing requirements failed "
                        f"({result['installer']}, {result['seconds']:.1f} s)"
                        + (f": the requirements conflict: {why}" if why else ""), tail,
                        hint="fix requirements*.txt locally, then run provision again (the "
                             "worker keeps its current environment)")
    if result["action"] == "none":
        return "none (the venv serves)"
    if result["action"] == "built":
        run.restart = True
        return run.change(f"built env {env} with {result['installer']} in "
                          f"{result['seconds']:.1f} s")
    return f"env {env} ready"


def _env_file(run: _Run) -> str:
    """Create (``--env``) or update (``--update-env``) .env.worker: merged, validated, then
    written 0600 on the remote, or nothing is written. Values travel on stdin."""
    env_file = f"{run.root}/{ENV_FILE}"
    options, name = run.options, run.target.name
    if options.update_env:
        mode, pairs = "update", options.update_env
    elif options.env and not run.state["env"]:
        mode, pairs = "create", options.env
    else:
        mode, pairs = "check", ()
        if options.env:
            run.warnings.append(f"{env_file} exists and was not overwritten; --env ignored "
                                "(use --update-env KEY[=VALUE] to change settings)")
    if mode == "check" and not run.state["env"]:
        step = (f"cp {shlex.quote(run.root)}/{ENV_FILE}.example {shlex.quote(env_file)}, "
                "edit it (chmod 600), then run provision again"
                if run.state["example"] else f"create {env_file} (chmod 600) on the remote")
        raise OperationalError(f"{name}: no {env_file}: the worker cannot start",
                               hint=f"{step}; or pass --env KEY=VALUE for each setting")
    if mode == "check":
        problems = run.remote.json(f"checking {ENV_FILE}", [run.vpy, "-c", _VALIDATE_ENV],
                                   cwd=run.root, env=run.pyenv)
        if problems:
            raise ConfigError(f"{name}: invalid {env_file}: " + "; ".join(problems),
                              hint="fix it with `syncagent provision --update-env KEY[=VALUE]` "
                                   "(a bare KEY takes the value from your environment)")
        return "kept"
    rc, out, err = run.remote.run([run.vpy, "-m", "worker", "write-env", mode], cwd=run.root,
                                  env=run.pyenv, stdin=json.dumps(dict(pairs)).encode())
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        last = redact((err.strip() or f"exit {rc}").splitlines()[-1], run.secrets)
        raise OperationalError(f"{name}: writing {ENV_FILE} failed: {last}")
    status = run.env_status = result["status"]
    if status == "invalid":
        raise ConfigError(f"{name}: {ENV_FILE} would be invalid, nothing written: "
                          + "; ".join(result["problems"]),
                          hint="pass the missing or corrected settings with --env (first "
                               "provision) or --update-env KEY[=VALUE]")
    if status == "created":
        run.restart = True
        return run.change(f"created {env_file} (mode 0600)")
    if status == "updated":
        run.restart = True
        return run.change(f"updated {', '.join(result['keys']) or 'formatting of'} in "
                          f"{env_file} (mode 0600)")
    return status  # kept (appeared meanwhile) or unchanged


def _supervisord(run: _Run) -> str:
    """``worker configure``: the supervisord configs, supervisord started or reloaded (its
    autostart runs the first slot). The worker itself is the next step's."""
    rc, out, err = run.remote.run(
        [run.vpy, "-m", "worker", "configure", "--venv", run.venv, "--pythonpath", run.runtime,
         "--timeout", f"{run.options.timeout:g}"],
        cwd=run.root, env=run.pyenv, timeout=run.options.timeout + 60)
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = {"ok": False, "error": (err.strip() or f"exit {rc}").splitlines()[-1]}
    if not result.get("ok"):
        lines = (err.strip() or "").splitlines()
        raise StepError(f"{run.target.name}: configuring supervisord failed: "
                        f"{redact(str(result.get('error')), run.secrets)}",
                        [redact(line, run.secrets) for line in lines[-TAIL_LINES:]])
    run.result = result
    run.changes += result["actions"]
    return ", ".join(result["actions"]) or "running, config unchanged"


def _start_change(started: dict) -> str | None:
    """What provision's start did, as a change line (None: the worker was kept)."""
    how = f"{started['colour']}, {'warm' if started.get('warm') else 'cold'}"
    if started["action"] == "restart":
        return f"restarted worker ({how}) on the new revision"
    if started["action"] == "start":
        return f"started worker ({how})"
    if started["action"] == "wait":
        return f"started worker ({started['colour']})"
    return None


def _worker(run: _Run) -> str:
    """The worker up on the pushed revision through the agent's slot controller (the one
    every restart uses: same readiness rule, same failure report), and a standby parked so
    the first restart after provision is warm."""
    restart = run.restart and not run.result.get("fresh")  # a fresh supervisord starts anew
    started = run.remote.session.start(run.root, run.revision, restart=restart,
                                       timeout=run.options.timeout)
    if not started["ok"]:
        raise WorkerStartError(f"{run.target.name}: "
                               f"{redact(started.get('failure', 'worker failed'), run.secrets)}",
                               [redact(line, run.secrets)
                                for line in started.get("log_tail", [])],
                               f"{run.root}/.syncagent/logs/worker-{started.get('colour')}.log")
    run.result.update(colour=started["colour"], pid=started["pid"], node=started["node"])
    change = _start_change(started)
    if change:
        run.change(change)
    standby = (f"; a standby parks in {started['standby']} (the next restart starts warm)"
               if started.get("standby") else "")
    return (f"{started['node']} (pid {started['pid']}) on revision {run.revision[:7]}"
            + (f"; {change}" if change else "") + standby)


def _boot(run: _Run) -> str:
    """Install the systemd unit (``--boot``), or say whether the worker comes back after a
    reboot; when it cannot install, the exact commands to run."""
    argv = [run.vpy, "-m", "worker", "boot", "--venv", run.venv,
            *([] if run.options.boot else ["--check"])]
    run.boot = run.remote.json("setting up the start at boot", argv, cwd=run.root,
                               env=run.pyenv)
    if not run.options.boot:
        if run.boot["boot"] == "enabled":
            return f"{run.boot['unit']} enabled: the worker comes back after a reboot"
        return (f"{run.boot['unit']} {run.boot['boot']}: the worker will not come back after "
                "a reboot (provision --boot)")
    if run.boot["enabled"]:
        return run.change(f"enabled {run.boot['kind']} unit {run.boot['unit']}")
    run.warnings.append(f"the worker will not come back after a reboot: {run.boot['reason']}; "
                        "run on the remote:\n    " + "\n    ".join(run.boot["commands"]))
    return f"not installed ({run.boot['reason']}); the unit is in {run.boot['unit_file']}"


STEPS: tuple[tuple[str, Callable[[_Run], str]], ...] = (
    ("push", _push),
    ("venv", _venv),
    ("runtime", _runtime),
    ("dependencies", _dependencies),
    ("requirements", _requirements),
    (".env.worker", _env_file),
    ("supervisord", _supervisord),
    ("worker ready", _worker),
    ("boot", _boot),
)
"""Provision's steps in order: each takes the shared :class:`_Run` and returns what it did."""


def _step(run: _Run, name: str, step: Callable[[_Run], str]) -> None:
    run.report(StepEvent(name, "start"))
    started = time.monotonic()
    try:
        detail = step(run)
    except BaseException as e:
        run.report(StepEvent(name, "failed", str(e) if isinstance(e, SyncAgentError)
                             else type(e).__name__, time.monotonic() - started))
        raise
    run.report(StepEvent(name, "done", detail, time.monotonic() - started))


def provision(project: Project, target: Target,
              options: ProvisionOptions = ProvisionOptions(),
              progress: Progress | None = None) -> ProvisionResult:
    """Set up (or check) the worker on ``target``, step by step (:data:`STEPS`); change only
    what differs.

    Args:
        project: the local project (pushed first; a no-op when up to date).
        target: a resolved target.
        options: venv, ``.env.worker`` settings, timeouts, safety overrides.
        progress: called as each step starts, prints a line and ends (or fails).

    Returns:
        What changed (``changes`` empty: nothing did) and where the worker runs.

    Raises:
        ConfigError: ``--venv`` has no bin/python; ``.env.worker`` is or would be invalid.
        OperationalError: no ``.env.worker`` and no ``--env`` (with the next step), a remote
            step failed (:class:`StepError`, with its last lines), or the worker did not become
            ready (:class:`WorkerStartError`).
        SafetyError: from the push (host key, mass delete, path escape).
    """
    check_before_writing(target, options)
    run = _Run(project, target, options, progress or (lambda event: None),
               secret_values(options.env + options.update_env))
    (name, push_step), *rest = STEPS
    _step(run, name, push_step)
    with Session.open(target, trust_new=options.trust_new_host) as session:
        run.remote = _Remote(session, run.secrets)
        for name, step in rest:
            _step(run, name, step)
    result = run.result
    return ProvisionResult(
        target=target.name, remote_root=run.root, venv=run.venv, revision=run.revision,
        changes=run.changes, env_file=run.env_status, conf=result["conf"],
        supervisorctl=result["supervisorctl"],
        worker={k: result.get(k) for k in ("colour", "pid", "node", "supervisord_pid")},
        warnings=run.warnings, boot=run.boot)
