"""Scale: a 100,000-file tree through `syncagent push` and `syncagent watch`.

Measures, against a local sandbox (real sshd on 127.0.0.1):
  * push, initial and no-op: wall time and peak RSS of the syncagent process (the one-shot
    command: SYNCAGENT_HOLDER=0);
  * watch: time from start to the first "synced" event, RSS after it, idle CPU over 10 s
    (utime+stime from /proc/<pid>/stat), and the inotify watches it holds; then 5 saves of
    one file, each timed from the write to its "synced" event, and the RSS after them.
Targets (issue): watcher start <= 10 s, RSS <= 150 MB, idle CPU ~0.

Usage: python bench/scale_bench.py [--files 100000] [--per-dir 100] [--dir /dev/shm]
                                   [--remote-dir DIR] [--fresh-watch] [--strace] [--json OUT]
The tree and HOME live in a temp dir under --dir (default: the system temp dir, on disk here;
/dev/shm for tmpfs); the sandbox (its sshd, the remote home with the remote tree and the
agent's state) in one under --remote-dir (default: the same as --dir), so the remote alone can
be moved between tmpfs and disk. Every process started is stopped by pid.

What each phase is told apart by (a shared machine is noisy, so every figure carries the load
average at its start and end):
  * the agent's own counters: every process under the sandbox's sshd (the agent, sshd's
    session child) is sampled from /proc every 50 ms; the last sample of each is kept (cpu
    time, read/write bytes, read/write syscalls, the bytes that went to the block device);
  * the dev process's: its CPU time (children rusage for a push; /proc for a watch);
  * watch: the time of each event from start (connected, synced, ...);
  * --fresh-watch: a second watch onto an empty remote (the first sync is then the whole
    transfer, as on a fresh clone with nothing pushed yet);
  * --strace: `strace -c -f` attached to the sandbox's sshd for every phase (its timings are
    then not comparable: strace slows every syscall), summaries in the JSON.
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
import threading
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


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of ``pid`` now (VmRSS), or its peak so far (``field="VmHWM"``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid``: system time is where a filesystem's cost shows."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def inotify_watches(pid: int) -> int:
    n = 0
    for fd in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            n += fd.read_text().count("inotify wd:")
        except OSError:
            pass
    return n


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def proc_io(pid: int) -> dict:
    """/proc/<pid>/io as ints (rchar, wchar, syscr, syscw, read_bytes, write_bytes, ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        k, v = line.split(":")
        out[k] = int(v)
    return out


def children_of(root: int) -> list[int]:
    """Every live descendant of ``root``, from /proc/<pid>/task/<tid>/children (cheap: no
    pass over all of /proc, so sampling every 50 ms costs ~1 % of a core)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
            except OSError:
                continue
            kids = [int(c) for c in text.split()]
            found += kids
            todo += kids
    return found


class RemoteProbe(threading.Thread):
    """Samples every process under the sandbox's sshd (the agent, sshd's session children)
    every 50 ms and keeps each one's last reading: the agent of a push exits with the push, so
    its counters are read while it runs. A reading (cpu s, /proc io) is cumulative, so the last
    one taken is the process's total up to at most 50 ms before it exited."""

    def __init__(self, sshd_pid: int):
        super().__init__(daemon=True)
        self.sshd_pid, self.stop = sshd_pid, threading.Event()
        self.last: dict[int, dict] = {}

    def run(self) -> None:
        while not self.stop.wait(0.05):
            for pid in children_of(self.sshd_pid):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                    user, system = cpu_split(pid)
                    self.last[pid] = {"cmd": cmd.decode(errors="replace")[:80],
                                      "cpu_s": user + system, "user_s": user, "sys_s": system,
                                      "peak_rss_mb": rss_mb(pid, "VmHWM"), **proc_io(pid)}
                except (OSError, ValueError):
                    pass

    def finish(self) -> dict:
        """Totals over the agent processes (python) and the sshd children apart."""
        self.stop.set()
        self.join()
        keys = ("cpu_s", "user_s", "sys_s", "rchar", "wchar", "syscr", "syscw", "read_bytes",
                "write_bytes")
        out = {}
        for group, pred in (("agent", lambda c: "python" in c),
                            ("sshd", lambda c: "python" not in c)):
            rows = [r for r in self.last.values() if pred(r["cmd"])]
            out[group] = {k: round(sum(r[k] for r in rows), 2) for k in keys}
            out[group]["processes"] = len(rows)
            if group == "agent" and rows:
                out[group]["peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in rows), 1)
        return out


class Phase:
    """One measured phase: load average at its start and end, the remote probe, and (with
    --strace) a syscall summary of everything under the sandbox's sshd."""

    def __init__(self, sshd_pid: int, strace_to: Path | None):
        self.sshd_pid, self.strace_to = sshd_pid, strace_to

    def __enter__(self):
        self.figures = {"load_start": loadavg()}
        self.strace = None
        if self.strace_to is not None:
            self.strace = subprocess.Popen(["strace", "-c", "-f", "-o", str(self.strace_to),
                                            "-p", str(self.sshd_pid)],
                                           stderr=subprocess.PIPE, text=True)
            # attached once it says so on stderr ("strace: Process N attached")
            self.strace.stderr.readline()
        self.probe = RemoteProbe(self.sshd_pid)
        self.probe.start()
        return self.figures

    def __exit__(self, *exc):
        self.figures["remote"] = self.probe.finish()
        self.figures["load_end"] = loadavg()
        if self.strace is not None:
            self.strace.send_signal(signal.SIGINT)
            self.strace.wait(timeout=30)
            self.strace.stderr.close()
            self.figures["strace"] = strace_summary(self.strace_to)
        return False


def strace_summary(path: Path, top: int = 12) -> list[str]:
    """The heaviest rows of an `strace -c` table (by time), as text."""
    lines = path.read_text().splitlines()
    rows = [ln for ln in lines if ln.strip() and not ln.startswith(("%", "-", "strace"))]
    total = [ln for ln in rows if ln.rstrip().endswith("total")]
    body = [ln for ln in rows if not ln.rstrip().endswith("total")]
    return lines[:2] + body[:top] + total


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


def next_synced(proc: subprocess.Popen) -> dict:
    """The watch's next "synced" event (its JSON lines, read in order)."""
    while True:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"watch exited: rc {proc.wait()}")
        event = json.loads(line)
        if event["event"] == "synced":
            return event


