"""`pip install .` gives a working install: the wheel holds both packages, the agent and the
demo app the sandbox provisions, declares the Redis transport's dependencies (celery[redis]),
and leaves out the `supervisor/` data folder (which would shadow the supervisord library).
tests/test_wheel.py installs it into a fresh venv and runs it."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import supervisor


def test_wheel_contents(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), "."], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("syncagent-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("syncagent/agent.py", "syncagent/cli.py", "worker/__main__.py",
                   "worker/supervisor_conf.py", "syncagent/demo_app/requirements.txt",
                   "syncagent/demo_app/.env.worker.example",
                   "syncagent/demo_app/app/tasks/celery_app.py",
                   "syncagent/demo_app/app/tasks/demo.py", "syncagent/demo_app/app/version.py"):
        assert needed in names
    assert not any("__pycache__" in n for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [line for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    assert any(r.startswith("Requires-Dist: celery[redis]") for r in requires), requires
    assert not any(n.startswith("supervisor/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "syncagent = syncagent.entry:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_supervisor_is_the_library():
    assert "site-packages" in supervisor.__file__
