"""The watcher on real inotify: editor saves, git checkouts, overflow, the watch limit."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from pathlib import Path

import pytest

from syncagent import agent
from syncagent.ignore import build_rules
from syncagent.plan import plan
from syncagent.watcher import WATCH_LIMIT_HINT, Watcher

RULES = build_rules()


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    (root / "a.py").write_text("one\n")
    return root


def changes(root: Path, before: dict, batch) -> list[str]:
    """What the batch changes, as the consumer would plan it: paths of the plan."""
    compiled = RULES.compiled()
    fresh = agent.scan_paths(str(root), compiled, batch.paths, {})
    old = {p: e for p, e in before.items() if p in batch.paths or p in fresh}
    p = plan(fresh, old)
    return sorted({u.path for u in p.uploads} | {d.path for d in p.deletes}
                  | {c.path for c in p.chmods} | {ln.path for ln in p.links})


def one_batch(watcher: Watcher, action) -> object:
    action()
    batch = watcher.next_batch(timeout=5)
    assert batch is not None, "no batch"
    return batch


def vim_save(root: Path):
    # vim: probe file 4913, backup by rename, write the new file, remove the backup
    (root / "4913").write_text("")
    (root / "4913").unlink()
    os.rename(root / "a.py", root / "a.py~")
    (root / "a.py").write_text("two\n")
    (root / "a.py~").unlink()
    (root / ".a.py.swp").write_bytes(b"\0" * 1024)


def jetbrains_save(root: Path):
    (root / "a.py___jb_tmp___").write_text("two\n")
    os.rename(root / "a.py", root / "a.py___jb_old___")
    os.rename(root / "a.py___jb_tmp___", root / "a.py")
    (root / "a.py___jb_old___").unlink()


def atomic_rename_save(root: Path):
    (root / ".a.py.3f2a1").write_text("two\n")  # a temp name no rule knows
    os.replace(root / ".a.py.3f2a1", root / "a.py")


def emacs_save(root: Path):
    (root / ".#a.py").symlink_to("user@host.1234")
    (root / "a.py").write_text("two\n")
    (root / ".#a.py").unlink()
    (root / "#a.py#").write_text("autosave")


@pytest.mark.parametrize("save", [vim_save, jetbrains_save, atomic_rename_save, emacs_save],
                         ids=["vim", "jetbrains", "atomic-rename", "emacs"])
def test_editor_saves_are_exactly_one_change(tree, save):
    before = agent.scan(str(tree), RULES.compiled())
    with Watcher(str(tree), RULES) as w:
        batch = one_batch(w, lambda: save(tree))
        assert not batch.full
        assert changes(tree, before, batch) == ["a.py"]


def test_excluded_paths_make_no_batch(tree):
    with Watcher(str(tree), RULES) as w:
        (tree / "venv" / "lib").mkdir(parents=True)
        (tree / "venv" / "lib" / "x.py").write_text("x")
        (tree / "x.pyc").write_text("x")
        (tree / "run.log").write_text("x")
        assert w.next_batch(timeout=0.5) is None


def test_rapid_same_size_edits_are_all_seen(tree):
    """Same size, same mtime: only content tells them apart."""
    f = tree / "a.py"
    stamp = f.stat().st_mtime_ns
    with Watcher(str(tree), RULES) as w:
        for i in range(30):
            before = agent.scan(str(tree), RULES.compiled())
            f.write_text(f"v{i:02d}\n")
            os.utime(f, ns=(stamp, stamp))
            batch = w.next_batch(timeout=5)
            assert batch and changes(tree, before, batch) == ["a.py"], i


def git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})


def git_repo_with_two_branches(root: Path, n: int) -> None:
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    for i in range(n):
        d = root / f"pkg{i % 40}"
        d.mkdir(exist_ok=True)
        (d / f"m{i}.py").write_text(f"V = 'main {i}'\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "main")
    git(root, "checkout", "-q", "-b", "feature")
    for i in range(n):
        (root / f"pkg{i % 40}" / f"m{i}.py").write_text(f"V = 'feature {i}'\n")
    git(root, "commit", "-qam", "feature")
    git(root, "checkout", "-q", "main")


def test_git_checkout_of_2000_files_is_one_batch(tmp_path):
    root = tmp_path / "repo"
    git_repo_with_two_branches(root, 2000)
    # max_wait far below the checkout's duration: only the index.lock hold keeps it whole
    with Watcher(str(root), RULES, quiet=0.05, max_wait=0.05) as w:
        checkout = threading.Thread(target=git, args=(root, "checkout", "-q", "feature"))
        checkout.start()  # while the consumer below waits for batches, as `watch` does
        batches = []
        while (b := w.next_batch(timeout=1)) is not None:
            batches.append(b)
        checkout.join()
    assert len(batches) == 1
    assert len([p for p in batches[0].paths if p.endswith(".py")]) == 2000


def test_without_the_lock_a_burst_is_cut_by_max_wait(tmp_path):
    """The control for the test above: the same tiny max_wait does cut long bursts."""
    root = tmp_path / "proj"
    root.mkdir()
    with Watcher(str(root), RULES, quiet=0.05, max_wait=0.05) as w:
        stop = threading.Event()

        def writer():
            i = 0
            while not stop.is_set():
                (root / f"f{i % 50}.py").write_text(str(i))
                i += 1
                stop.wait(0.005)

        t = threading.Thread(target=writer)
        t.start()
        try:
            first = w.next_batch(timeout=5)
            second = w.next_batch(timeout=5)
        finally:
            stop.set()
            t.join()
    assert first is not None and second is not None and not first.held_for_git


def test_queue_overflow_asks_for_a_full_reconcile(tree):
    if os.geteuid() != 0:
        pytest.skip("lowering fs.inotify.max_queued_events needs root")
    knob = Path("/proc/sys/fs/inotify/max_queued_events")
    saved = knob.read_text()
    knob.write_text("4")
    try:
        w = Watcher(str(tree), RULES)
        w.start()  # the limit is taken when the inotify instance is made
    finally:
        knob.write_text(saved)
    try:
        full = False
        for burst in range(5):  # the kernel may keep up once; it cannot keep up every time
            # far more events than the queue holds, from C, faster than a Python reader drains
            subprocess.run(["touch"] + [f"f{burst}-{i}.txt" for i in range(3000)], cwd=tree,
                           check=True)
            while (batch := w.next_batch(timeout=1)) is not None:
                full = full or batch.full
            if full:
                break
        assert full
    finally:
        w.stop()


def test_watch_limit_falls_back_to_polling(tree, monkeypatch):
    """The OS seam: the kernel's inotify_add_watch answers ENOSPC, as at the limit."""
    import ctypes

    from watchdog.observers import inotify_c

    def no_watches(fd, path, mask):
        ctypes.set_errno(errno.ENOSPC)
        return -1

    monkeypatch.setattr(inotify_c, "inotify_add_watch", no_watches)
    with Watcher(str(tree), RULES) as w:
        assert w.backend == "polling"
        assert WATCH_LIMIT_HINT in w.warnings and "max_user_watches" in WATCH_LIMIT_HINT
        (tree / "b.py").write_text("b")
        batch = w.next_batch(timeout=10)
        assert batch is not None and "b.py" in batch.paths
