"""What the terminal shows for odd file names, and a watch that cannot go on silently.

A file name may hold anything but "/" and NUL: a newline, a terminal escape, bytes that are
not UTF-8 (kept by Python as lone surrogates, which a strict UTF-8 stdout refuses: the case of
en_US.UTF-8, simulated here with PYTHONIOENCODING=utf-8:strict), rich markup ("[/b]"). Each
must print escaped on its one line, and never crash a command or a watch. Real sshd (the
session's sandbox), the CLI run as a user runs it.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
from pathlib import Path

import pytest

from syncagent.config import load_project, resolve_target
from syncagent.errors import OperationalError
from syncagent.push import PushOptions
from syncagent.watch import WatchOptions, watch
from tests.helpers.procs import start_process, stop_process, wait_until
from tests.test_push import proj, push  # noqa: F401 (fixture)

CLI = [sys.executable, "-c", "import sys; from syncagent.cli import main; sys.exit(main())"]
BAD = b"bad\xff.txt"  # not UTF-8


def _write_bad(root: Path) -> None:
    with open(os.path.join(os.fsencode(root), BAD), "wb") as f:
        f.write(b"b")


def _strict_env() -> dict:
    """The test's environment (its hermetic HOME) with a stdout that refuses surrogates."""
    return {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "PYTHONUNBUFFERED": "1"}


def _cli(args):
    import subprocess

    return subprocess.run(CLI + list(args), capture_output=True, env=_strict_env(), timeout=60)


def test_dry_run_shows_odd_names_escaped_on_one_line_each(proj):
    root, remote = proj
    (root / "ok.py").write_text("x = 1\n")
    (root / "new\nline.txt").write_text("n")
    (root / "esc\x1b[31mred.txt").write_text("e")
    _write_bad(root)
    out = _cli(["push", "sbx", "--path", str(root), "--remote-path", str(remote), "--dry-run"])
    text = out.stdout.decode()
    assert out.returncode == 0, out.stderr.decode()
    assert b"Traceback" not in out.stderr and b"\x1b" not in out.stdout
    creates = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("create")]
    assert sorted(c.split()[1] for c in creates) == sorted(
        ["bad\\udcff.txt", "esc\\x1b[31mred.txt", "new\\nline.txt", "ok.py"]), text
    assert "dry run: 4 to send" in text


def test_watch_goes_on_after_an_undecodable_file_name(tmp_path, proj):
    """Before: the target's thread died on printing the name (UnicodeEncodeError), the watch
    synced nothing more, and after a few seconds it exited 0 as if stopped by the user."""
    root, remote = proj
    (root / "app.py").write_text("v = 1\n")
    log = tmp_path / "watch.log"
    proc = start_process(CLI + ["watch", "sbx", "--path", str(root), "--remote-path",
                                str(remote), "--no-restart"], log, env=_strict_env())
    try:
        wait_until(lambda: b"up to date" in log.read_bytes() or b"sent" in log.read_bytes(),
                   30, "the initial reconcile")
        _write_bad(root)
        wait_until(lambda: b"bad\\udcff.txt" in log.read_bytes(), 15, "the odd name's line")
        (root / "app.py").write_text("v = 2\n")
        wait_until(lambda: (remote / "app.py").read_text() == "v = 2\n", 15,
                   "the next edit on the remote")
        assert os.path.exists(os.fsencode(remote) + b"/" + BAD)
        assert proc.poll() is None, log.read_text(errors="replace")
    finally:
        code = stop_process(proc)
    assert b"Traceback" not in log.read_bytes(), log.read_text(errors="replace")
    assert code == 0


def _strict_json(line: bytes):
    """Parse as a strict parser does: UTF-8 without lone surrogates, escaped or not."""
    value = json.loads(line.decode("utf-8"))
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    return value


def test_push_json_names_undecodable_bytes_escaped_with_the_raw_bytes_beside(proj):
    root, remote = proj
    (root / "ok.py").write_text("x = 1\n")
    _write_bad(root)
    out = _cli(["push", "sbx", "--path", str(root), "--remote-path", str(remote), "--dry-run",
                "--json"])
    assert out.returncode == 0, out.stderr.decode()
    result = _strict_json(out.stdout.strip())
    line = next(i for i, ln in enumerate(result["plan"]) if "bad" in ln)
    assert "bad\\udcff.txt" in result["plan"][line]  # as the text output shows it
    raw = [base64.b64decode(b) if b else None for b in result["plan_b64"]]
    assert BAD in raw[line] and raw.count(None) == len(raw) - 1, result


