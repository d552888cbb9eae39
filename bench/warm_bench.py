#!/usr/bin/env python3
"""Benchmark: save -> new code live through a warm start, a cold start, and rsync +
``supervisorctl restart``, on the demo app and on the heavy example app (issue 11, item 2).

For each app, one real supervisord (the generated config, three slots) and one redis-server;
the restarts are the agent's own (``syncagent.agent.restart_worker``, what `watch` calls after a
sync). Per sample: ``app/version.py`` (imported by the task module) gets a new ``VERSION``;
the time runs from just before that write until ``version`` sent through the broker returns it.

* warm: the agent says go to the parked standby (the sample waits until one is parked);
* cold: the same restart with the standby stopped first (today's start);
* manual: the edit in a local copy, ``rsync -a --delete`` into the root, then
  ``supervisorctl restart`` of the live slot, run at once after the save.

The sync itself is not in the warm and cold figures (the edit is written into the root): the
watch delivers a save in about 10 ms (``latency_bench.py``, series A). The heavy app's
requirements env is built by its first start, over this venv, from the pip cache.

Usage::

    .venv/bin/python bench/warm_bench.py [--samples 10] [--apps demo,heavy]

Results: a table on stdout, ``bench/results/warm_latency.json`` and the plot
``bench/warm_latency.png`` (``--replot`` redraws it from the JSON).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from celery import Celery  # noqa: E402

from syncagent import agent  # noqa: E402
from tests.helpers.procs import (redis_server, start_process, stop_process,  # noqa: E402
                                 supervisor_rpc, wait_until)
from worker import env as envmod  # noqa: E402
from worker import ready  # noqa: E402
from worker import supervisor_conf as sc  # noqa: E402

APPS = {"demo": (REPO / "examples" / "demo_app", "app.tasks.demo.version"),
        "heavy": (REPO / "examples" / "heavy_app", "app.tasks.media.version")}
TOOLS = ("manual", "cold", "warm")  # in this order: a cold restart parks the standby
GOAL = {"p50_max": 0.3, "p95_max": 0.6, "ratio_min": 10.0}


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Bench:
    """One app under one supervisord: the three ways to get a save live."""

    def __init__(self, app: str, work: Path, redis_url: str, venv: str) -> None:
        source, self.task = APPS[app]
        self.app, self.work = app, work
        self.root = work / "root"
        self.copy = work / "local"
        ignore = shutil.ignore_patterns("__pycache__", "instance", ".syncagent")
        shutil.copytree(source, self.root, ignore=ignore)
        shutil.copytree(source, self.copy, ignore=ignore)
        (self.root / ".env.worker").write_text(
            f"CELERY_BROKER_URL={redis_url}/0\nCELERY_RESULT_BACKEND={redis_url}/1\n"
            f"FLASK_APP_URL=http://127.0.0.1:9\nWORKER_API_KEY={secrets.token_urlsafe(24)}\n"
            "CELERY_CONCURRENCY=1\nWORKER_NAME=bench\n")
        (self.root / ".env.worker").chmod(0o600)
        ready.ensure_state_dir(self.root)
        self.revision(0)
        self.layout = sc.Layout(root=str(self.root), venv=venv, stopwaitsecs=30)
        self.conf = sc.write_configs(self.layout, extra_env={"PYTHONPATH": str(REPO)})
        self.client = Celery("warm-bench", broker=f"{redis_url}/0",
                             backend=f"{redis_url}/1", set_as_current=False)
        self.proc = None
        self.rpc = None
        self.n = 0

    def revision(self, i: int) -> str:
        rev = f"{i + 1:040x}"
        ready.revision_path(self.root).write_text(json.dumps({"revision": rev, "time": i}))
        return rev

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in envmod.KNOWN_VARIABLES}
        self.proc = start_process([self.layout.bin("supervisord"), "-n", "-c", str(self.conf)],
                                  self.work / "supervisord.out", env=env)
        self.rpc = supervisor_rpc(self.layout.socket_path)
        wait_until(lambda: ready.read_marker(self.root, "blue"), 900, "blue ready (the "
                   "requirements env is built on the first start)")

    def stop(self) -> None:
        self.client.close()
        if self.rpc is not None:
            self.rpc("close")()
        if self.proc is not None:
            stop_process(self.proc)

    def answer(self, expected: str, t0: float, timeout: float = 120) -> float:
        """Seconds from ``t0`` until the version task answers ``expected``: a probe every
        20 ms, each watched on its own (a probe the stopping colour took answers late, and
        must not hide the new one answering)."""
        deadline = time.monotonic() + timeout
        probes, sent = [], 0.0
        while time.monotonic() < deadline:
            if time.monotonic() - sent > 0.02:
                probes.append(self.client.send_task(self.task))
                sent = time.monotonic()
            for probe in list(probes):
                if probe.ready():
                    probes.remove(probe)
                    if probe.result == expected:
                        return time.perf_counter() - t0
            time.sleep(0.002)
        raise TimeoutError(f"{self.app}: {expected} not live after {timeout} s")

    def edit(self, where: Path) -> tuple[str, float]:
        self.n += 1
        version = f"{self.app}-{self.n}-{time.time_ns() % 10**9}"
        t0 = time.perf_counter()
        (where / "app" / "version.py").write_text(f'VERSION = "{version}"\n')
        return version, t0

    def standby(self):
        found = (agent.worker_state(str(self.root)) or {}).get("standby")
        return found if found and found.get("state") == "parked" and found.get("fresh") \
            else None

    def settle(self, want_standby: bool) -> None:
        """The last restart has drained, and a standby is parked (warm) or there is none."""
        wait_until(lambda: not [i for i in self.rpc.supervisor.getAllProcessInfo()
                                if i["statename"] in ("STOPPING", "STARTING")], 120,
                   "no slot stopping or starting")
        if want_standby:
            wait_until(self.standby, 120, "a parked standby")
            return
        for colour in ready.COLOURS:  # cold: take the standby away
            if (self.root / ".syncagent" / f"park-{colour}").exists():
                (self.root / ".syncagent" / f"park-{colour}").unlink()
                with contextlib.suppress(Exception):
                    self.rpc.supervisor.stopProcess(f"worker:worker-{colour}", True)

    def sample(self, tool: str) -> dict:
        self.settle(want_standby=tool == "warm")
        rev = self.revision(self.n + 1)
        if tool == "manual":
            version, t0 = self.edit(self.copy)
            subprocess.run(["rsync", "-a", "--delete", "--exclude", ".syncagent",
                            "--exclude", ".env.worker", "--exclude", "__pycache__",
                            f"{self.copy}/", f"{self.root}/"], check=True)
            live = (agent.worker_state(str(self.root)) or {}).get("live") or {}
            subprocess.run([self.layout.bin("supervisorctl"), "-c", str(self.conf), "restart",
                            f"worker:worker-{live.get('colour', 'blue')}"], check=True,
                           capture_output=True)
            warm = None
        else:
            version, t0 = self.edit(self.root)
            out = agent.restart_worker(str(self.root), rev, timeout=120)
            assert out["ok"], out
            warm = out["timings"]["warm"]
            assert warm == (tool == "warm"), out
        return {"s": round(self.answer(version, t0), 4), "warm": warm}


def run_app(app: str, samples: int, work: Path) -> dict:
    venv = sys.prefix  # the heavy app's requirements env layers over it (pip cache)
    with redis_server(work / "redis") as redis_srv:
        bench = Bench(app, work / app, redis_srv.url(0).rsplit("/", 1)[0], venv)
        try:
            bench.start()
            agent.restart_worker(str(bench.root), bench.revision(0), timeout=300)  # warm-up
            results: dict[str, list[float]] = {t: [] for t in TOOLS}
            for i in range(samples):  # interleaved: the machine's load hits all three alike
                for tool in TOOLS:
                    results[tool].append(bench.sample(tool)["s"])
                log(f"{app} {i + 1}/{samples}: " + ", ".join(
                    f"{t} {results[t][-1]:.2f} s" for t in TOOLS))
            return results
        finally:
            bench.stop()


def summarize(results: dict[str, list[float]]) -> dict:
    out = {t: {"p50": pct(xs, 50), "p95": pct(xs, 95), "min": min(xs), "max": max(xs),
               "n": len(xs)} for t, xs in results.items()}
    out["speedup_p50"] = out["manual"]["p50"] / out["warm"]["p50"]
    return out


TOOL_LABELS = {"manual": "rsync +\nsupervisorctl restart", "cold": "syncagent,\ncold start",
               "warm": "syncagent,\nwarm (standby)"}
COLOURS = {"manual": "tab:orange", "cold": "tab:gray", "warm": "tab:blue"}


def plot(report: dict, path: Path) -> None:
    """One panel per app: every sample of each way, its box, and the issue's goal lines."""
    import random

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    rng = random.Random(1)
    apps = list(report["apps"])
    fig, axes = plt.subplots(1, len(apps), figsize=(4.6 * len(apps), 4.2), squeeze=False)
    for ax, app in zip(axes[0], apps):
        raw, s = report["apps"][app]["raw"], report["apps"][app]["summary"]
        tools = [t for t in ("warm", "cold", "manual") if raw.get(t)]
        data = [raw[t] for t in tools]
        ax.boxplot(data, widths=0.5, showfliers=False, medianprops={"color": "black"})
        for i, (tool, d) in enumerate(zip(tools, data), start=1):
            ax.scatter([i + rng.uniform(-0.15, 0.15) for _ in d], d, s=10, alpha=0.6,
                       color=COLOURS[tool], zorder=3)
        ax.set_xticks(range(1, len(tools) + 1), [TOOL_LABELS[t] for t in tools], fontsize=7)
        ax.axhline(GOAL["p50_max"], color="tab:green", ls="--", lw=1,
                   label=f"goal p50 ≤ {GOAL['p50_max']:g} s")
        ax.axhline(GOAL["p95_max"], color="tab:red", ls=":", lw=1,
                   label=f"goal p95 ≤ {GOAL['p95_max']:g} s")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=6)
        ax.set_ylabel("save → new code answering a task (s)")
        ax.set_title(f"{app}: warm p50 {s['warm']['p50']:.2f} s, p95 {s['warm']['p95']:.2f} s"
                     f"\n{s['speedup_p50']:.1f}x faster than the manual way (p50)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(axis="y", which="both", alpha=0.3)
    load = ", ".join(f"{x:.1f}" for x in report["machine"]["load"])
    fig.suptitle(f"Warm vs cold vs manual, {report['samples']} saves each, interleaved "
                 f"({report['machine']['cpus']} CPUs, load average {load} at the start)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--apps", default="demo,heavy")
    ap.add_argument("--out", default=str(HERE / "results" / "warm_latency.json"))
    ap.add_argument("--plot", default=str(HERE / "warm_latency.png"))
    ap.add_argument("--replot", action="store_true",
                    help="redraw --plot from the JSON in --out, measure nothing")
    args = ap.parse_args(argv)
    if args.replot:
        plot(json.loads(Path(args.out).read_text()), Path(args.plot))
        return 0
    work = Path(tempfile.mkdtemp(prefix="warm-bench-"))
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load": os.getloadavg()}, "samples": args.samples, "apps": {}}
    try:
        for app in args.apps.split(","):
            raw = run_app(app, args.samples, work)
            report["apps"][app] = {"raw": raw, "summary": summarize(raw)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    report["machine"]["load_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(report, indent=1))
    plot(report, Path(args.plot))
    print(f"save -> new code live, {args.samples} samples each, load {report['machine']['load']}")
    print(f"{'app':<7}{'tool':<8}{'p50':>8}{'p95':>8}{'max':>8}")
    for app, data in report["apps"].items():
        s = data["summary"]
        for tool in TOOLS:
            print(f"{app:<7}{tool:<8}{s[tool]['p50']:>7.2f}s{s[tool]['p95']:>7.2f}s"
                  f"{s[tool]['max']:>7.2f}s")
        print(f"{app:<7}warm is {s['speedup_p50']:.1f}x faster than rsync + supervisorctl "
              f"restart (p50)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
