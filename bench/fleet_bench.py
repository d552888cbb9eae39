"""Fleet benchmark: one changed file pushed to 1 target vs to 3 targets, in one run.

Three sandboxes (sshd only; destinations on /dev/shm), a generated 2,000-file project. Each
repetition edits one file and times the whole `syncagent push` command (what a user waits for)
to g1 alone, then (after another edit) to g1 g2 g3. Target: 3 targets <= 1.5x one target.

    .venv/bin/python bench/fleet_bench.py [--reps 9] [--files 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYNCAGENT = [sys.executable, "-m", "syncagent.cli"]
NAMES = ("g1", "g2", "g3")


def run(args, env, cwd=None):
    t0 = time.perf_counter()
    proc = subprocess.run(SYNCAGENT + args, env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"syncagent {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--files", type=int, default=2000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    shm = Path(tempfile.mkdtemp(prefix="fleet-bench-", dir="/dev/shm"))
    env = {**os.environ, "XDG_CONFIG_HOME": str(work / "cfg"),
           "XDG_STATE_HOME": str(work / "state"), "PYTHONPATH": str(HERE.parent)}
    project = work / "proj"
    rng = random.Random(7)
    for i in range(args.files):
        d = project / f"pkg{i % 50}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"m{i}.py").write_bytes(rng.randbytes(rng.randint(200, 12000)))
    lines = []
    boxes = []
    try:
        for name in NAMES:
            box = json.loads(subprocess.run(
                SYNCAGENT + ["sandbox", "up", "--name", name, "--dir", str(work / name),
                             "--no-worker", "--json"], env=env, capture_output=True, text=True,
                check=True).stdout)
            boxes.append(box)
            lines += [f"[targets.{name}]", f'host = "{name}"',
                      f'ssh_config = "{box["ssh_config"]}"', f'remote_path = "{shm / name}"']
        (project / "syncagent.toml").write_text("\n".join(lines) + "\n")
        run(["push", *NAMES, "--path", str(project)], env)  # initial
        one, three = [], []
        edited = project / "pkg0" / "m0.py"
        for rep in range(args.reps):
            edited.write_text(f"rep {rep} one\n")
            one.append(run(["push", "g1", "--path", str(project)], env))
            edited.write_text(f"rep {rep} three\n")
            three.append(run(["push", *NAMES, "--path", str(project)], env))
            run(["push", *NAMES[1:], "--path", str(project)], env)  # g2, g3 catch up on 'one'
        m1, m3 = statistics.median(one), statistics.median(three)
        print(f"one-file change, {args.files} files, medians of {args.reps} (wall clock, s)")
        print(f"  1 target : {m1:.3f}")
        print(f"  3 targets: {m3:.3f}   ratio {m3 / m1:.2f}x   target <= 1.50x   "
              f"{'met' if m3 / m1 <= 1.5 else 'NOT met'}")
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        (out / "fleet.json").write_text(json.dumps(
            {"files": args.files, "reps": args.reps, "one": one, "three": three,
             "median_one": m1, "median_three": m3, "ratio": m3 / m1}, indent=2))
    finally:
        for name in NAMES:
            subprocess.run(SYNCAGENT + ["sandbox", "down", "--name", name, "--dir",
                                        str(work / name)], env=env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
