"""Secrets and permissions, end to end on a provisioned sandbox whose Redis has a password.

Every command runs with ``WORKER_API_KEY`` and a Redis password set; neither may appear in any
output, log, process command line, or file other than ``.env.worker``. Files syncagent creates
on either side are not group/world writable; the supervisord socket is 0700. The one secret
rule set (``worker/secret_rules.py``) and its verbatim copy in the agent are the same, and the
agent reads ``.env.worker`` exactly as python-dotenv does.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from dotenv import dotenv_values
from hypothesis import given, settings
from hypothesis import strategies as st

from syncagent import agent, sandbox
from syncagent.cli import main
from syncagent.config import Target
from syncagent.session import Session
from syncagent.errors import ConfigError
from tests.helpers.procs import (free_port, provisioned_sandbox, start_process, stop_process,
                                 wait_until)
from worker import secret_rules

REPO = Path(__file__).resolve().parents[1]

API_KEY = "wk-" + secrets.token_hex(12)
REDIS_PASSWORD = "rp-" + secrets.token_hex(12)
SECRETS = (API_KEY.encode(), REDIS_PASSWORD.encode())
SYNCAGENT = str(Path(sys.executable).with_name("syncagent"))


@pytest.fixture(scope="module")
def env(hermetic_home, tmp_path_factory):
    """sshd sandbox 'sbs' + a password-protected redis (password in a config file, not argv)
    + the demo app provisioned through the CLI with the secrets as --env pairs."""
    base = tmp_path_factory.mktemp("secrets")
    rdir = base / "redis"
    rdir.mkdir()
    port = free_port()
    conf = rdir / "redis.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\ndir {rdir}\n"
                    f"requirepass {REDIS_PASSWORD}\n")
    conf.chmod(0o600)
    redis_proc = start_process(["/usr/bin/redis-server", str(conf)], rdir / "redis.log")
    box = sandbox.up("sbs", base / "box")
    project = base / "project"
    shutil.copytree(sandbox.DEMO_APP, project,
                    ignore=shutil.ignore_patterns("__pycache__", ".env.worker"))
    remote = f"{box.remote_root}/project"
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}"
    ctx = {"box": box, "project": project, "remote": Path(remote), "redis_conf": conf,
           "redis_url": url,
           "argv": ["--path", str(project), "--remote-path", remote],
           "env": ["--env", f"CELERY_BROKER_URL={url}/0", "--env", f"CELERY_RESULT_BACKEND={url}/1",
                   "--env", "FLASK_APP_URL=http://127.0.0.1:9", "--env",
                   f"WORKER_API_KEY={API_KEY}", "--env", "CELERY_QUEUES=gpu,celery", "--env",
                   "CELERY_CONCURRENCY=1", "--env", "WORKER_NAME=demo"],
           "dirs": [base, Path(hermetic_home)]}
    try:
        import redis

        wait_until(lambda: redis.Redis(port=port, password=REDIS_PASSWORD).ping(), 10, "redis")
        yield ctx
    finally:
        pidfile = Path(remote) / ".syncagent" / "supervisord.pid"
        if pidfile.exists():
            sandbox.stop_pid(int(pidfile.read_text()), str(pidfile.with_name("supervisord.conf")),
                             timeout=60)
        sandbox.down("sbs", base / "box")
        stop_process(redis_proc)


def cmdlines() -> list[bytes]:
    out = []
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            out.append(p.read_bytes())
        except OSError:
            pass
    return out


def assert_clean(text: str | bytes, where: str) -> None:
    data = text.encode() if isinstance(text, str) else text
    for s in SECRETS:
        assert s not in data, f"a secret appears in {where}"


def run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_secrets_appear_in_no_output_log_command_line_or_file(capsys, env):
    argv, project = env["argv"], env["project"]
    outputs = []

    def cli(*args, ok=True):
        code, text = run(capsys, *args)
        outputs.append((" ".join(args[:2]), text))
        assert_clean(text, f"the output of `syncagent {' '.join(args)}`")
        assert_clean(b"\n".join(cmdlines()), "a process command line")
        if ok:
            assert code == 0, text
        return code, text

    cli("provision", "sbs", *argv, "--venv", sys.prefix, *env["env"])
    cli("provision", "sbs", *argv, "--venv", sys.prefix, "--json")
    version = project / "app" / "version.py"
    version.write_text('VERSION = "s1"\n')
    cli("push", "sbs", *argv, "--dry-run")
    cli("push", "sbs", *argv, "--json")
    cli("push", "sbs", *argv)
    cli("status", "sbs", *argv)
    cli("status", "sbs", *argv, "--json")
    cli("restart", "sbs", *argv)
    cli("restart", "sbs", *argv, "--json", "--mode", "drain")
    cli("logs", "sbs", *argv, "-n", "500")
    cli("sandbox", "status", "--name", "sbs", "--dir", str(env["box"].dir), "--json")
    # the failure path: code that cannot start, its log tail shown to the user
    demo = project / "app" / "tasks" / "demo.py"
    good = demo.read_text()
    demo.write_text(good + "\nraise RuntimeError('boom')\n")
    code, text = cli("push", "sbs", *argv, ok=False)
    assert code == 1 and "boom" in text
    demo.write_text(good)
    cli("push", "sbs", *argv)
    # watch, as its own process: its command line and its output
    proc = subprocess.Popen([SYNCAGENT, "watch", "sbs", *argv, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        lines = []
        while not any('"synced"' in ln for ln in lines):
            line = proc.stdout.readline().decode()
            assert line, b"".join(x.encode() for x in lines)
            lines.append(line)
        version.write_text('VERSION = "s2"\n')
        while not any('"ready"' in ln for ln in lines):
            line = proc.stdout.readline().decode()
            assert line, "".join(lines)
            lines.append(line)
        assert_clean(b"\n".join(cmdlines()), "a process command line during watch")
    finally:
        stop_process(proc)
    rest = proc.stdout.read().decode()
    proc.stdout.close()
    assert_clean("".join(lines) + rest, "the output of `syncagent watch`")
    # the remote runtime's own doctor
    target = Target("sbs", "sbs", ssh_config=env["box"].ssh_config)
    with Session.open(target) as s:
        remote = env["remote"]
        _, out, err = s.run(f"cd {remote} && PYTHONPATH={remote}/.syncagent/runtime "
                            f"{sys.executable} -m worker doctor --json", timeout=60)
    assert_clean(out + err, "the output of `python -m worker doctor`")
    assert "worker api key" in out
    # every file under the sandbox, the remote tree, the project and the user's dirs
    allowed = {".env.worker", env["redis_conf"].name}
    for top in env["dirs"]:
        for p in Path(top).rglob("*"):
            if p.is_symlink() or not p.is_file() or p.name in allowed:
                continue
            try:
                data = p.read_bytes()
            except OSError:
                continue
            assert_clean(data, f"file {p}")
    env_file = env["remote"] / ".env.worker"
    assert API_KEY in env_file.read_text() and REDIS_PASSWORD in env_file.read_text()


def writable_by_others(p: Path) -> bool:
    return bool(p.lstat().st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def test_files_syncagent_creates_are_not_group_or_world_writable(env, capsys):
    assert main(["push", "sbs", *env["argv"]]) == 0
    capsys.readouterr()
    remote, box = env["remote"], env["box"]
    created = [remote / ".syncagent", Path(box.remote_root) / ".cache" / "syncagent",
               env["project"] / ".syncagent", Path(box.dir),
               Path(os.environ["XDG_CONFIG_HOME"]) / "syncagent",
               Path(os.environ["XDG_STATE_HOME"]) / "syncagent"]
    checked = 0
    for top in created:
        if not top.exists():  # the user state dir exists only once something was recorded
            continue
        for p in [top, *top.rglob("*")]:
            if p.is_symlink() or Path(box.dir, "remote") in p.parents:
                continue  # the remote tree is checked through remote/.syncagent
            assert not writable_by_others(p), f"{p} is {oct(p.lstat().st_mode)}"
            checked += 1
    assert checked > 10
    sock = remote / ".syncagent" / "supervisor.sock"
    assert stat.S_ISSOCK(sock.lstat().st_mode) and sock.lstat().st_mode & 0o777 == 0o700
    assert (remote / ".syncagent").stat().st_mode & 0o777 == 0o700
    assert (remote / ".env.worker").stat().st_mode & 0o777 == 0o600
    for key in ("id_ed25519", "ssh_host_ed25519_key"):
        assert Path(box.dir, key).stat().st_mode & 0o777 == 0o600


def test_state_files_are_private_whatever_the_umask(tmp_path):
    """The digest cache and revision marker (both sides) do not follow a loose umask."""
    old = os.umask(0o002)
    try:
        root = tmp_path / "r"
        root.mkdir()
        (root / "a.py").write_text("a")
        cache: dict = {}
        agent.scan(str(root), agent.compile_rules([]), cache)
        agent.save_digest_cache(str(root), {"a.py": [1, 0, 0, 1, "d", 10**19]})
        agent.apply_batch(str(root), {"uploads": [], "revision": "r", "files": 1},
                          lambda up: iter(()))
    finally:
        os.umask(old)
    for p in (root / ".syncagent").rglob("*"):
        assert not writable_by_others(p), f"{p} is {oct(p.lstat().st_mode)}"
    assert json.loads((root / ".syncagent" / "revision").read_text())["revision"] == "r"


# ------------------------------------------------------------------ the one rule set


def _rules_block(path: Path) -> str:
    text = path.read_text()
    match = re.search(r"^# --- begin secret rules.*?^# --- end secret rules ---$", text,
                      re.MULTILINE | re.DOTALL)
    assert match, f"no secret rules block in {path}"
    return match.group(0)


def test_agent_carries_the_secret_rules_verbatim() -> None:
    """The agent must stay one file, so it holds a copy: the copy is the rule set itself."""
    assert _rules_block(REPO / "syncagent" / "agent.py") == \
        _rules_block(REPO / "worker" / "secret_rules.py"), (
        "syncagent/agent.py's secret rules differ from worker/secret_rules.py: copy the block")
    values = {"WORKER_API_KEY": "k" * 20, "CELERY_BROKER_URL": "redis://u:p%40ssw0rd9@h/0",
              "S3_SECRET": "short", "PLAIN": "visible-value-123"}
    assert agent.secret_values(values) == secret_rules.secret_values(values)
    assert set(agent.secret_values(values)) == {"k" * 20, "p%40ssw0rd9", "p@ssw0rd9"}


# Pieces that exercise every branch of python-dotenv's parser: quotes and their escapes,
# export, inline comments, multiline values, interpolation, BOM, CR/CRLF, malformed lines.
_PIECES = ["A", "B_1", "'K k'", "export ", "=", " ", "\t", "\n", "\r", "\r\n", "#", " #c",
           "'", '"', "\\", "\\'", '\\"', "\\n", "\\t", "${A}", "${B_1:-d}", "${NONE}", "$", "x",
           "é", ":", "\ufeff", "\x0b", "\x85"]
_VALUE = st.text(alphabet="ab #'\"\\=\n\r\t$:{}-é", max_size=12)


@st.composite
def _dotenv_line(draw) -> str:
    key = draw(st.sampled_from(["A", "B_1", "WORKER_API_KEY", "'Q K'", "x.y"]))
    value = draw(_VALUE)
    quote = draw(st.sampled_from(["", "'", '"']))
    if quote:
        value = quote + value.replace("\\", "\\\\").replace(quote, "\\" + quote) + quote
    return (draw(st.sampled_from(["", "export ", "  "])) + key
            + draw(st.sampled_from(["=", " = ", "= "])) + value
            + draw(st.sampled_from(["", " # comment 'x'", "#c", "  # \"q\""]))
            + draw(st.sampled_from(["\n", "\r\n", "\r", ""])))


_DOTENV_TEXT = st.one_of(st.lists(st.sampled_from(_PIECES), max_size=40).map("".join),
                         st.lists(_dotenv_line(), max_size=6).map("".join))


@settings(max_examples=600, deadline=None)
@given(_DOTENV_TEXT)
def test_agent_reads_dotenv_text_exactly_as_python_dotenv(text: str) -> None:
    assert agent.parse_dotenv(text) == dict(dotenv_values(stream=io.StringIO(text)))


_ATTACK_ENV = """\
WORKER_API_KEY='wk-escaped\\'quote-7f3a9c21'
export EXTRA_TOKEN=tk-inline-comment-55e1b0 # the token of the media service
DQ_SECRET="dq-\\"double\\"-quoted-8d2c"
S3_SECRET=
ONE_CHAR_KEY=x
"""
_ATTACK_SECRETS = ("wk-escaped'quote-7f3a9c21", "tk-inline-comment-55e1b0",
                   'dq-"double"-quoted-8d2c')


def test_log_tail_masks_values_as_dotenv_reads_them(tmp_path: Path) -> None:
    """A key written with an escaped quote or followed by an inline comment is masked; a
    one-character one masks nothing."""
    (tmp_path / ".env.worker").write_text(_ATTACK_ENV)
    logs = tmp_path / ".syncagent" / "logs"
    logs.mkdir(parents=True)
    (logs / "worker-blue.log").write_text(
        "SyntaxError: x\n" + "".join(f"leak {s}\n" for s in _ATTACK_SECRETS)
        + "redis://:pw@h:1/0\n")
    lines = agent.log_tail(str(tmp_path), "worker", "blue")
    assert lines == ["SyntaxError: x", "leak ***", "leak ***", "leak ***", "redis://:***@h:1/0"]


def test_escaped_quote_and_inline_comment_secrets_never_reach_logs_or_failure_tails(
        capsys, env) -> None:
    """Attack: secrets written the ways python-dotenv allows, printed by the worker's code,
    must be masked in `syncagent logs` and in a restart failure's log tail."""
    argv, project = env["argv"], env["project"]
    env_file = env["remote"] / ".env.worker"
    demo = project / "app" / "tasks" / "demo.py"
    good = demo.read_text()
    outputs = []

    def cli(*args) -> tuple[int, str]:
        code, text = run(capsys, *args)
        outputs.append(text)
        return code, text

    code, text = cli("provision", "sbs", *argv, "--venv", sys.prefix, *env["env"])
    assert code == 0, text  # a no-op after the first test
    original_env = env_file.read_text()
    leak = ("from dotenv import dotenv_values as _dv\n"
            "_LEAK = ' '.join(v or '' for k, v in _dv('.env.worker').items()\n"
            "                 if k in ('WORKER_API_KEY', 'EXTRA_TOKEN', 'DQ_SECRET'))\n"
            "print('leak:', _LEAK, flush=True)\n")
    try:
        env_file.write_text(original_env + _ATTACK_ENV)
        assert set(dotenv_values(env_file).values()) >= set(_ATTACK_SECRETS)
        demo.write_text(leak + good)
        code, text = cli("push", "sbs", *argv)
        assert code == 0, text
        code, text = cli("logs", "sbs", *argv, "-n", "500")
        assert code == 0 and "leak: ***" in text, text
        demo.write_text(leak + good + "\nraise RuntimeError('boom ' + _LEAK)\n")
        code, text = cli("push", "sbs", *argv)
        assert code == 1 and "boom ***" in text, text
        assert "RuntimeError" in text and not re.search(r"\w\*{3}|\*{3}\w", text), text
    finally:
        env_file.write_text(original_env)
        demo.write_text(good)
    for secret in _ATTACK_SECRETS:
        assert not any(secret in text for text in outputs), secret
    code, text = run(capsys, "push", "sbs", *argv)
    assert code == 0, text


