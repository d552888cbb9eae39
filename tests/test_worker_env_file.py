"""worker.env_file: .env.worker merged, validated, then written 0600, or not written at all."""
from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest
from dotenv import dotenv_values
from hypothesis import given
from hypothesis import strategies as st

from worker import env_file

VALID = {"CELERY_BROKER_URL": "redis://h:1/0", "CELERY_RESULT_BACKEND": "redis://h:1/1",
         "FLASK_APP_URL": "http://a", "WORKER_API_KEY": "k-1-9f3c2a7d5e8b1046"}


def _values(text: str) -> dict:
    return dict(dotenv_values(stream=io.StringIO(text)))


@pytest.mark.parametrize("before, pairs, after", [
    (None, {"A": "1"}, [env_file.HEADER, "A='1'"]),
    ("# mine\nA=1\nB=2\n", {"A": "9"}, ["# mine", "A='9'", "B=2"]),
    ("export A=1\n\nB=2\n", {"A": "x y"}, ["A='x y'", "", "B=2"]),
    ("A=1\nA=2\n", {"A": "3"}, ["A='3'"]),
    ("B=2\n", {"A": "1", "C": "3"}, ["B=2", "A='1'", "C='3'"]),
    ("AB=1\n", {"A": "2"}, ["AB=1", "A='2'"]),
], ids=["new-file", "replace-in-place", "export-and-blank", "duplicates", "append", "prefix-key"])
def test_merge_text(before, pairs, after) -> None:
    assert env_file.merge_text(before, pairs.items()).splitlines() == after


_KEY = st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True)
_VALUE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\0"),
                 max_size=30).filter(lambda v: "${" not in v)


@given(st.dictionaries(_KEY, _VALUE, max_size=5), st.dictionaries(_KEY, _VALUE, max_size=5))
def test_merge_sets_the_keys_and_keeps_the_others(old: dict, new: dict) -> None:
    text = env_file.merge_text(env_file.merge_text(None, old.items()), new.items())
    assert _values(text) == {**old, **new}


def test_write_env_update_keeps_other_lines_and_mode(tmp_path: Path) -> None:
    path = tmp_path / ".env.worker"
    path.write_text(env_file.merge_text(None, VALID.items()) + "# the user's note\n")
    path.chmod(0o644)  # even a loose file comes back 0600
    result = env_file.write_env(tmp_path, {"LOG_LEVEL": "debug"}, "update")
    assert result == {"status": "updated", "keys": ["LOG_LEVEL"], "problems": []}
    assert _values(path.read_text()) == {**VALID, "LOG_LEVEL": "debug"}
    assert "# the user's note" in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert env_file.write_env(tmp_path, {"LOG_LEVEL": "debug"}, "update")["status"] == \
        "unchanged"
    assert not [p for p in tmp_path.iterdir() if p.name != ".env.worker"]  # no temp left


@pytest.mark.parametrize("existing, pairs, mode", [
    (None, {k: v for k, v in VALID.items() if k != "CELERY_RESULT_BACKEND"}, "create"),
    (VALID, {"CELERY_BROKER_URL": "ftp://:pw-zq7@x/0"}, "update"),
    (VALID, {"CELERY_CONCURRENCY": "zero"}, "update"),
], ids=["create-missing-backend", "update-bad-scheme", "update-bad-int"])
def test_invalid_merge_writes_nothing(tmp_path: Path, existing, pairs, mode) -> None:
    path = tmp_path / ".env.worker"
    if existing:
        path.write_text(env_file.merge_text(None, existing.items()))
    before = path.read_bytes() if existing else None
    result = env_file.write_env(tmp_path, pairs, mode)
    assert result["status"] == "invalid" and result["problems"]
    assert not any(s in p for p in result["problems"] for s in ("pw-zq7", VALID["WORKER_API_KEY"]))
    assert (path.read_bytes() if path.exists() else None) == before
    assert len(list(tmp_path.iterdir())) == (1 if existing else 0)


def test_create_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / ".env.worker"
    path.write_text("# the user's own, even invalid\n")
    assert env_file.write_env(tmp_path, VALID, "create")["status"] == "kept"
    assert path.read_text() == "# the user's own, even invalid\n"
    (tmp_path / "new").mkdir()
    assert env_file.write_env(tmp_path / "new", VALID, "create")["status"] == "created"
    assert stat.S_IMODE((tmp_path / "new" / ".env.worker").stat().st_mode) == 0o600
