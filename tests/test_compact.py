"""Compact manifests and a cheap scan: one packed record per file, shared by the manifest and
the digest cache; the rules' quick-reject regex; no rewrite of an unchanged cache."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncagent import agent
from syncagent.agent import Entry
from syncagent.ignore import build_rules

RULES = agent.compile_rules(build_rules([]).to_wire())

# ------------------------------------------------------------------ the packed record

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
hex40 = st.text("0123456789abcdef", min_size=40, max_size=40)
ints = st.integers(-(2**63), 2**63 - 1)


@given(kind=st.sampled_from("fdl"), size=ints, mtime=ints, mode=st.integers(-1, 0o7777),
       digest=st.none() | hex40 | texts, link=st.none() | texts, ctime=ints,
       ino=st.integers(0, 2**64 - 1), hashed=ints)
def test_entry_keeps_every_field(kind, size, mtime, mode, digest, link, ctime, ino, hashed):
    link = link if kind == "l" else None
    e = Entry(kind, size, mtime, mode, digest, link, ctime, ino, hashed)
    assert (e.kind, e.size, e.mtime_ns, e.mode, e.digest, e.link, e.ctime_ns, e.ino,
            e.hashed_ns) == (kind, size, mtime, mode, digest, link, ctime, ino, hashed)
    assert e.with_mode(0o600).mode == 0o600 and e.with_mode(0o600).digest == digest
    assert Entry(kind, size, mtime, mode, digest, link, ctime, ino, hashed) == e


small = st.integers(0, 5)  # a few values, so that stats often match the record


@given(fields=st.tuples(small, small, small, small), seen=st.tuples(small, small, small, small),
       digest=st.none() | hex40, racy=st.booleans(), mode=st.integers(0, 0o777))
def test_a_record_vouches_exactly_when_its_stat_matches_and_it_was_not_racy(
        fields, seen, digest, racy, mode):
    """The settled flag is worked out once, at the record's making: the same answer as the
    whole rule (a digest, the four stat fields equal, hashed RACY_NS after the last change)."""
    size, mtime, ctime, ino = fields
    hashed = max(mtime, ctime) + agent.RACY_NS - (1 if racy else 0)
    e = Entry("f", size, mtime, mode, digest, None, ctime, ino, hashed)
    stat_ = type("St", (), {"st_size": seen[0], "st_mtime_ns": seen[1], "st_ctime_ns": seen[2],
                            "st_ino": seen[3]})()
    expected = bool(digest) and not racy and seen == fields
    assert bool(e.vouches(stat_)) is expected
    assert bool(e.with_mode(0o600).vouches(stat_)) is expected
    row = agent._cache_row(e)
    again = Entry("f", row[0], row[1], mode, row[4], None, row[2], row[3], row[5]) if row else None
    assert (row is not None) is (bool(digest) and not racy)
    assert again is None or again == e


def test_a_file_record_is_small():
    """What a 100,000-file watch holds per file and manifest: was a tuple, two ints and a
    40-char str (~320 bytes) plus a cache row of a list, five ints and the str again."""
    e = Entry("f", 12_345, 1_700_000_000_123_456_789, 0o644, "ab" * 20, None,
              1_700_000_000_123_456_789, 12_345_678, 1_700_000_002_123_456_789)
    assert sys.getsizeof(e) <= 120


def test_scan_shares_one_record_between_manifest_and_cache(tmp_path):
    (tmp_path / "a.py").write_text("a")
    (tmp_path / "b.py").write_text("b")
    os.chmod(tmp_path / "b.py", 0o600)
    cache: dict = {}
    out = agent.scan(str(tmp_path), RULES, cache)
    assert out["a.py"] is cache["a.py"] and out["b.py"] is cache["b.py"]
    assert out["b.py"].mode == 0o600 and out["a.py"].digest == agent.hash_file(
        str(tmp_path / "a.py"))


def test_loaded_cache_vouches_without_reading_and_learns_the_mode(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("a")
    st_ = os.lstat(tmp_path / "a.py")
    # hashed long after its change: not racy
    agent.save_digest_cache(str(tmp_path), {"a.py": [st_.st_size, st_.st_mtime_ns,
                                                     st_.st_ctime_ns, st_.st_ino, "d" * 40,
                                                     st_.st_ctime_ns + 10**10]})
    cache = agent.load_digest_cache(str(tmp_path))
    assert cache["a.py"].mode == -1
    monkeypatch.setattr(agent, "hash_file", lambda p: pytest.fail("re-hashed " + p))
    out = agent.scan(str(tmp_path), RULES, cache)
    assert out["a.py"].digest == "d" * 40 and out["a.py"].mode == st_.st_mode & 0o777
    assert cache["a.py"] is out["a.py"]


@pytest.mark.parametrize("row", [[1, 2, 3], "x", [1, 2, 3, 4, 5, 6], [1.5, 2, 3, 4, "d", 5],
                                 [1, 2, 3, 4, "d", 10**30], None],
                         ids=["short", "str", "digest-int", "float", "huge", "none"])
def test_a_damaged_cache_row_costs_a_rehash_not_a_crash(tmp_path, row):
    (tmp_path / "a.py").write_text("a")
    agent.write_state(str(tmp_path), "digests.json", '{"a.py": %s}' % (
        "null" if row is None else re.sub("'", '"', repr(row))))
    cache = agent.load_digest_cache(str(tmp_path))
    out = agent.scan(str(tmp_path), RULES, cache)
    assert out["a.py"].digest == agent.hash_file(str(tmp_path / "a.py"))


def test_a_noop_manifest_does_not_rewrite_the_cache(tmp_path):
    (tmp_path / "a.py").write_text("a")
    st_ = os.lstat(tmp_path / "a.py")
    agent.save_digest_cache(str(tmp_path), {"a.py": [st_.st_size, st_.st_mtime_ns,
                                                     st_.st_ctime_ns, st_.st_ino, "d" * 40,
                                                     st_.st_ctime_ns + 10**10]})
    cache_file = tmp_path / ".syncagent" / "digests.json"
    agent.scan_root(str(tmp_path), build_rules([]).to_wire())  # learns the mode: written
    assert json.loads(cache_file.read_text())["a.py"][6] == st_.st_mode & 0o777
    before = cache_file.stat()
    agent.scan_root(str(tmp_path), build_rules([]).to_wire())
    assert cache_file.stat().st_ino == before.st_ino  # written atomically: a new inode
    (tmp_path / "b.py").write_text("b")  # a new file is a change: written (not racy later)
    agent.scan_root(str(tmp_path), build_rules([]).to_wire())
    assert cache_file.stat().st_ino != before.st_ino


def test_the_manifest_request_sweeps_temp_files_in_the_same_walk(tmp_path):
    """... those of agents that are gone, and its own; another agent's, still running (a push
    beside a watch of the same root), are its batch in flight."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    running = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "a.py").write_text("a")
        for name in [f"{gone.pid:x}.2", f"{os.getpid():x}.3", f"link.{gone.pid:x}", "odd",
                     f"{running.pid:x}.4", f"{running.pid:x}.d0", f"chmod.{running.pid:x}"]:
            (tmp_path / "d" / (agent.TEMP_PREFIX + name)).write_text("half")
        (tmp_path / (agent.TEMP_PREFIX + f"link.{gone.pid:x}")).symlink_to("nowhere")
        entries, _, _ = agent.scan_root(str(tmp_path), build_rules([]).to_wire())
        assert set(entries) == {"d", "d/a.py"}
        assert sorted(os.listdir(tmp_path / "d")) == sorted(
            ["a.py"] + [agent.TEMP_PREFIX + n for n in [f"{running.pid:x}.4",
                                                       f"{running.pid:x}.d0",
                                                       f"chmod.{running.pid:x}"]])
        assert not os.path.lexists(tmp_path / (agent.TEMP_PREFIX + f"link.{gone.pid:x}"))
    finally:
        running.kill()
        running.wait()


