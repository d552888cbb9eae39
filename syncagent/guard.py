"""The mass-delete record of each target on this machine: losses not yet confirmed, and halts.

The policy itself is pure (``plan.judge``); this module only keeps what it needs between
commands, in ``$XDG_STATE_HOME/syncagent/guard/<key>.json``, one small file per local tree and
target. Local, not on the remote: the verdict is the dev side's (nothing on the remote changes
when a target halts), ``status`` must report it even when the remote is unreachable, and a
``push --allow-mass-delete`` in another terminal clears it for a running ``watch`` to see. The
file exists only while something is unconfirmed; most of the time there is none.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .config import Target, user_state_dir

__all__ = ["Record", "record_path", "load", "save", "clear", "way_out"]


def way_out(target: str) -> str:
    """What the user can do about a refusal or a halt (one place, every message)."""
    return (f"check --path and --remote-path; if the deletes are intended run "
            f"`syncagent push {target} --allow-mass-delete`, otherwise restore the files "
            f"(a halted watch resumes by itself)")


class Record(dict):
    """``{"target", "remote_path", "base", "lost": {path: digest}, "halted": {...} | None}``."""

    @property
    def halted(self) -> dict | None:
        return self.get("halted")


def record_path(root: str | Path, target: Target) -> Path:
    key = json.dumps([os.path.realpath(str(root)), target.name, target.host, target.user,
                      target.port, target.remote_path])
    name = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=10).hexdigest()
    return user_state_dir() / "guard" / f"{name}.json"


def load(root: str | Path, target: Target) -> Record | None:
    """The record, or None (nothing unconfirmed; an unreadable record counts as none)."""
    try:
        data = json.loads(record_path(root, target).read_text())
    except (OSError, ValueError):
        return None
    return Record(data) if isinstance(data, dict) else None


def save(root: str | Path, target: Target, base: int, lost: dict, halted: dict | None) -> None:
    """Write the record atomically (a reader never sees half of it)."""
    path = record_path(root, target)
    path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    body = {"target": target.name, "remote_path": target.remote_path, "base": base,
            "lost": dict(sorted(lost.items())), "halted": halted, "written": time.time()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body))
    os.replace(tmp, path)


def clear(root: str | Path, target: Target) -> None:
    """Everything confirmed (or restored): no record."""
    try:
        record_path(root, target).unlink()
    except FileNotFoundError:
        pass
