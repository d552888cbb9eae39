#!/usr/bin/env python3
"""Benchmark: ``syncagent push`` against ``rsync -a --delete -e ssh`` on the same sandbox.

Three source trees (on disk), destinations on tmpfs (/dev/shm) so the tools, not the disk, are
measured:

* ``gen``: a deterministic (seeded) tree of 20,000 files, ~140 MB, in 200 nested directories;
* ``web``: a deterministic (seeded) web project shaped like Clippy-Front (Flask + Celery):
  364 files, 3.8 MB that are pushed, plus a few (.env, __pycache__/, node_modules/,
  instance/, .git/, logs/, an editor swap file) that the default excludes drop;
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
hashed and compared (path, kind, mode, content, link target); ``gen`` and ``web`` are also
compared with their source (``gen`` contains nothing either tool excludes; ``web`` less the
paths its generator says the excludes drop).

Usage::

    .venv/bin/python bench/push_bench.py [--reps 5] [--trees gen,web,stdlib] [--keep]

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


# The ``web`` tree: shaped like Clippy-Front (a Flask + Celery project, the first real user of
# syncagent; /work/shared/reference): an application package with blueprints, models, tasks,
# services and utils, Alembic migrations, Jinja templates, static files with vendored
# minified libraries and a few binaries, tests, docs, and the project files around them.
# (name, kind, size in bytes): kind "py"/"html"/"css"/"js"/"md"/"txt" is text of that shape,
# "min.js"/"min.css" one long minified line, "png"/"ico"/"woff2"/"svg" a binary (or XML) body.
WEB_VENDOR = (
    ("app/static/css/vendor/bootstrap.min.css", "min.css", 232_000),
    ("app/static/css/vendor/bootstrap-icons.min.css", "min.css", 86_000),
    ("app/static/js/vendor/bootstrap.bundle.min.js", "min.js", 80_400),
    ("app/static/js/vendor/jquery-3.7.1.min.js", "min.js", 87_500),
    ("app/static/js/vendor/chart.umd.min.js", "min.js", 205_000),
    ("app/static/js/vendor/htmx.min.js", "min.js", 48_100),
    ("app/static/js/vendor/video.min.js", "min.js", 298_000),
    ("app/static/js/vendor/Sortable.min.js", "min.js", 44_300),
    ("app/static/js/vendor/dropzone.min.js", "min.js", 118_000),
)
WEB_BINARIES = (
    ("app/static/img/logo.png", "png", 48_000),
    ("app/static/img/og-image.png", "png", 142_000),
    ("app/static/img/empty-state.png", "png", 61_000),
    ("app/static/img/favicon.ico", "ico", 15_086),
    ("app/static/img/apple-touch-icon.png", "png", 9_400),
    ("app/static/fonts/bootstrap-icons.woff2", "woff2", 130_000),
    ("app/static/fonts/inter-regular.woff2", "woff2", 98_000),
    ("app/static/fonts/inter-semibold.woff2", "woff2", 101_000),
)
# Files the default excludes (and rsync's equivalent filters) must drop: (path, kind, size,
# the path the exclude rule drops: the file itself or the directory above it). The
# correctness check compares each destination with the source less these.
WEB_EXCLUDED = (
    (".env", "txt", 900, ".env"), (".env.worker", "txt", 700, ".env.worker"),
    ("app/__pycache__/__init__.cpython-311.pyc", "bin", 3_100, "app/__pycache__"),
    ("app/models/__pycache__/user.cpython-311.pyc", "bin", 9_800, "app/models/__pycache__"),
    ("node_modules/.package-lock.json", "txt", 2_400, "node_modules"),
    ("node_modules/esbuild/package.json", "txt", 1_100, "node_modules"),
    ("node_modules/esbuild/lib/main.js", "js", 40_000, "node_modules"),
    ("instance/clippy.db", "bin", 180_000, "instance"),
    ("instance/uploads/clip-0001.mp4", "bin", 90_000, "instance"),
    (".git/HEAD", "txt", 23, ".git"), (".git/config", "txt", 300, ".git"),
    ("logs/app.log", "txt", 12_000, "logs"),
    (".pytest_cache/v/cache/lastfailed", "txt", 200, ".pytest_cache"),
    ("app/static/js/app.js.swp", "bin", 4_096, "app/static/js/app.js.swp"),
)
WEB_PACKAGES = {  # package dir -> module stems (each gets an __init__.py too)
    "app": ("config", "extensions", "version", "cli", "errors", "security", "filters",
            "logging_config", "ffmpeg_config", "context_processors"),
    "app/main": ("routes", "forms", "views_dashboard", "views_library"),
    "app/auth": ("routes", "forms", "oauth", "decorators"),
    "app/admin": ("routes", "forms", "views_workers", "views_users", "views_settings"),
    "app/api": ("jobs", "media", "projects", "worker", "health", "clips", "teams",
                "notifications", "schemas"),
    "app/projects": ("routes", "forms", "wizard"),
    "app/teams": ("routes", "forms", "invites"),
    "app/models": ("user", "project", "clip", "media_file", "team", "processing_job", "tag",
                   "notification", "api_key", "system_setting", "theme", "audit", "mixins"),
    "app/tasks": ("celery_app", "compile_video", "download_clip", "media_maintenance",
                  "thumbnails", "transcode", "notifications", "cleanup", "worker_api",
                  "scheduled"),
    "app/services": ("storage", "twitch", "discord", "youtube", "ffmpeg", "compile_plan",
                     "media_probe", "quota", "mailer", "search"),
    "app/utils": ("paths", "timefmt", "hashing", "pagination", "validation", "text",
                  "retry", "locks", "gpu"),
    "scripts": ("create_admin", "backfill_thumbnails", "check_worker", "export_stats"),
}
WEB_TEMPLATES = {
    "app/templates": ("base", "index", "layout"),
    "app/templates/partials": ("navbar", "footer", "flash", "pagination", "clip_card",
                               "project_card", "job_row", "modal_confirm", "sidebar"),
    "app/templates/auth": ("login", "register", "reset_password", "forgot_password",
                           "account", "two_factor"),
    "app/templates/main": ("dashboard", "library", "clip_detail", "media_detail", "search",
                           "settings", "notifications", "help"),
    "app/templates/projects": ("list", "detail", "wizard_step1", "wizard_step2",
                               "wizard_step3", "compile", "edit", "timeline"),
    "app/templates/admin": ("index", "workers", "users", "user_detail", "jobs", "settings",
                            "themes", "system", "maintenance"),
    "app/templates/teams": ("list", "detail", "invite", "members"),
    "app/templates/errors": ("400", "403", "404", "500"),
    "app/templates/emails": ("welcome", "reset_password", "invite", "job_done"),
}
WEB_STATIC = (
    ("app/static/css", "css", ("style", "admin", "timeline", "wizard", "theme-dark", "auth")),
    ("app/static/js", "js", ("app", "admin", "timeline", "wizard", "upload", "notifications",
                             "player", "search", "theme", "api")),
)
WEB_DOCS = ("README", "installation", "configuration", "architecture", "worker-setup",
            "REMOTE_WORKER_SETUP", "api", "deployment", "troubleshooting", "media-pipeline",
            "nvenc", "development", "testing", "themes", "teams", "changelog-1.x", "security",
            "backup", "upgrading")
WEB_TOP = (  # project files at the root: (name, kind, size)
    ("README.md", "md", 14_000), ("CHANGELOG.md", "md", 38_000), ("LICENSE", "txt", 1_070),
    ("pyproject.toml", "toml", 2_300), ("requirements.txt", "req", 900),
    ("requirements-dev.txt", "req", 300), ("requirements-worker.txt", "req", 420),
    (".env.example", "env", 2_600), (".env.worker.example", "env", 1_200),
    ("Dockerfile", "txt", 1_500), ("docker-compose.yml", "yaml", 2_800),
    ("Makefile", "txt", 1_900), ("main.py", "py", 600), ("celery_worker.py", "py", 400),
    ("wsgi.py", "py", 300), ("pytest.ini", "ini", 250), (".pre-commit-config.yaml", "yaml", 900),
    (".dockerignore", "txt", 200), ("migrations/alembic.ini", "ini", 850),
    ("migrations/env.py", "py", 3_400), ("migrations/script.py.mako", "txt", 500),
    ("migrations/README", "txt", 40), ("scripts/worker/sync-to-remote.sh", "sh", 2_100),
    ("scripts/worker/run-worker-remote.sh", "sh", 1_700),
    ("scripts/worker/clippy-worker.service", "txt", 700), ("scripts/dev.sh", "sh", 800),
)
WEB_GITIGNORE = (  # what such a project ignores; every rule either matches nothing in the
    # tree or only what the default excludes drop anyway (rsync does not read .gitignore)
    "# Python", "__pycache__/", "*.py[cod]", "*.egg-info/", "build/", "dist/", "venv/",
    ".venv/", "", "# tooling", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", ".coverage",
    "htmlcov/", "", "# app", "instance/", "*.db", "logs/", "*.log", "uploads/", "tmp/", "",
    "# secrets", ".env", ".env.worker", "", "# frontend", "node_modules/", "", "# editors",
    ".idea/", ".vscode/", "*.swp", ".DS_Store", "", "# binaries", "bin/ffmpeg", "bin/ffprobe",
    "bin/yt-dlp",
)


def _web_text(rng: random.Random, corpus: bytes, kind: str, name: str, size: int) -> bytes:
    """A text body of about ``size`` bytes in the shape of its kind (deterministic)."""
    words = [w for w in WORDS if w.isalpha()]
    if kind == "py":
        head = f'"""{name}: part of the web app."""\nfrom __future__ import annotations\n\n'
    elif kind == "html":
        head = ('{% extends "base.html" %}\n{% block title %}' + name + '{% endblock %}\n'
                '{% block content %}\n<div class="container">\n')
    elif kind in ("min.js", "js"):
        head = "/*! " + name + " | MIT */\n" if kind == "min.js" else "'use strict';\n"
    elif kind in ("min.css", "css"):
        head = "/*! " + name + " */\n"
    elif kind == "req":
        pkgs = ("Flask", "Flask-Login", "Flask-SQLAlchemy", "Flask-Migrate", "Flask-WTF",
                "celery", "redis", "SQLAlchemy", "alembic", "psycopg2-binary", "requests",
                "python-dotenv", "gunicorn", "structlog", "Pillow", "yt-dlp", "pytest",
                "pytest-cov", "ruff", "mypy", "black", "Werkzeug", "Jinja2", "kombu")
        out = []
        while sum(map(len, out)) < size:
            out.append(f"{rng.choice(pkgs)}=={rng.randint(0, 5)}.{rng.randint(0, 30)}."
                       f"{rng.randint(0, 9)}\n")
        return "".join(out).encode()[:size]
    elif kind == "toml":  # valid TOML: syncagent reads [tool.syncagent] from pyproject.toml
        body = ('[build-system]\nrequires = ["setuptools>=68"]\n'
                'build-backend = "setuptools.build_meta"\n\n[project]\nname = "clippy-web"\n'
                'version = "1.6.2"\nrequires-python = ">=3.10"\ndependencies = [\n'
                + "".join(f'    "{p}>={rng.randint(1, 4)}.{rng.randint(0, 20)}",\n' for p in (
                    "Flask", "Flask-Login", "Flask-SQLAlchemy", "Flask-Migrate", "celery",
                    "redis", "SQLAlchemy", "requests", "python-dotenv", "structlog"))
                + ']\n\n[tool.ruff]\nline-length = 100\ntarget-version = "py311"\n\n'
                '[tool.pytest.ini_options]\ntestpaths = ["tests"]\n\n')
        while len(body) < size:
            body += f"# {' '.join(rng.choice(words) for _ in range(8))}\n"
        return body.encode()[:size].rsplit(b"\n", 1)[0] + b"\n"
    elif kind == "env":
        keys = ("FLASK_APP_URL", "SECRET_KEY", "DATABASE_URL", "CELERY_BROKER_URL",
                "CELERY_RESULT_BACKEND", "WORKER_API_KEY", "MEDIA_BASE_URL", "CELERY_QUEUES",
                "CELERY_CONCURRENCY", "USE_GPU_QUEUE", "CLIPPY_INSTANCE_PATH", "TMPDIR",
                "FFMPEG_DISABLE_NVENC", "WORKER_NAME", "LOG_LEVEL", "DISCORD_TOKEN")
        out = []
        while sum(map(len, out)) < size:
            out.append(f"# {' '.join(rng.choice(words) for _ in range(6))}\n"
                       f"{rng.choice(keys)}=changeme\n")
        return "".join(out).encode()[:size]
    else:
        head = f"# {name}\n\n"
    if kind in ("min.js", "min.css"):  # one long line, no indentation
        parts, n = [], len(head)
        while n < size:
            w = rng.choice(words)
            if kind == "min.js":
                piece = f"{w}.{rng.choice(words)}=function(t,e){{return t&&e.{w}}};"
            else:
                piece = f".{w}-{rng.randint(1, 5)}{{margin:{rng.randint(0, 9)}px}}"
            parts.append(piece)
            n += len(piece)
        return (head + "".join(parts)).encode()[:size]
    if kind == "html":
        parts, n = [], len(head)
        while n < size:
            w = rng.choice(words)
            line = rng.choice((
                f'  <div class="card {w}">{{{{ {w}.{rng.choice(words)} }}}}</div>\n',
                f'  {{% for {w} in {rng.choice(words)}s %}}<li>{{{{ {w} }}}}</li>{{% endfor %}}\n',
                f'  <a href="{{{{ url_for(\'main.{w}\') }}}}" class="btn">{w}</a>\n',
                f'  <p>{" ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))}</p>\n'))
            parts.append(line)
            n += len(line)
        return (head + "".join(parts) + "</div>\n{% endblock %}\n").encode()[:size]
    off = rng.randrange(0, len(corpus) - size - 1)
    return (head.encode() + corpus[off:off + size])[:size]


def _web_binary(rng: random.Random, kind: str, size: int) -> bytes:
    """Incompressible bytes behind the format's real magic number."""
    magic = {"png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "ico": b"\x00\x00\x01\x00\x03\x00",
             "woff2": b"wOF2\x00\x01\x00\x00", "bin": b"\x00"}[kind]
    return magic + rng.randbytes(size - len(magic))