def test_watch_json_events_are_strict_json_with_raw_names(tmp_path, proj):
    root, remote = proj
    (root / "app.py").write_text("v = 1\n")
    log = tmp_path / "watch.log"
    proc = start_process(CLI + ["watch", "sbx", "--path", str(root), "--remote-path",
                                str(remote), "--no-restart", "--json"], log, env=_strict_env())
    try:
        wait_until(lambda: b'"synced"' in log.read_bytes(), 30, "the initial reconcile")
        _write_bad(root)
        wait_until(lambda: b"bad\\\\udcff.txt" in log.read_bytes(), 15, "the odd name's event")
    finally:
        assert stop_process(proc) == 0, log.read_text(errors="replace")
    events = [_strict_json(line) for line in log.read_bytes().splitlines()
              if line.startswith(b"{")]
    synced = next(e for e in events if "bad\\udcff.txt" in e.get("paths", []))
    i = synced["paths"].index("bad\\udcff.txt")
    assert base64.b64decode(synced["paths_b64"][i]) == BAD, synced
    assert all(b is None for j, b in enumerate(synced["paths_b64"]) if j != i), synced


def test_warning_naming_a_bracketed_path_is_text_not_markup(capsys, proj):
    """A rich markup tag in a path ("[/y]") made the warning raise MarkupError after the
    push had been applied: a traceback, exit 1, for a push that worked."""
    root, remote = proj
    (root / "x[" / "y]").mkdir(parents=True)
    (root / "x[" / "y]" / "f.txt").write_text("f")
    assert push(capsys, root, remote)[0] == 0
    (remote / "x[" / "y]" / ".env").write_text("REMOTE_ONLY=1\n")  # protected, remote-only
    (root / "x[" / "y]" / "f.txt").unlink()
    (root / "x[" / "y]").rmdir()
    (root / "x[").rmdir()
    code, _, err = push(capsys, root, remote)
    assert code == 0, err
    assert "kept remote directory x[/y]/" in err
    assert (remote / "x[" / "y]" / ".env").read_text() == "REMOTE_ONLY=1\n"


def test_a_broken_consumer_ends_the_watch_with_an_error(proj, box):
    """Anything unexpected in a target's loop ends the watch with an error (exit 1 at the
    CLI), where before the thread died and the watch returned as if stopped by the user."""
    root, remote = proj
    (root / "app.py").write_text("v = 1\n")
    project = load_project(root)
    target = resolve_target("sbx", project, remote_path=str(remote))
    events: list[dict] = []

    def emit(event: dict) -> None:
        events.append(event)
        if event["event"] == "synced" and event["changed"] and not event["full"]:
            raise RuntimeError("consumer broke")

    stop = threading.Event()
    outcome: dict = {}

    def run() -> None:
        try:
            watch(project, target, emit, stop, PushOptions(restart=False), WatchOptions())
        except BaseException as e:  # checked below
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: any(e["event"] == "synced" for e in events), 30, "initial reconcile")
        (root / "app.py").write_text("v = 2\n")
        thread.join(timeout=20)
        assert not thread.is_alive(), events
    finally:
        stop.set()
        thread.join(timeout=10)
    error = outcome.get("error")
    assert isinstance(error, OperationalError), (error, events)
    assert "consumer broke" in str(error) and error.exit_code == 1
    assert any(e["event"] == "error" and e.get("fatal") for e in events)


@pytest.mark.parametrize("name", ["new\nline.txt", "bad\udcff.txt", "esc\x1b]0;x\x07.txt"])
def test_shown_keeps_a_name_on_one_printable_line(name):
    from syncagent.cli import _shown

    shown = _shown(name)
    assert shown.isprintable() and "\n" not in shown
    assert shown.encode("utf-8")  # encodable whatever the locale


@pytest.mark.parametrize("args,needle", [
    (["push", "gpu", "--mode", "fast"], "Invalid value for '--mode': 'fast' is not one of"),
    (["provision", "gpu", "--env", "BAD KEY=x"], "--env expects KEY=VALUE"),
    (["watch", "gpu", "--path", "/etc/passwd"], "is a file"),
    (["push", "gpu", "--no-such-flag"], "No such option '--no-such-flag'"),
    (["pusj"], "No such command 'pusj'"),
])
def test_usage_errors_are_one_line_exit_2(capsys, args, needle):
    from tests.test_push import one_line, run

    code, out, err = run(capsys, *args)
    assert code == 2 and out == ""
    line = one_line(err)
    assert line.startswith("syncagent: error: ") and needle in line and "--help" in line
