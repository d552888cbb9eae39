#!/usr/bin/env python3
"""Benchmark: ``syncagent push`` against ``rsync -a --delete -e ssh`` on the same sandbox.

Two source trees (on disk), destinations on tmpfs (/dev/shm) so the tools, not the disk, are
measured:

* ``gen``: a deterministic (seeded) tree of 20,000 files, ~140 MB, in 200 nested directories;
* ``stdlib``: a copy of this interpreter's standard library (no site-packages, no __pycache__).

For each tree, each case is run ``--reps`` times, the two tools alternating (which one goes first
flips every repetition):

* initial: the destination is removed, then pushed;
* noop:    pushed again, nothing changed;
* change:  one file's content is modified in the (shared) source, then pushed.

A third column, ``holder`` (``--no-holder-column`` leaves it out), pushes the same source to
its own destination with the warm path on: the first push leaves a holder (syncagent.holder),
which every later push of that column goes through. The ``syncagent`` column runs with
``SYNCAGENT_HOLDER=0``: the one-shot command as it is without a holder.

Times are the wall clock of the whole CLI command (``subprocess`` + ``time.perf_counter``), which
is what a user waits for. syncagent's local digest cache (``<source>/.syncagent/``) is kept
between runs as a user would have it; one cold first push (no cache) is timed separately before
the repetitions. syncagent's own ``--json`` stage durations are recorded too (both columns).

Correctness: after every initial push (and after the last change) the destination trees are
hashed and compared (path, kind, mode, content, link target); the ``gen`` tree is also compared
with its source (it contains nothing either tool excludes).

Usage::

    .venv/bin/python bench/push_bench.py [--reps 5] [--trees gen,stdlib] [--keep]

Results: a table on stdout and ``bench/results/push.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_SYNCAGENT = REPO / ".venv" / "bin" / "syncagent"
TARGETS = {"initial": 1.0, "noop": 0.5, "change": 0.5}  # issue 12
CASES = ("initial", "noop", "change")
TOOLS = ("syncagent", "rsync")  # plus "holder" unless --no-holder-column

# The same list as syncagent's DEFAULT_EXCLUDES (syncagent/ignore.py), in rsync syntax.
# A pattern with a slash inside (bin/ffmpeg) is anchored to the root, as in gitignore.
RSYNC_FILTERS = [
    "--include=.env.example", "--include=.env.*.example",
    *(f"--exclude={p}" for p in (
        "venv/", "__pycache__/", "*.pyc", ".git/", "instance/", "artifacts/", "tmp/", "logs/",
        "data/", "uploads/", "node_modules/", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/",
        ".venv/", ".env", ".env.*", "*.log", ".syncagent/", "*.swp", "*~",
        # the rest of syncagent's defaults (editor temp files, the ffmpeg-style binaries)
        "/bin/ffmpeg", "/bin/ffprobe", "/bin/yt-dlp", "*.swx", "*.swo", "4913", ".#*", "#*#",
        "*___jb_tmp___", "*___jb_old___", ".DS_Store", "*.tmp",
    )),
]


# ---------------------------------------------------------------- source trees

WORDS = ("def class return import from self None True False for while if else elif try except "
         "finally with as lambda yield async await print value result config request response "
         "session target remote local path file data_ item items key keys index count total "
         "buffer stream frame chunk digest manifest plan upload delete commit worker task queue "
         "celery redis model tensor batch epoch loss optimizer gradient device cuda").split()


def _corpus(rng: random.Random, size: int) -> bytes:
    """A few MB of code-like text to slice text files from (fast, compressible, deterministic)."""
    out, n = [], 0
    while n < size:
        indent = "    " * rng.randint(0, 3)
        line = indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        if rng.random() < 0.3:
            line += "(%s)" % ", ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 4)))
        line += "\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()


TEXT_EXT = (".py", ".py", ".py", ".py", ".txt", ".md", ".json", ".html", ".css", ".js",
            ".yaml", ".cfg", ".rst", ".toml")
BIN_EXT = (".bin", ".png", ".jpg", ".pt", ".npz", ".woff2")


def generate_tree(root: Path, files: int = 20_000, dirs: int = 200, total_mb: int = 140,
                  seed: int = 20240601) -> dict:
    """Write the deterministic ``gen`` tree; returns a summary. Names avoid every exclude."""
    rng = random.Random(seed)
    corpus = _corpus(rng, 4 << 20)
    # 200 directories: 10 top-level packages, each with 19 nested subdirectories (depth <= 4).
    dir_list: list[str] = []
    for top in range(10):
        base = f"pkg{top:02d}"
        dir_list.append(base)
        level = [base]
        while len(dir_list) < (top + 1) * (dirs // 10):
            parent = rng.choice(level)
            child = f"{parent}/{rng.choice(('core', 'utils', 'api', 'models', 'views', 'web', 'assets', 'lib', 'sub'))}{len(dir_list) % 97:02d}"
            if child.count("/") > 4 or child in dir_list:
                continue
            dir_list.append(child)
            level.append(child)
    for d in dir_list:
        (root / d).mkdir(parents=True, exist_ok=True)
    # Sizes: 24 MB-sized binaries (~60 MB together), a few hundred 20-200 KB files, and the
    # rest small (log-normal around 2-3 KB), scaled so the whole tree is ~total_mb.
    big = [rng.randint(1 << 20, 4 << 20) for _ in range(24)]
    medium = [rng.randint(20 << 10, 200 << 10) for _ in range(300)]
    n_small = files - len(big) - len(medium)
    small = [max(0, int(rng.lognormvariate(7.6, 1.0))) for _ in range(n_small)]
    budget = total_mb * 1_000_000 - sum(big) - sum(medium)
    scale = budget / sum(small)
    small = [int(s * scale) for s in small]
    sizes = [(s, False) for s in small] + [(s, True) for s in big] + \
            [(s, rng.random() < 0.3) for s in medium]
    rng.shuffle(sizes)
    total = 0
    written = []
    for i, (size, binary) in enumerate(sizes):
        d = dir_list[i % len(dir_list)] if i < len(dir_list) else rng.choice(dir_list)
        ext = rng.choice(BIN_EXT if binary else TEXT_EXT)
        path = root / d / f"f{i:05d}{ext}"
        if binary:
            body = rng.randbytes(size)
        else:
            head = f"# {path.name} {i}\n".encode()
            off = rng.randrange(0, len(corpus) - size - 1) if size < len(corpus) - 1 else 0
            body = (head + corpus[off:off + size])[:max(size, len(head))]
        path.write_bytes(body)
        if rng.random() < 0.02:
            os.chmod(path, 0o755)  # a few executables
        total += len(body)
        written.append(path)
    # a few relative symlinks inside the tree: both tools copy them as links
    for i in range(5):
        os.symlink(written[i].name, written[i].parent / f"link{i}")
    return {"files": len(sizes), "dirs": len(dir_list), "bytes": total, "links": 5}


def copy_stdlib(root: Path) -> dict:
    src = Path(sysconfig.get_paths()["stdlib"])
    shutil.copytree(src, root, symlinks=True, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("site-packages", "__pycache__"))
    n = b = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            n += 1
            b += os.lstat(os.path.join(dirpath, f)).st_size
    return {"source": str(src), "files": n, "bytes": b}


def pick_change_file(root: Path) -> Path:
    """A mid-sized .py file, deterministic: the one to modify in the one-file-change case."""
    candidates = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in (".syncagent", "test", "venv"))
        for f in sorted(files):
            p = Path(dirpath, f)
            if f.endswith(".py") and not p.is_symlink() and 4_000 < p.stat().st_size < 40_000:
                candidates.append(p)
    return candidates[len(candidates) // 2]


# ---------------------------------------------------------------- tree comparison

def tree_view(root: Path, skip_top=(".syncagent",)) -> dict[str, tuple]:
    """{relpath: (kind, mode, sha1 | link target)}; the top-level state dir is left out."""
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        if not rel_dir:
            dirnames[:] = [d for d in dirnames if d not in skip_top]
        for name in dirnames + files:
            full = os.path.join(dirpath, name)
            rel = os.path.join(rel_dir, name) if rel_dir else name
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", 0, os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", mode, None)
            else:
                with open(full, "rb") as f:
                    out[rel] = ("f", mode, hashlib.sha1(f.read()).hexdigest(), st.st_mtime_ns)
    return out


def diff_views(a: dict, b: dict, la: str, lb: str, limit: int = 10) -> list[str]:
    diffs = []
    for p in sorted(set(a) - set(b))[:limit]:
        diffs.append(f"only in {la}: {p}")
    for p in sorted(set(b) - set(a))[:limit]:
        diffs.append(f"only in {lb}: {p}")
    mtime = 0
    for p in sorted(set(a) & set(b)):
        va, vb = a[p], b[p]
        if va[:3] != vb[:3]:
            if len(diffs) < 3 * limit:
                diffs.append(f"differs: {p}: {la}={va[:3]} {lb}={vb[:3]}")
        elif va[0] == "f" and va[3] != vb[3]:
            mtime += 1
    if mtime:
        diffs.append(f"{mtime} files with equal content but different mtime ({la} vs {lb})")
    return diffs


# ---------------------------------------------------------------- running the tools

class Bench:
    def __init__(self, work: Path, dest_base: Path, syncagent: str, box: dict, env: dict):
        self.work, self.dest_base, self.syncagent, self.box, self.env = (
            work, dest_base, syncagent, box, env)
        self.ssh = f"ssh -F {box['ssh_config']}"

    def dest(self, tool: str, tree: str) -> Path:
        return self.dest_base / tool / tree

    def run(self, tool: str, tree: str, src: Path) -> tuple[float, dict | None]:
        dest = self.dest(tool, tree)
        env = self.env
        if tool in ("syncagent", "holder"):
            cmd = [self.syncagent, "push", self.box["name"], "--path", str(src),
                   "--remote-path", str(dest), "--json", "--no-restart"]
            env = dict(self.env, SYNCAGENT_HOLDER="1" if tool == "holder" else "0")
        else:
            cmd = ["rsync", "-a", "--delete", "-e", self.ssh, *RSYNC_FILTERS,
                   f"{src}/", f"{self.box['name']}:{dest}/"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, env=env)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {' '.join(cmd)}\n"
                               f"{proc.stderr.decode(errors='replace')}")
        info = json.loads(proc.stdout) if tool in ("syncagent", "holder") else None
        if tool == "holder":
            self.wait_holder()
        return elapsed, info

    def holder_sockets(self) -> list[Path]:
        return list((self.work / "state" / "syncagent" / "run").glob("*.sock"))

    def wait_holder(self, timeout: float = 30.0) -> None:
        """Untimed: until a holder answers on its socket (the first push only starts it)."""
        import socket as socketlib
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path in self.holder_sockets():
                with socketlib.socket(socketlib.AF_UNIX) as sock:
                    try:
                        sock.connect(str(path))
                        return
                    except OSError:
                        pass
            time.sleep(0.05)
        raise RuntimeError("no holder came up")

    def stop_holders(self) -> None:
        """The holders this run left: stopped by the pid their ping answers."""
        sys.path.insert(0, str(REPO))
        import signal
        import socket as socketlib
        import struct
        for path in self.holder_sockets():
            try:
                with socketlib.socket(socketlib.AF_UNIX) as sock:
                    sock.settimeout(5)
                    sock.connect(str(path))
                    data = json.dumps({"op": "ping"}).encode()
                    sock.sendall(struct.pack(">I", len(data)) + data)
                    (n,) = struct.unpack(">I", sock.recv(4))
                    os.kill(json.loads(sock.recv(n))["pid"], signal.SIGTERM)
            except (OSError, ValueError, KeyError, struct.error):
                pass


def code_version() -> dict:
    """Which syncagent was measured: HEAD, local changes, a hash of the package's sources."""
    def git(*a):
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True,
                              text=True).stdout.strip()
    h = hashlib.sha1()
    for f in sorted((REPO / "syncagent").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return {"head": git("rev-parse", "HEAD"), "dirty": git("status", "--short", "syncagent"),
            "sources_sha1": h.hexdigest()}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def bench_tree(b: Bench, tree: str, src: Path, reps: int, log, settle: float = 0.0,
               tools: tuple = TOOLS) -> dict:
    res: dict = {"samples": {t: {c: [] for c in CASES} for t in tools},
                 "stages": {c: [] for c in CASES}, "holder_stages": {c: [] for c in CASES},
                 "cold": {}, "correctness": []}
    change_file = pick_change_file(src)
    res["change_file"] = str(change_file.relative_to(src))
    src_view = tree_view(src) if tree == "gen" else None

    def check(label: str):
        views = {t: tree_view(b.dest(t, tree)) for t in tools}
        diffs = diff_views(views["syncagent"], views["rsync"], "syncagent", "rsync")
        if src_view is not None:
            now = tree_view(src)
            for t in tools:
                diffs += diff_views(now, views[t], "source", t)
        ok = not [d for d in diffs if "mtime" not in d]
        res["correctness"].append({"when": label, "ok": ok, "diffs": diffs,
                                   "entries": len(views["rsync"])})
        log(f"    check {label}: {'OK' if ok else 'MISMATCH'} "
            f"({len(views['rsync'])} entries){''.join(chr(10) + '      ' + d for d in diffs)}")

    # Cold first push: no local digest cache, destinations absent.
    shutil.rmtree(src / ".syncagent", ignore_errors=True)
    for t in tools:
        shutil.rmtree(b.dest(t, tree), ignore_errors=True)
        b.dest(t, tree).parent.mkdir(parents=True, exist_ok=True)
        secs, info = b.run(t, tree, src)
        res["cold"][t] = {"seconds": secs, "durations": info and info["durations"]}
        log(f"  cold initial {t:9s} {secs:7.3f} s"
            + (f"  {info['durations']}" if info else ""))
    check("cold initial")

    for rep in range(reps):
        order = tools if rep % 2 == 0 else tools[::-1]
        # initial
        for t in order:
            shutil.rmtree(b.dest(t, tree), ignore_errors=True)
            secs, info = b.run(t, tree, src)
            res["samples"][t]["initial"].append(secs)
            if info:
                res["stages" if t == "syncagent" else "holder_stages"]["initial"].append(
                    info["durations"] | {"files_sent": info["files_sent"]})
        check(f"rep {rep} initial")
        # no-op
        time.sleep(settle)
        for t in order:
            secs, info = b.run(t, tree, src)
            res["samples"][t]["noop"].append(secs)
            if info:
                res["stages" if t == "syncagent" else "holder_stages"]["noop"].append(
                    info["durations"] | {"files_sent": info["files_sent"]})
                assert not info["changed"], info
        # one-file change (same source for both tools; both destinations are up to date)
        time.sleep(settle)
        with open(change_file, "ab") as f:
            f.write(f"# bench change {rep} {time.time_ns()}\n".encode())
        for t in order:
            secs, info = b.run(t, tree, src)
            res["samples"][t]["change"].append(secs)
            if info:
                res["stages" if t == "syncagent" else "holder_stages"]["change"].append(
                    info["durations"] | {"files_sent": info["files_sent"]})
                assert info["files_sent"] == 1, info
        log(f"  rep {rep}: " + "  ".join(
            f"{c} sa={res['samples']['syncagent'][c][-1]:.3f} rs={res['samples']['rsync'][c][-1]:.3f}"
            for c in CASES))
    check("after last change")
    res["median"] = {t: {c: median(res["samples"][t][c]) for c in CASES} for t in tools}
    res["ratio"] = {c: res["median"]["syncagent"][c] / res["median"]["rsync"][c] for c in CASES}
    if "holder" in tools:
        res["ratio_holder"] = {c: res["median"]["holder"][c] / res["median"]["rsync"][c]
                               for c in CASES}
    # The stage names are whatever this syncagent's --json reports (older versions report
    # "manifest" apart from "connect"; newer ones fold it into "connect").
    res["stage_median"] = {
        c: {k: median([s[k] for s in res["stages"][c] if k in s])
            for k in dict.fromkeys(k for s in res["stages"][c] for k in s if k != "files_sent")}
        for c in CASES}
    for c in CASES:  # what --json does not see: interpreter start, imports, exit
        res["stage_median"][c]["outside"] = median(
            [w - s["total"] for w, s in zip(res["samples"]["syncagent"][c], res["stages"][c])])
    if "holder" in tools:  # the same, as the holder reports them (outside: client and socket)
        res["holder_stage_median"] = {
            c: {k: median([s[k] for s in res["holder_stages"][c] if k in s])
                for k in dict.fromkeys(k for s in res["holder_stages"][c] for k in s
                                       if k != "files_sent")}
            for c in CASES}
        for c in CASES:
            res["holder_stage_median"][c]["outside"] = median(
                [w - s["total"] for w, s in zip(res["samples"]["holder"][c],
                                                res["holder_stages"][c])])
    return res


def print_table(results: dict, reps: int) -> None:
    print()
    print(f"Medians of {reps} runs, wall clock of the whole command (s); "
          f"target = max syncagent/rsync ratio")
    hdr = f"{'tree':8s} {'case':8s} {'syncagent':>10s} {'rsync':>8s} {'ratio':>7s} {'target':>7s}  "
    print(hdr + "met")
    print("-" * (len(hdr) + 3))
    for tree, r in results.items():
        for c in CASES:
            sa, rs, ratio = r["median"]["syncagent"][c], r["median"]["rsync"][c], r["ratio"][c]
            print(f"{tree:8s} {c:8s} {sa:10.3f} {rs:8.3f} {ratio:6.2f}x {TARGETS[c]:6.2f}x  "
                  f"{'yes' if ratio <= TARGETS[c] else 'NO'}")
            if "ratio_holder" in r:
                ho, hr = r["median"]["holder"][c], r["ratio_holder"][c]
                print(f"{'':8s} {'  holder':8s} {ho:10.3f} {rs:8.3f} {hr:6.2f}x "
                      f"{TARGETS[c]:6.2f}x  {'yes' if hr <= TARGETS[c] else 'NO'}")
        cold = r["cold"]
        print(f"{tree:8s} {'cold':8s} {cold['syncagent']['seconds']:10.3f} "
              f"{cold['rsync']['seconds']:8.3f} "
              f"{cold['syncagent']['seconds'] / cold['rsync']['seconds']:6.2f}x   (1 run, "
              f"no local digest cache)")
    print()
    keys = list(dict.fromkeys(k for r in results.values() for c in CASES
                              for k in r["stage_median"][c]))
    print("syncagent stage medians from --json (s; the local scan runs in parallel with "
          "connect [+ manifest]):")
    print(f"{'tree':8s} {'case':8s} " + " ".join(f"{k:>9s}" for k in keys + ["wall"]))
    for tree, r in results.items():
        for c in CASES:
            s = r["stage_median"][c]
            print(f"{tree:8s} {c:8s} " + " ".join(f"{s.get(k, float('nan')):9.3f}" for k in keys)
                  + f" {r['median']['syncagent'][c]:9.3f}")
    print("(outside = wall - total: interpreter start, imports, exit; not in --json)")
    if any("holder_stage_median" in r for r in results.values()):
        keys = list(dict.fromkeys(k for r in results.values() if "holder_stage_median" in r
                                  for c in CASES for k in r["holder_stage_median"][c]))
        print()
        print("holder stage medians from --json (s; outside: the client process and the "
              "socket round trip):")
        print(f"{'tree':8s} {'case':8s} " + " ".join(f"{k:>9s}" for k in keys + ["wall"]))
        for tree, r in results.items():
            for c in CASES:
                s = r.get("holder_stage_median", {}).get(c, {})
                print(f"{tree:8s} {c:8s} "
                      + " ".join(f"{s.get(k, float('nan')):9.3f}" for k in keys)
                      + f" {r['median']['holder'][c]:9.3f}")
    print()
    for tree, r in results.items():
        bad = [c for c in r["correctness"] if not c["ok"]]
        print(f"correctness {tree}: {len(r['correctness']) - len(bad)}/{len(r['correctness'])} "
              f"checks equal" + ("" if not bad else f"; first mismatch: {bad[0]['diffs'][:3]}"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--trees", default="gen,stdlib")
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--mb", type=int, default=140)
    ap.add_argument("--work", default=None, help="where the source trees go (default: a temp "
                    "dir under /tmp, on disk)")
    ap.add_argument("--dest", default="/dev/shm", help="tmpfs for the destinations")
    ap.add_argument("--syncagent", default=str(DEFAULT_SYNCAGENT if DEFAULT_SYNCAGENT.exists()
                                               else shutil.which("syncagent")))
    ap.add_argument("--out", default=str(HERE / "results" / "push.json"))
    ap.add_argument("--no-holder-column", action="store_true",
                    help="leave out the column that pushes through a warm holder")
    ap.add_argument("--keep", action="store_true", help="keep the source trees")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds to wait (untimed) before the no-op and the change pushes; "
                    "> 2 lets the agent's digest cache keep the files it just wrote (it leaves "
                    "out entries changed in the last 2 s)")
    args = ap.parse_args(argv)
    trees = [t for t in args.trees.split(",") if t]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="syncagent-bench-", dir=args.work))
    dest_base = Path(tempfile.mkdtemp(prefix="syncagent-bench-", dir=args.dest))
    env = dict(os.environ, XDG_CONFIG_HOME=str(work / "config"),
               XDG_STATE_HOME=str(work / "state"))
    # An installed package has its bytecode compiled (pip does it); a shell that exports
    # PYTHONDONTWRITEBYTECODE=1 would make every run compile syncagent and its dependencies
    # again (~0.1-0.2 s per command here), which is not what a user waits for.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    box = None
    results: dict = {}
    meta: dict = {}
    try:
        sources = {}
        for t in trees:
            src = work / "src" / t  # basename = tree name
            src.mkdir(parents=True)
            t0 = time.perf_counter()
            meta[t] = generate_tree(src, files=args.files, total_mb=args.mb) if t == "gen" \
                else copy_stdlib(src)
            log(f"{t}: {meta[t]} ({time.perf_counter() - t0:.1f} s to create in {src})")
            sources[t] = src
        up = subprocess.run([args.syncagent, "sandbox", "up", "--name", "bench",
                             "--dir", str(work / "sandbox"), "--json"],
                            capture_output=True, env=env, check=True)
        box = json.loads(up.stdout)
        log(f"sandbox: sshd pid {box['sshd_pid']} on {box['host']}:{box['port']}")
        b = Bench(work, dest_base, args.syncagent, box, env)
        for t in trees:
            log(f"== {t}")
            results[t] = bench_tree(b, t, sources[t], args.reps, log, args.settle,
                                    TOOLS if args.no_holder_column else TOOLS + ("holder",))
            results[t]["tree"] = meta[t]
    finally:
        if box is not None:
            Bench(work, dest_base, args.syncagent, box, env).stop_holders()
            subprocess.run([args.syncagent, "sandbox", "down", "--name", "bench",
                            "--dir", str(work / "sandbox")], env=env, capture_output=True)
        shutil.rmtree(dest_base, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")
    print_table(results, args.reps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "rsync": subprocess.run(["rsync", "--version"], capture_output=True,
                                text=True).stdout.splitlines()[0],
        "code": code_version(), "reps": args.reps, "settle": args.settle, "source_dir": str(work), "dest_dir": str(dest_base),
        "targets": TARGETS, "results": results}, indent=1))
    print(f"\nwrote {out}")
    return 0 if all(c["ok"] for r in results.values() for c in r["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
