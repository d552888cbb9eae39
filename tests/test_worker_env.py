"""worker.env: loading precedence, validation (all problems at once, short and example
secrets refused), redaction through the one secret rule set."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.procs import preserved_environ
from worker import env as envmod
from worker.__main__ import main

KEY = "k3y-SUPER-secret-value"
PW = "p4ss-w0rd-xyz"
REPO = Path(__file__).resolve().parents[1]

GOOD = {
    "CELERY_BROKER_URL": f"redis://:{PW}@10.0.0.5:6379/0",
    "CELERY_RESULT_BACKEND": f"redis://user:{PW}@10.0.0.5:6379/1",
    "FLASK_APP_URL": "https://clippy.lan/",
    "WORKER_API_KEY": KEY,
    "MEDIA_BASE_URL": "https://clippy.lan",
}
GENERATE = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'


def _with(**changes: str | None) -> dict[str, str]:
    values = dict(GOOD)
    for name, value in changes.items():
        if value is None:
            values.pop(name, None)
        else:
            values[name] = value
    return values


CASES = [
    ("missing broker", _with(CELERY_BROKER_URL=None), ["CELERY_BROKER_URL is required"]),
    ("missing key", _with(WORKER_API_KEY=None), ["WORKER_API_KEY is required"]),
    ("blank flask url", _with(FLASK_APP_URL="  "), ["FLASK_APP_URL is required"]),
    ("amqp broker", _with(CELERY_BROKER_URL=f"amqp://guest:{PW}@h//"),
     ["CELERY_BROKER_URL must start with redis://"]),
    ("backend no host", _with(CELERY_RESULT_BACKEND=f"redis://:{PW}@/0"),
     ["CELERY_RESULT_BACKEND has no host"]),
    ("bad port", _with(CELERY_BROKER_URL=f"redis://:{PW}@h:notaport/0"),
     ["CELERY_BROKER_URL is not a valid URL"]),
    ("flask not http", _with(FLASK_APP_URL="ftp://x"), ["FLASK_APP_URL must start with http://"]),
    ("media not http", _with(MEDIA_BASE_URL="clippy.example.com"),
     ["MEDIA_BASE_URL must start with http://"]),
    ("concurrency text", _with(CELERY_CONCURRENCY="two"),
     ["CELERY_CONCURRENCY must be a positive integer (got 'two')"]),
    ("concurrency zero", _with(CELERY_CONCURRENCY="0"), ["CELERY_CONCURRENCY must be a positive"]),
    ("stopwait text", _with(SYNCAGENT_STOPWAITSECS="10m"), ["SYNCAGENT_STOPWAITSECS must be"]),
    ("log level", _with(LOG_LEVEL="loud"), ["LOG_LEVEL must be one of"]),
    ("one-character key", _with(WORKER_API_KEY="k"),
     ["WORKER_API_KEY is too short (1 characters, at least 16): generate one with " + GENERATE]),
    ("15-character key", _with(WORKER_API_KEY="x" * 15), ["WORKER_API_KEY is too short (15"]),
    ("example key", _with(WORKER_API_KEY="your-secure-key-here"),
     ["WORKER_API_KEY is still the example file's placeholder: generate one with " + GENERATE]),
    ("change-me key", _with(WORKER_API_KEY="change-me"), ["WORKER_API_KEY is still the example"]),
    ("angle-bracket key", _with(WORKER_API_KEY="<same-key-from-step-1>"),
     ["WORKER_API_KEY is still the example"]),
    ("example redis host", _with(CELERY_BROKER_URL="redis://your-redis-host:6379/0"),
     ["CELERY_BROKER_URL is still the example file's placeholder "
      "(redis://your-redis-host:6379/0)"]),
    ("example redis password", _with(CELERY_RESULT_BACKEND="redis://:change-me@10.0.0.5:6379/0"),
     ["CELERY_RESULT_BACKEND is still the example file's placeholder (redis://:***@10.0.0.5"]),
    ("example.com api", _with(FLASK_APP_URL="https://clippy.example.com"),
     ["FLASK_APP_URL is still the example file's placeholder (https://clippy.example.com)"]),
    ("everything at once", {"CELERY_CONCURRENCY": "x", "FLASK_APP_URL": "nope"},
     ["CELERY_BROKER_URL is required", "CELERY_RESULT_BACKEND is required",
      "WORKER_API_KEY is required", "FLASK_APP_URL must start with http://",
      "CELERY_CONCURRENCY must be a positive integer"]),
]


@pytest.mark.parametrize(("values", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validation_problems(values: dict[str, str], expected: list[str]) -> None:
    report = envmod.validate(values)
    assert report.env is None and not report.ok
    assert len(report.problems) == len(expected), report.problems
    for fragment in expected:
        assert any(fragment in p for p in report.problems), (fragment, report.problems)
    text = "\n".join(report.problems + report.warnings)
    assert KEY not in text and PW not in text


def test_valid_env_defaults_and_repr_hide_secrets() -> None:
    report = envmod.validate(_with(MEDIA_BASE_URL=None))
    env = report.env
    assert env is not None and report.ok
    assert env.queues == ("gpu", "celery") and env.concurrency == 2
    assert env.worker_name == "tundra-gpu" and env.celery_app == "app.tasks.celery_app"
    assert env.stopwaitsecs == 600 and env.tmpdir == "/tmp" and env.use_gpu_queue
    assert env.flask_app_url == "https://clippy.lan"
    assert any("MEDIA_BASE_URL" in w for w in report.warnings)
    assert KEY not in repr(env) and PW not in repr(env)
    assert set(env.secrets) == {KEY, PW}


@pytest.mark.parametrize(("name", "value"), [("FFMPEG_DISABLE_NVENC", "yes"),
                                             ("CLIPPY_DISABLE_NVENC", "1")])
def test_nvenc_disable_flags(name: str, value: str) -> None:
    env = envmod.validate(_with(**{name: value})).env
    assert env is not None and env.nvenc_disabled_by == name


@pytest.mark.parametrize(("url", "shown"), [
    (f"redis://:{PW}@h:6379/0", "redis://:***@h:6379/0"),
    (f"redis://bob:{PW}@h/0", "redis://bob:***@h/0"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    (f"https://u:{PW}@x.example/api?x=1", "https://u:***@x.example/api?x=1"),
    ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    (f"redis://:{PW}@h:bad/0", "***"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert envmod.redact_url(url) == shown


def test_process_env_wins_over_file(tmp_path: Path) -> None:
    (tmp_path / ".env.worker").write_text(
        "WORKER_NAME=from-file\nCELERY_CONCURRENCY=7\nLOG_LEVEL=debug\n")
    values = envmod.load_values(tmp_path, {"WORKER_NAME": "from-process"})
    assert values["WORKER_NAME"] == "from-process"
    assert values["CELERY_CONCURRENCY"] == "7"
    target = {"LOG_LEVEL": "warning"}
    envmod.apply_to_process(values, target)
    assert target["LOG_LEVEL"] == "warning" and target["WORKER_NAME"] == "from-process"
    assert target["CELERY_QUEUES"] == "gpu,celery"


def test_env_file_mode_warning(tmp_path: Path) -> None:
    path = tmp_path / ".env.worker"
    path.write_text("WORKER_API_KEY=x\n")
    path.chmod(0o640)
    assert "0640" in (envmod.env_file_mode_warning(tmp_path) or "")
    path.chmod(0o600)
    assert envmod.env_file_mode_warning(tmp_path) is None


@pytest.mark.parametrize("command", ["run", "doctor"])
def test_cli_exits_2_on_problems_without_secrets(tmp_path: Path, command: str,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    for name in envmod.KNOWN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env.worker").write_text(
        f"CELERY_BROKER_URL=amqp://:{PW}@h//\nWORKER_API_KEY={KEY}\nCELERY_CONCURRENCY=many\n")
    monkeypatch.chdir(tmp_path)
    with preserved_environ():
        assert main([command]) == 2
    out = capsys.readouterr()
    text = out.out + out.err
    assert "CELERY_RESULT_BACKEND is required" in text and "CELERY_CONCURRENCY" in text
    assert KEY not in text and PW not in text


def test_python_m_worker_usage_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "worker", "bogus"], cwd=REPO,
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2


@pytest.mark.parametrize("example", [".env.worker.example",
                                     "examples/demo_app/.env.worker.example"])
def test_example_env_files_are_refused_as_they_are(example: str) -> None:
    """Copied without editing, an example file names every placeholder it still holds."""
    from dotenv import dotenv_values

    values = {k: v for k, v in dotenv_values(REPO / example).items() if v}
    report = envmod.validate(values)
    assert not report.ok
    assert any(p.startswith("WORKER_API_KEY is still the example") for p in report.problems)
    edited = {**values, "WORKER_API_KEY": "e" * 16, "CELERY_BROKER_URL": "redis://10.1.1.1/0",
              "CELERY_RESULT_BACKEND": "redis://10.1.1.1/1", "FLASK_APP_URL": "http://10.1.1.1",
              "MEDIA_BASE_URL": "http://10.1.1.1"}
    assert envmod.validate(edited).ok, envmod.validate(edited).problems


def test_short_url_password_is_a_warning_and_still_masked_in_urls() -> None:
    report = envmod.validate(_with(CELERY_BROKER_URL="redis://:pw@10.0.0.5:6379/0"))
    assert report.ok
    assert any("CELERY_BROKER_URL has a password shorter than 8" in w for w in report.warnings)
    assert envmod.redact_text("url redis://:pw@10.0.0.5:6379/0", report.env.secrets) == \
        "url redis://:***@10.0.0.5:6379/0"


def test_masking_never_touches_short_strings() -> None:
    """A short value (which validation refuses as a key) never turns "SyntaxError" into
    "Synta***Error", whatever its name."""
    text = "SyntaxError: invalid syntax in x.py"
    for short in ("x", "Error", "syntax", "in x.py"):  # all under the floor of 8
        secrets = envmod.secrets_of({"WORKER_API_KEY": short, "S3_SECRET": short})
        assert secrets == () and envmod.redact_text(text, [short]) == text
    assert envmod.redact_text(text, envmod.secrets_of({"WORKER_API_KEY": "invalid syntax"})) \
        == "SyntaxError: *** in x.py"


def test_worker_refuses_a_short_key_naming_it_and_how_to_generate_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for name in envmod.KNOWN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    lines = [f"{k}={v}" for k, v in _with(WORKER_API_KEY="short-key-9").items()]
    (tmp_path / ".env.worker").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    with preserved_environ():
        assert main(["doctor"]) == 2
    text = "".join(capsys.readouterr())
    assert "WORKER_API_KEY is too short (11 characters, at least 16)" in text
    assert GENERATE in text and "short-key-9" not in text
