"""Fleet benchmark: one changed file pushed to 1 target vs to 3 targets, direct and held.

Three sandboxes (sshd only; destinations on /dev/shm), a generated 2,000-file project. Each
repetition edits one file before each of four whole ``syncagent push`` commands (what a user
waits for, started as the console script starts it, ``syncagent.entry``) and times them:

- 1 direct: ``push g1 --no-holder`` (a new SSH connection, full manifests);
- 3 direct: ``push g1 g2 g3 --no-holder``;
- 1 held:   ``push g1``, answered by the holder for g1 (``syncagent.holder``);
- 3 held:   ``push g1 g2 g3``, answered by the holder for the three.

Every measured push must send exactly the one edited file to each target it names (checked in
its ``--json`` output), and every held one must be answered by a holder (its ``served`` count
goes up). Goal: 3 targets <= 1.5x one target, for held pushes.

    .venv/bin/python bench/fleet_bench.py [--reps 9] [--files 2000] [--cli]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
NAMES = ("g1", "g2", "g3")
CASES = ("1 direct", "3 direct", "1 held", "3 held")


def run(command, args, env):
    t0 = time.perf_counter()
    proc = subprocess.run(command + args, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"syncagent {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return took, proc.stdout


def sent(out: str) -> list[int]:
    data = json.loads(out)
    return [t["files_sent"] for t in data.get("targets", [data])]


def holders(project: Path, env) -> dict:
    """{case: the holder's ping answer} for the two held cases (None: none answers)."""
    probe = ("import json, sys; from syncagent import holder; "
             "from pathlib import Path; from syncagent.config import load_project, resolve_target; "
             "p = load_project(Path(sys.argv[1])); "
             "ts = lambda names: [resolve_target(n, p) for n in names]; "
             "print(json.dumps({'1 held': holder.ping(p.root, ts(['g1'])), "
             "'3 held': holder.ping(p.root, ts(['g1', 'g2', 'g3']))}))")
    out = subprocess.run([sys.executable, "-c", probe, str(project)], env=env,
                         capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--cli", action="store_true",
                        help="start commands as `python -m syncagent.cli` (the full CLI) "
                             "instead of the console script's `syncagent.entry`")
    args = parser.parse_args()
    command = [sys.executable, "-m", "syncagent.cli" if args.cli else "syncagent.entry"]
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    shm = Path(tempfile.mkdtemp(prefix="fleet-bench-", dir="/dev/shm"))
    env = {**os.environ, "XDG_CONFIG_HOME": str(work / "cfg"),
           "XDG_STATE_HOME": str(work / "state"), "XDG_RUNTIME_DIR": str(work / "run"),
           "PYTHONPATH": str(HERE.parent)}
    env.pop("SYNCAGENT_HOLDER", None)
    (work / "run").mkdir(mode=0o700)
    project = work / "proj"
    rng = random.Random(7)
    for i in range(args.files):
        d = project / f"pkg{i % 50}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"m{i}.py").write_bytes(rng.randbytes(rng.randint(200, 12000)))
    lines = ["holder_idle = 120"]
    held_pids: set[int] = set()
    try:
        for name in NAMES:
            box = json.loads(run(command, ["sandbox", "up", "--name", name, "--dir",
                                           str(work / name), "--no-worker", "--json"], env)[1])
            lines += [f"[targets.{name}]", f'host = "{name}"',
                      f'ssh_config = "{box["ssh_config"]}"', f'remote_path = "{shm / name}"']
        (project / "syncagent.toml").write_text("\n".join(lines) + "\n")
        base = ["--path", str(project), "--json"]
        argv = {"1 direct": ["push", "g1", *base, "--no-holder"],
                "3 direct": ["push", *NAMES, *base, "--no-holder"],
                "1 held": ["push", "g1", *base], "3 held": ["push", *NAMES, *base]}
        run(command, argv["3 direct"], env)  # initial
        edited = project / "pkg0" / "m0.py"
        for case in ("1 held", "3 held"):  # leave the holders, and let them connect
            for i in range(2):
                edited.write_text(f"warm-up {case} {i}\n")
                run(command, argv[case], env)
        deadline = time.monotonic() + 60
        while True:  # both holders up, with their sessions, before anything is timed
            before = holders(project, env)
            if all((before.get(c) or {}).get("connected") for c in ("1 held", "3 held")):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the holders did not connect: {before}")
            time.sleep(0.2)
        times: dict[str, list[float]] = {case: [] for case in CASES}
        for rep in range(args.reps):
            for case in CASES:
                edited.write_text(f"rep {rep} {case}\n")
                took, out = run(command, argv[case], env)
                if sent(out) != [1] * (3 if case.startswith("3") else 1):
                    raise SystemExit(f"{case}: sent {sent(out)}, not one file each")
                times[case].append(took)
        after = holders(project, env)
        for case in ("1 held", "3 held"):
            b, a = before.get(case), after.get(case)
            if b and a:
                held_pids.add(a["pid"])
            print(f"{case}: holder pid {a and a['pid']}, served {b and b['served']} -> "
                  f"{a and a['served']} (reps {args.reps})")
            if not (b and a and a["pid"] == b["pid"] and a["served"] - b["served"] == args.reps):
                print(f"  WARNING: {case} was not answered by one holder throughout")
        med = {case: statistics.median(v) for case, v in times.items()}
        print(f"one-file change, {args.files} files, medians of {args.reps} "
              f"(wall clock, s; {'syncagent.cli' if args.cli else 'syncagent.entry'})")
        for case in CASES:
            print(f"  {case:9}: {med[case]:.3f}")
        r_direct = med["3 direct"] / med["1 direct"]
        r_held = med["3 held"] / med["1 held"]
        print(f"  3 direct / 1 direct: {r_direct:.2f}x")
        print(f"  3 held / 1 held    : {r_held:.2f}x   target <= 1.50x   "
              f"{'met' if r_held <= 1.5 else 'NOT met'}")
        print(f"  3 direct / 1 held  : {med['3 direct'] / med['1 held']:.2f}x")
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        (out / "fleet.json").write_text(json.dumps(
            {"files": args.files, "reps": args.reps, "times": times, "medians": med,
             "ratio_held": r_held, "ratio_direct": r_direct}, indent=2))
    finally:
        for pid in held_pids:  # the holders this run left (found by their own answer)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for name in NAMES:
            subprocess.run(command + ["sandbox", "down", "--name", name, "--dir",
                                      str(work / name)], env=env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
