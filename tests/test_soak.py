"""Soak: a seeded random workload against `watch`, interleaved with connection drops.

Creates, edits, truncations, deletes, renames of files and directories, moves of most of the
tree into a new directory and back out of one, renames of the top package, mode changes,
symlinks, and rapid same-size re-edits within one mtime tick. The mass-delete guard is on:
moves never count as losses (one seen in two batches may halt the target until its second
half arrives, and must then lift by itself); where the random deletes do add up past the
threshold, the target halts and the soak confirms as a user would (`push
--allow-mass-delete`), then the watch resumes by itself. At each checkpoint and at the end the
remote tree equals the local tree (paths, bytes, modes, links) by a full hash comparison, and
no temp file remains. ``make test`` runs a short version; ``make soak`` a long one
(SOAK_OPS=3000) that prints its figures. Reproduce a run with SOAK_SEED.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

from syncagent.config import load_project
from syncagent.push import PushOptions, push
from tests.helpers.faultproxy import FaultProxy
from tests.helpers.procs import wait_until
from tests.helpers.watching import Watching
from tests.test_faults import settled_equal, temp_files, via, view

OPS = int(os.environ.get("SOAK_OPS", "400"))
SEED = int(os.environ.get("SOAK_SEED", "20240601"))
CHECK_EVERY = int(os.environ.get("SOAK_CHECK_EVERY", "50"))


def differences(remote: Path, root: Path, limit: int = 10) -> str:
    """Where the two trees differ (up to ``limit`` paths), and any temp file left."""
    a, b = view(remote), view(root)
    paths = sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))
    shown = [f"{p}: remote {a.get(p)} local {b.get(p)}" for p in paths[:limit]]
    return "; ".join(shown + [f"temp files {temp_files(remote)}"])


class Workload:
    """Random operations on a local tree, all inside it, from one seed."""

    def __init__(self, root: Path, rng: random.Random):
        self.root, self.rng = root, rng
        self.counter = 0
        self.counts: dict[str, int] = {}

    def package(self, files: int) -> None:
        """The top package, app/: ``files`` modules of distinct content."""
        (self.root / "app").mkdir()
        for i in range(files):
            (self.root / "app" / f"mod{i}.py").write_text(f"# module {i}\nVALUE = {i}\n")

    def _top(self) -> Path | None:
        """The top package: the directory at the root that holds the most files."""
        tops = [p for p in sorted(self.root.iterdir()) if p.is_dir() and not p.is_symlink()
                and p.name != ".syncagent"]  # (the local digest cache: not the user's)
        return max(tops, key=lambda p: sum(len(f) for _, _, f in os.walk(p)), default=None)

    def _name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def _all(self, kind: str) -> list[Path]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            d = Path(dirpath)
            if d == self.root and ".syncagent" in dirnames:  # the local digest cache
                dirnames.remove(".syncagent")
            for n in dirnames:
                p = d / n
                if (kind == "d" and not p.is_symlink()) or (kind == "l" and p.is_symlink()):
                    out.append(p)
            for n in filenames:
                p = d / n
                if kind == ("l" if p.is_symlink() else "f"):
                    out.append(p)
        return sorted(out)

    def _dir(self) -> Path:
        return self.rng.choice([self.root] + self._all("d"))

    def _data(self) -> bytes:
        return self.rng.randbytes(self.rng.choice([0, 1, 17, 300, 5000, 70000]))

    def step(self) -> str:
        ops = ["create"] * 5 + ["edit"] * 4 + ["truncate", "delete", "rename", "mkdir",
                                                "rmtree", "rename_dir", "chmod", "symlink",
                                                "same_tick", "wrap", "unwrap",
                                                "rename_top"] * 1
        op = self.rng.choice(ops)
        files, dirs = self._all("f"), self._all("d")
        try:
            if op == "create" or (not files and op in ("edit", "truncate", "delete", "rename",
                                                       "chmod", "same_tick")):
                op = "create"
                (self._dir() / self._name("f")).write_bytes(self._data())
            elif op == "edit":
                with open(self.rng.choice(files), "ab") as f:
                    f.write(self._data() or b"x")
            elif op == "truncate":
                os.truncate(self.rng.choice(files), self.rng.choice([0, 1, 10]))
            elif op == "delete":
                self.rng.choice(files + self._all("l")).unlink()
            elif op == "rename":
                src = self.rng.choice(files + self._all("l"))
                src.rename(self._dir() / self._name("r"))
            elif op == "mkdir":
                (self._dir() / self._name("d")).mkdir()
            elif op == "rmtree" and dirs:
                shutil.rmtree(self.rng.choice(dirs))
            elif op == "rename_dir" and dirs:
                src = self.rng.choice(dirs)
                dst = self.root / self._name("m")
                src.rename(dst)
            elif op == "wrap":
                # most of the tree moves into a new directory: every top entry but one
                tops = [p for p in sorted(self.root.iterdir()) if p.name != ".syncagent"]
                if len(tops) < 2:
                    op = "noop"
                else:
                    dst = self.root / self._name("w")
                    dst.mkdir()
                    for p in tops[1:]:
                        p.rename(dst / p.name)
            elif op == "unwrap":
                # a directory's whole content moves up to the root, the directory goes
                wraps = [p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()
                         and p.name != ".syncagent"]
                if not wraps:
                    op = "noop"
                else:
                    src = self.rng.choice(sorted(wraps))
                    for p in sorted(src.iterdir()):
                        if not (self.root / p.name).exists():
                            p.rename(self.root / p.name)
                    if not any(src.iterdir()):
                        src.rmdir()
            elif op == "rename_top":
                top = self._top()
                if top is None:
                    op = "noop"
                else:
                    top.rename(self.root / self._name("pkg"))
            elif op == "chmod":
                target = self.rng.choice(files + dirs)
                modes = [0o755, 0o700] if target.is_dir() else [0o644, 0o755, 0o600]
                target.chmod(self.rng.choice(modes))
            elif op == "symlink":
                d = self._dir()
                siblings = [p.name for p in d.iterdir()] or ["nowhere"]
                (d / self._name("l")).symlink_to(self.rng.choice(siblings))
            elif op == "same_tick":
                # two same-size writes in one mtime tick, then the mtime put back: only the
                # content tells them apart
                f = self.rng.choice(files)
                st = f.stat()
                size = max(st.st_size, 8)
                f.write_bytes(self.rng.randbytes(size))
                f.write_bytes(self.rng.randbytes(size))
                os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
            else:
                op = "noop"
        except FileNotFoundError:
            op = "raced"
        self.counts[op] = self.counts.get(op, 0) + 1
        return op


def content_lost(remote: Path, root: Path) -> int:
    """Remote files whose content the local tree holds nowhere (what a push would lose)."""
    theirs, mine = view(remote), view(root)
    kept = {v[2] for v in mine.values() if v[0] == "f"}
    return sum(1 for path, v in theirs.items()
               if v[0] == "f" and path not in mine and v[2] not in kept)


def test_soak(box, tmp_path):
    rng = random.Random(SEED)
    root = tmp_path / "soak"
    root.mkdir()
    remote = Path(box.remote_root) / f"soak-{tmp_path.name}"
    work = Workload(root, rng)
    work.package(30)
    for _ in range(20):
        work.step()
    t0 = time.monotonic()
    drops = checks = confirmed = 0
    project = load_project(root)
    with FaultProxy(box.port, lifetime=max(300, OPS)) as proxy:
        target = via(box, proxy, tmp_path, str(remote))

        def halted() -> bool:
            return len(w.of("halted")) > len(w.of("resumed"))

        try:
            with Watching(project, target, PushOptions(restart=False),
                          ping_every=0.3, ping_timeout=1.0) as w:
                for i in range(1, OPS + 1):
                    work.step()
                    if rng.random() < 0.3:
                        time.sleep(rng.choice([0, 0.001, 0.01]))  # bursts and pauses: a workload
                    if rng.random() < 0.02:
                        drops += proxy.drop() > 0
                    if i % CHECK_EVERY == 0 or i == OPS:
                        try:
                            wait_until(lambda: settled_equal(remote, root) or halted(), 60,
                                       f"remote == local after {i} operations (seed {SEED})")
                        except AssertionError as e:  # say where they differ
                            raise AssertionError(f"{e}: {differences(remote, root)}") from None
                        if halted() and not content_lost(remote, root):
                            # a move seen in two batches: the watch lifts the halt itself
                            wait_until(lambda: settled_equal(remote, root) and not halted(),
                                       30, f"the halt lifted by itself after {i} operations")
                        if halted():  # the deletes added up: confirm, as the user would
                            push(project, target, PushOptions(restart=False,
                                                              allow_mass_delete=True))
                            confirmed += 1
                            wait_until(lambda: settled_equal(remote, root) and not halted(),
                                       60, f"the resume after {i} operations (seed {SEED})")
                        checks += 1
                assert w.error is None
            assert settled_equal(remote, root)
        finally:
            shutil.rmtree(remote, ignore_errors=True)
    took = time.monotonic() - t0
    moves = [e for e in w.of("resumed") if e["reason"] == "files restored"]
    print(f"\nsoak: seed {SEED}, {OPS} operations {dict(sorted(work.counts.items()))}, "
          f"{drops} connection drops, {len(w.of('connected'))} connects, "
          f"{len(w.of('synced'))} syncs, {checks} full hash checks, "
          f"{len(w.of('halted'))} halts ({confirmed} confirmed, {len(moves)} lifted by "
          f"themselves), {took:.1f} s")
    print("halts: " + "; ".join(f"{e['event']} {e.get('lost', e.get('reason'))} "
                                f"{e.get('paths', '')}"
                                for e in w.events if e["event"] in ("halted", "resumed")))
