"""Scale: a 100,000-file tree through `syncagent push` and `syncagent watch`.

Measures, against a local sandbox (real sshd on 127.0.0.1):
  * push, initial and no-op: wall time and peak RSS of the syncagent process;
  * watch: time from start to the first "synced" event, RSS after it, idle CPU over 10 s
    (utime+stime from /proc/<pid>/stat), and the inotify watches it holds.
Targets (issue): watcher start <= 10 s, RSS <= 150 MB, idle CPU ~0.

Usage: python bench/scale_bench.py [--files 100000] [--per-dir 100] [--dir /dev/shm] [--json OUT]
Everything (tree, remote, HOME) lives in a temp dir under --dir (default: the system temp dir,
on disk here; /dev/shm for tmpfs); every process started is stopped by pid.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYNCAGENT = str(Path(sys.executable).with_name("syncagent"))
TICK = os.sysconf("SC_CLK_TCK")


def make_tree(root: Path, files: int, per_dir: int) -> None:
    for i in range(files):
        d = root / f"pkg{i // per_dir // 50}" / f"mod{i // per_dir}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.py").write_text(f"VALUE = {i}\n")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def inotify_watches(pid: int) -> int:
    n = 0
    for fd in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            n += fd.read_text().count("inotify wd:")
        except OSError:
            pass
    return n


def timed_push(argv: list[str], env: dict) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([SYNCAGENT, "push", *argv, "--json", "--no-restart"], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"push failed: {proc.stderr.strip()}")
    out = json.loads(proc.stdout)
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(after.ru_maxrss / 1024, 1),
            "cpu_s": round((after.ru_utime + after.ru_stime)
                           - (before.ru_utime + before.ru_stime), 2),
            "files_sent": out["files_sent"], "durations": out["durations"]}


def watch_figures(argv: list[str], env: dict, idle: float) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([SYNCAGENT, "watch", *argv, "--json", "--no-restart"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        while True:
            line = proc.stdout.readline()
            if not line:
                raise SystemExit(f"watch exited: rc {proc.wait()}")
            event = json.loads(line)
            if event["event"] == "synced":
                break
        start = time.perf_counter() - t0
        rss = rss_mb(proc.pid)
        watches = inotify_watches(proc.pid)
        c0, w0 = cpu_s(proc.pid), time.perf_counter()
        time.sleep(idle)  # a measurement window, not synchronisation
        cpu = (cpu_s(proc.pid) - c0) / (time.perf_counter() - w0)
        return {"first_synced_s": round(start, 2), "rss_mb": round(rss, 1),
                "rss_after_idle_mb": round(rss_mb(proc.pid), 1),
                "idle_cpu_percent": round(cpu * 100, 2), "inotify_watches": watches,
                "initial_sync": event.get("durations")}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--per-dir", type=int, default=100)
    ap.add_argument("--idle", type=float, default=10.0)
    ap.add_argument("--dir", default=None, help="where the tree and the remote live")
    ap.add_argument("--syncagent", default=None,
                    help="the syncagent command to measure (default: this venv's)")
    ap.add_argument("--json", default=str(HERE / "results" / "scale.json"))
    args = ap.parse_args()
    global SYNCAGENT
    SYNCAGENT = args.syncagent or SYNCAGENT
    with tempfile.TemporaryDirectory(prefix="syncagent-scale-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        home = tmp / "home"
        home.mkdir()
        env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
               "XDG_STATE_HOME": str(home / ".local" / "state")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its bytecode
        os.environ.update({k: env[k] for k in ("HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME")})
        sys.path.insert(0, str(HERE.parent))
        from syncagent import sandbox

        box = sandbox.up("scale", tmp / "box")
        try:
            root = tmp / "tree"
            t0 = time.perf_counter()
            make_tree(root, args.files, args.per_dir)
            gen = time.perf_counter() - t0
            argv = ["scale", "--path", str(root), "--remote-path", f"{box.remote_root}/tree"]
            results = {"files": args.files, "dirs": args.files // args.per_dir,
                       "generate_s": round(gen, 1), "dir": str(tmp),
                       "filesystem": subprocess.run(["stat", "-f", "-c", "%T", str(tmp)],
                                                    capture_output=True, text=True
                                                    ).stdout.strip()}
            results["push_initial"] = timed_push(argv, env)
            results["push_noop"] = timed_push(argv, env)
            results["watch"] = watch_figures(argv, env, args.idle)
        finally:
            sandbox.down("scale", tmp / "box")
    print(json.dumps(results, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