def watch_figures(argv: list[str], env: dict, idle: float, edit: Path | None = None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([SYNCAGENT, "watch", *argv, "--json", "--no-restart"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    events = {}  # the first time (s from start) each kind of event came
    try:
        while True:
            line = proc.stdout.readline()
            if not line:
                raise SystemExit(f"watch exited: rc {proc.wait()}")
            event = json.loads(line)
            events.setdefault(event["event"], round(time.perf_counter() - t0, 2))
            if event["event"] == "synced":
                break
        start = time.perf_counter() - t0
        rss = rss_mb(proc.pid)
        watches = inotify_watches(proc.pid)
        dev = {"cpu_s": round(cpu_s(proc.pid), 2), **proc_io(proc.pid)}
        c0, w0 = cpu_s(proc.pid), time.perf_counter()
        time.sleep(idle)  # a measurement window, not synchronisation
        cpu = (cpu_s(proc.pid) - c0) / (time.perf_counter() - w0)
        figures = {"first_synced_s": round(start, 2), "rss_mb": round(rss, 1),
                   "rss_after_idle_mb": round(rss_mb(proc.pid), 1),
                   "idle_cpu_percent": round(cpu * 100, 2), "inotify_watches": watches,
                   "events_s": events, "files_sent": event.get("files_sent"),
                   "dev_at_first_sync": dev, "initial_sync": event.get("durations")}
        if edit is not None:  # a save: write to its "synced" event, the batch's own stages
            saves, stages = [], []
            for i in range(5):
                t0 = time.perf_counter()
                edit.write_text(f"VALUE = 'save {i}'\n")
                stages.append(next_synced(proc).get("durations"))
                saves.append(round(time.perf_counter() - t0, 3))
            figures.update(save_to_synced_s=saves, save_stages=stages,
                           rss_after_saves_mb=round(rss_mb(proc.pid), 1))
        return figures
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
    ap.add_argument("--dir", default=None, help="where the tree and HOME live")
    ap.add_argument("--remote-dir", default=None, help="where the sandbox (the remote tree, "
                    "the agent's state) lives (default: --dir)")
    ap.add_argument("--fresh-watch", action="store_true",
                    help="also time a watch whose first sync fills an empty remote")
    ap.add_argument("--strace", action="store_true",
                    help="strace -c -f everything under the sandbox's sshd (slows it)")
    ap.add_argument("--syncagent", default=None,
                    help="the syncagent command to measure (default: this venv's)")
    ap.add_argument("--json", default=str(HERE / "results" / "scale.json"))
    args = ap.parse_args()
    global SYNCAGENT
    SYNCAGENT = args.syncagent or SYNCAGENT
    remote_dir = args.remote_dir or args.dir
    with tempfile.TemporaryDirectory(prefix="syncagent-scale-", dir=args.dir) as tmp, \
            tempfile.TemporaryDirectory(prefix="syncagent-scale-remote-", dir=remote_dir) as rtmp:
        tmp, rtmp = Path(tmp), Path(rtmp)
        home = tmp / "home"
        home.mkdir()
        env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
               "XDG_STATE_HOME": str(home / ".local" / "state")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its bytecode
        # The one-shot push, as the issue measured it: no holder is left behind, so none
        # keeps the tree in memory or plans in the background while the watch is measured.
        env["SYNCAGENT_HOLDER"] = "0"
        os.environ.update({k: env[k] for k in ("HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME")})
        sys.path.insert(0, str(HERE.parent))
        from syncagent import sandbox

        box = sandbox.up("scale", rtmp / "box")
        try:
            root = tmp / "tree"
            t0 = time.perf_counter()
            make_tree(root, args.files, args.per_dir)
            gen = time.perf_counter() - t0

            def fs(path):
                return subprocess.run(["stat", "-f", "-c", "%T", str(path)],
                                      capture_output=True, text=True).stdout.strip()

            def phase(name):
                return Phase(box.sshd_pid, tmp / f"strace-{name}.txt" if args.strace else None)

            argv = ["scale", "--path", str(root), "--remote-path", f"{box.remote_root}/tree"]
            results = {"files": args.files, "dirs": args.files // args.per_dir,
                       "generate_s": round(gen, 1), "dir": str(tmp), "filesystem": fs(tmp),
                       "remote_dir": str(rtmp), "remote_filesystem": fs(rtmp),
                       "strace": args.strace, "cpus": os.cpu_count()}
            with phase("push_initial") as f:
                f.update(timed_push(argv, env))
            results["push_initial"] = f
            with phase("push_noop") as f:
                f.update(timed_push(argv, env))
            results["push_noop"] = f
            with phase("watch") as f:
                f.update(watch_figures(argv, env, args.idle, edit=root / "pkg0" / "mod0" / "f0.py"))
            results["watch"] = f
            if args.fresh_watch:
                fresh = ["scale", "--path", str(root),
                         "--remote-path", f"{box.remote_root}/fresh"]
                with phase("watch_fresh") as f:
                    f.update(watch_figures(fresh, env, args.idle))
                results["watch_fresh"] = f
        finally:
            sandbox.down("scale", rtmp / "box")
    print(json.dumps(results, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
