"""Idempotent set-up of a remote worker over the target's SSH connection.

Steps, each one only when something differs: push the project (no restart), create the venv
(or reuse ``--venv``), ship the ``worker`` runtime to ``<root>/.syncagent/runtime/worker``,
install its Python dependencies and the project's requirements, create ``.env.worker`` from
``--env`` pairs (never overwritten; the content travels on stdin, never on a command line),
then ``python -m worker configure`` writes the supervisord configs, starts or reloads
supervisord and waits until the readiness marker carries the pushed revision.

The remote needs only sshd and python3. No secret is ever printed: remote output shown to the
user goes through :func:`redact`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import worker
from worker import secret_rules
from worker.env import value_problems
from worker.supervisor_conf import path_problem, socket_problem

from .config import Project, Target
from .errors import ConfigError, OperationalError, WorkerStartError
from .push import PushOptions, PushResult, push
from .session import Session

__all__ = ["ProvisionOptions", "ProvisionResult", "WorkerStartError", "check_before_writing",
           "parse_env_pairs", "provision", "redact", "runtime_files", "secret_values",
           "runtime_digest", "ENV_FILE", "RUNTIME_MODULES", "RUNTIME_REQUIREMENTS"]

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

_REQUIREMENTS = ("import json; from worker.launch import ensure_requirements as e; "
                 "r = e('.'); print(json.dumps([r.action, r.message]))")
_VALIDATE_ENV = ("import json; from worker import env as e; "
                 "r = e.validate(e.load_values('.')); print(json.dumps(list(r.problems)))")


@dataclass(frozen=True)
class ProvisionOptions:
    """What ``syncagent provision`` was asked for.

    Attributes:
        venv: an existing remote virtualenv to reuse (default ``<root>/venv``, created).
        env: ``.env.worker`` content as (KEY, VALUE) pairs, used only if there is no file.
        timeout: seconds to wait for the worker's readiness marker.
    """

    venv: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    trust_new_host: bool = False
    allow_mass_delete: bool = False
    timeout: float = 90.0


@dataclass
class ProvisionResult:
    target: str
    remote_root: str
    venv: str
    revision: str
    changes: list[str]
    env_file: str  # created | kept
    conf: str
    supervisorctl: str
    worker: dict = field(default_factory=dict)  # colour, pid, node, supervisord_pid
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def to_json(self) -> dict:
        return {**self.__dict__, "changed": self.changed}


def parse_env_pairs(pairs: Iterable[str],
                    environ: Mapping[str, str] | None = None) -> tuple[tuple[str, str], ...]:
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
            raise ConfigError(f"--env expects KEY=VALUE or KEY, got a malformed pair "
                              f"(key {key[:40]!r})")
        if not sep:
            if key not in environ:
                raise ConfigError(f"--env {key}: not set in the environment",
                                  hint=f"export {key}=... first, or pass {key}=VALUE")
            value = environ[key]
        if any(c in value for c in "\n\r\0") or "${" in value:
            raise ConfigError(f"--env {key}: newlines and '${{' cannot be written to "
                              f"{ENV_FILE}", hint="edit the file on the remote instead")
        out[key] = value
    return tuple(out.items())


def env_file_text(pairs: Iterable[tuple[str, str]]) -> str:
    """The ``.env.worker`` text (single-quoted values, as python-dotenv reads them)."""
    lines = ["# written by syncagent provision; edit freely, it is never overwritten"]
    for key, value in pairs:
        quoted = value.replace("\\", "\\\\").replace("'", "\\'")
        lines.append(f"{key}='{quoted}'")
    return "\n".join(lines) + "\n"


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
            stdin: bytes | None = None, timeout: float = 120.0) -> tuple[int, str, str]:
        command = " ".join(shlex.quote(a) for a in argv)
        if env:
            command = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + command
        if cwd:
            command = f"cd {shlex.quote(cwd)} && {command}"
        return self.session.run(command, stdin=stdin, timeout=timeout)

    def check(self, what: str, argv: list[str], hint: str | None = None, **kw) -> str:
        rc, out, err = self.run(argv, **kw)
        if rc != 0:
            last = (err.strip() or out.strip() or f"exit {rc}").splitlines()[-1]
            raise OperationalError(f"{self.name}: {what} failed: "
                                   f"{redact(last, self.secrets)}", hint=hint)
        return out

    def json(self, what: str, argv: list[str], **kw):
        out = self.check(what, argv, **kw)
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise OperationalError(f"{self.name}: {what}: unexpected output") from e


def provision(project: Project, target: Target,
              options: ProvisionOptions = ProvisionOptions()) -> ProvisionResult:
    """Set up (or check) the worker on ``target``; change only what differs.

    Args:
        project: the local project (pushed first; a no-op when up to date).
        target: a resolved target.
        options: venv, ``.env.worker`` pairs, timeouts, safety overrides.

    Returns:
        What changed (``changes`` empty: nothing did) and where the worker runs.

    Raises:
        ConfigError: ``--venv`` has no bin/python; ``.env.worker`` is invalid.
        OperationalError: no ``.env.worker`` and no ``--env`` (with the next step), a remote
            step failed, or the worker did not become ready (:class:`WorkerStartError`).
        SafetyError: from the push (host key, mass delete, path escape).
    """
    check_before_writing(target, options)
    pushed: PushResult = push(project, target, PushOptions(
        restart=False, trust_new_host=options.trust_new_host,
        allow_mass_delete=options.allow_mass_delete))
    root, revision = pushed.remote_root, pushed.revision
    changes: list[str] = []
    warnings = list(pushed.warnings)
    if pushed.changed:
        changes.append(f"pushed revision {revision[:7]} ({pushed.files_sent} files)")
    secrets = secret_values(options.env)
    with Session.open(target, trust_new=options.trust_new_host) as session:
        remote = _Remote(session, secrets)
        py = target.python
        state = remote.json("inspecting the remote", [py, "-c", _PROBE, root, options.venv or ""])
        venv = state["venv"]
        vpy = f"{venv}/bin/python"
        if not state["python"]:
            if options.venv:
                raise ConfigError(f"{target.name}: --venv {options.venv}: no {vpy}",
                                  hint="create it, or leave --venv out to get <root>/venv")
            remote.check("creating the venv", [py, "-m", "venv", venv], timeout=300,
                         hint="install python3-venv on the remote")
            changes.append(f"created venv {venv}")
        runtime = f"{root}/.syncagent/runtime"
        reload_code = False  # new runtime code or packages: a running worker must restart
        files = runtime_files()
        digest = runtime_digest(files)
        if state["digest"] != digest:
            remote.check("installing the worker runtime", [py, "-c", _SHIP_RUNTIME, runtime,
                                                           digest],
                         stdin=json.dumps(files).encode())
            changes.append(f"installed the worker runtime in {runtime}")
            reload_code = True
        rc, _, _ = remote.run([vpy, "-c", f"import {', '.join(RUNTIME_MODULES)}"])
        if rc != 0:
            remote.check("installing the worker's dependencies",
                         [vpy, "-m", "pip", "install", "--disable-pip-version-check", "-q",
                          *RUNTIME_REQUIREMENTS], timeout=900)
            changes.append("installed the worker's dependencies")
            reload_code = True
        pyenv = {"PYTHONPATH": runtime}
        action, message = remote.json("installing the project's requirements",
                                      [vpy, "-c", _REQUIREMENTS], cwd=root, env=pyenv,
                                      timeout=1800)
        if action == "failed":
            raise OperationalError(f"{target.name}: installing requirements failed: "
                                   f"{redact(message, secrets)}")
        if action == "installed":
            changes.append("installed the project's requirements")
            reload_code = True
        env_file = f"{root}/{ENV_FILE}"
        if state["env"]:
            env_status = "kept"
            if options.env:
                warnings.append(f"{env_file} exists and was not overwritten; --env ignored")
        elif options.env:
            script = (f"umask 077; f={shlex.quote(env_file)}; "
                      'if [ -e "$f" ]; then echo kept; else set -C; cat > "$f" && echo created; fi')
            out = remote.check(f"writing {ENV_FILE}", ["sh", "-c", script],
                               stdin=env_file_text(options.env).encode())
            env_status = out.strip() or "created"
            if env_status == "created":
                changes.append(f"created {env_file} (mode 0600)")
        else:
            step = (f"cp {shlex.quote(root)}/{ENV_FILE}.example {shlex.quote(env_file)}, "
                    "edit it (chmod 600), then run provision again"
                    if state["example"] else f"create {env_file} (chmod 600) on the remote")
            raise OperationalError(f"{target.name}: no {env_file}: the worker cannot start",
                                   hint=f"{step}; or pass --env KEY=VALUE for each setting")
        problems = remote.json(f"checking {ENV_FILE}", [vpy, "-c", _VALIDATE_ENV], cwd=root,
                               env=pyenv)
        if problems:
            raise ConfigError(f"{target.name}: invalid {env_file}: " + "; ".join(problems),
                              hint="fix it on the remote (it is never overwritten), then "
                                   "run provision again")
        rc, out, err = remote.run(
            [vpy, "-m", "worker", "configure", "--venv", venv, "--pythonpath", runtime,
             "--revision", revision, "--timeout", f"{options.timeout:g}",
             *(["--restart"] if reload_code else [])],
            cwd=root, env=pyenv, timeout=options.timeout + 60)
        try:
            result = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            last = redact((err.strip() or f"exit {rc}").splitlines()[-1], secrets)
            raise OperationalError(f"{target.name}: configuring supervisord failed: {last}")
        changes += result.get("actions", [])
        if not result.get("ok"):
            colour = result.get("colour", "blue")
            raise WorkerStartError(f"{target.name}: "
                                   f"{redact(result.get('error', 'worker failed'), secrets)}",
                                   [redact(line, secrets) for line in result.get("log_tail", [])],
                                   f"{root}/.syncagent/logs/worker-{colour}.log")
    return ProvisionResult(
        target=target.name, remote_root=root, venv=venv, revision=revision, changes=changes,
        env_file=env_status, conf=result["conf"], supervisorctl=result["supervisorctl"],
        worker={k: result.get(k) for k in ("colour", "pid", "node", "supervisord_pid")},
        warnings=warnings)
