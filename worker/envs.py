"""One Python environment per requirements content, built beside the live one.

A worker slot's launcher starts in the base venv (the one supervisord runs from, holding the
worker runtime: celery, python-dotenv, supervisor). When the project has requirements, the slot
enters ``<root>/.syncagent/envs/<key>``, where ``key`` hashes the requirement files and the base
interpreter: the env is built once, then the launcher re-execs into its python. So:

* a requirements change builds a NEW env; the slot still serving keeps the env its process
  runs from, untouched, until it has drained (nothing is ever installed into a live env);
* builds are serialised per project by an exclusive ``flock`` on ``<root>/.syncagent/envs/.lock``
  (a looping slot, a new slot and ``syncagent provision`` never run an installer at once);
* an env is used only once its ready file exists (written last), so a build cut short is
  rebuilt, never entered;
* envs that are neither the current one nor run by a live process are pruned.

Why re-exec and not a stable ``current`` symlink in supervisord's command: a process started
through a symlink keeps resolving its imports through it, so flipping the link would change
the code under the slot that is still draining. A concrete path per env cannot move.

An env layers over the base venv (a ``.pth`` file adds the base's site-packages after its own):
the runtime is shared, and the project's pins win. ``uv`` builds it when present (in the base
venv's ``bin`` or on ``PATH``; see the README's figures), pip otherwise.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from worker.ready import ensure_state_dir, state_dir

__all__ = ["EnvResult", "env_key", "envs_dir", "ensure_env", "find_uv", "has_requirements",
           "install_lock", "live_envs", "prune", "ready_env", "requirements_files",
           "requirements_hash", "unsatisfiable", "TAIL_LINES"]

ENVS_DIR = "envs"
READY_FILE = ".syncagent-env-ready"
LOCK_FILE = ".lock"
BASE_PTH = "_syncagent_base.pth"
TAIL_LINES = 15

Line = Callable[[str], None]


@dataclass(frozen=True)
class EnvResult:
    """Outcome of :func:`ensure_env`.

    Attributes:
        action: ``none`` (no requirements: the base venv serves), ``ready`` (built before),
            ``built`` or ``failed``.
        path: the env's directory (None for ``none``).
        installer: ``uv`` or ``pip`` (what built it; empty for ``none``).
        seconds: build time (0 when nothing was built).
        tail: the installer's last output lines (for a failure: what to show).
        pruned: envs removed after the build.
        reason: for a failure the installer explained (uv found the requirements cannot be
            satisfied): that explanation, on one line; else empty.
    """

    action: str
    path: str | None = None
    installer: str = ""
    seconds: float = 0.0
    tail: tuple[str, ...] = ()
    pruned: tuple[str, ...] = field(default=())
    reason: str = ""

    @property
    def python(self) -> str | None:
        return f"{self.path}/bin/python" if self.path else None

    def to_json(self) -> dict:
        return {**self.__dict__, "python": self.python}


def requirements_files(root: str | os.PathLike[str]) -> list[Path]:
    """Return the sorted ``requirements*.txt`` files directly in ``root``."""
    return sorted(p for p in Path(root).glob("requirements*.txt") if p.is_file())


def requirements_hash(root: str | os.PathLike[str]) -> str | None:
    """sha256 over the sorted requirement files (name and content); None when there are none."""
    files = requirements_files(root)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def has_requirements(files: Sequence[Path]) -> bool:
    """True when some file has a line that is neither blank nor a comment."""
    for path in files:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                return True
    return False


def env_key(requirements_digest: str, base_python: str = sys.executable) -> str:
    """The env's name: the requirements' hash and the base interpreter it layers over."""
    h = hashlib.sha256(requirements_digest.encode())
    h.update(f"\0{os.path.abspath(base_python)}\0{sys.version_info[:2]}".encode())
    return h.hexdigest()[:16]


def envs_dir(root: str | os.PathLike[str]) -> Path:
    """``<root>/.syncagent/envs``."""
    return state_dir(root) / ENVS_DIR


@contextmanager
def install_lock(root: str | os.PathLike[str], on_wait: Line | None = None) -> Iterator[None]:
    """Hold the project's exclusive install lock (flock; released when the process dies)."""
    ensure_state_dir(root)
    directory = envs_dir(root)
    directory.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait("waiting for another install in this project to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def find_uv(base_python: str = sys.executable) -> str | None:
    """``uv`` beside the base python, else on PATH, else None."""
    beside = Path(base_python).parent / "uv"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("uv")


def _ready(path: Path) -> bool:
    return (path / READY_FILE).is_file()


def _site_packages(base_python: str) -> str:
    """The base venv's site-packages (asked of that interpreter: it may not be ours)."""
    if os.path.abspath(base_python) == os.path.abspath(sys.executable):
        return sysconfig.get_paths()["purelib"]
    return subprocess.run([base_python, "-c", "import sysconfig; "
                           "print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()


# quiet, plain output; uv trusts the system's CA certificates as pip does (a TLS-inspecting
# proxy's CA is installed there, not in uv's bundled roots)
_INSTALLER_ENV = {"PIP_PROGRESS_BAR": "off", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                  "NO_COLOR": "1", "UV_NATIVE_TLS": "1", "UV_SYSTEM_CERTS": "1"}


def _stream(argv: list[str], cwd: Path, on_line: Line | None) -> tuple[int, list[str]]:
    """Run ``argv``, passing each output line on as it comes; returns (code, all lines)."""
    lines: list[str] = []
    try:
        proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace",
                                env={**os.environ, **_INSTALLER_ENV})
    except OSError as e:  # e.g. a uv built for another machine: a failure like any other
        return 127, [f"cannot run {argv[0]}: {e.strerror or e}"]
    with proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if line.strip():
                lines.append(line)
                if on_line:
                    on_line(line)
    return proc.returncode, lines


def _build(root: Path, path: Path, files: Sequence[Path], base_python: str,
           uv: str | None, on_line: Line | None) -> tuple[bool, list[str]]:
    shutil.rmtree(path, ignore_errors=True)  # a build cut short: never entered, rebuilt
    code, lines = _stream([base_python, "-m", "venv", "--without-pip", str(path)], root, None)
    if code != 0:
        return False, lines or [f"python -m venv exited {code}"]
    env_python = path / "bin" / "python"
    purelib = subprocess.run([str(env_python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # addsitedir, not a bare path: the base's own .pth files (editable installs, a venv layered
    # over another) must count in the env as they do in the base
    Path(purelib, BASE_PTH).write_text(
        f"import site; site.addsitedir({_site_packages(base_python)!r})\n", encoding="utf-8")
    requirement_args = [arg for f in files for arg in ("-r", str(f))]
    if uv:
        argv = [uv, "pip", "install", "--python", str(env_python), *requirement_args]
    else:  # the base's pip, seen through the .pth, installs into the env's prefix
        argv = [str(env_python), "-m", "pip", "install", *requirement_args]
    code, lines = _stream(argv, root, on_line)
    return code == 0, lines


_NO_SOLUTION = "No solution found when resolving dependencies"
# uv reads neither pip.conf nor PIP_* settings: a package missing altogether from what uv sees
# may be on the index pip is configured for, so that one is not taken as the requirements' fault
_MISSING_PACKAGE = ("not found in the package registry", "not found in the provided package")


def unsatisfiable(lines: Sequence[str]) -> str | None:
    """uv's explanation, on one line, when its output says it resolved the requirements and
    they cannot be satisfied (pip, retried, would only fail later and less clearly); None for
    any other outcome (uv cannot run, network, a build failed, a package it cannot see).

    uv writes ``error: No solution ...`` then ``cause: Because ...`` to a pipe (older
    versions: ``× No solution ...:`` then ``╰─▶ Because ...``), continued on indented lines.
    """
    start = next((i for i, line in enumerate(lines) if _NO_SOLUTION in line), None)
    if start is None:
        return None
    because = []
    for line in lines[start + 1:]:
        text = line.strip().lstrip("╰─▶│").strip()
        if text.startswith("cause:"):
            text = text[len("cause:"):].strip()
        if not text or text.startswith(("hint:", "help:", "error:")) or not line[:1].isspace():
            break
        because.append(text)
    reason = " ".join(because)
    if not reason or any(marker in reason for marker in _MISSING_PACKAGE):
        return None
    return reason


def live_envs(root: str | os.PathLike[str]) -> set[str]:
    """Envs of this project that a running process was started from (``/proc``)."""
    prefix = str(envs_dir(root).resolve()) + "/"
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv0 = cmdline.read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
        if argv0.startswith(prefix):
            found.add(argv0[len(prefix):].split("/", 1)[0])
    return found


def prune(root: str | os.PathLike[str], keep: Sequence[str] = ()) -> list[str]:
    """Remove envs that are neither in ``keep`` nor run by a live process. Call under the lock.

    Returns:
        The names removed.
    """
    directory = envs_dir(root)
    if not directory.is_dir():
        return []
    wanted = set(keep) | live_envs(root)
    removed = []
    for path in sorted(directory.iterdir()):
        if path.is_dir() and path.name not in wanted:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def ready_env(root: str | os.PathLike[str], base_python: str = sys.executable) -> Path | None:
    """The built env for the current requirements over ``base_python``, else None (none
    needed, not built yet, or this process already runs in it)."""
    files = requirements_files(root)
    digest = requirements_hash(root)
    if digest is None or not has_requirements(files):
        return None
    path = envs_dir(root).resolve() / env_key(digest, base_python)
    return path if _ready(path) else None


def ensure_env(root: str | os.PathLike[str], base_python: str = sys.executable,
               on_line: Line | None = None, use_uv: bool = True) -> EnvResult:
    """Make sure the env for the current requirements exists; build it (serialised) if not.

    Args:
        root: project root.
        base_python: the base venv's python (the env layers over it).
        on_line: called with each installer output line, as it comes.
        use_uv: False forces pip (benchmarks, tests).

    Returns:
        An :class:`EnvResult`; ``failed`` carries the installer's last lines.
    """
    root_path = Path(root).resolve()
    files = requirements_files(root_path)
    digest = requirements_hash(root_path)
    if digest is None or not has_requirements(files):
        return EnvResult("none")
    name = env_key(digest, base_python)
    path = envs_dir(root_path) / name
    with install_lock(root_path, on_line):
        if _ready(path):
            installer = json.loads((path / READY_FILE).read_text()).get("installer", "")
            pruned = prune(root_path, keep=[name])
            return EnvResult("ready", str(path), installer, pruned=tuple(pruned))
        uv = find_uv(base_python) if use_uv else None
        started = time.monotonic()
        ok, lines = _build(root_path, path, files, base_python, uv, on_line)
        reason = unsatisfiable(lines) if not ok and uv else None
        # pip is the fallback, unless uv said the requirements themselves conflict: pip would
        # backtrack through old releases and fail later, on something unrelated
        if not ok and uv and reason is None:
            if on_line:
                on_line(f"uv failed, building with pip instead: "
                        f"{lines[-1].strip() if lines else '?'}")
            uv = None
            ok, lines = _build(root_path, path, files, base_python, None, on_line)
        seconds = round(time.monotonic() - started, 2)
        installer = "uv" if uv else "pip"
        if not ok:
            shutil.rmtree(path, ignore_errors=True)
            return EnvResult("failed", str(path), installer, seconds, tuple(lines[-TAIL_LINES:]),
                             reason=reason or "")
        (path / READY_FILE).write_text(json.dumps({"installer": installer, "seconds": seconds,
                                                   "requirements": digest,
                                                   "time": time.time()}) + "\n")
        pruned = prune(root_path, keep=[name])
        return EnvResult("built", str(path), installer, seconds, tuple(lines[-TAIL_LINES:]),
                         tuple(pruned))
