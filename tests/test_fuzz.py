"""The agent's protocol under hostile input (hypothesis): crafted paths (``..``, absolute, NUL,
very long, through symlinks swapped in on the remote), malformed batches, truncated frames,
lying sizes. Whatever arrives, nothing is written or deleted outside the remote root, and every
answer is a framed error, never a traceback or a path outside the root that the input did
not name."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncagent import agent

SEGMENTS = ["a", "b", "..", ".", "", "evil", "out", "x" * 300, "a\0b", ".syncagent", "/",
            "link_out", "dir_to_swap", "é"]
path_st = st.one_of(
    st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=4).map("/".join),
    st.sampled_from(["/etc/passwd", "OUTSIDE/x", "../OUTSIDE/x", "link_out/x",
                     "dir_to_swap/victim", "link_out", "a" * 5000]),
    st.text(max_size=20),
    st.integers(), st.none(), st.lists(st.integers(), max_size=2),
)
mode_st = st.one_of(st.sampled_from([0o644, 0o755, 0o4777, -1, 2**40]), st.text(max_size=3),
                    st.none())
kind_st = st.sampled_from(["f", "d", "l", "?", None])

upload_st = st.fixed_dictionaries({"path": path_st}, optional={"mode": mode_st,
                                                               "mtime_ns": st.integers(),
                                                               "size": st.integers()})
batch_st = st.fixed_dictionaries({}, optional={
    "uploads": st.one_of(st.lists(upload_st, max_size=4), st.integers(), st.text(max_size=3)),
    "links": st.lists(st.fixed_dictionaries({"path": path_st, "target": path_st}), max_size=3),
    "dirs": st.lists(st.fixed_dictionaries({"path": path_st, "mode": mode_st}), max_size=3),
    "chmods": st.lists(st.fixed_dictionaries({"path": path_st, "mode": mode_st}), max_size=3),
    "deletes": st.lists(st.fixed_dictionaries({"path": path_st, "kind": kind_st}), max_size=3),
    "revision": st.one_of(st.text(max_size=8), st.integers()),
    "files": st.integers(),
})
data_st = st.lists(st.binary(max_size=64), max_size=3)


def snapshot(top: Path) -> dict:
    """Everything under ``top``: path -> (kind, mode, content or link)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st_ = p.lstat()
            if p.is_symlink():
                out[str(p)] = ("l", os.readlink(p))
            elif p.is_dir():
                out[str(p)] = ("d", st_.st_mode & 0o7777)
            else:
                out[str(p)] = ("f", st_.st_mode & 0o7777, p.read_bytes())
    return out


def world(tmp: Path) -> tuple[Path, Path, dict]:
    """A remote root with a symlink to a directory outside it, and the outside to watch."""
    shutil.rmtree(tmp, ignore_errors=True)
    root, outside = tmp / "root", tmp / "OUTSIDE"
    (root / "a").mkdir(parents=True)
    (root / "a" / "keep.txt").write_text("keep")
    (root / "dir_to_swap").symlink_to("../OUTSIDE")  # "swapped in" after a plan saw a dir
    (root / "link_out").symlink_to("../OUTSIDE")
    outside.mkdir()
    (outside / "x").write_text("precious")
    (outside / "victim").write_text("precious too")
    (outside / "sub").mkdir()
    return root, outside, snapshot(outside)


def stream(requests, data) -> bytes:
    out = io.BytesIO()
    for req in requests:
        payload = req if isinstance(req, bytes) else json.dumps(req).encode()
        agent.write_frame(out, payload)
        if isinstance(req, dict) and req.get("op") == "apply":
            for block in data:
                agent.write_frame(out, block)
            agent.write_frame(out, b"")
    return out.getvalue()


def answers(raw: bytes) -> list[dict]:
    s, out = io.BytesIO(raw), []
    while s.tell() < len(raw):
        out.append(json.loads(agent.read_frame(s)))
    return out


