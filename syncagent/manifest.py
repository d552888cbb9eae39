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

__all__ = ["Entry", "LocalScan", "find_gitignores", "local_rules", "scan_local", "from_wire",
           "unchanged"]


@dataclass
class LocalScan:
    entries: dict[str, Entry]
    problems: list[tuple[str, str]] = field(default_factory=list)
    protected: list[str] = field(default_factory=list)  # let through by the rules, kept anyway

    @property
    def unreadable(self) -> list[str]:
        return [p for p, _ in self.problems]


def find_gitignores(root: str, base: Rules, stamps: dict | None = None
                    ) -> dict[str, list[str]]:
    """{directory relative to root: lines} for every .gitignore outside excluded directories.

    Args:
        stamps: filled with {path: stat stamp} of every directory listed and every .gitignore
            read (see :func:`unchanged`): what a later look can check instead of walking.
    """
    compiled = base.compiled()
    found = {}
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else root
        try:
            if stamps is not None:  # before the listing: a change after it shows next time
                stamps[(path, False)] = _stamp(os.lstat(path))
            listing = list(os.scandir(path))
        except OSError:
            continue
        for de in listing:
            try:
                is_dir = de.is_dir()  # as os.walk: a link to a directory is listed, not entered
            except OSError:
                continue
            if is_dir:
                sub = f"{rel}/{de.name}" if rel else de.name
                if not de.is_symlink() and not agent.is_excluded(compiled, sub, True):
                    stack.append(sub)
            elif de.name == ".gitignore":
                try:
                    if stamps is not None:
                        stamps[(de.path, True)] = _stamp(os.stat(de.path))
                    with open(de.path, encoding="utf-8", errors="surrogateescape") as f:
                        found[rel] = f.read().splitlines()
                except OSError:
                    continue
    return found


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size


def unchanged(stamps: dict, since_ns: int) -> bool:
    """True if every path ``find_gitignores`` stamped at ``since_ns`` (a clock reading taken
    before the walk) is as it was then: no .gitignore added, removed or edited, no directory
    added or removed where the walk went. Stamps taken less than ``agent.RACY_NS`` after a
    change vouch for nothing (the racy-entry rule: a later change in the same tick would not
    show)."""
    for (path, follow), stamp in stamps.items():
        try:
            st = os.stat(path) if follow else os.lstat(path)
        except OSError:
            return False
        if _stamp(st) != stamp or since_ns - max(stamp[0], stamp[1]) < agent.RACY_NS:
            return False
    return True


def local_rules(root: str, extra: Sequence[str] = (), protect: Sequence[str] = (),
                stamps: dict | None = None) -> Rules:
    """The rules for this tree: defaults, its .gitignore files, then the config's patterns;
    protection after them all. ``stamps``: as for :func:`find_gitignores`."""
    base = build_rules(extra, protect=protect)
    return build_rules(extra, find_gitignores(root, base, stamps), protect=protect)


def scan_local(root: str, rules: Rules, cache: dict | None = None, save: bool = True
               ) -> LocalScan:
    """Scan the dev tree, re-hashing only files the digest cache cannot vouch for.

    Args:
        cache: the digest cache to use and update (default: loaded from the tree's state dir).
        save: write it back now, if it changed (a holder writes it after answering).
    """
    cache = agent.load_digest_cache(root) if cache is None else cache
    problems: list[tuple[str, str]] = []
    held: list[str] = []
    entries = agent.scan(root, rules.compiled(), cache, problems, held=held)
    if save:
        agent.save_digest_cache(root, cache)
    return LocalScan(entries, problems, held)


def from_wire(entries: dict) -> dict[str, Entry]:
    """A manifest as the agent sent it back to Entry tuples (sizes and times are not sent)."""
    return agent.from_wire(entries)
