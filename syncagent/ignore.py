"""Exclude and protect rules, in gitignore syntax. No I/O in this module.

A path that is excluded is never pushed, and on the remote it is left alone: never overwritten
and never deleted. Rules are compiled with pathspec to plain regexes, so the stdlib-only agent
applies exactly the same rules to the remote tree (``syncagent.agent.is_excluded``).

Protection is stronger and is the agent's: the built-in set (``agent.PROTECTED``: ``.env``,
``.env.*`` except ``*.example``, ``venv/``, ``.venv/``, ``instance/``) plus the config's
``protect`` patterns is checked after every exclude rule, cannot be negated, and is enforced by
the agent on the remote whatever the dev side sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping, Sequence

import pathspec

from . import agent

__all__ = ["DEFAULT_EXCLUDES", "DEFAULT_RESTART_ON", "EDITOR_TEMP", "Rules", "build_rules",
           "rebase_gitignore", "restart_matcher"]

# Clippy-Front's sync-to-remote.sh list, in its order ...
CLIPPYFRONT_EXCLUDES = (
    "venv/", "__pycache__/", "*.pyc", ".git/", "instance/data/", "instance/logs/",
    "artifacts/", "tmp/", "logs/", "data/", "uploads/", "node_modules/", ".pytest_cache/",
    ".mypy_cache/", ".ruff_cache/", "bin/ffmpeg", "bin/ffprobe", "bin/yt-dlp",
)
# ... editor temp files (vim, emacs, JetBrains, macOS) ...
EDITOR_TEMP = (
    "*.swp", "*.swx", "*.swo", "4913", "*~", ".#*", "\\#*#", "*___jb_tmp___", "*___jb_old___",
    ".DS_Store", "*.tmp",
)
# ... and what the script forgot: environments and secrets stay where they are (the agent's
# protected set, which it also enforces on the remote whatever these rules say).
DEFAULT_EXCLUDES = CLIPPYFRONT_EXCLUDES + EDITOR_TEMP + ("*.log", ".syncagent/") + agent.PROTECTED


# Changes to these restart the worker; templates, static files and docs only sync.
DEFAULT_RESTART_ON = ("*.py", "requirements*.txt", "pyproject.toml", "setup.cfg", "*.ini",
                      "*.cfg", "*.toml", "*.yaml", "*.yml")


def restart_matcher(patterns: Sequence[str] | None = None):
    """A predicate: does a change to this path (posix, relative) need a worker restart?"""
    spec = pathspec.GitIgnoreSpec.from_lines(
        DEFAULT_RESTART_ON if patterns is None else patterns)
    return spec.match_file


@dataclass(frozen=True)
class Rules:
    """Ordered gitignore patterns compiled to regexes; the last match wins."""

    patterns: tuple[tuple[str, bool], ...]
    protect: tuple[str, ...] = ()  # regexes of the config's extra protected patterns

    def to_wire(self) -> list[list]:
        return [[rx, inc] for rx, inc in self.patterns]

    def protect_wire(self) -> list[str]:
        """What requests carry as ``protect`` (the built-in set is the agent's own)."""
        return list(self.protect)

    def compiled(self) -> agent.CompiledRules:
        return _compile(self.patterns, self.protect)

    def excluded(self, path: str, is_dir: bool = False) -> bool:
        """True if ``path`` (posix, relative to the root) is excluded or protected."""
        return agent.is_excluded(self.compiled(), path, is_dir)

    def protected(self, path: str) -> bool:
        """True if the remote keeps ``path`` whatever is sent."""
        return agent.is_protected(path, self.compiled().protect)


@lru_cache(maxsize=16)
def _compile(patterns: tuple[tuple[str, bool], ...],
             protect: tuple[str, ...]) -> agent.CompiledRules:
    return agent.compile_rules(patterns, protect)


def rebase_gitignore(directory: str, lines: Iterable[str]) -> list[str]:
    """Rewrite the patterns of ``<directory>/.gitignore`` so they apply from the root.

    A pattern with a slash (other than a trailing one) is anchored to its directory; one without
    matches at any depth below it, as git does.
    """
    if not directory:
        return [ln.rstrip("\n") for ln in lines]
    out = []
    for raw in lines:
        line = raw.rstrip("\n").rstrip(" ")
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        body = line[1:] if neg else line
        if "/" in body.rstrip("/"):
            new = f"{directory}/{body.lstrip('/')}"
        else:
            new = f"{directory}/**/{body}"
        out.append(("!" if neg else "") + new)
    return out


def build_rules(
    extra: Sequence[str] = (),
    gitignores: Mapping[str, Sequence[str]] | None = None,
    defaults: Sequence[str] = DEFAULT_EXCLUDES,
    protect: Sequence[str] = (),
) -> Rules:
    """Defaults, then the tree's ``.gitignore`` files (shallowest first), then the config's own
    patterns, which may add or negate (``!pattern``) anything before them. Protection
    (``agent.PROTECTED`` and ``protect``) comes after all of them: nothing negates it.

    Args:
        extra: patterns from ``syncagent.toml`` ``exclude``.
        gitignores: {directory relative to the root ("" for the root): lines of its .gitignore}.
        defaults: the built-in list.
        protect: patterns from ``syncagent.toml`` ``protect`` (adding only: no ``!``).
    """
    lines = list(defaults)
    for directory in sorted(gitignores or {}, key=lambda d: (d.count("/") if d else -1, d)):
        lines += rebase_gitignore(directory, gitignores[directory])
    lines += list(extra)
    spec = pathspec.GitIgnoreSpec.from_lines(lines)
    patterns = tuple(
        (p.regex.pattern, bool(p.include)) for p in spec.patterns if p.include is not None
    )
    guard = pathspec.GitIgnoreSpec.from_lines(protect)
    return Rules(patterns, tuple(p.regex.pattern for p in guard.patterns if p.include))
