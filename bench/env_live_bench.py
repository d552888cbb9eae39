"""Requirements change -> new code live, with uv and with pip building the new env.

A provisioned sandbox (sshd, Redis, supervisord; `syncagent sandbox up`), and a web project
(the demo app with ``env_bench.WEB``'s pinned Flask + SQLAlchemy + Celery requirements)
provisioned beside it with a venv that provision makes (so it gets ``uv``). Then, ``--reps``
times per installer, installers alternating: add one package to requirements.txt (a version
not used before, so every change is a new env) and ``push`` (blue-green restart), timing the
whole call: sync, env build in the starting slot, worker start, readiness. pip runs with ``uv``
moved out of the venv. One untimed change per installer first warms its cache.

Prints medians (seconds) and writes the samples to ``bench/results/env_live.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from env_bench import WEB  # noqa: E402

EXTRAS = [f"humanize=={v}" for v in ("4.11.0", "4.10.0", "4.9.0", "4.8.0", "4.7.0", "4.6.0",
                                     "4.5.0", "4.4.0", "4.3.0", "4.2.3")]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="env-live-"))
    os.environ.update(XDG_CONFIG_HOME=str(work / "cfg"), XDG_STATE_HOME=str(work / "state"))
    from syncagent import sandbox
    from syncagent.config import load_project, resolve_target
    from syncagent.provision import ProvisionOptions, provision
    from syncagent.push import PushOptions, push

    samples: dict[str, list[float]] = {"uv": [], "pip": []}
    extras = iter(EXTRAS)
    box = sandbox.up("envlive", work / "box", provision=True, timeout=60)
    try:
        project_dir = work / "web"
        shutil.copytree(sandbox.DEMO_APP, project_dir)
        requirements = project_dir / "requirements.txt"
        requirements.write_text(WEB)
        remote = f"{box.remote_root}/web"
        project = load_project(project_dir)
        target = resolve_target("envlive", project, remote_path=remote)
        settings = (("WORKER_API_KEY", "bench-key-3f9c2a7d5e8b1046c0"),
                    ("CELERY_BROKER_URL", f"{box.redis_url}/12"),
                    ("CELERY_RESULT_BACKEND", f"{box.redis_url}/13"),
                    ("FLASK_APP_URL", "http://127.0.0.1:9"))
        started = time.perf_counter()
        result = provision(project, target, ProvisionOptions(env=settings, timeout=300),
                           lambda e: print(f"  {e.step} {e.state} {e.detail[:100]}",
                                           file=sys.stderr) if e.state != "line" else None)
        print(f"first provision (venv, runtime, uv, web env): "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
        uv, parked = Path(result.venv, "bin", "uv"), Path(result.venv, "bin", "uv.parked")
        plan = [("uv", False), ("pip", False)]
        for rep in range(args.reps):
            plan += [("uv", True), ("pip", True)] if rep % 2 == 0 else [("pip", True),
                                                                        ("uv", True)]
        for installer, timed in plan:
            if installer == "pip" and uv.exists():
                uv.rename(parked)
            elif installer == "uv" and parked.exists():
                parked.rename(uv)
            requirements.write_text(WEB + next(extras) + "\n")
            t0 = time.perf_counter()
            pushed = push(project, target, PushOptions(restart=True, restart_timeout=600))
            seconds = time.perf_counter() - t0
            live = pushed.restart or {}
            envs = Path(remote, ".syncagent", "envs")
            newest = max((json.loads(p.read_text()) for p in envs.glob("*/.syncagent-env-ready")),
                         key=lambda r: r["time"])
            if newest["installer"] != installer:
                raise SystemExit(f"expected an env built by {installer}: {newest}")
            print(f"{installer:<4} {'timed' if timed else 'warm-up'} {seconds:6.1f} s "
                  f"(restart {live.get('timings', {})})", file=sys.stderr, flush=True)
            if timed:
                samples[installer].append(round(seconds, 2))
    finally:
        sandbox.down("envlive", work / "box")
        shutil.rmtree(work, ignore_errors=True)
    print(f"requirements change -> live (one package added, warm cache), medians of "
          f"{args.reps}: " + ", ".join(f"{k} {statistics.median(v):.1f} s"
                                       for k, v in samples.items()))
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "env_live.json").write_text(json.dumps(samples, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
