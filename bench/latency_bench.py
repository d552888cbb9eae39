#!/usr/bin/env python3
"""Benchmark: ``syncagent watch`` against the manual workflow it replaces, on one sandbox.

For the same edits, in one run against one provisioned sandbox (``syncagent sandbox up``: a real
sshd on 127.0.0.1, its own redis-server, the demo Celery app under supervisord):

* A. save -> file on remote: a unique token is written into ``notes/edit.txt`` of the local
  project; the time from just before the write until the remote copy holds the token (the
  sandbox's "remote" tree is a local directory, polled every ``--poll-ms``).
  - syncagent: ``syncagent watch NAME --json`` on the provisioned project;
  - rsync loop: ``inotifywait -m -r ... <project> | while read; do rsync -a --delete ...; done``
    into a separate remote directory (``<remote_root>/project-rsync``).
* B. save -> new code live: ``app/version.py`` is set to a new ``VERSION``; the time from just
  before the write until ``app.tasks.demo.version``, sent through the broker, returns it.
  - syncagent: the same ``syncagent watch`` (it syncs and blue-green restarts the worker);
  - manual: ``rsync -a --delete ... <project>/ NAME:<remote project>/`` then
    ``supervisorctl restart worker:worker-<running colour>``, run at once after the save (a
    lower bound for a person typing them).
* Burst: 2,000 new ``.py`` files written as fast as possible in a new package directory;
  syncagent: restarts and time until the last ``ready`` (settled); rsync loop: rsync runs and
  time until its last rsync finishes (capped at ``--burst-cap`` s; then projected).

Each sample waits for the previous one to settle (arrival/answer, the tool idle, then
``--settle`` s). One untimed warm-up sample precedes each series. The tools never run at the
same time.

Usage::

    .venv/bin/python bench/latency_bench.py [--samples 30] [--burst-files 2000]
    .venv/bin/python bench/latency_bench.py --warm [--samples 10] [--apps demo,heavy]

``--warm`` runs ``bench/warm_bench.py`` instead: warm starts from a parked standby against cold
starts and rsync + ``supervisorctl restart``, on the demo and the heavy example app (results:
``bench/results/warm_latency.json`` and the plot ``bench/warm_latency.png``).

Results: a table on stdout, ``bench/results/latency.json`` and the plot ``bench/latency.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from push_bench import RSYNC_FILTERS, code_version  # noqa: E402  (same excludes as syncagent)

DEFAULT_SYNCAGENT = REPO / ".venv" / "bin" / "syncagent"
NAME = "latbench"
# Targets from the issue: syncagent's p50 at most this, and rsync p50 / syncagent p50 at least.
TARGETS = {"file": {"p50_max": 0.050, "ratio_min": 5.0},
           "live": {"p50_max": 1.5, "ratio_min": 2.0}}
INOTIFY_EXCLUDE = r"(venv|__pycache__|\.git)"
LABELS = {"file": "save → file on remote", "live": "save → new code answering a task"}
METRICS = ("file", "live", "rapid")
TOOL_LABELS = {"file": ("syncagent watch", "inotifywait | rsync loop"),
               "live": ("syncagent watch", "rsync +\nsupervisorctl restart")}


def pct(xs: list[float], p: float) -> float:
    """Percentile with linear interpolation (numpy's default); NaN when empty."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait_for(pred, timeout: float, what: str, interval: float = 0.001):
    deadline = time.perf_counter() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.perf_counter() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def write(path: Path, text: str) -> float:
    """A plain editor-style save (open, truncate, write, close); returns t_save (just before)."""
    t = time.perf_counter()
    with open(path, "w") as f:
        f.write(text)
    return t


def unique_version(prefix: str, i: int) -> str:
    """A new VERSION whose length grows with ``i``: Python trusts a cached .pyc whose recorded
    source size and mtime (whole seconds) match, so two same-size saves within one second
    would leave the worker on the old bytecode with either tool (see README)."""
    return f"{prefix}-{i + 1:03d}-{time.time_ns()}-" + "x" * (i + 2)


def version_py(v: str) -> str:
    return f'"""Version of the demo app (read by admin pages to spot stale workers)."""\n' \
           f'__all__ = ["VERSION"]\n\nVERSION = "{v}"\n'


# ---------------------------------------------------------------- the tools

class Watch:
    """``syncagent watch NAME --json`` as a subprocess; its events, stamped on arrival."""

    def __init__(self, syncagent: str, project: Path, env: dict, out: Path):
        self.cmd = [syncagent, "watch", NAME, "--path", str(project), "--json"]
        self.env, self.out = env, out
        self.events: list[dict] = []
        self.lock = threading.Lock()

    def start(self) -> "Watch":
        self.stderr = open(self.out, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self.stderr,
                                     env=self.env, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        wait_for(lambda: self.of("synced"), 60, "the initial reconcile", 0.01)
        self.wait_idle()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            t = time.perf_counter()
            try:
                e = json.loads(line)
            except ValueError:
                continue
            e["_t"] = t
            with self.lock:
                self.events.append(e)

    def of(self, kind: str, since: float = 0.0) -> list[dict]:
        with self.lock:
            return [e for e in self.events if e["event"] == kind and e["_t"] >= since]

    def idle(self) -> bool:
        """Every restart answered (ready or error)."""
        with self.lock:
            n = {k: sum(e["event"] == k for e in self.events) for k in ("restart", "ready",
                                                                          "error")}
        return n["restart"] <= n["ready"] + n["error"]

    def wait_idle(self, quiet: float = 0.5, timeout: float = 120) -> None:
        """No restart outstanding, and no event for ``quiet`` s."""
        def calm():
            with self.lock:
                last = self.events[-1]["_t"] if self.events else 0
            return self.idle() and time.perf_counter() - last >= quiet
        wait_for(calm, timeout, "syncagent watch to settle", 0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.reader.join(5)
        self.stderr.close()


class RsyncLoop:
    """The manual loop, verbatim apart from rsync being a wrapper that logs each run and the
    events being tee'd to a file (to count them)."""

    def __init__(self, project: Path, dest: str, ssh: str, work: Path):
        self.work = work
        self.runs_log = work / "rsync-runs.log"
        self.events_log = work / "inotify-events.log"
        self.stderr_log = work / "inotify.err"
        wrapper = work / "rsync-logged"
        wrapper.write_text(
            "#!/bin/bash\n"
            f"echo \"S $EPOCHREALTIME\" >> {shlex.quote(str(self.runs_log))}\n"
            "rsync \"$@\"\nrc=$?\n"
            f"echo \"E $EPOCHREALTIME\" >> {shlex.quote(str(self.runs_log))}\n"
            "exit $rc\n")
        wrapper.chmod(0o755)
        rsync = " ".join(shlex.quote(a) for a in [
            str(wrapper), "-a", "--delete", "-e", ssh, *RSYNC_FILTERS, f"{project}/", dest])
        self.rsync_cmd = rsync
        self.script = (
            f"inotifywait -m -r -e modify,create,delete,move --exclude "
            f"{shlex.quote(INOTIFY_EXCLUDE)} {shlex.quote(str(project))} "
            f"| tee -a {shlex.quote(str(self.events_log))} "
            f"| while read -r _; do {rsync}; done")

    def start(self) -> "RsyncLoop":
        for p in (self.runs_log, self.events_log, self.stderr_log):
            p.write_text("")
        self.err = open(self.stderr_log, "ab")
        self.proc = subprocess.Popen(["bash", "-c", self.script], stdout=subprocess.DEVNULL,
                                     stderr=self.err, start_new_session=True)
        wait_for(lambda: "Watches established" in (read(self.stderr_log) or ""), 30,
                 "inotifywait's watches", 0.01)
        return self

    def runs(self) -> list[tuple[float, float | None]]:
        """(start, end) wall-clock times of the rsync runs so far (end None while running)."""
        out: list[list] = []
        for line in (read(self.runs_log) or "").splitlines():
            kind, _, t = line.partition(" ")
            if kind == "S":
                out.append([float(t), None])
            elif kind == "E":
                for r in out:  # runs are sequential: the first open one
                    if r[1] is None:
                        r[1] = float(t)
                        break
        return [tuple(r) for r in out]

    def events(self) -> int:
        return len((read(self.events_log) or "").splitlines())

    def idle_for(self) -> float:
        """Seconds since the last rsync ended (0 while one runs or an event is unserved)."""
        runs = self.runs()
        if self.events() > len(runs):
            return 0.0
        if not runs:
            return float("inf")
        if runs[-1][1] is None:
            return 0.0
        return time.time() - runs[-1][1]

    def wait_idle(self, quiet: float = 0.5, timeout: float = 120) -> None:
        wait_for(lambda: self.idle_for() >= quiet, timeout, "the rsync loop to go quiet", 0.02)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.err.close()


# ---------------------------------------------------------------- the bench

class Bench:
    def __init__(self, args, work: Path, env: dict, box: dict):
        self.args, self.work, self.env, self.box = args, work, env, box
        self.project = Path(box["project"])
        self.remote = Path(box["remote_root"]) / "project"
        self.remote_rsync = Path(box["remote_root"]) / "project-rsync"
        self.ssh = f"ssh -F {box['ssh_config']}"
        self.ctl = shlex.split(box["supervisorctl"])[:-1]  # ... -c <conf>, without "status"
        self.poll = args.poll_ms / 1000
        from celery import Celery
        self.celery = Celery("latbench", broker=box["demo"]["broker"],
                             backend=box["demo"]["backend"], set_as_current=False)
        self.celery.conf.broker_connection_retry_on_startup = True
        self.celery.conf.task_default_queue = box["demo"]["queue"]
        self.res: dict = {"samples": {m: {"syncagent": [], "rsync": []} for m in METRICS},
                          "detail": {m: {"syncagent": [], "rsync": []} for m in METRICS},
                          "burst": {}}

    # ---- helpers
    def rsync_once(self, dest: str) -> float:
        t = time.perf_counter()
        subprocess.run(["rsync", "-a", "--delete", "-e", self.ssh, *RSYNC_FILTERS,
                        f"{self.project}/", f"{NAME}:{dest}/"], check=True, env=self.env,
                       capture_output=True)
        return time.perf_counter() - t

    def version_answer(self, timeout: float = 2.0) -> str | None:
        from celery.exceptions import TimeoutError as CeleryTimeout
        r = self.celery.send_task("app.tasks.demo.version")
        try:
            return r.get(timeout=timeout)
        except CeleryTimeout:
            r.forget()
            return None

    def wait_version(self, expected: str, t0: float, timeout: float = 60) -> float:
        """Send the version task until it returns ``expected``; each try waits at most
        --task-timeout-ms (a task picked up by a colour that is being stopped is answered
        late: the next try goes to the new worker). Unanswered tries are counted."""
        deadline = t0 + timeout
        self.unanswered = 0
        while time.perf_counter() < deadline:
            got = self.version_answer(self.args.task_timeout_ms / 1000)
            if got == expected:
                return time.perf_counter() - t0
            self.unanswered += got is None
            time.sleep(self.args.task_poll_ms / 1000)
        raise TimeoutError(f"version {expected!r} not live after {timeout} s")

    def programs(self) -> dict[str, str]:
        out = subprocess.run([*self.ctl, "status"], capture_output=True, text=True,
                             env=self.env).stdout
        return {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}

    def wait_remote_at_rest(self) -> None:
        """One colour RUNNING, every other one STOPPED or EXITED (none STARTING or STOPPING)."""
        def rest():
            states = list(self.programs().values())
            return states.count("RUNNING") == 1 and all(
                st in ("RUNNING", "STOPPED", "EXITED") for st in states)
        wait_for(rest, 60, "the worker at rest (one colour running, the others stopped)", 0.05)

    def running_colour(self) -> str:
        out = subprocess.run([*self.ctl, "status"], capture_output=True, text=True,
                             env=self.env).stdout
        running = [line.split()[0] for line in out.splitlines() if " RUNNING " in f" {line} "]
        if len(running) != 1:
            raise RuntimeError(f"expected one running colour, got:\n{out}")
        return running[0]  # worker:worker-blue

    def file_series(self, tool: str, remote_file: Path, idle) -> None:
        edit = self.project / "notes" / "edit.txt"
        for i in range(-1, self.args.samples):  # -1: untimed warm-up
            # The size grows with every sample: rsync's quick check (size + mtime, in whole
            # seconds by default) would skip a same-size edit made within the same second.
            token = f"{tool}-{i}-{time.time_ns()}\n" + "." * (i + 2)
            before = time.perf_counter()
            t0 = write(edit, token)
            wait_for(lambda: read(remote_file) == token, 30, f"{tool} sample {i} on the remote",
                     self.poll)
            dt = time.perf_counter() - t0
            idle(before)
            if i >= 0:
                self.res["samples"]["file"][tool].append(dt)
                self.res["detail"]["file"][tool].append(self._detail(tool, before))
            time.sleep(self.args.settle)
        s = self.res["samples"]["file"][tool]
        log(f"  file/{tool}: p50 {pct(s, 50) * 1000:.1f} ms  p95 {pct(s, 95) * 1000:.1f} ms")

    def _detail(self, tool: str, since: float) -> dict:
        if tool == "syncagent":
            return {"events": [{k: v for k, v in e.items() if k != "paths" and k != "_t"}
                               for e in self.watch.events if e["_t"] >= since]}
        runs = [r for r in self.loop.runs() if r[0] >= self._wall(since)]
        return {"rsync_runs": len(runs),
                "rsync_seconds": [round(e - s, 4) for s, e in runs if e is not None]}

    @staticmethod
    def _wall(perf: float) -> float:
        return time.time() - (time.perf_counter() - perf)

    # ---- phases
    def phase_syncagent(self) -> None:
        log("== syncagent watch")
        self.watch = Watch(self.args.syncagent, self.project, self.env,
                           self.work / "watch.err").start()
        try:
            self.file_series("syncagent", self.remote / "notes" / "edit.txt",
                             lambda since: (wait_for(lambda: self.watch.of("synced", since), 10,
                                                     "the synced event", 0.005),
                                            self.watch.wait_idle(0.05)))
            self.version_answer(10)  # the client's connections, untimed
            # "live": each save finds the remote at rest (the previous colour stopped);
            # "rapid": the next save follows --settle s after the previous one is live, while
            # the colour it replaced may still be finishing its warm shutdown.
            for metric in ("live", "rapid") if self.args.rapid else ("live",):
                for i in range(-1, self.args.samples):
                    v = unique_version(f"sa-{metric}", i)
                    before = time.perf_counter()
                    t0 = write(self.project / "app" / "version.py", version_py(v))
                    try:
                        dt = self.wait_version(v, t0)
                    except TimeoutError as e:
                        self.res.setdefault("failures", []).append(
                            {"error": str(e)} | self._detail("syncagent", before))
                        log(f"  {e}")
                        continue
                    self.watch.wait_idle(self.args.settle)
                    if metric == "live":
                        self.wait_remote_at_rest()
                        time.sleep(self.args.settle)
                    if i >= 0:
                        self.res["samples"][metric]["syncagent"].append(dt)
                        self.res["detail"][metric]["syncagent"].append(
                            self._detail("syncagent", before)
                            | {"unanswered_tries": self.unanswered})
                s = self.res["samples"][metric]["syncagent"]
                log(f"  {metric}/syncagent: p50 {pct(s, 50):.3f} s  p95 {pct(s, 95):.3f} s")
            self.res["burst"]["syncagent"] = self.burst_syncagent()
        finally:
            self.watch.stop()
            self.res["watch_events"] = [{k: v for k, v in e.items() if k != "paths"}
                                        for e in self.watch.events]
        shutil.rmtree(self.project / "burst", ignore_errors=True)

    def phase_rsync_loop(self) -> None:
        log("== inotifywait | rsync loop")
        self.rsync_once(str(self.remote_rsync))
        self.loop = RsyncLoop(self.project, f"{NAME}:{self.remote_rsync}/", self.ssh,
                              self.work).start()
        try:
            self.file_series("rsync", self.remote_rsync / "notes" / "edit.txt",
                             lambda since: self.loop.wait_idle(0.05))
            self.res["burst"]["rsync"] = self.burst_rsync()
        finally:
            self.loop.stop()
        shutil.rmtree(self.project / "burst", ignore_errors=True)

    def phase_manual(self) -> None:
        log("== rsync + supervisorctl restart")
        self.rsync_once(str(self.remote))  # untimed: the remote project equal to the local one
        program = self.running_colour()
        self.res["manual_program"] = program
        self.version_answer(10)
        for i in range(-1, self.args.samples):
            v = unique_version("manual", i)
            t0 = write(self.project / "app" / "version.py", version_py(v))
            t1 = time.perf_counter()
            subprocess.run(["rsync", "-a", "--delete", "-e", self.ssh, *RSYNC_FILTERS,
                            f"{self.project}/", f"{NAME}:{self.remote}/"], check=True,
                           env=self.env, capture_output=True)
            t2 = time.perf_counter()
            subprocess.run([*self.ctl, "restart", program], check=True, env=self.env,
                           capture_output=True)
            t3 = time.perf_counter()
            dt = self.wait_version(v, t0)
            if i >= 0:
                self.res["samples"]["live"]["rsync"].append(dt)
                self.res["detail"]["live"]["rsync"].append(
                    {"rsync": round(t2 - t1, 4), "restart": round(t3 - t2, 4),
                     "after_restart": round(dt - (t3 - t0), 4),
                     "unanswered_tries": self.unanswered})
            time.sleep(self.args.settle)
        s = self.res["samples"]["live"]["rsync"]
        log(f"  live/manual: p50 {pct(s, 50):.3f} s  p95 {pct(s, 95):.3f} s")

    def write_burst(self) -> tuple[float, float]:
        root = self.project / "burst"
        n = self.args.burst_files
        t0 = time.perf_counter()
        root.mkdir()
        (root / "__init__.py").write_text("")
        for i in range(n - 1):
            d = root / f"pkg{i % 20:02d}"
            if i < 20:
                d.mkdir()
            (d / f"m{i:04d}.py").write_text(f"V = {i}\n")
        return t0, time.perf_counter() - t0

    def count_remote(self, root: Path) -> int:
        return sum(len(f) for _, _, f in os.walk(root))

    def burst_syncagent(self) -> dict:
        log(f"  burst: {self.args.burst_files} files, syncagent")
        w = self.watch
        w.wait_idle(1.0)
        t0, write_s = self.write_burst()
        remote = self.remote / "burst"
        complete = wait_for(lambda: self.count_remote(remote) >= self.args.burst_files
                            and time.perf_counter(), 120, "the burst on the remote", 0.005)
        # settled: synced, all restarts answered, then 2 s without an event (the files land
        # before the commit that reports them)
        wait_for(lambda: w.of("synced", t0), 60, "syncagent's synced event", 0.01)
        w.wait_idle(2.0, timeout=self.args.burst_cap)
        synced, ready = w.of("synced", t0), w.of("ready", t0)
        last = max([e["_t"] for e in synced + ready] or [t0])
        out = {"files": self.args.burst_files, "write_s": round(write_s, 4),
               "complete_s": round(complete - t0, 4), "settle_s": round(last - t0, 4),
               "restarts": len(w.of("restart", t0)), "ready": len(ready),
               "errors": len(w.of("error", t0)), "syncs": len(synced),
               "live_is_last": bool(ready and synced and ready[-1]["revision"]
                                    == synced[-1]["revision"]),
               "events": [{k: v for k, v in e.items() if k not in ("paths", "_t")}
                          | {"t": round(e["_t"] - t0, 4)} for e in w.events if e["_t"] >= t0]}
        log(f"    restarts {out['restarts']}, all on remote {out['complete_s']:.2f} s, "
            f"settled {out['settle_s']:.2f} s")
        return out

    def burst_rsync(self) -> dict:
        log(f"  burst: {self.args.burst_files} files, inotifywait | rsync loop "
            f"(cap {self.args.burst_cap:g} s)")
        lp = self.loop
        lp.wait_idle(1.0)
        runs_before, events_before = len(lp.runs()), lp.events()
        t0, write_s = self.write_burst()
        w0 = self._wall(t0)
        remote = self.remote_rsync / "burst"
        complete = None
        capped = False
        while True:
            now = time.perf_counter()
            if complete is None and self.count_remote(remote) >= self.args.burst_files:
                complete = now
            if lp.idle_for() >= 2.0:
                break
            if now - t0 > self.args.burst_cap:
                capped = True
                break
            time.sleep(0.05)
        runs = lp.runs()[runs_before:]
        done = [(s, e) for s, e in runs if e is not None]
        events = lp.events() - events_before
        durations = [e - s for s, e in done]
        mean = statistics.mean(durations) if durations else float("nan")
        settle = (done[-1][1] - w0) if done and not capped else None
        left = max(0, events - len(runs)) + (1 if runs and runs[-1][1] is None else 0)
        out = {"files": self.args.burst_files, "write_s": round(write_s, 4),
               "complete_s": None if complete is None else round(complete - t0, 4),
               "settle_s": None if settle is None else round(settle, 4),
               "capped": capped, "cap_s": self.args.burst_cap,
               "rsync_runs": len(done), "inotify_events": events, "events_left": left,
               "rsync_mean_s": round(mean, 4),
               "settle_projected_s": round(time.perf_counter() - t0 + left * mean, 1)
               if capped else None,
               "restarts": 0}
        log(f"    rsync runs {len(done)} for {events} events"
            + (f", all on remote {out['complete_s']:.2f} s" if complete else "")
            + (f", settled {settle:.2f} s" if settle is not None else
               f", NOT settled after {self.args.burst_cap:g} s: {left} events queued, "
               f"~{out['settle_projected_s']:.0f} s projected"))
        return out


# ---------------------------------------------------------------- report

def summarize(res: dict) -> dict:
    out = {}
    for m in ("file", "live"):
        sa, rs = res["samples"][m]["syncagent"], res["samples"][m]["rsync"]
        o = {t: {"p50": pct(x, 50), "p95": pct(x, 95), "n": len(x), "min": min(x or [0]),
                 "max": max(x or [0])} for t, x in (("syncagent", sa), ("rsync", rs))}
        o["ratio_p50"] = o["rsync"]["p50"] / o["syncagent"]["p50"]
        o["ratio_p95"] = o["rsync"]["p95"] / o["syncagent"]["p95"]
        tg = TARGETS[m]
        o["target"] = tg
        o["met_p50"] = o["syncagent"]["p50"] <= tg["p50_max"]
        o["met_ratio"] = o["ratio_p50"] >= tg["ratio_min"]
        out[m] = o
    rapid = res["samples"]["rapid"]["syncagent"]
    if rapid:
        out["rapid"] = {"syncagent": {"p50": pct(rapid, 50), "p95": pct(rapid, 95),
                                      "n": len(rapid), "min": min(rapid), "max": max(rapid)}}
    # what the per-sample syncagent events say (medians)
    stages: dict = {}
    for m in METRICS:
        rows = res["detail"][m]["syncagent"]
        if not rows:
            continue
        synced = [next((e for e in r["events"] if e["event"] == "synced"), None) for r in rows]
        ready = [next((e for e in r["events"] if e["event"] == "ready"), None) for r in rows]
        st = {"synced.latency": statistics.median([e["latency"] for e in synced if e]
                                                  or [float("nan")])}
        for k in dict.fromkeys(k for e in synced if e for k in e["durations"]):
            st[f"synced.{k}"] = statistics.median([e["durations"][k] for e in synced
                                                   if e and k in e["durations"]])
        if any(ready):
            st["ready.latency"] = statistics.median([e["latency"] for e in ready if e])
            st["ready.restart"] = statistics.median([e["restart"] for e in ready if e])
            for k in dict.fromkeys(k for e in ready if e for k in e["timings"]):
                st[f"ready.timings.{k}"] = statistics.median([e["timings"][k] for e in ready
                                                              if e and k in e["timings"]])
            st["restarts_per_save"] = statistics.mean(
                sum(e["event"] == "restart" for e in r["events"]) for r in rows)
            st["ready.restart-start"] = statistics.median(
                [e["restart"] - e["timings"]["start"] for e in ready if e])
        stages[m] = st
    man = res["detail"]["live"]["rsync"]
    if man:
        stages["manual"] = {k: statistics.median([r[k] for r in man])
                            for k in ("rsync", "restart", "after_restart")}
    rs = res["detail"]["file"]["rsync"]
    if rs:
        stages["rsync_loop"] = {
            "runs_per_save": statistics.mean(r["rsync_runs"] for r in rs),
            "rsync_run_s": statistics.median([x for r in rs for x in r["rsync_seconds"]]
                                             or [float("nan")])}
    out["stages"] = stages
    return out


def print_table(s: dict, res: dict, samples: int, settle: float) -> None:
    print()
    print(f"{samples} samples per tool and metric; p50 / p95 of the time from the save")
    hdr = (f"{'metric':34s} {'syncagent p50/p95':>20s} {'manual p50/p95':>20s} "
           f"{'ratio p50':>9s}  target")
    print(hdr)
    print("-" * (len(hdr) + 34))
    for m, unit, k in (("file", "ms", 1000), ("live", "s", 1)):
        o = s[m]
        f = "{:.1f}" if unit == "ms" else "{:.2f}"
        sa = f"{f.format(o['syncagent']['p50'] * k)} / {f.format(o['syncagent']['p95'] * k)} {unit}"
        rs = f"{f.format(o['rsync']['p50'] * k)} / {f.format(o['rsync']['p95'] * k)} {unit}"
        tg = o["target"]
        lim = f"{tg['p50_max'] * k:g} {unit}"
        print(f"{LABELS[m] + ' (' + TOOL_LABELS[m][1].split()[0] + ')':34s} {sa:>20s} {rs:>20s} "
              f"{o['ratio_p50']:8.1f}x  p50 <= {lim}: {'yes' if o['met_p50'] else 'NO'}; "
              f">= {tg['ratio_min']:g}x: {'yes' if o['met_ratio'] else 'NO'}")
    if "rapid" in s:
        r = s["rapid"]["syncagent"]
        print(f"{'  same, saves ' + str(settle) + ' s after live':34s} "
              f"{r['p50']:.2f} / {r['p95']:.2f} s".rjust(55 + 1)
              + "   (syncagent only; no target)")
    print()
    b = res["burst"]
    if b:
        sa, rs = b.get("syncagent"), b.get("rsync")
        print(f"burst of {(sa or rs)['files']} new .py files:")
        if sa:
            print(f"  syncagent watch : {sa['restarts']} restart(s), {sa['syncs']} sync(s); "
                  f"all files on remote {sa['complete_s']:.2f} s, settled (last ready) "
                  f"{sa['settle_s']:.2f} s; live = last synced revision: {sa['live_is_last']}")
        if rs:
            settle = (f"settled (last rsync done) {rs['settle_s']:.1f} s" if not rs["capped"]
                      else f"NOT settled after {rs['cap_s']:g} s: {rs['events_left']} events "
                      f"still queued, ~{rs['settle_projected_s']:.0f} s projected")
            complete = "never" if rs["complete_s"] is None else f"{rs['complete_s']:.2f} s"
            print(f"  rsync loop      : 0 restarts, {rs['rsync_runs']} rsync runs for "
                  f"{rs['inotify_events']} inotify events (mean {rs['rsync_mean_s']:.3f} s "
                  f"each); all files on remote {complete}, {settle}")
    print()
    print("syncagent stage medians (s, from its --json events):")
    for k, v in s["stages"].items():
        print(f"  {k:10s} " + "  ".join(f"{n}={x:.4f}" for n, x in v.items()))


def plot(res: dict, s: dict, path: Path, samples: int, settle: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import random

    rng = random.Random(1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, m, k, unit in ((axes[0], "file", 1000, "ms"), (axes[1], "live", 1, "s")):
        data = [[x * k for x in res["samples"][m][t]] for t in ("syncagent", "rsync")]
        labels = list(TOOL_LABELS[m])
        colours = ["tab:blue", "tab:orange"]
        if m == "live" and res["samples"]["rapid"]["syncagent"]:
            data.insert(1, res["samples"]["rapid"]["syncagent"])
            labels.insert(1, f"syncagent watch,\nsaves {settle:g} s apart")
            colours.insert(1, "tab:cyan")
        ax.boxplot(data, widths=0.5, showfliers=False, medianprops={"color": "black"})
        for i, (d, c) in enumerate(zip(data, colours), start=1):
            ax.scatter([i + rng.uniform(-0.15, 0.15) for _ in d], d, s=10, alpha=0.6, color=c,
                       zorder=3)
        ax.set_xticks(range(1, len(data) + 1), labels, fontsize=7)
        tg = TARGETS[m]["p50_max"] * k
        ax.axhline(tg, color="tab:green", ls="--", lw=1, label=f"target p50 ≤ {tg:g} {unit}")
        ax.set_yscale("log")
        ax.set_ylabel(unit)
        o = s[m]
        ax.set_title(f"{LABELS[m]}\np50 {o['syncagent']['p50'] * k:.3g} vs "
                     f"{o['rsync']['p50'] * k:.3g} {unit} ({o['ratio_p50']:.1f}x)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.suptitle(f"syncagent vs the manual workflow, {samples} saves each (sandbox, demo app)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--warm"]:  # warm vs cold vs rsync + supervisorctl, demo and heavy apps
        import warm_bench
        return warm_bench.main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--burst-files", type=int, default=2000)
    ap.add_argument("--burst-cap", type=float, default=120.0,
                    help="give up waiting for the rsync loop to settle after this long "
                    "(seconds); the rest is projected")
    ap.add_argument("--no-rapid", dest="rapid", action="store_false",
                    help="skip the extra syncagent series with saves --settle s apart")
    ap.add_argument("--settle", type=float, default=0.3,
                    help="seconds between samples, after the tool went idle")
    ap.add_argument("--poll-ms", type=float, default=1.0,
                    help="how often the remote file is read (save -> file on remote)")
    ap.add_argument("--task-poll-ms", type=float, default=10.0,
                    help="pause between version tasks (save -> new code live)")
    ap.add_argument("--task-timeout-ms", type=float, default=250.0,
                    help="how long one version task may take before another is sent")
    ap.add_argument("--syncagent", default=str(DEFAULT_SYNCAGENT if DEFAULT_SYNCAGENT.exists()
                                               else shutil.which("syncagent")))
    ap.add_argument("--out", default=str(HERE / "results" / "latency.json"))
    ap.add_argument("--png", default=str(HERE / "latency.png"))
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, sandbox)")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw --png from the samples in --out")
    args = ap.parse_args(argv)
    if args.replot:
        data = json.loads(Path(args.out).read_text())
        plot(data, data["summary"], Path(args.png), data["args"]["samples"],
             data["args"]["settle"])
        return 0
    for exe in ("inotifywait", "rsync"):
        if not shutil.which(exe):
            sys.exit(f"{exe} not found: sudo apt-get install -y inotify-tools rsync")

    work = Path(tempfile.mkdtemp(prefix="syncagent-latency-"))
    env = dict(os.environ, XDG_CONFIG_HOME=str(work / "config"),
               XDG_STATE_HOME=str(work / "state"))
    box = None
    b = None
    ok = False
    try:
        up = subprocess.run([args.syncagent, "sandbox", "up", "--name", NAME,
                             "--dir", str(work / "sandbox"), "--json"],
                            capture_output=True, env=env, check=True)
        box = json.loads(up.stdout)
        log(f"sandbox: sshd pid {box['sshd_pid']} on {box['host']}:{box['port']}, "
            f"project {box['project']}")
        (Path(box["project"]) / "notes").mkdir(exist_ok=True)
        (Path(box["project"]) / "notes" / "edit.txt").write_text("start\n")
        b = Bench(args, work, env, box)
        b.phase_syncagent()
        b.phase_rsync_loop()
        b.phase_manual()
        ok = True
    finally:
        if b is not None:
            b.celery.close()
        if box is not None:
            subprocess.run([args.syncagent, "sandbox", "down", "--name", NAME,
                            "--dir", str(work / "sandbox")], env=env, capture_output=True)
        if args.keep or not ok:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res = b.res
    s = summarize(res)
    print_table(s, res, args.samples, args.settle)
    png = Path(args.png)
    plot(res, s, png, args.samples, args.settle)
    print(f"\nwrote {png} ({png.stat().st_size // 1024} KB)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "rsync": subprocess.run(["rsync", "--version"], capture_output=True,
                                text=True).stdout.splitlines()[0],
        "inotifywait": subprocess.run(["inotifywait", "--help"], capture_output=True,
                                      text=True).stdout.splitlines()[0],
        "code": code_version(), "args": vars(args), "targets": TARGETS,
        "rsync_filters": RSYNC_FILTERS, "summary": s, **res}, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
