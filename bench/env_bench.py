"""Building a worker env for a web project's requirements: pip against uv.

Runs the real builder (``worker.envs.ensure_env``) over a base venv that holds only the
worker runtime (as ``syncagent provision`` makes it), for a pinned Flask + SQLAlchemy + Celery
requirements file. Cases, each ``--reps`` times per installer, installers alternating:

* ``cold``: empty installer cache (``PIP_CACHE_DIR`` / ``UV_CACHE_DIR`` in a fresh dir);
* ``warm``: the same requirements into a new project dir, cache kept;
* ``change``: one more package added (a requirements change), cache kept: the env build that a
  requirements change costs before the new slot starts.

Prints a table of medians (seconds) and writes everything to ``bench/results/env.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from worker import envs  # noqa: E402

RUNTIME = ["celery[redis]", "python-dotenv", "requests", "rich", "supervisor"]
WEB = """\
flask==3.0.3
flask-sqlalchemy==3.1.1
flask-migrate==4.0.7
flask-login==0.6.3
flask-wtf==1.2.1
sqlalchemy==2.0.36
alembic==1.14.0
celery[redis]==5.4.0
kombu==5.4.2
redis==5.2.1
structlog==24.4.0
requests==2.32.3
python-dotenv==1.0.1
marshmallow==3.23.1
gunicorn==23.0.0
psycopg2-binary==2.9.10
"""
EXTRA = "humanize==4.11.0\n"


def _base(work: Path) -> str:
    base = work / "base"
    subprocess.run([sys.executable, "-m", "venv", str(base)], check=True)
    subprocess.run([str(base / "bin/pip"), "install", "-q", *RUNTIME, "uv"], check=True)
    return str(base / "bin/python")


def _one(work: Path, base_python: str, installer: str, case: str, cache: Path,
         text: str) -> float:
    project = Path(tempfile.mkdtemp(prefix=f"{installer}-{case}-", dir=work))
    (project / "requirements.txt").write_text(text)
    os.environ["PIP_CACHE_DIR" if installer == "pip" else "UV_CACHE_DIR"] = str(cache)
    started = time.perf_counter()
    result = envs.ensure_env(project, base_python, use_uv=installer == "uv")
    seconds = time.perf_counter() - started
    if result.action != "built" or result.installer != installer:
        raise SystemExit(f"{installer} {case}: {result.action}\n" + "\n".join(result.tail))
    check = subprocess.run([result.python, "-c", "import flask, flask_sqlalchemy, sqlalchemy, "
                            "celery, structlog, requests, dotenv; print(celery.__version__)"],
                           capture_output=True, text=True)
    if check.returncode != 0 or check.stdout.strip() != "5.4.0":
        raise SystemExit(f"{installer} {case}: env does not import: {check.stderr[-500:]}")
    shutil.rmtree(project)
    print(f"{installer:<4} {case:<6} {seconds:6.1f} s", file=sys.stderr, flush=True)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="env-bench-", dir=args.work))
    samples: dict[str, dict[str, list[float]]] = {}
    try:
        base_python = _base(work)
        for rep in range(args.reps):
            order = ("pip", "uv") if rep % 2 == 0 else ("uv", "pip")
            for installer in order:
                cache = work / f"cache-{installer}-{rep}"
                s = samples.setdefault(installer, {})
                s.setdefault("cold", []).append(_one(work, base_python, installer, "cold",
                                                     cache, WEB))
                s.setdefault("warm", []).append(_one(work, base_python, installer, "warm",
                                                     cache, WEB))
                s.setdefault("change", []).append(_one(work, base_python, installer, "change",
                                                       cache, WEB + EXTRA))
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'installer':<10} {'cold':>8} {'warm':>8} {'change':>8}   (medians of "
          f"{args.reps}, seconds)")
    for installer, s in samples.items():
        print(f"{installer:<10} " + " ".join(f"{statistics.median(s[c]):8.1f}"
                                              for c in ("cold", "warm", "change")))
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "env.json").write_text(json.dumps({"samples": samples, "requirements": WEB,
                                              "extra": EXTRA}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