def check(tmp: Path, outside: Path, before: dict, request_bytes: bytes, out: bytes) -> None:
    assert snapshot(outside) == before, "something outside the root changed"
    assert not (tmp / "etc").exists()
    text = out.decode("utf-8", "replace")
    assert "Traceback" not in text and 'File "' not in text
    if str(outside).encode() not in request_bytes:
        assert str(outside) not in text, text
    for body in answers(out):
        assert "error" in body
        if body["error"]:
            assert set(body["error"]) == {"type", "message"}


@settings(max_examples=300, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batches=st.lists(batch_st, min_size=1, max_size=3), data=data_st,
       cut=st.one_of(st.none(), st.integers(min_value=0, max_value=400)),
       lie=st.one_of(st.none(), st.integers(min_value=0, max_value=2**32 - 1)))
def test_fuzzed_apply_never_touches_anything_outside_the_root(tmp_path, batches, data, cut,
                                                             lie):
    root, outside, before = world(tmp_path / "w")
    reqs = [{"op": "apply", "root": str(root), "batch": b} for b in batches]
    raw = stream(reqs, data)
    if lie is not None:  # a frame header that lies about its size, then the stream ends
        raw += struct.pack(">I", lie) + b"short"
    if cut is not None:  # the connection drops anywhere
        raw = raw[:cut]
    out = io.BytesIO()
    assert agent.serve(io.BytesIO(raw), out) in (0, 1)
    check(tmp_path / "w", outside, before, raw, out.getvalue())
    # whatever happened, the root holds no staged temp file after the next manifest
    agent.scan_root(str(root), [])
    assert not [p for p in root.rglob("*") if p.name.startswith(agent.TEMP_PREFIX)]


op_st = st.fixed_dictionaries({"op": st.sampled_from(
    ["ping", "manifest", "apply", "restart", "worker", "logs", "bye", "nope", ""])},
    optional={"root": st.one_of(st.none(), st.integers(), st.just("ROOT")),
              "rules": st.one_of(st.lists(st.tuples(st.sampled_from(["(", "a.*", "[z-a]"]),
                                                    st.booleans()), max_size=2), st.integers()),
              "batch": st.one_of(batch_st, st.integers()),
              "colour": st.one_of(st.sampled_from(["blue", "../../OUTSIDE/x", "/etc/passwd"]),
                                  st.integers()),
              "offset": st.one_of(st.integers(), st.text(max_size=3)),
              "lines": st.one_of(st.integers(), st.text(max_size=3)),
              "mode": st.text(max_size=5), "timeout": st.one_of(st.text(max_size=3),
                                                                 st.floats(0, 1))})
raw_st = st.one_of(st.binary(max_size=40), st.just(b"[]"), st.just(b'{"op": 3}'),
                   st.just(b"\xff\xfe"), st.just(b'"str"'))


@settings(max_examples=300, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(reqs=st.lists(st.one_of(op_st, raw_st), min_size=1, max_size=5), data=data_st)
def test_fuzzed_requests_get_framed_errors_never_tracebacks(tmp_path, reqs, data):
    root, outside, before = world(tmp_path / "w")
    (root / ".syncagent" / "logs" / "worker-..").mkdir(parents=True)
    fixed = []
    for r in reqs:
        if isinstance(r, dict) and r.get("root") == "ROOT":
            r = dict(r, root=str(root))
        fixed.append(r)
    raw = stream(fixed, data)
    out = io.BytesIO()
    assert agent.serve(io.BytesIO(raw), out) in (0, 1)
    check(tmp_path / "w", outside, before, raw, out.getvalue())


def test_logs_colour_cannot_name_a_file_outside_the_state_dir(tmp_path):
    """`logs` builds a file name from the colour: a crafted one must not climb out."""
    root = tmp_path / "root"
    (root / ".syncagent" / "logs" / "worker-x").mkdir(parents=True)
    (tmp_path / "secret.log").write_text("outside the root\n")
    req = {"op": "logs", "root": str(root), "colour": "x/../../../../secret"}
    out = io.BytesIO()
    agent.serve(io.BytesIO(stream([req], [])), out)
    (banner, body) = answers(out.getvalue())
    assert body["error"]["type"] == "Protocol"
    assert "outside the root" not in out.getvalue().decode()
