"""Restarts: whether a batch restarts the worker, and in what order a fleet restarts.

One pure owner, shared by push, watch, fleets and ``restart``. No I/O in this module. The
callers gather the facts (what the batch changed, which revision it left, which revision the
serving worker runs and which project files it has imported) and act on the answer.

Scope (``restart_scope``): ``imports`` (default) restarts for a Python file only when the
serving worker has imported it (changed, written over or deleted; a module nobody imported yet
is read fresh when first imported); other files restart when they match ``restart_on``
(requirements, ``*.toml``, ``*.cfg``, ``*.ini``...). ``any`` restarts for any change matching
``restart_on``, ``*.py`` included: the behaviour before scopes. An unknown import set (a worker
too old to record it) is judged as ``any``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Sequence

__all__ = ["Decision", "POLICIES", "SCOPES", "decide", "one_at_a_time", "stopped_after",
           "waves"]

SCOPES = ("imports", "any")
POLICIES = ("rolling", "parallel")


@dataclass(frozen=True)
class Decision:
    """The answer, and why (the user is told when a batch restarts nothing it could have).

    Attributes:
        restart: restart the worker onto the pushed revision.
        why: one short clause, e.g. "the tree is back at 3fa2c1d, the revision that is live".
        back_at_live: the batch returned the tree to the live revision (a restart queued for
            an earlier batch is pointless too).
    """

    restart: bool
    why: str
    back_at_live: bool = False


def decide(changed: Iterable[str], matches: Callable[[str], bool], pushed: str | None,
           live: str | None, *, enabled: bool = True, provisioned: bool = True,
           nothing_serving: bool = False, imports: Collection[str] | None = None,
           scope: str = "imports", owed: str | None = None) -> Decision:
    """Does this batch restart the worker?

    Args:
        changed: the paths the batch changed (empty: it changed nothing).
        matches: the ``restart_on`` matcher (``ignore.restart_matcher``).
        pushed: the revision the batch left on the remote.
        live: the revision the serving worker runs; None when unknown (no shortcut taken).
        enabled: False with ``--no-restart``.
        provisioned: a supervisord-managed worker lives on the target.
        nothing_serving: no worker serves at all (start one even if nothing changed).
        imports: the project files the serving worker has imported; None when unknown.
        scope: ``imports`` or ``any`` (see the module's docstring).
        owed: why an earlier batch, committed on the remote, needed a restart that never ran
            (its command was cut off); None when none is owed.

    Returns:
        A :class:`Decision`.
    """
    if not enabled:
        return Decision(False, "restarts are off (--no-restart)")
    if not provisioned:
        return Decision(False, "no worker provisioned")
    if nothing_serving:
        return Decision(True, "no worker is serving")
    changed = list(changed)
    if not changed and not owed:
        return Decision(False, "nothing changed")
    if live is not None and live == pushed:
        return Decision(False, f"the tree is back at {live[:7]}, the revision that is live",
                        back_at_live=True)
    if not changed:
        own = Decision(False, "nothing changed")
    elif scope == "imports" and imports is not None:
        own = _by_imports(changed, matches, frozenset(imports))
    else:
        hit = next((p for p in changed if matches(p)), None)
        own = (Decision(True, f"{hit} changed") if hit is not None else
               Decision(False, "no change matches restart_on"))
    if owed and not own.restart:  # the worker runs older code than an earlier push needed
        return Decision(True, f"the restart an earlier push needed never ran: {owed}")
    return own


def _by_imports(changed: list[str], matches: Callable[[str], bool],
                imports: frozenset[str]) -> Decision:
    for path in changed:
        if path in imports or any(f.startswith(path + "/") for f in imports):
            return Decision(True, f"{path} changed (the worker imports it)")
    hit = next((p for p in changed if not p.endswith(".py") and matches(p)), None)
    if hit is not None:
        return Decision(True, f"{hit} changed")
    code = [p for p in changed if p.endswith(".py")]
    if not code:
        return Decision(False, "no change matches restart_on")
    shown = ", ".join(code[:3]) + (f" and {len(code) - 3} more" if len(code) > 3 else "")
    return Decision(False, f"the worker does not import {shown}")


def waves(policy: str, targets: Sequence[str]) -> list[list[str]]:
    """The order a fleet restarts in: ``rolling`` one target per wave (the next once the
    previous is live), ``parallel`` all in one wave."""
    if policy == "parallel":
        return [list(targets)] if targets else []
    return [[t] for t in targets]


def one_at_a_time(policy: str, targets: int) -> bool:
    """Whether a live loop's targets take turns restarting (a rolling fleet)."""
    return policy != "parallel" and targets > 1


def stopped_after(policy: str, failed: str, later: Sequence[str]) -> dict[str, str]:
    """The targets a failed start leaves unrestarted, each with why: a rolling restart stops
    at the first that fails, so broken code never takes the whole fleet down."""
    if policy == "parallel":
        return {}
    return {t: f"{t}: not restarted (rolling restart stopped after {failed} failed)"
            for t in later}
