"""Writing ``.env.worker`` from the dev machine: merge, validate, then write (or nothing).

``python -m worker write-env create|update`` reads ``{"KEY": "value"}`` as JSON on stdin (so
no value is ever on a command line), merges it into the existing file (``update``: the chosen
keys are replaced in place, new ones appended, every other line kept), validates the MERGED
settings the way the worker will read them, and only then writes the file atomically with mode
0600. An invalid result writes nothing. Prints one JSON object, never a value.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

from dotenv import dotenv_values

from worker import env as envmod

__all__ = ["format_line", "merge_text", "write_env", "HEADER"]

HEADER = "# written by syncagent provision; edit it here or with `provision --update-env`"
_ASSIGN = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=")


def format_line(key: str, value: str) -> str:
    """``KEY='value'``, single-quoted as python-dotenv reads it back literally."""
    quoted = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"{key}='{quoted}'"


def merge_text(text: str | None, pairs: Iterable[tuple[str, str]]) -> str:
    """The file text with ``pairs`` set: each key's assignment replaced where it stands (its
    later duplicates dropped), new keys appended, every other line kept. No I/O."""
    updates = dict(pairs)
    # split on "\n" only: str.splitlines() also breaks at \x1c-\x1e, \x85, \u2028 inside values
    lines = [HEADER] if text is None else text.split("\n")
    if lines[-1] == "":
        lines.pop()
    out, done = [], set()
    for line in lines:
        match = _ASSIGN.match(line)
        key = match.group(1) if match else None
        if key in updates:
            if key not in done:
                out.append(format_line(key, updates[key]))
                done.add(key)
            continue
        out.append(line)
    out += [format_line(k, v) for k, v in updates.items() if k not in done]
    return "\n".join(out) + "\n"


def _problems(text: str) -> list[str]:
    """What the worker would refuse in this file (supervisord gives the worker none of these
    variables from elsewhere: the file is the whole truth)."""
    values = {k: v for k, v in dotenv_values(stream=io.StringIO(text)).items() if v is not None}
    return list(envmod.validate(values).problems)


def write_env(root: str | os.PathLike[str], pairs: Mapping[str, str], mode: str) -> dict:
    """Create or update ``<root>/.env.worker`` with ``pairs``, if the merged result is valid.

    Args:
        root: project root.
        pairs: the settings to set.
        mode: ``create`` (an existing file is kept as it is) or ``update``.

    Returns:
        ``{"status": created|updated|unchanged|kept|invalid, "keys": [...], "problems": [...]}``
        (keys whose value changed; never a value).
    """
    path = Path(root) / envmod.ENV_FILE_NAME
    try:
        old = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        old = None
    if old is not None and mode == "create":
        return {"status": "kept", "keys": [], "problems": []}
    new = merge_text(old, pairs.items())
    before = {} if old is None else dotenv_values(stream=io.StringIO(old))
    after = dotenv_values(stream=io.StringIO(new))
    keys = sorted(k for k in pairs if before.get(k) != after.get(k))
    problems = _problems(new)
    if problems:
        return {"status": "invalid", "keys": keys, "problems": problems}
    if old is not None and new == old:
        return {"status": "unchanged", "keys": [], "problems": []}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
        if old is None:
            try:
                os.link(tmp, path)  # never overwrite a file that appeared meanwhile
            except FileExistsError:
                return {"status": "kept", "keys": [], "problems": []}
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"status": "created" if old is None else "updated", "keys": keys, "problems": []}