def generate_web(root: Path, seed: int = 20240602) -> dict:
    """Write the deterministic ``web`` tree (~360 files, ~3.7 MB, Clippy-Front's shape).

    Returns a summary with ``excluded``: the paths the default excludes must drop (and the
    .gitignore's rules, which only rsync does not read, match nothing else in the tree)."""
    rng = random.Random(seed)
    corpus = _corpus(rng, 1 << 20)
    files: list[tuple[str, str, int]] = []

    def sized(median: int) -> int:  # log-normal around the median, like real source files
        return max(200, int(rng.lognormvariate(0, 0.7) * median))

    for pkg, mods in WEB_PACKAGES.items():
        files.append((f"{pkg}/__init__.py", "py", sized(1_200) if pkg != "app" else 6_500))
        for m in mods:
            files.append((f"{pkg}/{m}.py", "py", sized(6_200)))
    for i in range(56):  # Alembic revisions: mostly small, a few big ones
        files.append((f"migrations/versions/{rng.randrange(16**12):012x}_"
                      f"{rng.choice(WORDS).strip('_')}_{i:03d}.py", "py", sized(1_800)))
    for d, names in WEB_TEMPLATES.items():
        for n in names:
            files.append((f"{d}/{n}.html", "html", sized(5_500)))
    for d, kind, names in WEB_STATIC:
        for n in names:
            files.append((f"{d}/{n}.{kind}", kind, sized(9_000)))
    for i in range(22):
        files.append((f"app/static/img/icons/{rng.choice(WORDS).strip('_')}-{i}.svg", "svg",
                      sized(1_200)))
    files.append(("tests/__init__.py", "py", 0))
    files.append(("tests/conftest.py", "py", 9_000))
    for pkg, mods in list(WEB_PACKAGES.items())[:10]:
        for m in mods[:5]:
            files.append((f"tests/test_{pkg.replace('app/', '').replace('/', '_')}_{m}.py",
                          "py", sized(5_000)))
    for i in range(10):
        files.append((f"tests/fixtures/sample_{i}.json", "json", sized(1_500)))
    for n in WEB_DOCS:
        files.append((f"docs/{n}.md", "md", sized(9_000)))
    files += WEB_TOP + WEB_VENDOR + WEB_BINARIES
    excluded = sorted({drop for _, _, _, drop in WEB_EXCLUDED})
    skipped = {rel for rel, _, _, _ in WEB_EXCLUDED}
    total = 0
    for rel, kind, size in files + [row[:3] for row in WEB_EXCLUDED]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind in ("png", "ico", "woff2", "bin"):
            body = _web_binary(rng, kind, size)
        elif kind == "svg":
            body = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><path d="'
                    + " ".join(f"M{rng.randint(0, 16)} {rng.randint(0, 16)}" for _ in
                               range(size // 8)) + '"/></svg>\n').encode()[:size]
        else:
            body = _web_text(rng, corpus, kind, rel, size) if size else b""
        path.write_bytes(body)
        if rel not in skipped:
            total += len(body)
    (root / ".gitignore").write_text("\n".join(WEB_GITIGNORE) + "\n")
    for script in ("scripts/worker/sync-to-remote.sh", "scripts/worker/run-worker-remote.sh",
                   "scripts/dev.sh"):
        os.chmod(root / script, 0o755)
    return {"files": len(files) + 1, "bytes": total + (root / ".gitignore").stat().st_size,
            "excluded": excluded}


def without(view: dict[str, tuple], excluded) -> dict[str, tuple]:
    """``view`` less the excluded paths and everything under them."""
    return {p: v for p, v in view.items()
            if not any(p == d or p.startswith(d + "/") for d in excluded)}


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


def install_wheel(where: Path) -> str:
    """Build this checkout's wheel and install it into a fresh venv under ``where`` (no
    extras, no editable finder): the command a user runs. Returns its ``syncagent``."""
    wheels, venv = where / "wheel", where / "venv"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--disable-pip-version-check", "-w", str(wheels), str(REPO)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    *map(str, wheels.glob("*.whl"))], check=True)
    return str(venv / "bin" / "syncagent")


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
               tools: tuple = TOOLS, excluded=None) -> dict:
    """Time the cases on one tree. ``excluded``: None when the source is not compared with the
    destinations (stdlib), else the source paths the excludes drop (() for gen)."""
    res: dict = {"samples": {t: {c: [] for c in CASES} for t in tools},
                 "stages": {c: [] for c in CASES}, "holder_stages": {c: [] for c in CASES},
                 "cold": {}, "correctness": []}
    change_file = pick_change_file(src)
    res["change_file"] = str(change_file.relative_to(src))
    src_view = None if excluded is None else without(tree_view(src), excluded)

    def check(label: str):
        views = {t: tree_view(b.dest(t, tree)) for t in tools}
        diffs = diff_views(views["syncagent"], views["rsync"], "syncagent", "rsync")
        if src_view is not None:
            now = without(tree_view(src), excluded)
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


def make_source(tree: str, src: Path, args) -> dict:
    """Write one source tree; its summary's ``excluded`` (absent for stdlib, whose source is
    not compared) lists what the excludes must drop."""
    if tree == "gen":
        return generate_tree(src, files=args.files, total_mb=args.mb) | {"excluded": ()}
    if tree == "web":
        return generate_web(src)
    if tree == "stdlib":
        return copy_stdlib(src)
    raise SystemExit(f"unknown tree {tree!r} (gen, web, stdlib)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--trees", default="gen,web,stdlib")
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--mb", type=int, default=140)
    ap.add_argument("--work", default=None, help="where the source trees go (default: a temp "
                    "dir under /tmp, on disk)")
    ap.add_argument("--dest", default="/dev/shm", help="tmpfs for the destinations")
    ap.add_argument("--syncagent", default=None,
                    help="the syncagent command to measure (default: this checkout, built as a "
                    "wheel and installed into a fresh venv, as a user installs it; an editable "
                    "install pays ~10 ms more per command for its import finder)")
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
            meta[t] = make_source(t, src, args)
            log(f"{t}: {meta[t]} ({time.perf_counter() - t0:.1f} s to create in {src})")
            sources[t] = src
        if args.syncagent is None:
            t0 = time.perf_counter()
            args.syncagent = install_wheel(work / "install")
            log(f"syncagent: {args.syncagent} ({time.perf_counter() - t0:.1f} s to build and "
                "install the wheel)")
        up = subprocess.run([args.syncagent, "sandbox", "up", "--name", "bench",
                             "--dir", str(work / "sandbox"), "--json"],
                            capture_output=True, env=env, check=True)
        box = json.loads(up.stdout)
        log(f"sandbox: sshd pid {box['sshd_pid']} on {box['host']}:{box['port']}")
        b = Bench(work, dest_base, args.syncagent, box, env)
        for t in trees:
            log(f"== {t}")
            results[t] = bench_tree(b, t, sources[t], args.reps, log, args.settle,
                                    TOOLS if args.no_holder_column else TOOLS + ("holder",),
                                    excluded=meta[t].get("excluded"))
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
