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
    ([], B, A, {"owed": "app/x.py changed"},
     Decision(True, "the restart an earlier push needed never ran: app/x.py changed")),
    (["static/site.css"], B, None, {"owed": "app/x.py changed"},
     Decision(True, "the restart an earlier push needed never ran: app/x.py changed")),
    (["requirements.txt"], B, A, {"owed": "app/x.py changed"},
     Decision(True, "requirements.txt changed")),
    ([], A, A, {"owed": "app/x.py changed"},
     Decision(False, "the tree is back at aaaaaaa, the revision that is live", True)),
    ([], B, A, {"owed": "app/x.py changed", "enabled": False},
     Decision(False, "restarts are off (--no-restart)")),
], ids=["code", "code-live-unknown", "requirements", "static-only", "back-at-live", "no-change",
        "no-restart-flag", "not-provisioned", "nothing-serving", "nothing-serving-at-live",
        "nothing-serving-but-off", "owed", "owed-web-only-batch", "owed-and-own-reason",
        "owed-but-live", "owed-but-off"])
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


# ---------------------------------------------------------------- scope: the worker's code only

IMPORTS = frozenset({"app/__init__.py", "app/tasks/__init__.py", "app/tasks/media.py",
                     "app/models.py"})


@pytest.mark.parametrize("changed, imports, scope, expected", [
    (["app/web/routes.py"], IMPORTS, "imports",
     Decision(False, "the worker does not import app/web/routes.py")),
    (["app/web/a.py", "app/web/b.py", "app/web/c.py", "app/web/d.py"], IMPORTS, "imports",
     Decision(False, "the worker does not import app/web/a.py, app/web/b.py, app/web/c.py "
                     "and 1 more")),
    (["app/web/routes.py", "app/tasks/media.py"], IMPORTS, "imports",
     Decision(True, "app/tasks/media.py changed (the worker imports it)")),
    (["app/tasks"], IMPORTS, "imports",  # a deleted package
     Decision(True, "app/tasks changed (the worker imports it)")),
    (["app/tasks_new.py"], IMPORTS, "imports",  # a module nobody imported yet
     Decision(False, "the worker does not import app/tasks_new.py")),
    (["requirements.txt", "app/web/routes.py"], IMPORTS, "imports",
     Decision(True, "requirements.txt changed")),
    (["setup.cfg"], IMPORTS, "imports", Decision(True, "setup.cfg changed")),
    (["static/site.css"], IMPORTS, "imports", Decision(False, "no change matches restart_on")),
    (["app/web/routes.py"], None, "imports", Decision(True, "app/web/routes.py changed")),
    (["app/web/routes.py"], IMPORTS, "any", Decision(True, "app/web/routes.py changed")),
    (["app/web/routes.py"], frozenset(), "imports",
     Decision(False, "the worker does not import app/web/routes.py")),
], ids=["web-only", "many-web", "task-module", "deleted-package", "new-module", "requirements",
        "config", "static", "unknown-imports", "scope-any", "imports-nothing"])
def test_decide_scope(changed, imports, scope, expected) -> None:
    assert decide(changed, MATCH, B, A, imports=imports, scope=scope) == expected


code_paths = st.lists(st.sampled_from(sorted(IMPORTS) + [
    "app/web/routes.py", "app/new.py", "app", "app/tasks", "requirements.txt", "x.toml",
    "docs/a.md"]), max_size=6)


@given(code_paths, st.sampled_from(["imports", "any"]), st.booleans())
def test_scope_never_skips_the_workers_code(changed, scope, known) -> None:
    """The promise: with the import set known, a batch that touches an imported file (or a
    folder holding one: a deleted package) or an always-restart file restarts; for files,
    the imports scope only ever restarts less than `any`."""
    imports = IMPORTS if known else None
    d = decide(changed, MATCH, B, A, imports=imports, scope=scope)
    touches = any(p in IMPORTS or any(f.startswith(p + "/") for f in IMPORTS)
                  or (MATCH(p) and not p.endswith(".py")) for p in changed)
    if touches and known and scope == "imports":
        assert d.restart
    if d.restart and not {"app", "app/tasks"} & set(changed):
        assert decide(changed, MATCH, B, A, scope="any").restart
    assert d.why


