"""Whether a batch restarts the worker: one pure decision, shared by push and watch.

No I/O in this module. The callers gather the facts (what the batch changed, which revision it
left, which revision the serving worker runs) and act on the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

__all__ = ["Decision", "decide"]


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
           nothing_serving: bool = False) -> Decision:
    """Does this batch restart the worker?

    Args:
        changed: the paths the batch changed (empty: it changed nothing).
        matches: the ``restart_on`` matcher (``ignore.restart_matcher``).
        pushed: the revision the batch left on the remote.
        live: the revision the serving worker runs; None when unknown (no shortcut taken).
        enabled: False with ``--no-restart``.
        provisioned: a supervisord-managed worker lives on the target.
        nothing_serving: no worker serves at all (start one even if nothing changed).

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
    if not changed:
        return Decision(False, "nothing changed")
    if live is not None and live == pushed:
        return Decision(False, f"the tree is back at {live[:7]}, the revision that is live",
                        back_at_live=True)
    hit = next((p for p in changed if matches(p)), None)
    if hit is None:
        return Decision(False, "no change matches restart_on")
    return Decision(True, f"{hit} changed")
