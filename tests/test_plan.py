"""The pure planner: table-driven cases and the invariant that applying a plan yields local."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncagent.agent import Entry
from syncagent.plan import (Chmod, Delete, Link, Mkdir, Upload, apply_plan, content_view,
                            escaping_links, plan, revision)


def F(digest, mode=0o644, size=1, mtime=1):
    return Entry("f", size, mtime, mode, digest)


def D(mode=0o755):
    return Entry("d", 0, 0, mode)


def L(target):
    return Entry("l", 0, 0, 0, None, target)


CASES = [
    ("empty", {}, {}, dict()),
    ("create file", {"a": F("x")}, {}, dict(uploads=[Upload("a", 0o644, 1, 1, "x", None)])),
    ("same content, other mtime (touch)", {"a": F("x", mtime=5)}, {"a": F("x", mtime=1)}, dict()),
    ("edit", {"a": F("y")}, {"a": F("x")}, dict(uploads=[Upload("a", 0o644, 1, 1, "y", "x")])),
    ("remote digest unknown", {"a": F("y")}, {"a": F(None)},
     dict(uploads=[Upload("a", 0o644, 1, 1, "y", None)])),
    ("chmod +x", {"a": F("x", 0o755)}, {"a": F("x", 0o644)},
     dict(chmods=[Chmod("a", 0o755, 0o644)])),
    ("delete", {}, {"a": F("x")}, dict(deletes=[Delete("a", "f")])),
    ("mkdir empty", {"d": D()}, {}, dict(dirs=[Mkdir("d", 0o755)])),
    ("dir mode", {"d": D(0o700)}, {"d": D()}, dict(chmods=[Chmod("d", 0o700, 0o755)])),
    ("link new", {"l": L("a")}, {}, dict(links=[Link("l", "a", None)])),
    ("link retarget", {"l": L("b")}, {"l": L("a")}, dict(links=[Link("l", "b", "a")])),
    ("file becomes dir", {"p": D(), "p/x": F("x")}, {"p": F("x")},
     dict(deletes=[Delete("p", "f")], dirs=[Mkdir("p", 0o755)],
          uploads=[Upload("p/x", 0o644, 1, 1, "x", None)])),
    ("dir becomes link", {"p": L("q")}, {"p": D(), "p/x": F("x")},
     dict(deletes=[Delete("p", "d"), Delete("p/x", "f")], links=[Link("p", "q", None)])),
]


@pytest.mark.parametrize("local,remote,expected", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_plan_cases(local, remote, expected):
    p = plan(local, remote)
    for field in ("uploads", "links", "dirs", "chmods", "deletes"):
        assert sorted(getattr(p, field), key=repr) == sorted(expected.get(field, []), key=repr), field
    assert p.empty == (not expected)


def test_unreadable_local_paths_are_kept_on_the_remote():
    p = plan({"d": D()}, {"d": D(), "d/secret": F("x"), "gone": F("y")}, keep=["d/secret"])
    assert p.deletes == (Delete("gone", "f"),)
    assert p.kept == ("d/secret",)


def test_revision_ignores_times_but_not_content_mode_or_names():
    base = {"a": F("x", mtime=1), "d": D()}
    assert revision(base) == revision({"a": F("x", mtime=99), "d": D()})
    assert revision(base) != revision({"a": F("y"), "d": D()})
    assert revision(base) != revision({"a": F("x", 0o755), "d": D()})
    assert revision(base) != revision({"b": F("x"), "d": D()})
    assert len(revision(base)) == 40


@pytest.mark.parametrize("path,target,bad", [
    ("l", "a", False), ("d/l", "../a", False), ("l", "../x", True), ("l", "/etc/passwd", True),
    ("d/l", "../../x", True), ("d/l", "./../a/../b", False), ("l", "a/../../x", True),
])
def test_escaping_links(path, target, bad):
    assert bool(escaping_links({path: L(target)})) == bad


# ---------------------------------------------------------------- property: apply(plan) == local

names = st.sampled_from(["a", "b", "c", "é", "x y"])
paths = st.lists(names, min_size=1, max_size=3).map("/".join)


@st.composite
def manifests(draw):
    """A consistent tree: every parent of an entry is a directory."""
    out = {}
    for path in draw(st.lists(paths, max_size=12)):
        parts = path.split("/")
        if any(out.get("/".join(parts[:i]), D()).kind != "d" for i in range(1, len(parts))):
            continue
        if path in out and out[path].kind == "d":
            continue
        for i in range(1, len(parts)):
            out.setdefault("/".join(parts[:i]), D(draw(st.sampled_from([0o755, 0o700]))))
        out[path] = draw(st.one_of(
            st.builds(F, st.sampled_from(["h1", "h2", "h3"]), st.sampled_from([0o644, 0o755])),
            st.builds(D, st.sampled_from([0o755, 0o700])),
            st.builds(L, st.sampled_from(["a", "b"])),
        ))
    # a path that became a non-dir cannot keep children
    return {p: e for p, e in out.items()
            if all(out.get("/".join(p.split("/")[:i])) is not None
                   and out["/".join(p.split("/")[:i])].kind == "d"
                   for i in range(1, p.count("/") + 1))}


@settings(max_examples=400, deadline=None)
@given(manifests(), manifests())
def test_applying_the_plan_yields_the_local_tree(local, remote):
    p = plan(local, remote)
    after = apply_plan(remote, p, local)
    assert content_view(after) == content_view(local)
    assert plan(local, after).empty


@settings(max_examples=200, deadline=None)
@given(manifests())
def test_plan_of_equal_trees_is_empty(tree):
    assert plan(tree, dict(tree)).empty
