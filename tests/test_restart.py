"""syncagent.restart: the one decision whether a batch restarts the worker (pure)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncagent.ignore import restart_matcher
from syncagent.restart import Decision, decide

MATCH = restart_matcher()
A, B = "a" * 40, "b" * 40


@pytest.mark.parametrize("changed, pushed, live, flags, expected", [
    (["app/tasks/demo.py"], B, A, {}, Decision(True, "app/tasks/demo.py changed")),
    (["README.md", "app/x.py"], B, None, {}, Decision(True, "app/x.py changed")),
    (["requirements.txt"], B, A, {}, Decision(True, "requirements.txt changed")),
    (["static/site.css"], B, A, {}, Decision(False, "no change matches restart_on")),
    (["app/tasks/demo.py"], A, A, {},
     Decision(False, "the tree is back at aaaaaaa, the revision that is live", True)),
    ([], A, B, {}, Decision(False, "nothing changed")),
    (["app/x.py"], B, A, {"enabled": False}, Decision(False, "restarts are off (--no-restart)")),
    (["app/x.py"], B, A, {"provisioned": False}, Decision(False, "no worker provisioned")),
    ([], A, None, {"nothing_serving": True}, Decision(True, "no worker is serving")),
    (["app/x.py"], A, A, {"nothing_serving": True}, Decision(True, "no worker is serving")),
    ([], A, None, {"nothing_serving": True, "enabled": False},
     Decision(False, "restarts are off (--no-restart)")),
], ids=["code", "code-live-unknown", "requirements", "static-only", "back-at-live", "no-change",
        "no-restart-flag", "not-provisioned", "nothing-serving", "nothing-serving-at-live",
        "nothing-serving-but-off"])
def test_decide(changed, pushed, live, flags, expected) -> None:
    assert decide(changed, MATCH, pushed, live, **flags) == expected


paths = st.lists(st.sampled_from(["app/a.py", "app/b.py", "README.md", "static/x.css",
                                  "requirements.txt", ".env.worker", "conf.toml"]), max_size=5)
revisions = st.sampled_from([A, B])


@given(paths, revisions, revisions | st.none(), st.booleans(), st.booleans(), st.booleans())
def test_decide_invariants(changed, pushed, live, enabled, provisioned, nothing_serving) -> None:
    d = decide(changed, MATCH, pushed, live, enabled=enabled, provisioned=provisioned,
               nothing_serving=nothing_serving)
    if not enabled or not provisioned:  # the flag and an unprovisioned target always win
        assert not d.restart
    elif nothing_serving:  # something must serve
        assert d.restart
    elif live == pushed:  # back at the live revision: nothing to restart onto
        assert not d.restart and (d.back_at_live or not changed)
    else:  # otherwise exactly when a changed path matches restart_on
        assert d.restart == any(MATCH(p) for p in changed)
    assert d.why
