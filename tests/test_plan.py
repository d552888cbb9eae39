"""The pure planner and its safety policy: table-driven cases, and the invariants (applying a
plan yields local; moves never count as losses; live batches are judged as one push of the same
change, and cannot walk past the mass-delete threshold however the change is split)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncagent.agent import Entry
from syncagent.plan import (Chmod, Delete, Ledger, Link, Mkdir, Revisions, TouchedRevision,
                            Upload, apply_plan, changed_paths, content_view, escaping_links,
                            judge, plan, replan, revision)


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


def _old_revision(manifest):
    """The revision as it was hashed before Revisions: one pass over every sorted line."""
    import hashlib
    h = hashlib.blake2b(digest_size=20)
    for path, view in sorted(content_view(manifest).items()):
        h.update(repr((path,) + view).encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


@settings(max_examples=80, deadline=None)
@given(st.lists(manifests(), min_size=1, max_size=5))
def test_an_incremental_revision_is_the_revision_of_each_manifest(sequence):
    kept = Revisions()
    for m in sequence:
        assert kept.of(m) == revision(m) == Revisions().of(dict(m))


@settings(max_examples=100, deadline=None)
@given(manifests(), manifests())
def test_the_revision_tells_trees_apart_as_the_full_hash_did(a, b):
    assert (revision(a) == revision(b)) == (_old_revision(a) == _old_revision(b))


@settings(max_examples=80, deadline=None)
@given(st.lists(manifests(), min_size=1, max_size=5), st.booleans())
def test_a_revision_of_a_manifest_changed_in_place_is_its_revision(sequence, replace):
    """A watch's local manifest: one dict, changed path by path, each change said (or, as a
    full reconcile does, a new dict put in its place)."""
    kept = TouchedRevision()
    m = dict(sequence[0])
    assert kept.of(m) == revision(m)
    for target in sequence[1:]:
        if replace:
            m = dict(target)
        else:
            changed = changed_paths(m, target)
            for path in changed:
                if path in target:
                    m[path] = target[path]
                else:
                    del m[path]
            kept.touched(changed)
        assert kept.of(m) == revision(m) == revision(target)


def test_a_revision_changes_when_a_file_moves_to_another_directory():
    a = {"x": D(), "y": D(), "x/f": F("h")}
    b = {"x": D(), "y": D(), "y/f": F("h")}
    assert revision(a) != revision(b)
    kept = Revisions()
    assert kept.of(a) != kept.of(b) == revision(b)


keeps = st.lists(st.sampled_from(["a", "b/c", "b"]), max_size=2)


@settings(max_examples=120, deadline=None)
@given(manifests(), manifests(), manifests(), manifests(), keeps)
def test_replanning_the_changed_paths_gives_the_full_plan(l0, r0, l1, r1, keep):
    changed = changed_paths(l0, l1) | changed_paths(r0, r1)
    assert replan(plan(l0, r0, keep), changed, l1, r1, keep) == plan(l1, r1, keep)


def test_changed_paths_sees_added_removed_and_changed_records():
    old = {"a": F("1"), "b": F("2"), "c": F("3")}
    new = {"a": F("1"), "b": F("2", mtime=5), "d": F("4")}
    assert changed_paths(old, new) == {"b", "c", "d"}


# ---------------------------------------------------------------- the safety policy: judge()


def tree(n, prefix="app", digest="c"):
    """``n`` files of distinct content under ``prefix``/."""
    out = {prefix: D()}
    out.update({f"{prefix}/m{i}.py": F(f"{digest}{i}") for i in range(n)})
    return out


def moved(m, old, new):
    return {(new + p[len(old):] if p == old or p.startswith(old + "/") else p): e
            for p, e in m.items()}


def without(m, *prefixes):
    return {p: e for p, e in m.items()
            if not any(p == x or p.startswith(x + "/") for x in prefixes)}


JUDGE_CASES = [
    # (id, remote, local, lost, allowed)
    ("rename the only package", tree(81), moved(tree(81), "app", "src"), 0, True),
    ("rm -rf the only package", tree(40), {}, 40, False),
    ("21 of 40 lost", tree(40), without(tree(40), *[f"app/m{i}.py" for i in range(21)]),
     21, False),
    ("20 of 30 lost: not more than 20", tree(30),
     without(tree(30), *[f"app/m{i}.py" for i in range(20)]), 20, True),
    ("21 of 50 lost: not more than half", tree(50),
     without(tree(50), *[f"app/m{i}.py" for i in range(21)]), 21, True),
    ("content kept in a copy is not lost", {**tree(40), "keep": D(),
                                            **{f"keep/{i}": F(f"c{i}") for i in range(40)}},
     {"keep": D(), **{f"keep/{i}": F(f"c{i}") for i in range(40)}}, 0, True),
    ("move plus an edit of every file: content gone", tree(30),
     {p.replace("app", "src"): F(e.digest + "'") if e.kind == "f" else e
      for p, e in tree(30).items()}, 30, False),
    ("file turned into a directory loses its content", {f"m{i}": F(f"c{i}") for i in range(30)},
     {**{f"m{i}": D() for i in range(30)}}, 30, False),
    ("identical copies are one content", {f"m{i}": F("same") for i in range(40)}, {}, 1, True),
    ("edits are not deletes", tree(40), {p: F(e.digest + "'") if e.kind == "f" else e
                                         for p, e in tree(40).items()}, 0, True),
]


@pytest.mark.parametrize("remote,local,lost,allowed", [c[1:] for c in JUDGE_CASES],
                         ids=[c[0] for c in JUDGE_CASES])
def test_judge_cases(remote, local, lost, allowed):
    verdict = judge(plan(local, remote), remote)
    assert (verdict.count, verdict.allowed) == (lost, allowed)


def test_judge_allow_confirms_anything():
    assert judge(plan({}, tree(40)), tree(40), allow=True).allowed


def test_judge_ratio_is_the_projects():
    remote = tree(100)
    local = without(remote, *[f"app/m{i}.py" for i in range(30)])
    assert judge(plan(local, remote), remote).allowed
    assert judge(plan(local, remote), remote, ratio=0.25).refused


def test_a_storm_of_small_batches_cannot_walk_past():
    """40 files deleted one per batch: the 21st loss is refused, as one push of the 21."""
    remote, ledger = tree(40), None
    for i in range(40):
        local = without(remote, f"app/m{i}.py")
        verdict = judge(plan(local, remote), remote, ledger)
        if verdict.refused:
            break
        remote, ledger = apply_plan(remote, plan(local, remote), local), verdict.ledger
    assert i == 20 and verdict.count == 21 and verdict.base == 40


def test_files_that_arrived_since_the_confirmation_are_guarded_too():
    """A remote confirmed empty, filled by live batches, then rm -rf: all 40 count."""
    remote, ledger = {}, None
    local = tree(40)
    for path in sorted(local):  # one file per batch, as a watch would send them
        p = plan({path: local[path]}, {})
        verdict = judge(p, remote, ledger)
        remote, ledger = apply_plan(remote, p, local), verdict.ledger
    verdict = judge(plan({}, remote), remote, ledger)
    assert verdict.refused and (verdict.count, verdict.base) == (40, 0)


def test_restoring_the_files_takes_the_losses_back():
    remote = tree(40)
    local = without(remote, *[f"app/m{i}.py" for i in range(15)])
    v1 = judge(plan(local, remote), remote)
    remote = apply_plan(remote, plan(local, remote), local)
    assert len(v1.lost) == 15
    back = tree(40)  # the same content at the same paths again
    v2 = judge(plan(back, remote), remote, v1.ledger)
    assert v2.allowed and not v2.lost and not v2.ledger.lost


def test_losses_are_carried_over_from_an_earlier_command():
    """A new command opens its ledger from the record: 15 lost earlier + 10 now > 20."""
    remote = without(tree(40), *[f"app/m{i}.py" for i in range(15)])
    earlier = {f"app/m{i}.py": f"c{i}" for i in range(15)}
    local = without(remote, *[f"app/m{i}.py" for i in range(15, 25)])
    assert judge(plan(local, remote), remote).allowed  # without the record: 10 of 25
    verdict = judge(plan(local, remote), remote, Ledger.confirmed(remote, earlier, 40))
    assert verdict.refused and verdict.count == 25 and verdict.base == 40


# ---------------------------------------------------------------- properties of judge()

@st.composite
def changes(draw):
    """A remote tree of files with distinct content, and a local tree made from it by
    keeping, deleting, moving (file or whole directory), editing and creating files."""
    n = draw(st.integers(1, 70))
    dirs = draw(st.integers(1, 4))
    remote = {f"d{i}": D() for i in range(dirs)}
    remote.update({f"d{i % dirs}/f{i}": F(f"c{i}") for i in range(n)})
    local = dict(remote)
    deleting = draw(st.sampled_from([0.1, 0.6, 0.9]))  # share of files deleted, roughly
    for i in range(n):
        path = f"d{i % dirs}/f{i}"
        what = "delete" if draw(st.floats(0, 1)) < deleting else draw(
            st.sampled_from(["keep", "move", "edit"]))
        if what == "delete":
            del local[path]
        elif what == "move":
            local[f"moved/{path}"] = local.pop(path)
        elif what == "edit":
            local[path] = F(f"c{i}'")
    for i in draw(st.sets(st.integers(0, dirs - 1))):  # whole directories moved
        local = moved(local, f"d{i}", f"r{i}")
    local.update({f"new{i}": F(f"n{i}") for i in range(draw(st.integers(0, 5)))})
    if any(p.startswith("moved/") for p in local):
        local["moved"] = D()
        local.update({f"moved/d{i}": D() for i in range(dirs)})
    return remote, local


def batches_of(draw, remote, local):
    """The changed paths of the change, split at random into batches."""
    changed = sorted(p for p in set(remote) | set(local) if remote.get(p) != local.get(p))
    order = draw(st.permutations(changed))
    cuts = sorted(draw(st.sets(st.integers(0, len(order)), max_size=6)))
    edges = [0] + cuts + [len(order)]
    return [set(order[a:b]) for a, b in zip(edges, edges[1:]) if b > a]


def batch_plan(local, remote, paths):
    """The plan of a live batch naming ``paths`` (what the watcher hands over)."""
    return plan({p: e for p, e in local.items() if p in paths},
                {p: e for p, e in remote.items() if p in paths})


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 60), st.data())
def test_moves_never_count(n, data):
    remote = tree(n)
    remote.update({"lib": D(), **{f"lib/x{i}": F(f"x{i}") for i in range(n)}})
    local = dict(remote)
    for path in data.draw(st.lists(st.sampled_from(sorted(remote)), unique=True)):
        if path in local and local[path].kind == "f":
            local[f"elsewhere/{path.replace('/', '_')}"] = local.pop(path)
    local["elsewhere"] = D()
    if data.draw(st.booleans()):
        local = moved(local, "app", "src")  # the top package renamed, too
    verdict = judge(plan(local, remote), remote)
    assert verdict.allowed and not verdict.lost


@settings(max_examples=300, deadline=None)
@given(changes(), st.data())
def test_a_live_batch_is_judged_as_a_one_shot_push_of_the_same_change(change, data):
    remote, local = change
    paths = batches_of(data.draw, remote, local)[0] if remote != local else set()
    live = batch_plan(local, remote, paths)
    after = apply_plan(remote, live, local)  # the tree the batch leads to
    one_shot = plan(after, remote)
    a, b = judge(live, remote), judge(one_shot, remote)
    assert (a.allowed, dict(a.lost)) == (b.allowed, dict(b.lost))


@settings(max_examples=300, deadline=None)
@given(changes(), st.data())
def test_losses_over_the_threshold_are_refused_whatever_the_split(change, data):
    remote, local = change
    whole = judge(plan(local, remote), remote)
    current, ledger, refused = remote, None, False
    for paths in batches_of(data.draw, remote, local):
        p = batch_plan(local, current, paths)
        verdict = judge(p, current, ledger)
        if verdict.refused:
            refused = True
            break
        current, ledger = apply_plan(current, p, local), verdict.ledger
    if whole.refused:
        assert refused
    if not refused:  # every batch ran: the losses are exactly the one-shot push's
        assert content_view(current) == content_view(local)
        final = judge(plan(local, current), current, ledger)
        assert dict(final.lost) == dict(whole.lost)


def test_a_file_moved_then_edited_is_not_lost():
    """Seen live, a rename resolves the loss; editing the moved file later is an edit."""
    remote = tree(40)
    local = moved(remote, "app", "src")
    v1 = judge(plan(without(local, "src"), remote), remote)  # the deletes' batch first
    assert v1.count == 40 and v1.refused
    half = without(remote, "app")  # had it run: the creates' batch brings the content back
    v2 = judge(plan(local, half), half, v1.ledger)
    assert v2.allowed and not v2.lost
    after = apply_plan(half, plan(local, half), local)
    edited = {p: F(e.digest + "'") if e.kind == "f" else e for p, e in local.items()}
    v3 = judge(plan(edited, after), after, v2.ledger)
    assert v3.allowed and v3.count == 0


# ---------------------------------------------------------------- a change git made (watch)


def test_a_branch_switch_made_by_git_is_not_counted():
    """The user trial: 31 files confirmed, a branch adds 30 (synced), switching back deletes
    them: refused as a plain delete ("35 of 31"), let through when git made it, and the base
    becomes the 31 files the remote holds after."""
    master = tree(31)
    feature = {**master, "feat": D(), **{f"feat/f{i}.py": F(f"f{i}") for i in range(30)}}
    ledger = judge(plan(feature, master), master).ledger  # the branch's files, synced
    back = plan(master, feature)
    assert judge(back, feature, ledger).refused
    verdict = judge(back, feature, ledger, confirmed=True)
    assert verdict.allowed and not verdict.lost and verdict.ledger.base == 31
    # what follows is judged against the tree git left: rm -rf of 21 of its 31 is refused
    after = apply_plan(feature, back, master)
    rm = without(after, *[f"app/m{i}.py" for i in range(21)])
    assert judge(plan(rm, after), after, verdict.ledger).refused


def test_a_change_git_made_keeps_the_earlier_losses_counted():
    """15 files lost by hand, then a checkout: the 15 still count, so 6 more are refused."""
    remote = tree(40)
    local = without(remote, *[f"app/m{i}.py" for i in range(15)])
    v1 = judge(plan(local, remote), remote)
    remote = apply_plan(remote, plan(local, remote), local)
    switched = {**local, "b.py": F("b")}
    v2 = judge(plan(switched, remote), remote, v1.ledger, confirmed=True)
    assert v2.allowed and set(v2.lost) == set(v1.lost) and v2.ledger.base == 26
    remote = apply_plan(remote, plan(switched, remote), switched)
    rm = without(switched, *[f"app/m{i}.py" for i in range(15, 21)])
    assert judge(plan(rm, remote), remote, v2.ledger).refused


@settings(max_examples=300, deadline=None)
@given(changes(), st.data())
def test_a_change_git_made_is_never_refused_and_confirms_the_tree_it_leaves(change, data):
    remote, local = change
    earlier = {f"gone{i}": f"g{i}" for i in range(data.draw(st.integers(0, 25)))}
    current, ledger = remote, Ledger.confirmed(remote, earlier, len(remote))
    for paths in batches_of(data.draw, remote, local):
        p = batch_plan(local, current, paths)
        verdict = judge(p, current, ledger, confirmed=True)
        assert verdict.allowed and set(verdict.lost) <= set(ledger.lost)
        current, ledger = apply_plan(current, p, local), verdict.ledger
        assert ledger.base == sum(1 for e in current.values() if e.kind == "f")
    assert dict(ledger.lost) == earlier  # none of them came back; nothing new counted


def test_a_fleets_threads_get_the_same_revision_from_one_warm():
    """push_many asks Warm.revision from one thread per target: its incremental state must
    not be changed by two at once (without the lock, 6 answers in 90 were wrong)."""
    import sys
    import threading

    from syncagent.push import Warm

    manifests = [{f"p{d}/f{i}": F(f"{i}-{v}") for d in range(40) for i in range(50)}
                 for v in range(4)]
    expected = [revision(m) for m in manifests]
    warm = Warm("/nonexistent")
    wrong = []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for m, want in zip(manifests * 3, expected * 3):
            start = threading.Barrier(4)

            def ask(m=m, want=want, start=start):
                start.wait()
                if warm.revision(m) != want:
                    wrong.append(want)

            threads = [threading.Thread(target=ask) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(old)
    assert wrong == []
