"""Start-up cost: a command imports only what it uses.

Every command pays the interpreter's start and its imports before it looks at a file; paramiko
alone (with invoke, which paramiko's config loads) is about 0.1 s. These tests run the real
console entry point in a fresh interpreter and look at ``sys.modules`` afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("paramiko", "invoke", "cryptography", "rich", "watchdog", "celery", "pathspec")

PROBE = """
import json, sys
from syncagent.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
sys.stderr.write("\\nLOADED " + json.dumps(loaded) + "\\n")
""" % (HEAVY,)


def loaded_after(*argv: str, cwd=None) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                         timeout=60, cwd=cwd)
    line = [ln for ln in out.stderr.splitlines() if ln.startswith("LOADED ")]
    assert line, out.stderr
    return json.loads(line[-1][len("LOADED "):])


@pytest.mark.parametrize("argv", [("--version",), ("--help",), ("push", "--help"),
                                  ("watch", "--help"), ("sandbox", "--help")],
                         ids=["version", "help", "push-help", "watch-help", "sandbox-help"])
def test_version_and_help_import_nothing_heavy(argv):
    assert loaded_after(*argv) == []


def test_init_imports_nothing_heavy(tmp_path):
    assert loaded_after("init", "--path", str(tmp_path)) == []
    assert (tmp_path / "syncagent.toml").exists()


@pytest.mark.parametrize("program", [
    ["-m", "syncagent.cli"],  # click's version option
    ["-c", "import sys; from syncagent.entry import main; sys.exit(main())"],  # the console
])                                                       # script's, which skips click
def test_version_matches_the_package_metadata(program):
    from importlib.metadata import version

    out = subprocess.run([sys.executable, *program, "--version"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout == f"syncagent, version {version('syncagent')}\n"
