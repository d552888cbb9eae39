"""A plain install works: the wheel, installed into a fresh venv WITHOUT the test extras, runs
`syncagent sandbox up`, a `push` and a task through the demo worker, then `sandbox down`.

Everything runs from that venv: the CLI, the demo worker (the sandbox provisions it in the
venv the CLI runs in) and the Celery client, so an import that only the test extras happen to
satisfy (kombu's Redis transport needs `packaging`) fails here. pip's cache is the user's, so a
rerun downloads nothing.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

import pytest

from syncagent import sandbox
from tests.helpers.procs import pid_running

REPO = Path(__file__).resolve().parents[1]
NAME = "whl"


def pip_env() -> dict[str, str]:
    """The environment, with pip's cache in the user's real home (HOME is a temp dir here)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("PIP_CACHE_DIR",
                   str(Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "pip"))
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel and its declared dependencies, nothing else."""
    work = tmp_path_factory.mktemp("wheel")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(work), str(REPO)], check=True, capture_output=True)
    (wheel,) = work.glob("syncagent-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # pip too, as in a user's venv (the worker's requirements step runs it); installing it from
    # the cache beats ensurepip, and skipping the .pyc compilation saves seconds more.
    for args in (["install", "-q", "--no-compile", str(wheel), "pip"], ["check"]):
        proc = subprocess.run([sys.executable, "-m", "pip", "--python", python, *args],
                              env=pip_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"wheel built and installed in {time.monotonic() - started:.1f} s")
    return venv


def run(venv: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], cwd=cwd, env=pip_env(),
                          capture_output=True, text=True, timeout=180)


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c",
                           "user.email=t@example.invalid", *args], check=True,
                          capture_output=True, text=True).stdout


def test_plain_install_runs_sandbox_push_and_a_task(venv, tmp_path_factory):
    work = tmp_path_factory.mktemp("w")  # a short path: supervisord's socket path must fit
    no_extras = run(venv, "python", "-c", "import importlib.util as u; "
                    "print(u.find_spec('pytest'), u.find_spec('hypothesis'))", cwd=work)
    assert no_extras.stdout.split() == ["None", "None"]
    directory = work / "box"
    started = time.monotonic()
    try:
        up = run(venv, "syncagent", "sandbox", "up", "--name", NAME, "--dir", str(directory),
                 "--timeout", "60", "--json", cwd=work)
        assert up.returncode == 0, up.stdout + up.stderr
        box = json.loads(up.stdout)
        assert box["supervisorctl"].startswith(f"{venv}/bin/supervisorctl ")  # worker: the venv's
        project = Path(box["project"])
        assert (project / "app" / "tasks" / "demo.py").is_file()  # copied from the wheel

        git(project, "init", "-q", "-b", "main")
        git(project, "add", "-A")
        git(project, "commit", "-q", "-m", "demo")
        (project / "app" / "version.py").write_text('VERSION = "v-wheel"\n')
        push = run(venv, "syncagent", "push", NAME, "--path", str(project), cwd=work)
        assert push.returncode == 0, push.stdout + push.stderr
        assert "live" in push.stdout
        assert git(project, "status", "--porcelain") == " M app/version.py\n"

        task = run(venv, "python", "-c", (
            "import sys; from syncagent import sandbox\n"
            f"box = sandbox.status({NAME!r}, {str(directory)!r})\n"
            "with sandbox.demo_client(box) as c:\n"
            "    print(c.send_task('app.tasks.demo.version').get(timeout=30))"), cwd=work)
        assert task.returncode == 0, task.stderr
        assert task.stdout.strip() == "v-wheel"
        processes = sandbox.started_through(directory)
        assert processes

        down = run(venv, "syncagent", "sandbox", "down", "--name", NAME, "--dir",
                   str(directory), cwd=work)
        assert down.returncode == 0, down.stderr
        assert not [p for p in processes if pid_running(p)]
        assert run(venv, "syncagent", "sandbox", "status", "--name", NAME, "--dir",
                   str(directory), cwd=work).returncode == 1
        print(f"sandbox up + push + task + down from the wheel: "
              f"{time.monotonic() - started:.1f} s")
    finally:
        sandbox.down(NAME, directory)
