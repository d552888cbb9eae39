"""worker.envs with real uv and pip over a local, offline wheel directory: a requirements
conflict uv reports is the final error (no pip fallback); other uv failures fall back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.wheels import offline_index_env, write_wheel
from worker import envs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def uv_bin(tmp_path_factory) -> Path:
    """A real uv, installed apart from the test venv (whose envs must keep building with
    pip); its directory goes on PATH, where worker.envs looks."""
    target = tmp_path_factory.mktemp("uv")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target), "uv"],
                   check=True, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    return target / "bin"


@pytest.fixture
def wheels(tmp_path) -> Path:
    """sa-top 1.0 requires sa-dep==2.0; sa-dep 1.0 and 2.0 exist."""
    directory = tmp_path / "wheels"
    write_wheel(directory, "sa-top", "1.0", ["sa-dep==2.0"])
    write_wheel(directory, "sa-dep", "1.0")
    write_wheel(directory, "sa-dep", "2.0")
    return directory


def _offline(monkeypatch, uv_bin: Path, uv_sees: Path, pip_sees: Path) -> None:
    for key, value in offline_index_env(pip_sees).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("UV_FIND_LINKS", str(uv_sees))
    monkeypatch.setenv("PATH", f"{uv_bin}{os.pathsep}{os.environ['PATH']}")


def test_a_conflict_uv_reports_is_the_error_and_pip_is_not_tried(
        tmp_path, monkeypatch, uv_bin, wheels) -> None:
    _offline(monkeypatch, uv_bin, wheels, wheels)
    project = tmp_path / "project"
    project.mkdir()
    (project / "requirements.txt").write_text("sa-top==1.0\nsa-dep==1.0\n")
    lines: list[str] = []
    result = envs.ensure_env(project, on_line=lines.append)
    assert result.action == "failed" and result.installer == "uv", result
    assert "sa-top==1.0" in result.reason and "sa-dep==1.0" in result.reason, result.reason
    assert result.reason.endswith("your requirements are unsatisfiable."), result.reason
    assert "\n" not in result.reason
    assert not any("pip" in line for line in lines), lines
    assert not Path(result.path).exists()


def test_worker_requirements_prints_the_conflict_in_its_json(
        tmp_path, monkeypatch, uv_bin, wheels) -> None:
    _offline(monkeypatch, uv_bin, wheels, wheels)
    (tmp_path / "requirements.txt").write_text("sa-top==1.0\nsa-dep==1.0\n")
    proc = subprocess.run([sys.executable, "-m", "worker", "requirements"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=60)
    result = json.loads(proc.stdout)
    assert proc.returncode == 1 and result["installer"] == "uv", proc.stderr
    assert "you require sa-dep==1.0" in result["reason"], result


def test_a_package_uv_cannot_see_falls_back_to_pip(tmp_path, monkeypatch, uv_bin,
                                                   wheels) -> None:
    """uv reads neither pip.conf nor PIP_*: what only pip's index has is not a conflict."""
    empty = tmp_path / "empty"
    empty.mkdir()
    _offline(monkeypatch, uv_bin, empty, wheels)
    project = tmp_path / "project"
    project.mkdir()
    (project / "requirements.txt").write_text("sa-top==1.0\n")
    lines: list[str] = []
    result = envs.ensure_env(project, on_line=lines.append)
    assert result.action == "built" and result.installer == "pip", (result, lines)
    assert any(line.startswith("uv failed, building with pip instead") for line in lines)


def test_uv_that_cannot_run_falls_back_to_pip(tmp_path, monkeypatch, wheels) -> None:
    broken = tmp_path / "broken-bin"
    broken.mkdir()
    (broken / "uv").write_bytes(b"\x7fELF not a real binary")  # e.g. built for another arch
    (broken / "uv").chmod(0o755)
    _offline(monkeypatch, broken, wheels, wheels)
    project = tmp_path / "project"
    project.mkdir()
    (project / "requirements.txt").write_text("sa-top==1.0\n")
    result = envs.ensure_env(project)
    assert result.action == "built" and result.installer == "pip", result
    assert result.reason == ""


@pytest.mark.parametrize("output, reason", [
    (["error: No solution found when resolving dependencies",
      "  cause: Because a==1 depends on b==2 and you require a==1, we can conclude that you "
      "require b==2.",
      "         And because you require b==1, we can conclude that your requirements are "
      "unsatisfiable."],
     "Because a==1 depends on b==2 and you require a==1, we can conclude that you require "
     "b==2. And because you require b==1, we can conclude that your requirements are "
     "unsatisfiable."),
    (["  × No solution found when resolving dependencies:",
      "  ╰─▶ Because you require kombu==5.7.0 and redis==5.0.1, we can conclude that your "
      "requirements are unsatisfiable.",
      "  hint: pre-releases ..."],
     "Because you require kombu==5.7.0 and redis==5.0.1, we can conclude that your "
     "requirements are unsatisfiable."),
    (["error: No solution found when resolving dependencies",
      "  cause: Because x was not found in the package registry and you require x, we can "
      "conclude that your requirements are unsatisfiable."], None),
    (["error: Failed to fetch: `https://pypi.org/simple/x/`"], None),
])
def test_unsatisfiable_reads_uv_output(output, reason) -> None:
    assert envs.unsatisfiable(output) == reason
