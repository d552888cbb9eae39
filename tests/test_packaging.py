"""`pip install .` gives a working install: the wheel holds both packages and the agent, and
not the `supervisor/` data folder (which would shadow the supervisord library)."""

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
                   "worker/supervisor_conf.py"):
        assert needed in names
    assert not any(n.startswith("supervisor/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "syncagent = syncagent.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_supervisor_is_the_library():
    assert "site-packages" in supervisor.__file__