# ---------------------------------------------------------------- fleets: one policy

def test_waves_and_stops() -> None:
    from syncagent.restart import one_at_a_time, stopped_after, waves

    assert waves("rolling", ["a", "b", "c"]) == [["a"], ["b"], ["c"]]
    assert waves("parallel", ["a", "b", "c"]) == [["a", "b", "c"]]
    assert waves("parallel", []) == [] == waves("rolling", [])
    assert one_at_a_time("rolling", 2) and not one_at_a_time("rolling", 1)
    assert not one_at_a_time("parallel", 3)
    assert stopped_after("rolling", "a", ["b", "c"]) == {
        "b": "b: not restarted (rolling restart stopped after a failed)",
        "c": "c: not restarted (rolling restart stopped after a failed)"}
    assert stopped_after("parallel", "a", ["b"]) == {}


# ---------------------------------------------------------------- the record on the remote

def test_imports_record_and_live_imports(tmp_path) -> None:
    """The worker side records the project files its modules came from (never a venv inside
    the root); the agent returns them only for the live marker's running process."""
    import os
    import types

    from syncagent import agent
    from worker import ready

    root = tmp_path / "proj"
    mods = {name: types.SimpleNamespace(__file__=str(root / rel)) for name, rel in [
        ("app", "app/__init__.py"), ("app.tasks", "app/tasks/__init__.py"),
        ("flask", "venv/lib/python3.12/site-packages/flask/__init__.py")]}
    mods["os"] = os
    mods["builtin"] = types.SimpleNamespace()
    found = ready.project_imports(root, mods)
    assert found == {"app/__init__.py", "app/tasks/__init__.py"}

    assert agent.live_imports(str(root)) is None  # no marker: unknown
    ready.write_marker(root, "green", "r1", "node", pid=os.getpid())
    assert agent.live_imports(str(root)) is None  # a worker that records nothing: unknown
    ready.record_imports(root, "green", "r1", os.getpid(), found)
    ready.record_imports(root, "green", "r1", os.getpid(), {"app/tasks/media.py"})  # a pool child
    assert agent.live_imports(str(root)) == sorted(found | {"app/tasks/media.py"})
    ready.record_imports(root, "green", "r1", os.getpid() + 10**6, {"x.py"})  # a new process
    assert agent.live_imports(str(root)) is None  # not the live marker's process
    ready.write_marker(root, "green", "r1", "node", pid=2**22 + 12345)  # a dead pid
    ready.record_imports(root, "green", "r1", 2**22 + 12345, {"x.py"})
    assert agent.live_imports(str(root)) is None


# ---------------------------------------------------------------- provision's start (the agent)

@pytest.mark.parametrize("slots, restart, expected", [
    ([], False, ("start", None)),
    ([("blue", None)], False, ("wait", "blue")),
    ([("blue", A)], False, ("keep", "blue")),
    ([("blue", A)], True, ("restart", "blue")),
    ([("blue", B)], False, ("restart", "blue")),
    ([("green", B), ("blue", A)], False, ("keep", "blue")),
    ([("green", None), ("blue", B)], False, ("wait", "green")),
], ids=["none-serves", "autostart-starting", "serves-the-revision", "runtime-changed",
        "serves-another-revision", "an-older-slot-serves-it", "starting-beside-an-old-one"])
def test_first_start(slots, restart, expected) -> None:
    """What provision's start does (syncagent/agent.py, the slot controller; stdlib-only,
    so tested here with the other restart decisions)."""
    from syncagent.agent import first_start

    assert first_start(slots, A, restart) == expected
