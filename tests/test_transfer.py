"""The bulk transfer of a push (issue 12, third pass): what the sender streams, what the agent
stages and records, over a real OpenSSH sshd (the sandbox).

The sender vouches for a file's bytes (the VOUCHED end frame) only when the local record its
digest came from was settled and still vouches for the file's stat after the read; the agent then
records that digest without hashing. Everything else is hashed by the agent as received, so
its digest cache only ever holds the digest of what the remote file holds.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
from pathlib import Path

import pytest

from syncagent import agent
from syncagent.config import Target
from syncagent.errors import ConnectError
from syncagent.ignore import build_rules
from syncagent.plan import plan, revision
from syncagent.session import Session, _Channel
from tests.helpers.procs import wait_until
from tests.test_agent import frames, responses
from tests.test_push import proj, push, view  # noqa: F401  (proj: a fixture)

RULES = build_rules().compiled()
RULES_WIRE = build_rules().to_wire()
RACY_NS = 200 * 10**6  # the tests' racy window: far above a timestamp tick, far below 2 s


def contents() -> dict[str, bytes]:
    """Every size class the sender treats differently."""
    text = "".join(f"def task_{i}(queue, item):\n    return queue.put(item * {i})\n"
                   for i in range(6000)).encode()
    return {
        "random.bin": os.urandom(3 * agent.CHUNK + 12345),  # several frames, incompressible
        "code.py": text,  # highly compressible
        "empty.txt": b"",
        "chunk.bin": os.urandom(agent.CHUNK),  # exactly one frame
        "chunk_plus.bin": os.urandom(agent.CHUNK + 1),  # one byte into a second frame
        "d/e/small.py": b"x = 1\n",
    }


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def settled(root: Path) -> None:
    """Until the tree's newest change is older than the racy window: its records vouch."""
    newest = max(max(p.lstat().st_mtime_ns, p.lstat().st_ctime_ns) for p in root.rglob("*"))
    while time.time_ns() < newest + RACY_NS:
        time.sleep(0.01)


@pytest.fixture
def target(box) -> Target:
    return Target("sbx", "sbx", ssh_config=box.ssh_config, remote_root=box.remote_root)


@pytest.fixture
def ends(monkeypatch) -> list[bool]:
    """Each upload's end frame as the sender chose it (True: VOUCHED)."""
    seen: list[bool] = []
    real = _Channel.end_upload

    def end_upload(self, vouched):
        seen.append(vouched)
        real(self, vouched)
    monkeypatch.setattr(_Channel, "end_upload", end_upload)
    return seen


def send(target: Target, root: Path, remote: Path, on_frame=None):
    """One batch of the whole local tree to an empty remote through Session.apply, then the
    remote manifest from the same agent (the digests it recorded for what it wrote)."""
    local = agent.scan(str(root), RULES)
    p = plan(local, {})
    with Session.open_new(target) as s:
        if on_frame is not None:
            real = s.channel.frame_from

            def frame_from(fd, n):  # on_frame sees each data frame once it is queued
                at = os.lseek(fd, 0, os.SEEK_CUR)
                got = real(fd, n)
                if got:
                    on_frame(s, os.pread(fd, got, at))
                return got
            s.channel.frame_from = frame_from
        out = s.apply(str(remote), str(root), p, revision(local), len(local), local=local)
        tree = s.manifest(str(remote), RULES_WIRE)
    return p, out, tree.entries


def remote_digests_match_contents(entries: dict, remote: Path) -> None:
    for path, e in entries.items():
        if e.kind == "f":
            assert e.digest == agent.hash_file(str(remote / path)), path


def test_sessions_use_aes_gcm(target):
    """AES-GCM first: no separate MAC per packet (~40 % less CPU to send through paramiko)."""
    with Session.open_new(target) as s:
        t = s.client.get_transport()
        assert t.local_cipher == t.remote_cipher == "aes128-gcm@openssh.com"


def test_files_arrive_byte_identical_through_push(capsys, proj):  # noqa: F811
    root, remote = proj
    files = contents()
    write_tree(root, files)
    code, out, err = push(capsys, root, remote, "--json")
    assert code == 0, err
    assert json.loads(out)["files_sent"] == len(files)
    for rel, data in files.items():
        assert (remote / rel).read_bytes() == data, rel
    assert view(remote) == view(root)


def test_settled_files_are_vouched_and_recorded_with_their_digests(target, proj, ends,  # noqa: F811
                                                                   monkeypatch):
    root, remote = proj
    files = contents()
    write_tree(root, files)
    monkeypatch.setattr(agent, "RACY_NS", RACY_NS)  # the dev side's records, not the agent's
    settled(root)
    p, out, entries = send(target, root, remote)
    assert out["changed"] == [] and out["written"] == len(files)
    assert ends == [True] * len(files)
    for rel, data in files.items():
        assert (remote / rel).read_bytes() == data, rel
        assert entries[rel].digest == agent.hash_file(str(root / rel)), rel


