"""The watcher on real inotify: editor saves, git checkouts, overflow, the watch limit."""

from __future__ import annotations

import errno
import os
import shutil
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


@pytest.mark.parametrize("becomes", ["file", "link"])
def test_paths_below_a_directory_that_became_a_file_are_gone_not_unreadable(tree, becomes):
    """A batch names a directory that is now a file (or a link) and the files that were in it:
    those are gone (their deletes are planned), not problems "Not a directory" whose remote
    copies would be kept."""
    (tree / "app").mkdir()
    (tree / "app" / "m.py").write_text("m\n")
    before = agent.scan(str(tree), RULES.compiled())
    shutil.rmtree(tree / "app")
    if becomes == "file":
        (tree / "app").write_text("now a file\n")
    else:
        (tree / "app").symlink_to("a.py")
    problems: list = []
    fresh = agent.scan_paths(str(tree), RULES.compiled(), ["app", "app/m.py", "app/n/o.py"],
                             {}, problems)
    assert problems == []
    assert set(fresh) == {"app"} and fresh["app"].kind == becomes[0]
    p = plan(fresh, {k: v for k, v in before.items() if k.startswith("app")})
    assert sorted(d.path for d in p.deletes) == ["app", "app/m.py"]


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


def test_a_mode_change_is_a_batch(tree):
    """A chmod alone (no write): before, the watcher's event filter dropped watchdog's attrib
    events, so a live chmod reached the remote only with that file's next edit or the next
    full reconcile (the soak caught it: a file left 0644 on the remote, 0600 here)."""
    (tree / "sub").mkdir()
    before = agent.scan(str(tree), RULES.compiled())
    with Watcher(str(tree), RULES) as w:
        batch = one_batch(w, lambda: (tree / "a.py").chmod(0o600))
        assert changes(tree, before, batch) == ["a.py"]
        batch = one_batch(w, lambda: (tree / "sub").chmod(0o700))
        assert "sub" in batch.paths


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
    assert len(batches) == 1 and batches[0].by_git
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
    assert first is not None and second is not None and not first.by_git


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


# ---------------------------------------------------------------- which batches git made


