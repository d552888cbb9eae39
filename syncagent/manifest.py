"""Local tree scanning: rules from the tree's .gitignore files, then a manifest.

The scan itself is the agent's (``syncagent.agent.scan``), so both sides see a tree the same way;
this module adds what only the dev side does: finding .gitignore files and keeping the local
digest cache under ``<root>/.syncagent/``.

A manifest maps paths to :class:`Entry` records, one packed ``bytes`` object per entry; for a
file it is also the digest cache's record (the same object: one per file, shared by every
target of a fleet or watch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

from . import agent
from .agent import Entry
from .ignore import Rules, build_rules

__all__ = ["Entry", "LocalScan", "find_gitignores", "local_rules", "scan_local", "from_wire"]


@dataclass
class LocalScan:
    entries: dict[str, Entry]
    problems: list[tuple[str, str]] = field(default_factory=list)
    protected: list[str] = field(default_factory=list)  # let through by the rules, kept anyway

    @property
    def unreadable(self) -> list[str]:
        return [p for p, _ in self.problems]


def find_gitignores(root: str, base: Rules) -> dict[str, list[str]]:
    """{directory relative to root: lines} for every .gitignore outside excluded directories."""
    compiled = base.compiled()
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel.replace(os.sep, "/")
        dirnames[:] = [
            d for d in dirnames
            if not agent.is_excluded(compiled, f"{rel}/{d}" if rel else d, True)
        ]
        if ".gitignore" in filenames:
            try:
                with open(os.path.join(dirpath, ".gitignore"), encoding="utf-8",
                          errors="surrogateescape") as f:
                    found[rel] = f.read().splitlines()
            except OSError:
                continue
    return found


def local_rules(root: str, extra: Sequence[str] = (), protect: Sequence[str] = ()) -> Rules:
    """The rules for this tree: defaults, its .gitignore files, then the config's patterns;
    protection after them all."""
    base = build_rules(extra, protect=protect)
    return build_rules(extra, find_gitignores(root, base), protect=protect)


def scan_local(root: str, rules: Rules, cache: dict | None = None) -> LocalScan:
    """Scan the dev tree, re-hashing only files the digest cache cannot vouch for.

    Args:
        cache: the digest cache to use and update (default: loaded from the tree's state dir);
            it is saved back either way.
    """
    cache = agent.load_digest_cache(root) if cache is None else cache
    problems: list[tuple[str, str]] = []
    held: list[str] = []
    entries = agent.scan(root, rules.compiled(), cache, problems, held=held)
    agent.save_digest_cache(root, cache)
    return LocalScan(entries, problems, held)


def from_wire(entries: dict) -> dict[str, Entry]:
    """A manifest as the agent sent it back to Entry tuples (sizes and times are not sent)."""
    return agent.from_wire(entries)