def test_racy_files_are_hashed_by_the_agent(target, proj, ends, monkeypatch):  # noqa: F811
    """Just written: the local records are racy, the sender does not vouch, the agent hashes."""
    root, remote = proj
    files = contents()
    write_tree(root, files)
    monkeypatch.setattr(agent, "RACY_NS", 3600 * 10**9)
    p, out, entries = send(target, root, remote)
    assert ends == [False] * len(files)
    for rel, data in files.items():
        assert (remote / rel).read_bytes() == data, rel
    remote_digests_match_contents(entries, remote)


@pytest.mark.parametrize("how", ["append", "same-size overwrite"])
def test_a_file_that_changes_while_sent_is_detected_and_hashed_as_received(
        target, proj, ends, monkeypatch, how):  # noqa: F811
    """The file changes after its first frame is queued: it is reported changed, not vouched,
    and the agent records the digest of what it received (not the plan's, not the new one)."""
    root, remote = proj
    files = contents()
    write_tree(root, files)
    monkeypatch.setattr(agent, "RACY_NS", RACY_NS)
    settled(root)
    first = files["random.bin"][:agent.CHUNK]
    done = []

    def change(_s, payload):
        if payload == first and not done:
            done.append(True)
            with open(root / "random.bin", "r+b" if how != "append" else "ab") as f:
                f.write(b"appended" if how == "append" else os.urandom(len(files["random.bin"])))
    order, out, entries = send(target, root, remote, change)
    assert done and out["changed"] == ["random.bin"]
    i = [u.path for u in order.uploads].index("random.bin")
    assert ends[i] is False and ends.count(True) == len(files) - 1
    got = (remote / "random.bin").read_bytes()
    assert got[:agent.CHUNK] == first and len(got) == len(files["random.bin"])
    if how == "append":
        assert got == files["random.bin"]  # its size when opened: the rest is the next pass's
    else:
        assert got != files["random.bin"]  # its first megabyte, then the new bytes
        assert entries["random.bin"].digest != order.uploads[i].digest
    remote_digests_match_contents(entries, remote)


@pytest.mark.parametrize("after", [agent.CHUNK + 4096, 3 * agent.CHUNK])
def test_an_interrupted_transfer_leaves_nothing(target, proj, after):  # noqa: F811
    """The connection drops mid-batch (in the second file; in the last, when d/e/small.py is
    written in its new directory): the push fails, the agent discards what it staged and the
    directories it made, nothing of the batch is visible."""
    root, remote = proj
    write_tree(root, contents())
    sent, agents = [], []

    def cut(s, payload):
        sent.append(len(payload))
        if sum(sent) > after and not agents:
            agents.append(s.banner["pid"])
            s.client.get_transport().sock.shutdown(socket.SHUT_RDWR)
    with pytest.raises(ConnectError):
        send(target, root, remote, cut)
    # the agent (same host) cleans up, then exits
    wait_until(lambda: not Path(f"/proc/{agents[0]}").exists(), 20,
               "the agent to exit after the cut")
    assert remote.is_dir()  # the batch began there (its root is made first)
    left = [p for p in remote.rglob("*") if agent.STATE_DIR not in p.relative_to(remote).parts]
    assert left == []
    assert not (remote / agent.REVISION_FILE).exists()


def test_a_send_that_stalls_midway_closes_the_channel_and_sends_nothing_more(target, proj):  # noqa: F811
    """A send that fails after part of a frame (a stalled link: paramiko's timeout) leaves the
    stream out of step. Before, closing the session then sent the "bye" after the whole send
    buffer again, from its first byte: file bytes the agent read as frame lengths, where four
    bytes of 0x80 00 00 00 read as VOUCHED. Now the channel is closed at the failure, the close
    sends nothing, and the agent commits nothing."""
    root, remote = proj
    write_tree(root, contents())
    local = agent.scan(str(root), RULES)
    p = plan(local, {})
    sent: list[int] = []
    with Session.open_new(target) as s:
        chan = s.channel.chan
        real = chan.send

        def stalling(data):
            if len(sent) == 40:  # ~1.3 MB in: mid-file, mid-buffer
                raise socket.timeout("stalled")
            sent.append(len(data))
            return real(data)
        chan.send = stalling
        pid = s.banner["pid"]
        with pytest.raises(ConnectError, match="connection lost while sending"):
            s.apply(str(remote), str(root), p, revision(local), len(local), local=local)
        assert chan.closed
        count = len(sent)
    assert len(sent) == count  # the close sent nothing
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 20, "the agent to exit")
    assert not (remote / agent.REVISION_FILE).exists()
    assert [q for q in remote.rglob("*") if agent.STATE_DIR not in q.relative_to(remote).parts
            ] == []