@pytest.fixture
def repo(tmp_path):
    """A repository on main (31 files) with a branch 'feature' that adds 30 more."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    for i in range(31):
        (root / f"m{i}.py").write_text(f"V = {i}\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "main")
    git(root, "checkout", "-q", "-b", "feature")
    (root / "feat").mkdir()
    for i in range(30):
        (root / "feat" / f"f{i}.py").write_text(f"F = {i}\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "feature")
    return root


def batches_after(watcher: Watcher, action) -> list:
    """Run ``action`` to its end first (a fast git command: its index.lock is long gone when
    the consumer looks), then take every batch it made."""
    action()
    out = []
    while (b := watcher.next_batch(timeout=0.5)) is not None:
        out.append(b)
    return out


def rm_during_git_status(root: Path) -> None:
    git(root, "status", "--porcelain")  # takes and releases index.lock (an IDE does this)
    shutil.rmtree(root / "feat")


@pytest.mark.parametrize("action,by_git", [
    (lambda root: git(root, "checkout", "-q", "main"), True),
    (lambda root: git(root, "switch", "-q", "main"), True),
    (lambda root: git(root, "reset", "-q", "--hard", "main"), True),
    (lambda root: git(root, "stash", "-q"), True),
    (lambda root: shutil.rmtree(root / "feat"), False),
    (rm_during_git_status, False),
    # its untracked files go by `git clean`, as below: no lock; the tracked edit goes back
    # under the lock
    (lambda root: git(root, "stash", "-q", "-u"), "build*.o: not git's, m0.py: git's"),
    (lambda root: git(root, "clean", "-q", "-f", "-d", "-x"), False),
], ids=["checkout", "switch", "reset-hard", "stash", "rm-rf", "rm-after-git-status",
        "stash-untracked", "git-clean"])
def test_a_batch_says_whether_git_made_it(repo, action, by_git):
    """Git's own changes happen while it holds .git/index.lock; `git clean` (and the
    untracked part of `stash -u`) takes no lock: those files are not in git."""
    (repo / "m0.py").write_text("edited\n")  # before the watch: the action is the batch
    for i in range(25):
        (repo / f"build{i}.o").write_text("untracked\n")
    with Watcher(str(repo), RULES) as w:
        batches = batches_after(w, lambda: action(repo))
    made = {p: b.by_git for b in batches for p in b.paths}
    expected = {p: not p.startswith("build") if isinstance(by_git, str) else by_git
                for p in made}
    assert batches and made == expected, [(sorted(b.paths)[:3], b.by_git) for b in batches]


def test_a_fast_checkout_is_made_by_git_though_its_lock_is_gone_when_the_batch_is_cut(repo):
    with Watcher(str(repo), RULES) as w:
        batches = batches_after(w, lambda: git(repo, "checkout", "-q", "main"))
        assert not os.path.exists(repo / ".git" / "index.lock")
    assert len(batches) == 1 and batches[0].by_git
    assert sum(1 for p in batches[0].paths if p.startswith("feat/")) == 30


def test_an_edit_after_a_checkout_is_not_made_by_git(repo):
    with Watcher(str(repo), RULES) as w:
        assert batches_after(w, lambda: git(repo, "checkout", "-q", "main"))[0].by_git
        edit = batches_after(w, lambda: (repo / "m1.py").write_text("mine\n"))
    assert [b.by_git for b in edit] == [False]


def test_an_edit_just_before_a_checkout_is_a_batch_of_its_own(repo):
    """The consumer takes no batch between the edit and the checkout (it is busy, or the edit's
    last event arrives late): git's batch still holds only git's changes."""
    with Watcher(str(repo), RULES) as w:
        batches = batches_after(w, lambda: ((repo / "m1.py").write_text("mine\n"),
                                            git(repo, "checkout", "-q", "-f", "main")))
    assert [(b.by_git, "m1.py" in b.paths) for b in batches] == [(False, True), (True, True)]
    assert sum(1 for p in batches[1].paths if p.startswith("feat/")) == 30


def test_an_edit_just_after_a_checkout_is_a_batch_of_its_own(repo):
    with Watcher(str(repo), RULES) as w:
        batches = batches_after(w, lambda: (git(repo, "checkout", "-q", "main"),
                                            (repo / "m1.py").write_text("mine\n")))
    assert [(b.by_git, "m1.py" in b.paths) for b in batches] == [(True, False), (False, True)]


def _inotify_masks() -> dict[str, list[int]]:
    """{fd: [mask of each watch]} of this process's inotify instances, as the kernel has them."""
    out = {}
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            text = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:
            continue
        masks = [int(word[5:], 16) for line in text.splitlines() if line.startswith("inotify wd:")
                 for word in line.split() if word.startswith("mask:")]
        if masks:
            out[fd] = masks
    return out


def test_the_kernel_queues_no_event_for_reading(tree):
    """Opens and closes without a write change nothing; asked for, they are two events per
    file read, so the first sync of a watch (which reads every file it sends, and hashes what
    its cache cannot vouch for) flooded the queue and the event threads: 200,000 events to
    decode and drop for 100,000 files, half of that sync's time (bench/README.md, scale)."""
    (tree / "sub").mkdir()
    before = _inotify_masks()
    with Watcher(str(tree), RULES):
        masks = {fd: m for fd, m in _inotify_masks().items() if fd not in before}
    IN_CLOSE_NOWRITE, IN_OPEN, IN_CLOSE_WRITE, IN_MODIFY, IN_CREATE = 0x10, 0x20, 0x8, 0x2, 0x100
    watches = [m for ms in masks.values() for m in ms]
    assert len(watches) == 2, masks  # the root and sub/
    for mask in watches:
        assert not mask & (IN_OPEN | IN_CLOSE_NOWRITE), hex(mask)
        assert mask & IN_CLOSE_WRITE and mask & IN_MODIFY and mask & IN_CREATE, hex(mask)
