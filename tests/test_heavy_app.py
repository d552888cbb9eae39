"""The heavy example (examples/heavy_app: Flask, its extensions, SQLAlchemy, structlog) provisioned
onto the sandbox with its pinned requirements, and one task through its supervised worker.

Cheap on purpose: the worker's venv is layered over the test venv (a `.pth` file), so
provision's requirements step installs only what the heavy app adds (Flask-SQLAlchemy,
Flask-Migrate, Flask-WTF, ...) into it, from the user's pip cache; the test venv is never
changed.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from celery import Celery

from syncagent import sandbox
from syncagent.cli import main
from tests.helpers.procs import redis_server
from worker import ready

REPO = Path(__file__).resolve().parents[1]
HEAVY = REPO / "examples" / "heavy_app"


def layered_venv(path: Path) -> Path:
    """A venv that sees the test venv's packages and installs into itself."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    purelib = subprocess.run([str(path / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for tool in ("supervisord", "supervisorctl"):
        (path / "bin" / tool).symlink_to(Path(sys.prefix, "bin", tool))
    cache = os.environ.get("PIP_CACHE_DIR") or str(
        Path(pwd.getpwuid(os.getuid()).pw_dir) / ".cache" / "pip")  # HOME is a temp dir here
    (path / "pip.conf").write_text(f"[global]\ncache-dir = {cache}\n"
                                   "disable-pip-version-check = true\n")
    return path


@pytest.fixture(scope="module")
def heavy(box, tmp_path_factory):
    """The heavy app provisioned on the sandbox; yields (local project, remote root, client)."""
    work = tmp_path_factory.mktemp("heavy")
    project = work / "heavy_app"
    shutil.copytree(HEAVY, project, ignore=shutil.ignore_patterns("__pycache__", "instance"))
    venv = layered_venv(work / "venv")
    remote = Path(box.remote_root) / f"heavy-{work.name}"
    with redis_server(work / "redis") as redis:
        started = time.monotonic()
        code = main(["provision", "sbx", "--path", str(project), "--remote-path", str(remote),
                     "--venv", str(venv), "--timeout", "90",
                     "--env", f"CELERY_BROKER_URL={redis.url(0)}",
                     "--env", f"CELERY_RESULT_BACKEND={redis.url(1)}",
                     "--env", "FLASK_APP_URL=http://127.0.0.1:9",
                     "--env", "WORKER_API_KEY=heavy-key-of-the-heavy-app-test",
                     "--env", "WORKER_NAME=heavy"])
        print(f"heavy app provisioned in {time.monotonic() - started:.1f} s")
        client = Celery("heavy-client", broker=redis.url(0), backend=redis.url(1),
                        set_as_current=False)
        try:
            assert code == 0
            yield project, remote, client
        finally:
            client.close()
            pidfile = remote / ".syncagent" / "supervisord.pid"
            if pidfile.exists():
                sandbox.stop_pid(int(pidfile.read_text()),
                                 str(pidfile.with_name("supervisord.conf")), timeout=60)


def test_heavy_worker_runs_a_task_with_its_models_and_not_the_web_modules(heavy):
    _, remote, client = heavy
    result = client.send_task("app.tasks.media.record_clip", args=("first",)).get(timeout=60)
    assert result == {"id": 1, "title": "first", "clips": 1, "version": "h1"}
    assert (remote / "instance" / "heavy-app.db").is_file()
    modules = client.send_task("app.tasks.media.imported").get(timeout=30)
    assert {"app", "app.extensions", "app.models", "app.tasks.media"} <= set(modules)
    assert not [m for m in modules if m.startswith("app.web")], modules
    live = [m for c in ready.COLOURS if (m := ready.read_marker(remote, c))]
    assert live and live[0]["revision"] == ready.read_revision(remote)


def test_heavy_worker_restarts_onto_a_new_revision(heavy, capsys):
    project, remote, client = heavy
    (project / "app" / "version.py").write_text('VERSION = "h2"\n')
    code = main(["push", "sbx", "--path", str(project), "--remote-path", str(remote), "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    timings = json.loads(out.strip().splitlines()[-1])["restart"]["timings"]
    assert client.send_task("app.tasks.media.version").get(timeout=30) == "h2"
    print(f"heavy worker restart: start {timings['start']:.2f} s, total {timings['total']:.2f} s")


def _live(remote: Path) -> dict:
    markers = [m for c in ready.COLOURS if (m := ready.read_marker(remote, c))]
    return max(markers, key=lambda m: m["time"])


def _push(project: Path, remote: Path, capsys, *flags: str) -> dict:
    code = main(["push", "sbx", "--path", str(project), "--remote-path", str(remote), "--json",
                 *flags])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])


def test_web_only_edits_sync_without_a_restart_and_task_edits_restart(heavy, capsys):
    """Issue 11, item 1: ten saves of web modules (the worker never imports app/web/*) sync and
    restart nothing; a save of a module the worker imports restarts it onto the new code."""
    project, remote, client = heavy
    client.send_task("app.tasks.media.version").get(timeout=30)  # a task ran: record refreshed
    serving = _live(remote)
    recorded = ready.read_imports(remote, serving["colour"])
    assert recorded and recorded["pid"] == serving["pid"]
    assert {"app/__init__.py", "app/models.py", "app/tasks/media.py"} <= set(recorded["files"])
    assert not [f for f in recorded["files"] if f.startswith("app/web/")], recorded
    routes = project / "app" / "web" / "routes.py"
    restarts = 0
    for n in range(10):
        routes.write_text(routes.read_text() + f"\n# web edit {n}\n")
        out = _push(project, remote, capsys)
        assert out["files_sent"] == 1, out
        restarts += out["restart"] is not None
        assert out["restart_why"] == "the worker does not import app/web/routes.py", out
    assert restarts == 0
    assert _live(remote)["pid"] == serving["pid"]  # the same worker process serves
    print(f"heavy app: {restarts} restarts for 10 web-only edits")

    media = project / "app" / "tasks" / "media.py"
    media.write_text(media.read_text().replace(
        'return VERSION\n', 'return VERSION + "-edited"\n', 1))
    out = _push(project, remote, capsys)
    assert out["restart"] is not None, out
    assert out["restart_why"] == "app/tasks/media.py changed (the worker imports it)"
    assert client.send_task("app.tasks.media.version").get(timeout=30).endswith("-edited")
    assert _live(remote)["pid"] != serving["pid"]


def test_restart_on_any_change_keeps_the_old_behaviour(heavy, capsys):
    project, remote, client = heavy
    before = _live(remote)["pid"]
    forms = project / "app" / "web" / "forms.py"
    forms.write_text(forms.read_text() + "\n# any change\n")
    out = _push(project, remote, capsys, "--restart-on-any-change")
    assert out["restart"] is not None and out["restart_why"] == "app/web/forms.py changed"
    assert _live(remote)["pid"] != before