# ------------------------------------------------------------------ the rules' quick reject

patterns = st.lists(st.sampled_from([
    "*.pyc", "__pycache__/", "data/", "/bin/ffmpeg", "build", "a/b/", "**/x.txt", "!keep.pyc",
    "*.log", "docs/*.md", ".env", "node_modules/", "[ab]*.tmp", "deep/**/z", "!data/ok/",
]), max_size=8)
paths = st.lists(st.sampled_from(["a", "b", "data", "x.txt", "z", "keep.pyc", "m.md", "docs",
                                  "__pycache__", "bin", "ffmpeg", "deep", "q.log", "bb.tmp"]),
                 min_size=1, max_size=5).map("/".join)


@settings(max_examples=300, deadline=None)
@given(pats=patterns, path=paths, is_dir=st.booleans())
def test_the_factored_alternation_matches_where_any_rule_does(pats, path, is_dir):
    wire = build_rules(pats).to_wire()
    name = path + "/" if is_dir else path
    factored = agent._alternation(rx for rx, _ in wire)
    assert bool(factored.match(name)) == any(re.match(rx, name) for rx, _ in wire)


def test_what_a_batch_wrote_needs_no_rehash_on_the_next_manifest(tmp_path, monkeypatch):
    """The agent records what it just wrote: the no-op push after an initial one reads no
    file on the remote, and its manifest request writes no cache."""
    from pathlib import Path

    from syncagent.plan import plan, revision

    local, remote = tmp_path / "local", tmp_path / "remote"
    (local / "pkg").mkdir(parents=True)
    for i in range(5):
        (local / "pkg" / f"m{i}.py").write_text(f"x = {i}\n")
    os.chmod(local / "pkg" / "m0.py", 0o755)
    remote.mkdir()
    mine = agent.scan(str(local), RULES)

    def chunks(up):
        yield Path(local, up["path"]).read_bytes()

    agent.apply_batch(str(remote), plan(mine, {}).to_wire(revision(mine), len(mine)), chunks)
    cache_file = remote / ".syncagent" / "digests.json"
    written = cache_file.stat().st_ino
    monkeypatch.setattr(agent, "hash_file", lambda p: pytest.fail("re-hashed " + p))
    theirs, _, _ = agent.scan_root(str(remote), build_rules([]).to_wire())
    assert {p: (e.kind, e.mode, e.digest) for p, e in theirs.items()} == {
        p: (e.kind, e.mode, e.digest) for p, e in mine.items()}
    assert cache_file.stat().st_ino == written