def test_sandbox_json_keeps_no_redis_password(env, tmp_path_factory) -> None:
    """`sandbox up --redis-url` with a password: the state file keeps it redacted; a later `up`
    reads the real URL from the remote .env.worker, and says so when it cannot."""
    directory = tmp_path_factory.mktemp("sbp")  # short: the supervisord socket lives below
    state = directory / sandbox.STATE_FILE
    with provisioned_sandbox("sbp", directory, redis_url=env["redis_url"]) as box:
        assert box.last_provision is not None
        assert REDIS_PASSWORD.encode() not in state.read_bytes()
        assert json.loads(state.read_text())["redis_url"] == \
            env["redis_url"].replace(REDIS_PASSWORD, "***")
        again = sandbox.up("sbp", directory, provision=True, timeout=60)  # no --redis-url
        assert not again.last_provision.changed
        assert REDIS_PASSWORD.encode() not in state.read_bytes()
        env_file = Path(again.remote_root, sandbox.PROJECT_DIR, ".env.worker")
        assert REDIS_PASSWORD in env_file.read_text()  # where it is needed, and only there
        kept = env_file.read_bytes()
        env_file.unlink()
        try:
            with pytest.raises(ConfigError, match="pass --redis-url again"):
                sandbox.up("sbp", directory, provision=True, timeout=60)
        finally:
            env_file.write_bytes(kept)
            env_file.chmod(0o600)