# ---------------------------------------------------------------- the wire, at the agent


def apply_request(root: Path, digest: str) -> bytes:
    batch = {"uploads": [{"path": "f.bin", "mode": 0o644, "mtime_ns": 10**18, "digest": digest}],
             "revision": "r", "files": 1}
    return json.dumps({"op": "apply", "root": str(root), "batch": batch}).encode()


def manifest_after(root: Path, *data: bytes) -> dict:
    """serve: an apply of one file with these data frames, then a manifest from the same agent
    (what it recorded for the file it wrote)."""
    ask = json.dumps({"op": "manifest", "root": str(root), "rules": RULES_WIRE}).encode()
    out = io.BytesIO()
    inp = frames(apply_request(root, "ab" * 20), *[d for d in data if isinstance(d, bytes)])
    raw = inp.getvalue()
    for d in data:  # raw length words (an end frame without payload)
        if isinstance(d, int):
            raw += d.to_bytes(4, "big")
    inp = io.BytesIO(raw + frames(ask).getvalue())
    agent.serve(inp, out)
    return responses(out.getvalue())


def test_agent_records_the_batch_digest_for_a_vouched_upload(tmp_path):
    _banner, applied, manifest = manifest_after(tmp_path, b"payload", agent.VOUCHED)
    assert applied["error"] is None and applied["written"] == 1
    assert (tmp_path / "f.bin").read_bytes() == b"payload"
    assert manifest["entries"]["f.bin"] == ["f", 0o644, "ab" * 20]


def test_agent_hashes_an_upload_that_is_not_vouched(tmp_path):
    _banner, applied, manifest = manifest_after(tmp_path, b"payload", 0)
    assert applied["error"] is None
    assert manifest["entries"]["f.bin"] == ["f", 0o644, agent.hash_file(str(tmp_path / "f.bin"))]


def test_agent_refuses_a_flagged_length_that_is_not_vouched(tmp_path):
    _banner, applied, _ = manifest_after(tmp_path, b"payload", agent.VOUCHED | 7)
    assert applied["error"]["type"] == "Protocol"
    assert not (tmp_path / "f.bin").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(agent.TEMP_PREFIX)]


def test_files_in_new_directories_are_recorded_without_a_rehash(tmp_path, monkeypatch):
    """Written in place inside a directory the batch made (renamed into place at the commit):
    the stat taken when written is the one the next manifest sees, nothing is hashed again."""
    files = {"top.py": b"t = 1\n", "d/e/deep.py": b"x = 2\n", "d/f.txt": b"f"}
    digests = {p: __import__("hashlib").blake2b(d, digest_size=20).hexdigest()
               for p, d in files.items()}
    batch = {"uploads": [{"path": p, "mode": 0o644, "mtime_ns": 10**18, "digest": digests[p]}
                         for p in files],
             "dirs": [{"path": "d", "mode": 0o755}, {"path": "d/e", "mode": 0o750}],
             "revision": "r", "files": 3}
    ask = json.dumps({"op": "manifest", "root": str(tmp_path), "rules": RULES_WIRE}).encode()
    raw = frames(ask, json.dumps({"op": "apply", "root": str(tmp_path), "batch": batch}).encode()
                 ).getvalue()
    for p in files:
        raw += frames(files[p]).getvalue() + agent.VOUCHED.to_bytes(4, "big")
    hashed = []
    monkeypatch.setattr(agent, "hash_file", lambda p: hashed.append(p) or "0" * 40)
    out = io.BytesIO()
    agent.serve(io.BytesIO(raw + frames(ask).getvalue()), out)
    _banner, _empty, applied, after = responses(out.getvalue())
    assert applied["error"] is None and applied["written"] == 3
    assert hashed == []
    assert {p: e[2] for p, e in after["entries"].items() if e[0] == "f"} == digests
    assert (tmp_path / "d" / "e").stat().st_mode & 0o777 == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == [".syncagent", "d", "top.py"]


def test_a_killed_batch_s_new_directory_is_swept_by_the_next_manifest(tmp_path):
    left = tmp_path / f"{agent.TEMP_PREFIX}1234.d0"
    (left / "sub").mkdir(parents=True)
    (left / "sub" / "a.py").write_text("a")
    (tmp_path / "kept.py").write_text("k")
    entries, _problems, _held = agent.scan_root(str(tmp_path), RULES_WIRE)
    assert set(entries) == {"kept.py"}
    assert not left.exists()
