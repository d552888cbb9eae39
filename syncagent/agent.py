"""The remote agent: one stdlib-only file, shipped to the remote content-addressed.

It runs as ``python3 agent-<hash>.py`` on an SSH exec channel and speaks a framed protocol on
stdin/stdout. The dev side imports the same module, so both sides scan trees, match rules and
hash files with the same code, and tests call :func:`apply_batch` directly.

Wire format: every frame is a 4-byte big-endian length and a payload. Requests and responses are
JSON objects; each response has ``"error"`` (``null`` or ``{"type", "message"}``). An ``apply``
request is followed, for each upload in order, by data frames ending with an end frame: a length
word of 0 (the agent hashes what it received), or ``VOUCHED`` (0x80000000, no payload): the
sender read the file with the very stat its non-racy digest was taken at, before and after the
read, so the bytes are the batch's ``digest`` and the agent records that one without hashing
(:func:`_read_data`). A length word with the top bit and any other bit set is a protocol error.

Must run on Python 3.8+ with nothing but the standard library.
"""

import codecs
import errno
import fcntl
import hashlib
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import struct
import sys
import threading
import time
import xmlrpc.client
from urllib.parse import unquote, urlsplit

__all__ = [
    "PROTOCOL",
    "STATE_DIR",
    "Entry",
    "compile_rules",
    "is_excluded",
    "scan",
    "scan_paths",
    "hash_file",
    "check_relpath",
    "check_link",
    "resolve",
    "escaping",
    "PROTECTED",
    "protected_name",
    "is_protected",
    "under_any",
    "manifest_delta",
    "apply_delta",
    "batch_claims",
    "apply_batch",
    "read_frame",
    "write_frame",
    "serve",
    "parse_dotenv",
    "secret_values",
    "mask",
]

PROTOCOL = 2  # 2: the VOUCHED end frame of an upload
MAGIC = "syncagent-agent"
STATE_DIR = ".syncagent"
REVISION_FILE = STATE_DIR + "/revision"
DIGEST_CACHE = STATE_DIR + "/digests.json"
TEMP_PREFIX = ".~sa."
CHUNK = 1 << 20
RACY_NS = 2 * 10**9  # a digest taken this soon after a change is not trusted next time
MAX_FRAME = 64 << 20
VOUCHED = 1 << 31  # an upload's end frame: its digest is the batch's (see the module doc)


class AgentFailure(Exception):
    """An error that crosses the wire as ``{"type", "message"}``."""

    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message


# ---------------------------------------------------------------- manifest entries


class Entry(bytes):
    """One tree entry: kind ('f' file, 'd' dir, 'l' symlink), size, mtime_ns, mode, digest, link;
    for a file the scan hashed, also what vouches for its digest next time (ctime_ns, inode,
    and when it was hashed).

    One packed record per entry (about 100 bytes for a file, where a tuple, its ints and a
    hex digest took about 320, and a separate digest-cache row as much again): a 100,000-file
    watch holds three manifests' worth of them. The digest cache *is* these records: a scan
    puts the same object in the manifest and in the cache. Fields are decoded on access.
    """

    __slots__ = ()

    def __new__(cls, kind, size=0, mtime_ns=0, mode=0, digest=None, link=None, ctime_ns=0,
                ino=0, hashed_ns=0):
        if digest is None:
            form, tail = 0, b""
        elif _HEX40.match(digest):
            form, tail = 1, bytes.fromhex(digest)
        else:  # not one of ours (a peer's or a test's): kept as text
            form, tail = 2, digest.encode("utf-8", "surrogateescape")
        n = len(tail)
        if form and hashed_ns - max(mtime_ns, ctime_ns) >= RACY_NS:
            form |= _SETTLED
        if link is not None:
            form |= _HAS_LINK
            tail += link.encode("utf-8", "surrogateescape")
        return bytes.__new__(cls, _HEAD.pack(_KIND_CODE[kind], form, mode + 1, n, size,
                                             mtime_ns, ctime_ns, ino, hashed_ns) + tail)

    # planning reads kind, mode and digest of every entry: those three are the fast ones
    kind = property(lambda self: _KIND_NAME[self[0]])
    mode = property(lambda self: (self[2] | self[3] << 8) - 1)
    size = property(lambda self: _I64.unpack_from(self, 6)[0])
    mtime_ns = property(lambda self: _I64.unpack_from(self, 14)[0])
    ctime_ns = property(lambda self: _I64.unpack_from(self, 22)[0])
    ino = property(lambda self: _U64.unpack_from(self, 30)[0])
    hashed_ns = property(lambda self: _I64.unpack_from(self, 38)[0])

    @property
    def digest(self):
        form = self[1] & 3
        if form == 1:
            return self[46:66].hex()
        if not form:
            return None
        return self[46:46 + _DLEN.unpack_from(self, 4)[0]].decode("utf-8", "surrogateescape")

    @property
    def link(self):
        if not self[1] & _HAS_LINK:
            return None
        start = _HEAD.size + _DLEN.unpack_from(self, 4)[0]
        return bytes(self[start:]).decode("utf-8", "surrogateescape")

    def vouches(self, st):
        """True if this record's digest holds for a file with stat ``st``: the quick check
        (size, mtime, ctime, inode) passes, and the digest was not taken racily close to the
        file's last change (a write later in the same timestamp tick would go unseen; the
        record knows that from its making: _SETTLED)."""
        return self[1] & _SETTLED and self[6:38] == _STAT.pack(st.st_size, st.st_mtime_ns,
                                                               st.st_ctime_ns, st.st_ino)

    def sent(self):
        """(mode, mtime_ns, size, digest) of a file in one decode: what an upload of it says."""
        _, _, mode, _, size, mtime_ns, _, _, _ = _HEAD.unpack_from(self)
        return mode - 1, mtime_ns, size, self.digest

    def with_mode(self, mode):
        """The same record with another mode."""
        return bytes.__new__(type(self), self[:2] + _MODE.pack(mode + 1) + self[4:])

    def __repr__(self):
        return "Entry(%r, size=%r, mode=%o, digest=%r, link=%r)" % (
            self.kind, self.size, self.mode, self.digest, self.link)

    __str__ = __repr__

    def __reduce__(self):
        return (Entry, (self.kind, self.size, self.mtime_ns, self.mode, self.digest, self.link,
                        self.ctime_ns, self.ino, self.hashed_ns))


# kind, form (digest: 0 none, 1 20 raw bytes of a 40-hex digest, 2 text; | 4 if a link target
# follows the digest; | 8 if the digest was taken RACY_NS or more after the file's last
# change, so that it vouches for the file while its stat stays the same), mode + 1 (-1: not
# known yet), digest length, size, mtime_ns, ctime_ns, inode, hashed_ns; then the digest,
# then a link's target
_HEAD = struct.Struct("<BBHHqqqQq")
_MODE, _DLEN, _I64, _U64 = (struct.Struct("<H"), struct.Struct("<H"), struct.Struct("<q"),
                            struct.Struct("<Q"))
_STAT = struct.Struct("<qqqQ")  # size, mtime_ns, ctime_ns, inode: bytes 6 to 38 of a record
_HAS_LINK, _SETTLED = 4, 8
_KIND_CODE = {"f": 1, "d": 2, "l": 3}
_KIND_NAME = {v: k for k, v in _KIND_CODE.items()}
_HEX40 = re.compile(r"[0-9a-f]{40}\Z")


# ---------------------------------------------------------------- rules


ANY_DEPTH = "^(?:.+/)?"  # how a gitignore pattern without a slash starts, compiled


def _alternation(regexes):
    """One regex that matches where any of ``regexes`` does.

    The patterns that match at any depth share their ``^(?:.+/)?`` prefix: factored out, the
    path is walked once for all of them (``^(?:.+/)?(?:A|B)`` is ``^(?:.+/)?A|^(?:.+/)?B``),
    where each would backtrack over it on its own; three times faster on the default rules."""
    bodies = [re.sub(r"\(\?P<[^>]+>", "(?:", rx) for rx in regexes]
    if not bodies:
        return None
    anywhere = [b[len(ANY_DEPTH):] for b in bodies if b.startswith(ANY_DEPTH)]
    branches = [b for b in bodies if not b.startswith(ANY_DEPTH)]
    if anywhere:
        branches.append(ANY_DEPTH + "(?:%s)" % "|".join("(?:%s)" % b for b in anywhere))
    return re.compile("|".join("(?:%s)" % b for b in branches))


class CompiledRules(object):
    """Ordered (regex, include) pairs, plus one alternation of them all: most paths match no
    rule, and one failed match of the alternation says so at a fraction of the cost. ``protect``
    is one alternation of the extra protected patterns (None: the built-in ones only)."""

    __slots__ = ("ordered", "any", "protect", "seen")

    def __init__(self, wire_rules, protect=()):
        pairs = [(rx, bool(inc)) for rx, inc in wire_rules]
        self.ordered = [(re.compile(rx), inc) for rx, inc in pairs]
        self.any = _alternation(rx for rx, _ in pairs)
        self.protect = compile_protect(protect)
        # {path (a directory's with a trailing "/"): scanning verdict}, kept by a long-lived
        # process (an agent, a holder) that scans the same tree again and again; None: none
        self.seen = None


def compile_rules(wire_rules, protect=()):
    """[[regex, include], ...] (gitignore order, last match wins) and the extra protected
    patterns ([regex, ...]) -> CompiledRules."""
    return CompiledRules(wire_rules, protect)


def compile_protect(wire):
    """The config's extra protected patterns, as regexes, -> one regex (or None)."""
    if wire is None or not isinstance(wire, (list, tuple)) \
            or not all(isinstance(rx, str) for rx in wire):
        raise AgentFailure("Protocol", "'protect' must be a list of patterns")
    try:
        return _alternation(wire)
    except re.error:
        raise AgentFailure("Protocol", "'protect' holds a pattern that does not compile")


def is_excluded(rules, path, is_dir):
    """True if ``path`` (posix, relative) is excluded or protected; directories are matched as
    ``path/``. Protection comes after every rule: no rule negates it."""
    return _excluded_by_rules(rules, path, is_dir) or is_protected(path, rules.protect)


def _excluded_by_rules(rules, path, is_dir):
    name = path + "/" if is_dir else path
    if rules.any is None or not rules.any.match(name):
        return False
    excluded = False
    for rx, include in rules.ordered:
        if rx.match(name):
            excluded = include
    return excluded


# ---------------------------------------------------------------- protected paths

# The one definition of what the remote keeps whatever the dev side sends (gitignore syntax,
# matched at any depth; a protected directory protects everything below it). The dev side
# builds on it (ignore.py): these rules come after every exclude rule and nothing negates them;
# the config's ``protect`` patterns can only add to them. The names are protected whatever
# kind of entry holds them, so a file can never replace a protected directory.
PROTECTED = (".env", ".env.*", "!.env.example", "!.env.*.example", "venv/", ".venv/",
             "instance/")
_PROTECTED_NAMES = frozenset((".env", "venv", ".venv", "instance"))


def protected_name(name):
    """True if an entry called ``name`` is protected by the built-in rules."""
    if name in _PROTECTED_NAMES:
        return True
    return name.startswith(".env.") and not name.endswith(".example")


def is_protected(path, extra=None):
    """True if ``path`` or a directory above it is protected: by the built-in rules or by
    ``extra`` (the compiled extra patterns, matched as a file and as a directory)."""
    for name in path.split("/"):
        if protected_name(name):
            return True
    return extra is not None and bool(extra.match(path) or extra.match(path + "/"))


_KEEP, _SKIP, _HOLD = 0, 1, 2  # scanning verdicts: kept, excluded, protected (reported)
_IFMT = 0o170000  # the file type bits of st_mode (stat.S_IFMT as a mask)


def _held(rules, rel, name, is_dir, held):
    """Scanning: True if ``rel`` is skipped. A protected path the rules let through is
    recorded in ``held`` (the dev side reports it as kept); its parents are not protected,
    the scan never descends into a protected directory. With ``rules.seen``, each path's
    verdict is worked out once (it depends on the rules and the path only)."""
    seen = rules.seen
    if seen is None:
        verdict = _verdict(rules, rel, name, is_dir)
    else:
        key = rel + "/" if is_dir else rel
        verdict = seen.get(key)
        if verdict is None:
            verdict = seen[key] = _verdict(rules, rel, name, is_dir)
    if verdict == _HOLD:
        held.append(rel)
    return verdict != _KEEP


def _verdict(rules, rel, name, is_dir):
    if _excluded_by_rules(rules, rel, is_dir):
        return _SKIP
    if protected_name(name) or (rules.protect is not None and is_protected(rel, rules.protect)):
        return _HOLD
    return _KEEP


# ---------------------------------------------------------------- hashing and scanning


def hash_file(path_or_fd):
    """blake2b-160 hex digest of a file's content, read in chunks."""
    h = hashlib.blake2b(digest_size=20)
    own = not isinstance(path_or_fd, int)
    fd = os.open(path_or_fd, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)) if own else path_or_fd
    try:
        while True:
            block = os.read(fd, CHUNK)
            if not block:
                break
            h.update(block)
    finally:
        if own:
            os.close(fd)
    return h.hexdigest()


class DigestCache(dict):
    """{relpath: Entry}: the files' records as last hashed, which vouch for their digests
    (see :meth:`Entry.vouches`). It knows whether it changed since it was loaded or saved,
    so a no-op scan writes nothing."""

    unchanged = True

    def __setitem__(self, key, value):
        if self.get(key) != value:
            self.unchanged = False
        dict.__setitem__(self, key, value)

    def pop(self, key, *default):
        if key in self:
            self.unchanged = False
        return dict.pop(self, key, *default)


def load_digest_cache(root):
    """The DigestCache kept in the state dir (empty if none or unreadable)."""
    data = read_state(root, "digests.json")
    cache = DigestCache()
    if not isinstance(data, dict):
        return cache
    for path, row in data.items():
        try:
            size, mtime_ns, ctime_ns, ino, digest, hashed_ns = row[:6]
            mode = row[6] if len(row) > 6 else -1  # -1: unknown until a scan sees the file
            dict.__setitem__(cache, path, Entry("f", size, mtime_ns, mode, digest, None,
                                                ctime_ns, ino, hashed_ns))
        except (TypeError, ValueError, AttributeError, struct.error):
            continue  # a damaged row costs one re-hash
    return cache


def _cache_row(v):
    """An on-disk row, [size, mtime_ns, ctime_ns, ino, digest, hashed_ns(, mode)], or None if
    racy: hashed so soon after its last change that a write later in the same timestamp tick
    would go unseen (as git does)."""
    if isinstance(v, Entry):
        v = [v.size, v.mtime_ns, v.ctime_ns, v.ino, v.digest, v.hashed_ns, v.mode]
    if len(v) < 6 or v[4] is None or v[5] - max(v[1], v[2]) < RACY_NS:
        return None
    return v


def save_digest_cache(root, cache):
    """Write the cache atomically, leaving out racy records (see :func:`_cache_row`); a
    DigestCache that has not changed since it was loaded or saved is not written again."""
    if getattr(cache, "unchanged", False):
        return
    if isinstance(cache, DigestCache):
        cache.unchanged = True  # before the copy: a change made meanwhile marks it again
    keep = {}
    for p, v in list(cache.items()):  # a copy: a watch's threads share the cache
        row = _cache_row(v)
        if row is not None:
            keep[p] = row
    try:
        write_state(root, "digests.json", json.dumps(keep, separators=(",", ":")))
    except OSError:
        pass  # the cache only saves time


# ---------------------------------------------------------------- the state directory
# Everything under <root>/.syncagent is read and written through a directory fd opened without
# following links, as project files are: a .syncagent that is a symlink is never followed.

_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0)


def check_state_dir(root):
    """Refuse a root whose state directory is a symlink (or not a directory)."""
    try:
        st = os.lstat(os.path.join(root, STATE_DIR))
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise AgentFailure("PathEscape", "refusing %s/%s: it is %s, not a directory (remove it)"
                           % (root, STATE_DIR, "a symlink" if stat.S_ISLNK(st.st_mode)
                              else "a file"))


def _state_fd(root, create):
    """An fd on <root>/.syncagent (created 0700 if ``create``), never through a link."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            sfd = os.open(STATE_DIR, _NOFOLLOW_DIR, dir_fd=root_fd)
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(STATE_DIR, 0o700, dir_fd=root_fd)
            except FileExistsError:
                pass
            sfd = os.open(STATE_DIR, _NOFOLLOW_DIR, dir_fd=root_fd)
    finally:
        os.close(root_fd)
    if create:
        _ignore_in_git(sfd)
    return sfd


def _ignore_in_git(sfd):
    """A ``.gitignore`` of ``*`` in the state dir (as pytest does for its cache), so the state
    never shows in ``git status`` of the project it sits in (the dev side keeps one too)."""
    try:
        os.stat(".gitignore", dir_fd=sfd, follow_symlinks=False)
        return
    except FileNotFoundError:
        pass
    try:
        fd = os.open(".gitignore", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                     dir_fd=sfd)
    except FileExistsError:  # another agent process made it meanwhile
        return
    try:
        _write_all(fd, b"# syncagent's state, not part of the project\n*\n")
    finally:
        os.close(fd)


def write_state(root, name, text):
    """Write <root>/.syncagent/<name> atomically (0600), through no link."""
    sfd = _state_fd(root, create=True)
    try:
        tmp = "%s.%d.%d.tmp" % (name, os.getpid(), threading.get_ident())  # threads: fleets
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600,
                     dir_fd=sfd)
        try:
            _write_all(fd, text.encode("utf-8"))
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=sfd, dst_dir_fd=sfd)
    finally:
        os.close(sfd)


def drop_state(root, name):
    """Remove <root>/.syncagent/<name> if it is there, through no link."""
    try:
        sfd = _state_fd(root, create=False)
    except OSError:
        return
    try:
        _unlink_quiet(name, sfd)
    finally:
        os.close(sfd)


def read_state(root, name):
    """The JSON in <root>/.syncagent/<name>, read through no link; None if absent or bad."""
    try:
        sfd = _state_fd(root, create=False)
    except OSError:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=sfd)
        with os.fdopen(fd, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    finally:
        os.close(sfd)


def scan(root, rules, cache=None, problems=None, start="", held=None, temps=None):
    """Walk ``root`` (or its subdirectory ``start``) and return ``{relpath: Entry}`` for
    everything not excluded or protected below it.

    Symlinks are recorded, never followed. Excluded directories are not descended into.
    ``cache`` maps relpath -> [size, mtime_ns, ctime_ns, ino, digest]; it is read to avoid
    re-hashing unchanged files and updated in place. Files that vanish are left out; files that
    cannot be read are left out and reported in ``problems`` as (path, message). Protected
    paths that the rules alone would have let through are listed in ``held``, and temp files
    left by a killed batch in ``temps`` (full paths). Modes are the nine rwx bits only: setuid,
    setgid and sticky never travel.

    A file costs one ``lstat`` (from ``scandir``) when the cache vouches for it, and its
    manifest entry is the cache's record itself (one object per file, shared).
    """
    out = {}
    cache = {} if cache is None else cache
    problems = [] if problems is None else problems
    held = [] if held is None else held
    temps = [] if temps is None else temps
    seen = set()
    kept = rules.seen or {}  # verdicts worked out before: a file kept before is kept
    stack = [start]
    while stack:
        rel_dir = stack.pop()
        full_dir = os.path.join(root, rel_dir) if rel_dir else root
        prefix = rel_dir + "/" if rel_dir else ""
        try:
            entries = list(os.scandir(full_dir))
        except FileNotFoundError:
            continue
        except OSError as e:
            problems.append((rel_dir or ".", "cannot list directory: %s" % e.strerror))
            continue
        for de in entries:
            name = de.name
            rel = prefix + name
            if name.startswith(TEMP_PREFIX):
                temps.append(de.path)
                continue
            try:
                st = de.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as e:
                problems.append((rel, e.strerror))
                continue
            kind = st.st_mode & _IFMT
            if kind == stat.S_IFREG:  # the common case first
                if kept.get(rel) != _KEEP and _held(rules, rel, name, False, held):
                    continue
                mode = st.st_mode & 0o777
                rec = cache.get(rel)
                if rec is None or not rec.vouches(st):
                    rec = _hash(de.path, rel, st, mode, cache, problems)
                    if rec is None:
                        continue
                elif rec.mode != mode:
                    rec = cache[rel] = rec.with_mode(mode)
                seen.add(rel)
                out[rel] = rec
            elif kind == stat.S_IFDIR:
                if _held(rules, rel, name, True, held):
                    continue
                out[rel] = Entry("d", 0, 0, st.st_mode & 0o777)
                stack.append(rel)
            elif kind == stat.S_IFLNK:
                if _held(rules, rel, name, False, held):
                    continue
                try:
                    out[rel] = Entry("l", 0, 0, 0, None, os.readlink(de.path))
                except OSError:
                    continue
            # sockets, fifos and devices are not code: skipped silently
    if not start and len(seen) != len(cache):
        for gone in set(cache) - seen:
            cache.pop(gone, None)
    return out


def scan_paths(root, rules, paths, cache, problems=None, held=None):
    """Entries at and below each of ``paths``, plus their ancestor directories.

    The files named in ``paths`` are re-hashed whatever the cache says: an event named them,
    and a same-size edit within one mtime tick must not be missed. Paths that no longer exist,
    or lie under an excluded, protected or non-directory ancestor, yield nothing; protected
    ones the rules let through are listed in ``held``.
    """
    out = {}
    problems = [] if problems is None else problems
    held = [] if held is None else held
    for rel in sorted(paths):
        parts = rel.split("/")
        ok = True
        for i in range(1, len(parts)):
            anc = "/".join(parts[:i])
            known = out.get(anc)
            if known is not None:  # met already: a directory, or what stands there now
                if known.kind == "d":
                    continue
                ok = False
                break
            if is_excluded(rules, anc, True):
                ok = False
                break
            try:
                st = os.lstat(os.path.join(root, anc))
            except OSError:
                ok = False
                break
            if not stat.S_ISDIR(st.st_mode):
                ok = False
                break
            out[anc] = Entry("d", 0, 0, st.st_mode & 0o777)
        if not ok:
            continue
        full = os.path.join(root, rel)
        try:
            st = os.lstat(full)
        except (FileNotFoundError, NotADirectoryError):  # gone, or its parent is no directory
            continue
        except OSError as e:
            problems.append((rel, e.strerror))
            continue
        mode = st.st_mode & 0o777
        name = parts[-1]
        if stat.S_ISDIR(st.st_mode):
            if not _held(rules, rel, name, True, held):
                out[rel] = Entry("d", 0, 0, mode)
                out.update(scan(root, rules, cache, problems, start=rel, held=held))
        elif stat.S_ISLNK(st.st_mode):
            if not _held(rules, rel, name, False, held):
                try:
                    out[rel] = Entry("l", 0, 0, 0, None, os.readlink(full))
                except OSError:
                    pass
        elif stat.S_ISREG(st.st_mode) and not _held(rules, rel, name, False, held):
            rec = _hash(full, rel, st, mode, cache, problems)  # named by an event: always read
            if rec is not None:
                out[rel] = rec
    return out


def _hash(path, rel, st, mode, cache, problems):
    """Hash one file; its record (the manifest entry) goes into the cache and is returned.
    None if it vanished or cannot be read."""
    hashed_ns = time.time_ns()
    try:
        digest = hash_file(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        problems.append((rel, e.strerror or str(e)))
        return None
    rec = cache[rel] = Entry("f", st.st_size, st.st_mtime_ns, mode, digest, None,
                             st.st_ctime_ns, st.st_ino, hashed_ns)
    return rec


def _staging(temp):
    """A temp file or directory that another agent, still running, is staging: a ``push``
    beside a ``watch`` of the same root runs two agents there, and one's walk must not sweep
    the other's batch away. Its name carries the agent's pid (``.~sa.<pid>.<n>``,
    ``.~sa.<pid>.d<n>``, ``.~sa.link.<pid>``, ``.~sa.chmod.<pid>``)."""
    fields = temp[len(TEMP_PREFIX):].split(".")
    if fields[0] in ("link", "chmod"):
        fields = fields[1:]
    try:
        pid = int(fields[0], 16)
    except (IndexError, ValueError):
        return False
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        pass
    return True


def scan_root(root, wire_rules, protect=(), memory=None):
    """The agent's manifest request: scan with the persistent digest cache.

    Args:
        memory: what this agent keeps of ``root`` between requests (see :class:`_Memory`);
            None: a one-off scan (the cache read from disk).

    Returns:
        (entries, problems, held): held lists the protected paths the rules let through."""
    mem = _Memory(root) if memory is None else memory
    mem.settle(root)
    problems = []
    held = []
    temps = []
    entries = scan(root, mem.compiled(wire_rules, protect), mem.cache, problems, held=held,
                   temps=temps)
    if memory is None:
        save_digest_cache(root, mem.cache)  # only if it changed
    else:
        _UNSAVED.add(root)  # saved once the answer is sent
    for path in temps:  # left by a batch that was killed (never visible in a manifest)
        if _staging(os.path.basename(path)):
            continue
        try:
            os.unlink(path)
        except IsADirectoryError:  # a new directory it was filling (see _Dirs)
            shutil.rmtree(path, ignore_errors=True)  # fd-based: no link is followed
        except OSError:
            pass
    _LINK_INDEX.pop(root, None)  # the tree may have changed since this agent last saw it
    return entries, problems, held


# ---------------------------------------------------------------- what an agent remembers
# An agent lives as long as its session, and a holder (syncagent.holder) keeps its session for
# many commands. Per root it keeps what the next manifest request can use again: the digest
# cache (not read from disk again: 20,000 records cost 0.06 s), the compiled rules with each
# path's verdict, and the manifest it last sent, named by a token, so that a dev side that
# kept that manifest can ask for what changed since (a stat-level walk all the same: only
# what crosses the wire shrinks).

class _Memory(object):
    __slots__ = ("cache", "pending", "rules_key", "rules", "token", "sent")

    def __init__(self, root):
        self.cache = None  # read when first needed
        self.pending = []  # ([deleted paths], {path: digest}, {path: stat}) of each batch since
        self.rules_key = self.rules = self.token = self.sent = None

    def settle(self, root):
        """The kept digest cache (read from disk if need be), with what this agent's batches
        wrote since: records built here, off the clock of the batch's answer (20,000 of
        them take 0.05 s)."""
        if self.cache is None:
            self.cache = load_digest_cache(root)
        while self.pending:
            deletes, digests, stats = self.pending.pop(0)
            for path in deletes:
                self.cache.pop(path, None)
            for path, r in _written_rows(digests, stats).items():
                self.cache[path] = Entry("f", r[0], r[1], r[6], r[4], None, r[2], r[3], r[5])
        return self.cache

    def compiled(self, wire_rules, protect):
        """The rules compiled, again only when the request's rules differ from the last."""
        key = json.dumps([wire_rules, protect])
        if key != self.rules_key:
            self.rules = compile_rules(wire_rules, protect)
            self.rules.seen = {}
            self.rules_key = key
        return self.rules

    def answer(self, entries, since):
        """The manifest as sent: in full, or as the difference from the one sent with token
        ``since`` (when it is the last this agent sent for this root); a new token either
        way."""
        out = {}
        if since is not None and since == self.token and self.sent is not None:
            changed, removed = manifest_delta(self.sent, entries)
            out["delta"] = {"changed": to_wire(changed), "removed": removed}
        else:
            out["entries"] = to_wire(entries)
        self.token = out["token"] = os.urandom(12).hex()
        self.sent = entries
        return out


_MEMORY = {}  # root -> _Memory
_UNSAVED = set()  # roots whose kept digest cache may hold what the disk does not yet


def save_kept():
    """Write the kept digest caches that changed: after an answer is sent, off the dev side's
    clock (a killed agent loses only hints: the files they covered are hashed again)."""
    while _UNSAVED:
        root = _UNSAVED.pop()
        mem = _MEMORY.get(root)
        if mem is not None:
            save_digest_cache(root, mem.settle(root))


def _memory(root):
    mem = _MEMORY.get(root)
    if mem is None:
        mem = _MEMORY[root] = _Memory(root)
    return mem


def manifest_delta(old, new):
    """What turns manifest ``old`` into ``new`` as sent (``to_wire``): ({path: entry} added or
    different, [paths removed]), so that ``to_wire(apply_delta(old, *manifest_delta(old,
    new))) == to_wire(new)``. A record that differs in what is not sent only (a file hashed
    again: its times) is left out."""
    changed = {}
    for p, e in new.items():
        o = old.get(p)
        if o != e and (o is None or not _same_on_wire(o, e)):
            changed[p] = e
    unchanged = len(new) - len(changed)  # all of them paths of ``old`` too
    removed = [p for p in old if p not in new] if unchanged != len(old) else []
    return changed, removed


def _same_on_wire(a, b):
    """Kind, digest form (not whether it is settled) and mode (the first four bytes), digest
    and link target (the tail): what ``to_wire`` sends of a record."""
    return (a[0] == b[0] and a[1] & ~_SETTLED == b[1] & ~_SETTLED and a[2:4] == b[2:4]
            and a[_HEAD.size:] == b[_HEAD.size:])


def batch_claims(base, batch):
    """``base`` (a manifest as sent) as the batch says the tree is after it: its deletes gone,
    its uploads (with the digests the sender planned), links, directories and modes in place.

    The sender of a batch and the agent that receives it both apply this to their copies of
    the manifest last sent, which stay equal (the same function of the same batch), so that
    the next manifest request carries only what differs from the claim. A claim is never
    trusted: where the batch did not do what it says (a file changed while being sent, a
    protected path refused), the agent's next walk finds it and the delta says so."""
    out = dict(base)
    for d in batch.get("deletes", []):
        out.pop(d["path"], None)
    for d in batch.get("dirs", []):
        out[d["path"]] = Entry("d", 0, 0, int(d["mode"]) & 0o777)
    for up in batch.get("uploads", []):
        out[up["path"]] = Entry("f", 0, 0, int(up["mode"]) & 0o777, up.get("digest"))
    for link in batch.get("links", []):
        out[link["path"]] = Entry("l", 0, 0, 0, None, link["target"])
    for ch in batch.get("chmods", []):
        e = out.get(ch["path"])
        if e is not None:
            out[ch["path"]] = e.with_mode(int(ch["mode"]) & 0o777)
    return out


def apply_delta(old, changed, removed):
    """A new manifest: ``old`` without ``removed``, with ``changed`` (``old`` is left as it
    is)."""
    out = dict(old)
    for p in removed:
        out.pop(p, None)
    out.update(changed)
    return out


# ---------------------------------------------------------------- path safety


def check_relpath(path):
    """Validate a relative posix path sent by the dev side; return its components."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise AgentFailure("PathEscape", "invalid path %r" % (path,))
    if path.startswith("/") or len(path.encode("utf-8", "surrogateescape")) > 4096:
        raise AgentFailure("PathEscape", "path escapes the root: %r" % (path,))
    parts = path.split("/")
    for p in parts:
        if p in ("", ".", "..") or len(p.encode("utf-8", "surrogateescape")) > 255:
            raise AgentFailure("PathEscape", "path escapes the root: %r" % (path,))
    if parts[0] == STATE_DIR:
        raise AgentFailure("PathEscape", "path inside the state dir: %r" % (path,))
    return parts


def check_link(path, target):
    """A symlink may only point inside the root (relative, not climbing above it)."""
    if not isinstance(target, str) or not target or "\0" in target or target.startswith("/"):
        raise AgentFailure("PathEscape", "symlink %s -> %s points outside the root" % (path, target))
    depth = path.count("/")
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise AgentFailure(
                    "PathEscape", "symlink %s -> %s points outside the root" % (path, target))
        elif part not in ("", "."):
            depth += 1


MAX_HOPS = 40  # links followed in one resolution, as the Linux kernel's MAXSYMLINKS
LOOP = "<loop>"


def resolve(path, links, max_hops=MAX_HOPS):
    """Where ``path`` (relative to the root) lands when every link on the way is followed, as
    ``os.path.realpath`` does: a link's target replaces it, ``..`` after a link climbs from
    where the link led, and what is not a link counts as a directory. Pure: the tree is
    ``links`` ({relpath: target} of every symlink in it).

    Returns:
        The final path relative to the root ("" for the root itself), None if the walk
        leaves the root (an absolute target, or ``..`` above the root), or LOOP after
        ``max_hops`` links (the kernel gives up there too: nothing is reached through it).
    """
    todo = path.split("/")[::-1]
    done = []
    hops = 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            if not done:
                return None
            done.pop()
            continue
        done.append(name)
        target = links.get("/".join(done))
        if target is None:
            continue
        hops += 1
        if hops > max_hops:
            return LOOP
        if target.startswith("/"):
            return None
        done.pop()
        todo.extend(target.split("/")[::-1])
    return "/".join(done)


def escaping(links, paths=None):
    """The links among ``paths`` (default: all of ``links``) that resolve, following the
    tree's other links, outside the root: sorted ``"path -> target"`` lines."""
    return sorted("%s -> %s" % (p, links[p]) for p in (links if paths is None else paths)
                  if resolve(p, links) is None)


class _Dirs:
    """Directory fds under one root, opened component by component without following links.

    A directory a batch creates where nothing was is made under a temp name beside its
    place (``staged``: renamed into place by the commit) unless its parent is one the batch
    made too: everything below such a new directory is written in place under its final
    name (``fresh`` holds their keys), invisible until the commit's one rename of the
    top-most new directory, and needs no rename (and no stat) of its own at the commit."""

    def __init__(self, root):
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        self.fds = {(): self.root_fd}
        self.created = []  # (parent fd, name as made) of each directory made, in order
        self.staged = []  # (parent fd, temp name, name) of each top-most new directory
        self.fresh = set()  # keys of the directories made by this batch
        self.umask = _umask()  # once a batch, not twice a file (reading it means setting it)
        self.pid = os.getpid()  # for temp names: once a batch, not once a file

    def open(self, parts, create):
        key = tuple(parts)
        if key in self.fds:
            return self.fds[key]
        parent = self.open(parts[:-1], create)
        name = parts[-1]
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            made = name
            if key[:-1] not in self.fresh and key != (STATE_DIR,):  # the state dir: in place
                made = "%s%x.d%d" % (TEMP_PREFIX, self.pid, len(self.staged))
                self.staged.append((parent, made, name))
            os.mkdir(made, 0o755, dir_fd=parent)
            self.created.append((parent, made))
            if key != (STATE_DIR,):
                self.fresh.add(key)
            fd = os.open(made, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                st = os.lstat(name, dir_fd=parent)
                if stat.S_ISLNK(st.st_mode):
                    raise AgentFailure("PathEscape", "refusing to write through symlink %s"
                                       % "/".join(parts))
            raise
        self.fds[key] = fd
        return fd

    def forget(self, parts):
        """A directory removed: close its fd (an agent lives for a whole watch)."""
        fd = self.fds.pop(tuple(parts), None)
        if fd is not None and fd != self.root_fd:
            os.close(fd)

    def close(self):
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = {}


# ---------------------------------------------------------------- applying a batch


def apply_batch(root, batch, chunks_for, protect=()):
    """Apply one batch atomically: stage every upload, then rename all, delete, mark revision.

    Args:
        root: the remote project root (created with parents if missing).
        batch: {"uploads": [{path, mode, mtime_ns}], "links": [{path, target}],
                "dirs": [{path, mode}], "chmods": [{path, mode}], "deletes": [{path, kind}],
                "revision": str, "files": int}.
        chunks_for: called with each upload in order; returns an iterable of bytes chunks.
            It is called for every upload even after a failure, so a stream stays in step.
        protect: the config's extra protected patterns (regexes), on top of the built-in ones.

    Returns:
        {"written", "bytes", "deleted", "kept", "undone", "refused"}: counts, directories
        kept because they hold protected files, the paths the remote left as they were
        ([{"op", "path", "code", "why"}]: see ``_commit``), and the items refused because
        their path is protected ([{"op", "path"}]: not applied; the rest of the batch is).

    Raises:
        AgentFailure: nothing of the batch is visible (staged files are removed). A path or
        a link that would lead outside the root refuses the whole batch.
    """
    uploads = batch.get("uploads", [])
    staged = []
    failure = None
    dirs = None
    received = 0
    held = ()
    stamp = _stamp(root)
    try:
        _validate(batch)
        batch, held, refused = _hold_protected(batch, compile_protect(protect))
        links_after = _check_links(root, batch)
        try:
            os.makedirs(root, exist_ok=True)
            dirs = _Dirs(root)
        except OSError as e:
            raise AgentFailure("RootNotWritable", "cannot create remote root %s: %s"
                               % (root, e.strerror))
        doomed = {d["path"] for d in batch.get("deletes", []) if d["kind"] != "d"}
        for d in sorted(batch.get("dirs", []), key=lambda d: d["path"]):
            _open_new_dir(dirs, d["path"].split("/"), doomed)
    except AgentFailure as e:
        failure = e
    except OSError as e:
        failure = _os_failure(e)
    cache_updates = {}
    in_place = {}
    try:
        for n, up in enumerate(uploads):
            chunks = chunks_for(up)
            if failure is not None or n in held:
                for _ in chunks:
                    pass
                continue
            try:
                received += _stage(dirs, n, up, chunks, staged, cache_updates, in_place)
            except (AgentFailure, OSError) as e:
                failure = e if isinstance(e, AgentFailure) else _os_failure(e, up["path"])
                for _ in chunks:  # the rest of this file's frames
                    pass
        if failure is None:
            try:
                marker = _stage_marker(dirs, batch)
            except OSError as e:
                failure = _os_failure(e)
        if failure is not None:
            raise failure
    except BaseException:  # a failure, or the stream ended mid-batch: nothing stays
        if dirs is not None:
            _discard(dirs, staged)
        raise
    try:
        out = _commit(root, dirs, batch, staged, marker, cache_updates, received, in_place)
    except BaseException:
        _LINK_INDEX.pop(root, None)  # what the tree holds now is unknown
        raise
    finally:
        dirs.close()
    _keep_link_index(root, stamp, batch, links_after)
    out["refused"] = refused
    return out


_OPS = (("uploads", "write"), ("links", "link"), ("dirs", "mkdir"), ("chmods", "chmod"),
        ("deletes", "delete"))


def _hold_protected(batch, extra):
    """Take out every item at a protected path (or below a protected directory).

    Returns:
        (the batch without them, the indices of the held uploads (their data is still read),
        [{"op", "path"}] of what was refused).
    """
    out = dict(batch)
    refused = []
    held = set()
    for key, op in _OPS:
        keep = []
        for n, item in enumerate(batch.get(key, [])):
            if is_protected(item["path"], extra):
                refused.append({"op": op, "path": item["path"]})
                if key == "uploads":
                    held.add(n)
            else:
                keep.append(item)
        out[key] = keep
    return out, held, refused


# ---------------------------------------------------------------- links after a batch

_LINK_INDEX = {}  # root -> (revision marker stamp, {relpath: target}): the remote's links


def _remote_links(root):
    """Every symlink under ``root`` (protected and excluded places too, not .syncagent).
    Walked when a batch first needs it, then kept up to date by this agent's batches; walked
    again after a manifest request, or when another agent has applied a batch since (the
    revision marker is not the one this agent last saw)."""
    stamp = _stamp(root)
    entry = _LINK_INDEX.get(root)
    if entry is None or entry[0] != stamp:
        entry = _LINK_INDEX[root] = (stamp, _walk_links(root))
    return entry[1]


def _keep_link_index(root, stamp, batch, links_after):
    """After a commit: the index follows this batch, if it was current when the batch began
    (``stamp``: the revision marker then); else it is walked again when next needed."""
    entry = _LINK_INDEX.pop(root, None)
    if entry is not None and entry[0] == stamp:
        _LINK_INDEX[root] = (_stamp(root), links_after if links_after is not None
                             else _links_after(entry[1], batch))


def _stamp(root):
    try:
        st = os.lstat(os.path.join(root, REVISION_FILE))
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _walk_links(root):
    out = {}
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            it = os.scandir(os.path.join(root, rel_dir) if rel_dir else root)
        except OSError:
            continue
        with it:
            for de in it:
                rel = rel_dir + "/" + de.name if rel_dir else de.name
                try:
                    if de.is_symlink():
                        out[rel] = os.readlink(de.path)
                    elif de.is_dir(follow_symlinks=False) and rel != STATE_DIR:
                        stack.append(rel)
                except OSError:
                    continue
    return out


def _links_after(before, batch):
    """The tree's links once ``batch`` is applied: its deletes, files and directories take the
    place of links at exactly their paths (a directory is only removed when empty), its links
    are added."""
    gone = {item["path"] for key in ("deletes", "uploads", "dirs") for item in batch.get(key, [])}
    after = {p: t for p, t in before.items() if p not in gone}
    after.update((l["path"], l["target"]) for l in batch.get("links", []))
    return after


def _check_links(root, batch):
    """Refuse the whole batch if a link of the tree after it would resolve, following the
    tree's other links, outside the root where it did not before. Only a batch that makes
    links, or directories where it deletes something (a link may become a directory), can
    change where links lead; for the others this costs nothing.

    Returns:
        The links after the batch, or None when the batch cannot change them.
    """
    links = batch.get("links", [])
    if not links and not (batch.get("dirs") and batch.get("deletes")):
        return None
    before = _remote_links(root)
    after = _links_after(before, batch)
    new = {l["path"] for l in links}
    bad = [p for p in sorted(after) if resolve(p, after) is None
           and (p in new or resolve(p, before) is not None)]
    if bad:
        more = " (and %d more)" % (len(bad) - 1) if len(bad) > 1 else ""
        raise AgentFailure("PathEscape", "symlink %s -> %s would resolve outside the root%s; "
                           "nothing of the batch was applied" % (bad[0], after[bad[0]], more))
    return after


def _open_new_dir(dirs, parts, doomed):
    """Open (creating) a directory of the batch. A file or link standing where the directory
    goes, and deleted by the same batch, is removed first: the one step of a kind change
    that cannot wait for the commit, since files are staged inside the directory."""
    if "/".join(parts) in doomed:
        parent = dirs.open(parts[:-1], create=True)
        try:
            if not stat.S_ISDIR(os.lstat(parts[-1], dir_fd=parent).st_mode):
                os.unlink(parts[-1], dir_fd=parent)
        except FileNotFoundError:
            pass
    return dirs.open(parts, create=True)


def _stage(dirs, n, up, chunks, staged, digests, in_place):
    """Write one upload to a temp file beside its target, or under its own name in a
    directory this batch made (``dirs.fresh``: invisible until the commit; its stat, final
    already, goes into ``in_place``); returns the bytes received.

    Its digest (for the cache) is the batch's when the sender vouched for the bytes
    (``chunks.vouched``, see the module doc); else the written file is read back and hashed,
    so the cache only ever holds the digest of what the file holds."""
    parts = up["path"].split("/")
    dfd = dirs.open(parts[:-1], create=True)
    direct = tuple(parts[:-1]) in dirs.fresh
    tmp = parts[-1] if direct else "%s%x.%d" % (TEMP_PREFIX, dirs.pid, n)
    mode = int(up["mode"]) & 0o777  # the rwx bits only: never setuid, setgid or sticky
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dfd)
    staged.append((dfd, tmp, parts[-1], up))
    size = 0
    try:
        for block in chunks:
            _write_all(fd, block)
            size += len(block)
        digest = up.get("digest")
        if not (getattr(chunks, "vouched", False) and isinstance(digest, str)
                and _HEX40.match(digest)):
            digest = _written_digest(fd, size)
        if mode & dirs.umask:
            os.fchmod(fd, mode)
        os.utime(fd, ns=(int(up["mtime_ns"]), int(up["mtime_ns"])))
        if direct:  # renaming a directory above it leaves its inode (and ctime) alone
            in_place[up["path"]] = os.fstat(fd)
    finally:
        os.close(fd)
    digests[up["path"]] = digest
    return size


def _written_digest(fd, size):
    """The digest of the ``size`` bytes just written to ``fd``, read back (from the page
    cache): the same as :func:`hash_file` of the file."""
    h = hashlib.blake2b(digest_size=20)
    offset = 0
    while offset < size:
        block = os.pread(fd, min(CHUNK, size - offset), offset)
        if not block:
            break
        h.update(block)
        offset += len(block)
    return h.hexdigest()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _discard(dirs, staged):
    """Remove staged temp files (and files written in new directories) and the directories
    this batch created, deepest first."""
    for dfd, tmp, _, _ in staged:
        _unlink_quiet(tmp, dfd)
    for parent, made in reversed(dirs.created):
        try:
            os.rmdir(made, dir_fd=parent)
        except OSError:
            pass
    dirs.close()


def _write_all(fd, block):
    view = memoryview(block)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _validate(batch):
    for key in ("uploads", "links", "dirs", "chmods", "deletes"):
        for item in batch.get(key, []):
            check_relpath(item["path"])
    for link in batch.get("links", []):
        check_link(link["path"], link["target"])


def _os_failure(e, path=None):
    """The batch's failure for ``e`` (met at ``path``, when one was)."""
    at = " at %s" % path if path else ""
    if e.errno == errno.ENOSPC:
        return AgentFailure("DiskFull", "remote disk full; batch aborted, remote unchanged")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return AgentFailure("NotWritable", "remote not writable%s: %s" % (at, e.strerror))
    return AgentFailure("RemoteOSError", "%s%s (errno %s)" % (e.strerror or e, at, e.errno))


def _unlink_quiet(name, dfd):
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


def _stage_marker(dirs, batch):
    sfd = dirs.open([STATE_DIR], create=True)
    os.fchmod(sfd, 0o700)
    tmp = "revision.%d.tmp" % os.getpid()
    body = json.dumps({"revision": batch.get("revision"), "time": time.time(),
                       "files": batch.get("files", 0)})
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=sfd)
    try:
        _write_all(fd, body.encode())
    finally:
        os.close(fd)
    return sfd, tmp


def _commit(root, dirs, batch, staged, marker, cache_updates, received, in_place=None):
    """Put the staged batch in place, then the revision marker. A path the remote will not
    let change (``_LEFT_ALONE``: a directory holding unsynced files stands where a file or
    link goes, a file made immutable, a directory this user may not write) is left as it is
    and said in ``undone``; the rest of the batch lands, so a commit never stops halfway on
    one path, and never fails every later push the same way."""
    deletes = batch.get("deletes", [])
    # A path that changes kind (file <-> dir <-> link) is removed before its new entry lands.
    replacing = {u["path"] for u in batch.get("uploads", [])} | {
        l["path"] for l in batch.get("links", [])}
    kept, undone = [], []
    early = [d for d in deletes if under_any(d["path"], replacing)]
    deleted = _apply_deletes(dirs, early, kept, undone)
    for parent, made, name in dirs.staged:  # each new tree, with what was written in it
        os.replace(made, name, src_dir_fd=parent, dst_dir_fd=parent)
    stats = dict(in_place or ())
    sources = {}
    written = len(staged)
    for dfd, tmp, name, up in staged:
        if up["path"] in stats:
            continue
        if not _replace(tmp, name, dfd, "write", up["path"], undone):
            cache_updates.pop(up["path"], None)
            written -= 1
            continue
        stats[up["path"]] = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if name.endswith(".py"):
            sources.setdefault(dfd, []).append(name[:-3])
    _drop_bytecode(sources)
    for link in batch.get("links", []):
        parts = link["path"].split("/")
        dfd = dirs.open(parts[:-1], create=True)
        tmp = "%slink.%x" % (TEMP_PREFIX, os.getpid())
        _unlink_quiet(tmp, dfd)
        os.symlink(link["target"], tmp, dir_fd=dfd)
        _replace(tmp, parts[-1], dfd, "link", link["path"], undone)
    for ch in batch.get("chmods", []):
        try:
            _chmod(dirs, ch["path"], int(ch["mode"]) & 0o777)
        except OSError as e:
            _left_alone(e, "chmod", ch["path"], undone)
    deleted += _apply_deletes(dirs, [d for d in deletes if not under_any(d["path"], replacing)],
                              kept, undone)
    for d in batch.get("dirs", []):
        fd = dirs.open(d["path"].split("/"), create=True)
        os.fchmod(fd, int(d["mode"]) & 0o777)
    sfd, tmp = marker
    _owe(root, batch)  # before the marker: a commit never loses the restart it needs
    os.replace(tmp, "revision", src_dir_fd=sfd, dst_dir_fd=sfd)
    _update_cache(root, batch, cache_updates, stats)
    return {"written": written, "bytes": received, "deleted": deleted, "kept": kept,
            "undone": undone}


# What one path of a commit may meet that leaves that path as it is, not the batch: a
# directory standing where a file or link goes (EISDIR), a file or directory the remote will
# not let this user change (immutable, another user's: EPERM, EACCES), a mount point (EBUSY).
_LEFT_ALONE = (errno.EISDIR, errno.EPERM, errno.EACCES, errno.EBUSY)


def _left_alone(e, op, path, undone):
    """Record ``path`` in ``undone`` if ``e`` leaves it alone (else re-raise ``e``)."""
    if e.errno not in _LEFT_ALONE:
        raise e
    undone.append({"op": op, "path": path, "code": errno.errorcode[e.errno],
                   "why": e.strerror})


def _replace(tmp, name, dfd, op, path, undone):
    """Put the staged file or link ``tmp`` in place as ``name``; False, ``tmp`` removed and
    ``path`` in ``undone``, where the remote leaves that path alone (``_LEFT_ALONE``)."""
    try:
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        return True
    except OSError as e:
        _unlink_quiet(tmp, dfd)
        _left_alone(e, op, path, undone)
        return False


def _chmod(dirs, path, mode):
    """Change a mode through an fd opened without following links: never through a link. A
    file with other hard links (one may lie outside the root) is replaced by a copy with the
    new mode, so the other names keep theirs. Links, and what is neither file nor directory,
    are left alone."""
    parts = path.split("/")
    dfd = dirs.open(parts[:-1], create=False)
    name = parts[-1]
    kind = os.lstat(name, dir_fd=dfd).st_mode
    if stat.S_ISDIR(kind):
        os.fchmod(dirs.open(parts, create=False), mode)  # opened without following links
        return
    if not stat.S_ISREG(kind):
        return
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
        readable = True
    except PermissionError:  # a file without read permission: its owner may still chmod it
        fd = os.open(name, getattr(os, "O_PATH", os.O_RDONLY) | os.O_NOFOLLOW, dir_fd=dfd)
        readable = False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped since the lstat
            return
        if st.st_nlink > 1:
            if readable:  # an unreadable one cannot be copied: it keeps its mode
                _replace_with_copy(dfd, name, fd, st, mode)
        elif readable:
            os.fchmod(fd, mode)
        else:
            os.chmod("/proc/self/fd/%d" % fd, mode)  # the inode the O_PATH fd holds, no link
    finally:
        os.close(fd)


def _replace_with_copy(dfd, name, fd, st, mode):
    tmp = "%schmod.%x" % (TEMP_PREFIX, os.getpid())
    _unlink_quiet(tmp, dfd)
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
    try:
        while True:
            block = os.read(fd, CHUNK)
            if not block:
                break
            _write_all(out, block)
        os.fchmod(out, mode)
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
    except BaseException:
        os.close(out)
        _unlink_quiet(tmp, dfd)
        raise
    os.close(out)
    os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)


def _drop_bytecode(sources):
    """Remove the cached bytecode of replaced .py files ({dir fd: [module stems]}).

    Python trusts a .pyc whose recorded source size and whole-second mtime match. Two same-size
    saves within one second (mtimes are kept) would otherwise leave the worker on the old code
    while its readiness marker names the new revision."""
    for dfd, stems in sources.items():
        try:
            cache = os.open("__pycache__", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                            dir_fd=dfd)
        except OSError:
            continue
        try:
            wanted = set(stems)
            for name in os.listdir(cache):
                if name.endswith(".pyc") and name.split(".", 1)[0] in wanted:
                    _unlink_quiet(name, cache)
        finally:
            os.close(cache)


def under_any(path, roots):
    """True if ``path`` or one of its parents is in ``roots``."""
    while True:
        if path in roots:
            return True
        if "/" not in path:
            return False
        path = path.rsplit("/", 1)[0]


def _apply_deletes(dirs, deletes, kept, undone):
    """Files and links first, then directories deepest first; a directory that still holds
    what is not synced (excluded or protected files) is kept, bytecode caches aside, and a
    path the remote will not let go (``_LEFT_ALONE``) goes into ``undone``."""
    n = 0
    ordered = sorted(deletes, key=lambda d: (d["kind"] == "d", -d["path"].count("/")))
    for d in ordered:
        parts = d["path"].split("/")
        try:
            dfd = dirs.open(parts[:-1], create=False)
            st = os.lstat(parts[-1], dir_fd=dfd)
            if stat.S_ISDIR(st.st_mode):
                if d["kind"] != "d":  # the file is gone already: the batch put a dir there
                    continue
                _drop_pycache(dirs, parts)
                os.rmdir(parts[-1], dir_fd=dfd)
                dirs.forget(parts)
            else:
                os.unlink(parts[-1], dir_fd=dfd)
            n += 1
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                kept.append(d["path"])
            else:
                _left_alone(e, "delete", d["path"], undone)
    return n


def _drop_pycache(dirs, parts):
    """Remove the ``__pycache__`` of a directory being deleted (bytecode of sources that are
    gone, which only the remote's Python wrote), so that a renamed package leaves no husk
    behind. Only ``*.pyc`` files are removed, through directory fds."""
    try:
        cache = dirs.open(parts + ["__pycache__"], create=False)
    except OSError:
        return
    for name in os.listdir(cache):
        if name.endswith(".pyc"):
            try:
                if stat.S_ISREG(os.lstat(name, dir_fd=cache).st_mode):
                    os.unlink(name, dir_fd=cache)
            except OSError:
                pass
    try:
        os.rmdir("__pycache__", dir_fd=dirs.open(parts, create=False))
        dirs.forget(parts + ["__pycache__"])
    except OSError:
        pass  # something else in it: kept with its directory


def _update_cache(root, batch, digests, stats):
    """Record what was just written so the next manifest needs no re-hash: by an agent that
    keeps this root's cache (it answered a manifest request for it), once the answer is sent
    (``save_kept``); else in the cache on disk, now."""
    deletes = [d["path"] for d in batch.get("deletes", [])]
    mem = _MEMORY.get(root)
    if mem is not None:  # its records are built by settle, after the answer is sent
        mem.pending.append((deletes, digests, stats))
        _UNSAVED.add(root)
        return
    cache = load_digest_cache(root)
    for path in deletes:
        cache.pop(path, None)
    for path, row in _written_rows(digests, stats).items():  # on-disk rows: only saved
        cache[path] = row
    save_digest_cache(root, cache)


def _written_rows(digests, stats):
    """{path: on-disk cache row} of the files a batch wrote."""
    rows = {}
    for path, digest in digests.items():
        st = stats[path]
        # the digest is of the very bytes this process wrote (or the sender vouched for):
        # not racy, whatever the times
        changed = max(st.st_mtime_ns, st.st_ctime_ns)
        rows[path] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest,
                      changed + RACY_NS, st.st_mode & 0o777]
    return rows


def to_wire(entries):
    """Manifest entries as sent: [kind, mode, digest or link target] (what planning needs)."""
    return {p: [e.kind, e.mode, e.link if e.kind == "l" else e.digest]
            for p, e in entries.items()}


def from_wire(entries):
    return {p: Entry(k, 0, 0, m, None if k == "l" else v, v if k == "l" else None)
            for p, (k, m, v) in entries.items()}


def read_revision(root):
    return read_state(root, "revision")


# ---------------------------------------------------------------- the worker (supervisord)

COLOURS = ("blue", "green", "red")  # as worker/ready.py
LIVE_STATES = ("STARTING", "RUNNING", "BACKOFF")
DOWN_STATES = ("STOPPED", "EXITED", "FATAL", "UNKNOWN")
ALREADY_STARTED, NOT_RUNNING, BAD_NAME = 60, 70, 10
MODES = ("blue-green", "drain", "requeue")
TERM_AGAIN_S = 5.0
STOP_FETCHING_WAIT_S = 1.0  # the old colour says it stopped fetching within this
RESTART_LOCK = threading.RLock()  # the threads of one agent; restart_lock adds the processes
LOCK_FILE = "restart.lock"
LOCK_POLL_S = 0.02
_LOCK_DEPTH = threading.local()


class _UnixHTTPConnection(http.client.HTTPConnection):
    """supervisord's XML-RPC over its unix socket (after supervisor's UnixStreamHTTPConnection)."""

    def __init__(self, path, timeout):
        http.client.HTTPConnection.__init__(self, "localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path, timeout=10):
        xmlrpc.client.Transport.__init__(self)
        self.path, self.timeout = path, timeout

    def make_connection(self, host):
        # kept, as the base class does, so close() reaches it (no leaked socket per call)
        if not self._connection or self._connection[0] != host:
            self._connection = host, _UnixHTTPConnection(self.path, self.timeout)
        return self._connection[1]


def supervisor_socket(root):
    return os.path.join(root, STATE_DIR, "supervisor.sock")


def _supervisor(root):
    return xmlrpc.client.ServerProxy("http://localhost",
                                     transport=_UnixTransport(supervisor_socket(root)))


def _marker(root, colour):
    return read_state(root, "ready-%s.json" % colour)


OWED = "restart-owed.json"


def restart_owed(root):
    """The restart a committed batch needed and that has not run yet ({revision, why,
    time}), or None. The sender decides before it sends (``syncagent/restart.py``) and the
    batch carries the answer, so a push cut off between its commit and its restart (Ctrl-C,
    a dropped connection) leaves it on record: the next push or watch restarts even though
    nothing is left to send. None while what is pushed is live."""
    owed = read_state(root, OWED)
    if not isinstance(owed, dict) or _pushed(root) in _live_revisions(root):
        return None
    return owed


def _live_revisions(root):
    return {m.get("revision") for m in (_marker(root, c) for c in COLOURS)
            if isinstance(m, dict) and _running(m.get("pid"))}


def _owe(root, batch):
    """Keep the restart ``batch`` needs on record; a batch that brings the tree back to what
    runs owes nothing, and pays what earlier ones owed."""
    if batch.get("revision") in _live_revisions(root):
        drop_state(root, OWED)
    elif batch.get("restart"):
        write_state(root, OWED, json.dumps({"revision": batch.get("revision"),
                                            "why": str(batch["restart"])[:500],
                                            "time": time.time()}))


def _settle_owed(r, out):
    """A restart attempt onto the pushed revision (started or failed: a failed start is
    reported, not retried by every later push) pays what was owed."""
    if r.revision and r.revision == _pushed(r.root):
        drop_state(r.root, OWED)
    return out


def live_imports(root):
    """The project files the serving worker has imported (sorted posix paths, relative to the
    root: worker/ready.py records them), or None when unknown (no live marker, a worker too
    old to record them). The newest readiness marker of a running process is the live one;
    files only, no supervisord call: every manifest and apply answer carries it."""
    live = None
    for colour in COLOURS:
        marker = _marker(root, colour)
        if (isinstance(marker, dict) and _running(marker.get("pid"))
                and (live is None or marker.get("time", 0) > live[1].get("time", 0))):
            live = (colour, marker)
    if live is None:
        return None
    record = read_state(root, "imports-%s.json" % live[0])
    if not isinstance(record, dict) or record.get("pid") != live[1].get("pid"):
        return None
    files = record.get("files")
    return sorted(f for f in files if isinstance(f, str)) if isinstance(files, list) else None


def _running(pid):
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it exists
        return True
    return True


def _failed_start(root, colour):
    """The slot's failed-start record (worker/ready.py writes it), or None; its error line is
    masked here too, as every text the agent sends back."""
    try:
        with open(os.path.join(root, STATE_DIR, "failed-%s.json" % colour)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    data["error"] = mask(str(data.get("error") or ""), _secrets(root))
    return data


def standby_fingerprint(root):
    """As worker/standby.py's fingerprint: sha256 over the requirements files, .env.worker,
    the module record and the worker runtime's digest, what a parked standby imported from."""
    digest = hashlib.sha256()
    try:
        names = sorted(n for n in os.listdir(root) if n.startswith("requirements")
                       and n.endswith(".txt") and os.path.isfile(os.path.join(root, n)))
    except OSError:
        names = []
    for name in names + [".env.worker", STATE_DIR + "/modules.json",
                         STATE_DIR + "/runtime/worker.digest"]:
        try:
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
        except OSError:
            data = b"\0missing"
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


def _parking(root, colour):
    """True when ``colour`` was asked to park by this supervisord's agent (the launcher drops
    the request at go; one left by a supervisord that died is void)."""
    request = read_state(root, "park-%s" % colour)
    return isinstance(request, dict) and request.get("supervisor") == _supervisord_pid(root)


def _supervisord_pid(root):
    try:
        with open(os.path.join(root, STATE_DIR, "supervisord.pid")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def standby_state(root, colour, info):
    """The parked standby in ``colour`` (its marker, ``fresh``: nothing it imported from has
    changed since), or None when the slot holds none."""
    if not _parking(root, colour):
        return None
    marker = read_state(root, "standby-%s.json" % colour)
    # STARTING counts: supervisord says RUNNING only after startsecs (1 s), and a save that
    # came sooner than that after the last restart would otherwise start cold
    parked = bool(marker and info.get("pid") and marker.get("pid") == info["pid"]
                  and info["statename"] in ("STARTING", "RUNNING"))
    if not parked:
        return {"colour": colour, "state": "parking" if info["statename"] in LIVE_STATES
                else "down", "fresh": False}
    fresh = marker.get("fingerprint") == standby_fingerprint(root)
    for path, mtime in marker.get("watch") or []:
        try:
            fresh = fresh and os.stat(path).st_mtime_ns == mtime
        except OSError:
            fresh = False
    return dict(marker, state="parked", fresh=fresh)


def failing(programs, live, pushed):
    """The failed start that matters now, or None: the newest one of the pushed revision,
    made after the live worker got ready (a failure of a revision no longer pushed, or one
    a later start has overtaken, is history)."""
    found = None
    for colour, p in programs.items():
        failed = p.get("failed")
        if not failed or p.get("ready") or failed.get("revision") != pushed:
            continue
        if live and failed.get("time", 0) <= live.get("time", 0):
            continue
        if found is None or failed.get("time", 0) > found.get("time", 0):
            found = dict(failed, colour=colour)
    return found


# ---------------------------------------------------------------- secrets
# The secret rule set is worker/secret_rules.py; the agent must stay one file, so the block
# below is a verbatim copy (tests/test_secrets.py checks it). .env.worker is read the way
# python-dotenv reads it (the worker's loader), so a value is masked exactly as the worker sees it.

# --- begin secret rules (copied verbatim in syncagent/agent.py) ---
MASK = "***"
# Values shorter than this are never searched for in text: a one-character "secret" would
# turn "SyntaxError" into "Synta***Error". Validation refuses a WORKER_API_KEY under 16
# characters, so no real key is that short; a short URL password is still masked inside URLs.
MASK_FLOOR = 8
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*):([^@\s/]+)@")


def _url_passwords(value):
    """The passwords of the URLs in ``value``, as written and percent-decoded."""
    found = [m.group(2) for m in _URL_PASSWORD.finditer(value)]
    try:
        found.append(urlsplit(value.strip()).password or "")
    except ValueError:
        pass
    return [form for p in found if p for form in (p, unquote(p))]


def secret_values(values):
    """Return the secret strings among ``values`` (a name -> value mapping).

    A value is secret when its name looks like one (KEY, SECRET, TOKEN, PASSWORD, PASSWD,
    CREDENTIAL); the password of every URL is secret whatever the name. Values shorter than
    ``MASK_FLOOR`` are left out (see there).

    Returns:
        The secrets, longest first (so a secret containing another is masked whole).
    """
    found = set()
    for name, value in values.items():
        if not value:
            continue
        if SECRET_NAME.search(name):
            found.add(value)
        if "://" in value:
            found.update(_url_passwords(value))
    return tuple(sorted((s for s in found if len(s) >= MASK_FLOOR), key=lambda s: (-len(s), s)))


def mask(text, secrets=()):
    """Return ``text`` with every secret and every URL password replaced by ``***``.

    Args:
        text: any output (a log line, an error message).
        secrets: secret strings (see :func:`secret_values`); shorter than ``MASK_FLOOR``: ignored.
    """
    for secret in sorted((s for s in secrets if len(s) >= MASK_FLOOR), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _URL_PASSWORD.sub(r"\1:" + MASK + "@", text)
# --- end secret rules ---


_DOTENV = {name: re.compile(pattern, re.UNICODE | flags) for name, pattern, flags in (
    ("multiline_whitespace", r"\s*", re.MULTILINE),
    ("whitespace", r"[^\S\r\n]*", 0),
    ("export", r"(?:export[^\S\r\n]+)?", 0),
    ("single_quoted_key", r"'([^']+)'", 0),
    ("unquoted_key", r"([^=\#\s]+)", 0),
    ("equal_sign", r"(=[^\S\r\n]*)", 0),
    ("single_quoted_value", r"'((?:\\.|[^'\\])*)'", re.DOTALL),
    ("double_quoted_value", r'"((?:\\.|[^"\\])*)"', re.DOTALL),
    ("unquoted_value", r"([^\r\n]*)", 0),
    ("comment", r"(?:[^\S\r\n]*#[^\r\n]*)?", 0),
    ("end_of_line", r"[^\S\r\n]*(?:\r\n|\n|\r|$)", 0),
    ("rest_of_line", r"[^\r\n]*(?:\r|\n|\r\n)?", 0),
    ("double_quote_escapes", r"\\[\\'\"abfnrtv]", 0),
    ("single_quote_escapes", r"\\[\\']", 0),
)}
_DOTENV_VARIABLE = re.compile(r"\$\{(?P<name>[^\}:]*)(?::-(?P<default>[^\}]*))?\}")


class _DotenvText(object):
    """A cursor over .env text, as python-dotenv's ``parser.Reader``."""

    def __init__(self, text):
        self.text, self.pos = text, 0

    def peek(self):
        return self.text[self.pos:self.pos + 1]

    def read(self, name):
        match = _DOTENV[name].match(self.text, self.pos)
        if match is None:
            raise ValueError(name)
        self.pos = match.end()
        return match.groups()


def _dotenv_decode(name, value):
    return _DOTENV[name].sub(lambda m: codecs.decode(m.group(0), "unicode-escape"), value)


def _dotenv_value(cur):
    char = cur.peek()
    if char == "'":
        return _dotenv_decode("single_quote_escapes", cur.read("single_quoted_value")[0])
    if char == '"':
        return _dotenv_decode("double_quote_escapes", cur.read("double_quoted_value")[0])
    if char in ("", "\n", "\r"):
        return ""
    return re.sub(r"\s+#.*", "", cur.read("unquoted_value")[0]).rstrip()


def _dotenv_binding(cur):
    """One ``(key, value)`` binding, as python-dotenv's ``parse_binding`` (key None: none)."""
    cur.read("multiline_whitespace")
    if cur.pos >= len(cur.text):
        return None, None
    cur.read("export")
    key = None
    if cur.peek() != "#":
        key = cur.read("single_quoted_key" if cur.peek() == "'" else "unquoted_key")[0]
    cur.read("whitespace")
    value = None
    if cur.peek() == "=":
        equal_sign = cur.read("equal_sign")[0]
        value = "" if len(equal_sign) > 1 and cur.peek() == "#" else _dotenv_value(cur)
    cur.read("comment")
    cur.read("end_of_line")
    return key, value


def parse_dotenv(text, environ=None):
    """The variables of a .env text, exactly as python-dotenv's ``dotenv_values`` reads them.

    Quotes and their escapes, ``export``, inline comments, multiline quoted values and
    ``${VAR:-default}`` interpolation (earlier values, then ``environ``); a malformed line is
    skipped. A port of python-dotenv's parser (the agent cannot import it), checked against it
    by a hypothesis property in tests/test_secrets.py.

    Returns:
        ``{name: value}``; a name without ``=`` maps to None.
    """
    cur = _DotenvText(text[1:] if text.startswith("\ufeff") else text)
    pairs = []
    while cur.pos < len(cur.text):
        try:
            key, value = _dotenv_binding(cur)
        except ValueError:
            cur.read("rest_of_line")
            continue
        if key is not None:
            pairs.append((key, value))
    values = {}
    for key, value in pairs:
        if value is not None:
            env = dict(os.environ if environ is None else environ)
            env.update(values)
            value = _DOTENV_VARIABLE.sub(
                lambda m: env.get(m.group("name"), m.group("default") or "") or "", value)
        values[key] = value
    return values


def _secrets(root):
    """The secrets of ``<root>/.env.worker`` (see :func:`secret_values`)."""
    try:
        with open(os.path.join(root, ".env.worker"), encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return ()
    return secret_values(parse_dotenv(text))


def log_tail(root, group, colour, offset=0, lines=30):
    """The worker log from ``offset`` on, last ``lines`` lines, secrets masked."""
    path = os.path.join(root, STATE_DIR, "logs", "%s-%s.log" % (group, colour))
    try:
        with open(path, "rb") as f:
            f.seek(max(0, offset))
            text = f.read()[-65536:].decode("utf-8", "replace")
    except OSError:
        return []
    return mask(text, _secrets(root)).splitlines()[-lines:]


def _log_size(root, group, colour):
    try:
        return os.path.getsize(os.path.join(root, STATE_DIR, "logs",
                                            "%s-%s.log" % (group, colour)))
    except OSError:
        return 0


def worker_state(root, group="worker"):
    """What runs: supervisord, each colour's program state and readiness marker.

    Returns None when no worker is provisioned under ``root``.
    """
    if not os.path.exists(supervisor_socket(root)):
        return None
    try:
        with _supervisor(root) as proxy:
            infos = proxy.supervisor.getAllProcessInfo()
    except (OSError, xmlrpc.client.Error) as e:
        return {"supervisord": "down", "error": str(e), "programs": {}, "live": None}
    programs = {}
    live = None
    for info in infos:
        if info.get("group") != group:
            continue
        colour = info["name"].rsplit("-", 1)[-1]
        marker = _marker(root, colour)
        ready = bool(marker and marker.get("pid") == info["pid"] and info["pid"])
        programs[colour] = {"state": info["statename"], "pid": info["pid"],
                            "ready": ready, "marker": marker if ready else None,
                            "failed": _failed_start(root, colour),
                            "standby": standby_state(root, colour, info)}
        if ready and info["statename"] in ("STARTING", "RUNNING"):
            if live is None or marker.get("time", 0) > live.get("time", 0):
                live = dict(marker, colour=colour)
    conf = os.path.join(root, STATE_DIR, "supervisord.conf")
    last = read_state(root, "last-restart.json")
    standby = [p["standby"] for p in programs.values() if p["standby"]]
    return {"supervisord": "running", "programs": programs, "live": live, "conf": conf,
            "last_restart": last, "standby": standby[0] if standby else None,
            "failing": failing(programs, live, (read_revision(root) or {}).get("revision")),
            "supervisorctl": "%s -c %s status" % (_supervisorctl(root, group), conf)}


def _supervisorctl(root, group):
    """supervisorctl beside the python that runs the worker (the provisioned venv)."""
    try:
        with open(os.path.join(root, STATE_DIR, "supervisor", group + ".conf")) as f:
            for line in f:
                if line.startswith("command="):
                    python = line.split("=", 1)[1].split()[0]
                    return os.path.join(os.path.dirname(python), "supervisorctl")
    except (OSError, IndexError):
        pass
    return "supervisorctl"


class _Restart(object):
    """One restart: the supervisord calls, the waits, the timings."""

    def __init__(self, root, group, revision, timeout):
        self.root, self.group, self.revision = root, group, revision
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.proxy = _supervisor(root)
        self.timings = {}

    def name(self, colour):
        return "%s:%s-%s" % (self.group, self.group, colour)

    def state(self, colour):
        return self.proxy.supervisor.getProcessInfo(self.name(colour))

    def forget_failure(self, colour):
        """New code is about to run in ``colour``: its earlier failed start no longer counts.
        (Only then: parking a standby in a slot whose start just failed must leave the failure
        on record, or `status` would stop saying that the pushed revision is failing.)"""
        drop_state(self.root, "failed-%s.json" % colour)

    def start(self, colour):
        try:
            self.proxy.supervisor.startProcess(self.name(colour), False)
        except xmlrpc.client.Fault as e:
            if e.faultCode != ALREADY_STARTED:
                raise

    def stop(self, colour):
        """Warm stop (TERM): Celery finishes its in-flight tasks; does not wait for it."""
        try:
            self.proxy.supervisor.stopProcess(self.name(colour), False)
        except xmlrpc.client.Fault as e:
            if e.faultCode != NOT_RUNNING:
                raise

    def stop_fetching(self, colour):
        """Before a switch's warm stop: the old colour stops fetching tasks, so none waits in a
        stopping worker (a task it had taken but not started went back to the broker only at
        the end of its shutdown). Only a worker whose marker names the signal gets it (any
        other would die of it); waits for its answer up to STOP_FETCHING_WAIT_S."""
        marker = _marker(self.root, colour)
        pid = (marker or {}).get("pid")
        sig = (marker or {}).get("stop_fetching")
        if not sig or sig not in ("USR2",) or self.state(colour)["pid"] != pid or not pid:
            return False
        try:
            self.proxy.supervisor.signalProcess(self.name(colour), sig)
        except xmlrpc.client.Fault:
            return False
        until = min(self.deadline, time.monotonic() + STOP_FETCHING_WAIT_S)
        while time.monotonic() < until:
            done = read_state(self.root, "stopped-fetching-%s.json" % colour)
            if isinstance(done, dict) and done.get("pid") == pid:
                return True
            time.sleep(0.005)
        return False

    def wait_down(self, colour, grace=None):
        """Wait until ``colour`` has stopped; after ``grace`` seconds, a cold stop (QUIT)."""
        t0 = time.monotonic()
        cold = False
        nudged = t0
        while self.state(colour)["statename"] not in DOWN_STATES:
            if grace is not None and not cold and time.monotonic() - t0 > grace:
                try:
                    self.proxy.supervisor.signalProcess(self.name(colour), "QUIT")
                except xmlrpc.client.Fault:
                    pass
                cold = True
            elif not cold and time.monotonic() - nudged > TERM_AGAIN_S:
                # Seen under load: a TERM that Celery never acted on (the worker kept taking
                # tasks). Another TERM is still a warm shutdown: running tasks finish.
                try:
                    self.proxy.supervisor.signalProcess(self.name(colour), "TERM")
                except xmlrpc.client.Fault:
                    pass
                nudged = time.monotonic()
            if time.monotonic() > self.deadline:
                raise AgentFailure("RestartTimeout", "%s did not stop within %gs"
                                   % (self.name(colour), self.timeout))
            time.sleep(0.05)

    def wait_ready(self, colour, log_offset):
        """Until the readiness marker names this process and the pushed revision (or a newer
        push that landed while it started: the worker reads the revision at its start)."""
        while True:
            info = self.state(colour)
            marker = _marker(self.root, colour)
            if (info["statename"] in ("STARTING", "RUNNING") and marker and info["pid"]
                    and marker.get("pid") == info["pid"]
                    and marker.get("revision") in (self.revision, _pushed(self.root))):
                return marker
            failed = _failed_start(self.root, colour)
            if failed:  # the launcher exited before it was ready (whatever its exit code)
                self.stop(colour)  # no retry loop on code that cannot start
                raise _StartFailed(colour, "failing", log_tail(self.root, self.group, colour,
                                                              log_offset), failed.get("error"))
            if info["statename"] in ("BACKOFF", "EXITED", "FATAL"):
                self.stop(colour)  # no retry loop on code that cannot start
                raise _StartFailed(colour, info["statename"],
                                   log_tail(self.root, self.group, colour, log_offset))
            if time.monotonic() > self.deadline:
                error = "not ready after %gs" % self.timeout
                self.record_failed(colour, error)  # status: failing, not running
                self.stop(colour)  # reported as failed: it must not come up later unseen
                raise _StartFailed(colour, error, log_tail(self.root, self.group, colour,
                                                           log_offset))
            time.sleep(0.02)

    def record_failed(self, colour, error):
        """A failed-start record as the launcher writes one (worker/ready.py), for a start
        the agent gave up on: `status` then says the pushed revision is failing."""
        try:
            write_state(self.root, "failed-%s.json" % colour, json.dumps(
                {"revision": self.revision, "error": error, "count": 1, "colour": colour,
                 "supervisor": _supervisord_pid(self.root), "time": time.time()}))
        except OSError:
            pass

    def launch(self, colour):
        """A cold start: the slot runs the worker from scratch."""
        offset = _log_size(self.root, self.group, colour)
        t0 = time.monotonic()
        self.forget(colour)
        self.forget_failure(colour)
        self.start(colour)
        marker = self.wait_ready(colour, offset)
        self.timings["start"] = time.monotonic() - t0
        return marker

    def forget(self, colour):
        """Drop the slot's park and go requests: it starts as a worker, not a standby."""
        for name in ("park-%s" % colour, "go-%s.json" % colour):
            drop_state(self.root, name)

    def go(self, colour, standby):
        """A warm start: tell the parked standby to run the code on disk (a file, then SIGUSR1
        to wake it at once; it also looks every half second). Its label is the revision on
        disk now, as a cold start's is: a batch committed since this restart was asked for is
        what the standby imports, and a label of the older revision made the next batch that
        returned to it look live already."""
        offset = _log_size(self.root, self.group, colour)
        t0 = time.monotonic()
        self.forget_failure(colour)
        write_state(self.root, "go-%s.json" % colour, json.dumps(
            {"revision": _pushed(self.root) or self.revision, "time": time.time()}))
        try:
            os.kill(standby["pid"], signal.SIGUSR1)
        except OSError:
            pass  # gone: supervisord starts it again, and the go request is still there
        marker = self.wait_ready(colour, offset)
        self.timings["start"] = time.monotonic() - t0
        return marker

    def park(self, colour):
        """Start ``colour`` as the standby for the next restart (does not wait for it)."""
        drop_state(self.root, "go-%s.json" % colour)
        write_state(self.root, "park-%s" % colour, json.dumps(
            {"time": time.time(), "supervisor": self.proxy.supervisor.getPID()}))
        self.start(colour)

    def bring_up(self, colour, standby):
        """Start ``colour``: warm when it holds a fresh parked standby, else cold (a stale or
        half-parked standby is stopped first)."""
        self.timings["warm"] = bool(standby and standby.get("fresh"))
        if self.timings["warm"]:
            return self.go(colour, standby)
        if standby:
            self.stop(colour)
            self.wait_down(colour)
        return self.launch(colour)


class restart_lock(object):
    """Held for a restart and for parking a standby: one at a time per project, whichever
    process asks. A `push` agent and a `watch` agent are two processes on the remote: with a
    thread lock alone, one restarted while the other's park thread parked a slot. An flock on
    .syncagent/restart.lock (opened through no link, as all state), taken after RESTART_LOCK
    (the threads of one agent; a thread that re-enters does not flock again: a second open file
    would wait on the first). Gives up at ``deadline`` (monotonic) with RestartBusy."""

    def __init__(self, root, deadline):
        self.root, self.deadline = root, deadline
        self.fd = None
        self.waited = 0.0

    def __enter__(self):
        t0 = time.monotonic()
        if not RESTART_LOCK.acquire(timeout=max(0.0, self.deadline - t0)):
            raise self._busy()
        try:
            if not getattr(_LOCK_DEPTH, "n", 0):
                self.fd = _open_lock(self.root)
                while not _try_flock(self.fd):
                    if time.monotonic() > self.deadline:
                        raise self._busy()
                    time.sleep(LOCK_POLL_S)
            _LOCK_DEPTH.n = getattr(_LOCK_DEPTH, "n", 0) + 1
        except BaseException:
            self._close()
            RESTART_LOCK.release()
            raise
        self.waited = time.monotonic() - t0
        return self

    def __exit__(self, *exc):
        _LOCK_DEPTH.n -= 1
        self._close()  # closing the file releases the flock
        RESTART_LOCK.release()

    def _close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _busy(self):
        return AgentFailure("RestartBusy", "another restart of %s held the restart lock "
                            "(%s/%s) until the deadline" % (self.root, STATE_DIR, LOCK_FILE))


def _open_lock(root):
    sfd = _state_fd(root, create=True)
    try:
        return os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                       0o600, dir_fd=sfd)
    finally:
        os.close(sfd)


def _try_flock(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def _standby_for(r, colours):
    """The slot holding a standby (parked or parking), or None. A park request left in a
    slot that is down (stopped by hand, or by a reload of supervisord's config) holds none."""
    for colour in colours:
        if _parking(r.root, colour):
            found = standby_state(r.root, colour, r.state(colour))
            if found and found["state"] != "down":
                return dict(found, colour=colour)
    return None


PARK_WAIT_S = 60.0


def _park_next(r, colours, new):
    """Park a standby for the next restart in a stopped slot; when every other slot is still
    draining, a thread parks the first that stops (within PARK_WAIT_S; else the next restart
    is cold). A failure here never fails the restart that has just succeeded."""
    try:
        for colour in colours:  # a park request of a slot that is down holds no standby
            if colour != new and _parking(r.root, colour) and \
                    r.state(colour)["statename"] in DOWN_STATES:
                r.forget(colour)
        if _standby_for(r, colours) or _park_free(r, colours, new):
            return
    except (OSError, xmlrpc.client.Error):
        return
    # daemon: it ends with this agent; restart_lock orders it with every restart, this
    # agent's or another's
    threading.Thread(target=_park_when_free, args=(r.root, r.group, r.revision, colours, new),
                     name="syncagent-park", daemon=True).start()


def _park_free(r, colours, new):
    """Park a standby in a stopped slot other than ``new``; False when none is stopped."""
    for colour in colours:
        if colour != new and r.state(colour)["statename"] in DOWN_STATES:
            r.park(colour)
            return True
    return False


def _park_when_free(root, group, revision, colours, new):
    r = _Restart(root, group, revision, PARK_WAIT_S)
    try:
        while time.monotonic() < r.deadline:
            with restart_lock(root, r.deadline):  # a restart that began meanwhile decides
                live = _marker_colours(root)
                if new not in live or _standby_for(r, colours) or \
                        _park_free(r, colours, new):
                    return
            time.sleep(0.1)
    except (OSError, xmlrpc.client.Error, AgentFailure):
        pass
    finally:
        r.proxy("close")()


def _marker_colours(root):
    return [c for c in COLOURS if _marker(root, c)]


def _idle_slot(colours, states, live):
    """The slot a blue-green restart starts: a stopped one if any (no waiting for a drain),
    else one still stopping, else (all serving) the one serving the oldest code."""
    idle = [c for c in colours if c not in live]
    for c in idle:
        if states[c] in DOWN_STATES:
            return c
    return idle[0] if idle else live[-1]


def _pushed(root):
    return (read_revision(root) or {}).get("revision")


class _StartFailed(Exception):
    def __init__(self, colour, state, tail, error=None):
        Exception.__init__(self, state)
        self.colour, self.state, self.tail, self.error = colour, state, tail, error


def restart_worker(root, revision, mode="blue-green", timeout=120.0, grace=3.0,
                   group="worker"):
    """Restart the worker onto ``revision`` and wait until that revision is live.

    Modes: ``blue-green`` starts the idle colour, waits for its readiness marker, then warm-
    stops the old colour (which finishes its tasks on the old code); ``drain`` warm-stops,
    waits, starts; ``requeue`` sends TERM, then after ``grace`` a cold stop (QUIT) so in-flight
    tasks go back to the queue (acks_late), then starts.

    Returns:
        {"ok", "mode", "colour", "previous", "pid", "node", "revision", "timings"}; when the
        new code does not start: ok False, "failure", "log_tail" and (blue-green) the
        colours still serving. ("error" is the protocol's own field.)
    """
    if mode not in MODES:
        raise AgentFailure("Config", "unknown restart mode %r" % (mode,))
    if not os.path.exists(supervisor_socket(root)):
        raise AgentFailure("NotProvisioned", "no worker is provisioned under %s" % root)
    r = _Restart(root, group, revision, timeout)
    try:
        with restart_lock(root, r.deadline) as lock:  # no standby parked in its middle
            r.timings["lock_wait"] = lock.waited
            return _settle_owed(r, _restart(r, mode, grace))
    finally:
        r.proxy("close")()  # the XML-RPC connection: an agent lives for a whole watch


def _slot_states(r):
    """{colour: statename} of the slots this supervisord has (two in configs written before
    the third existed)."""
    try:
        states = {i["name"].rsplit("-", 1)[-1]: i["statename"]
                  for i in r.proxy.supervisor.getAllProcessInfo() if i.get("group") == r.group}
    except (OSError, xmlrpc.client.Error) as e:
        raise AgentFailure("SupervisorDown", "supervisord is not running (no answer on %s: "
                           "%s); run `syncagent provision` to start it again"
                           % (supervisor_socket(r.root), e))
    if not states:
        raise AgentFailure("NotProvisioned", "no worker programs in group %r" % r.group)
    return states


def _serving(root, colours, states):
    """The live slots that are not standbys, the newest readiness marker first."""
    live = [c for c in colours if states[c] in LIVE_STATES and not _parking(root, c)]
    live.sort(key=lambda c: (_marker(root, c) or {}).get("time", 0), reverse=True)
    return live


def _start_failed(out, r, e, serving, t0):
    """The answer of a start that failed: why, its log tail, the colours still serving."""
    failure = ("the new code did not start: %s" % e.error if e.error else
               "the new code did not start (%s)" % e.state.lower())
    out.update(colour=e.colour, failure=failure, failing=e.error, log_tail=e.tail,
               serving=serving)
    r.timings["total"] = time.monotonic() - t0
    out["timings"] = r.timings
    return out


def _started(out, r, colours, new, marker, t0):
    """The answer of a start that succeeded; parks the standby for the next restart."""
    r.timings["total"] = time.monotonic() - t0
    _park_next(r, colours, new)
    out.update(ok=True, colour=new, pid=marker.get("pid"), node=marker.get("node"),
               revision=marker.get("revision"), timings=r.timings)
    try:  # for `syncagent status`: the last restart and how long it took
        write_state(r.root, "last-restart.json", json.dumps(
            {"time": time.time(), "mode": out["mode"], "colour": new,
             "revision": out["revision"], "timings": r.timings}))
    except OSError:
        pass
    return out


def _restart(r, mode, grace):
    root = r.root
    t0 = time.monotonic()
    states = _slot_states(r)
    colours = [c for c in COLOURS if c in states]
    standby = _standby_for(r, colours)
    live = _serving(root, colours, states)
    out = {"ok": False, "mode": mode, "previous": live, "revision": r.revision}
    try:
        if mode == "blue-green":
            new = standby["colour"] if standby else _idle_slot(colours, states, live)
            if states[new] == "STOPPING":  # every idle slot still finishes an earlier drain
                r.wait_down(new)
            marker = r.bring_up(new, standby)
            t1 = time.monotonic()
            for colour in live:  # all stop fetching, then all stop
                if colour != new:
                    r.stop_fetching(colour)
            r.timings["stop_fetching"] = time.monotonic() - t1
            for colour in live:
                if colour != new:
                    r.stop(colour)
        else:
            current = live[0] if live else colours[0]
            t1 = time.monotonic()
            for colour in live:
                r.stop(colour)
            for colour in live:
                r.wait_down(colour, grace=grace if mode == "requeue" else None)
            r.timings["stop"] = time.monotonic() - t1
            new = standby["colour"] if standby and standby["fresh"] else current
            marker = r.bring_up(new, standby if new != current else None)
    except _StartFailed as e:
        return _start_failed(out, r, e, [c for c in live if mode == "blue-green"], t0)
    except (OSError, xmlrpc.client.Error) as e:
        raise AgentFailure("SupervisorDown", "supervisord failed during the restart: %s" % e)
    return _started(out, r, colours, new, marker, t0)


def first_start(slots, revision, restart):
    """What provision's start does, given the serving slots (newest first, each
    ``(colour, revision its readiness marker names for its process, or None)``).

    Returns ``(action, colour)``: ``keep`` a slot serving ``revision`` (unless ``restart``:
    the runtime, packages or .env.worker changed), ``wait`` for a slot supervisord is starting
    itself (its autostart after supervisord started or reloaded, or a crash restart),
    ``restart`` (blue-green) when the serving slot runs another revision, ``start`` when none
    serves.
    """
    for colour, ready_on in slots:
        if ready_on == revision and not restart:
            return "keep", colour
    for colour, ready_on in slots:
        if ready_on is None:
            return "wait", colour
    if slots:
        return "restart", slots[0][0]
    return "start", None


def start_worker(root, revision, restart=False, timeout=120.0, group="worker"):
    """provision's start: the worker up on ``revision`` through this slot controller (the
    readiness rule and the failure report of every restart), then a standby parked, so the
    first restart after provision is warm. See :func:`first_start` for what it does.

    Returns:
        As :func:`restart_worker`, plus ``action`` (keep, wait, start, restart), ``warm``
        and ``standby`` (the slot holding the next restart's standby, or None).
    """
    if not os.path.exists(supervisor_socket(root)):
        raise AgentFailure("NotProvisioned", "no worker is provisioned under %s" % root)
    r = _Restart(root, group, revision, timeout)
    try:
        with restart_lock(root, r.deadline) as lock:
            r.timings["lock_wait"] = lock.waited
            out = _settle_owed(r, _first_start(r, restart))
            if out["ok"]:
                found = _standby_for(r, [c for c in COLOURS if c in _slot_states(r)])
                out["standby"] = found and found["colour"]
            return out
    finally:
        r.proxy("close")()


def _first_start(r, restart):
    root = r.root
    t0 = time.monotonic()
    states = _slot_states(r)
    colours = [c for c in COLOURS if c in states]
    live = _serving(root, colours, states)
    slots = []
    for colour in live:
        marker = _marker(root, colour) or {}
        pid = r.state(colour)["pid"]
        slots.append((colour, marker.get("revision") if pid and marker.get("pid") == pid
                      else None))
    action, colour = first_start(slots, r.revision, restart)
    if action == "restart":
        return dict(_restart(r, "blue-green", 0), action=action,
                    warm=bool(r.timings.get("warm")))
    out = {"ok": False, "mode": "start", "previous": live, "revision": r.revision,
           "action": action, "warm": False}
    try:
        if action == "keep":
            marker = _marker(root, colour)
        elif action == "wait":
            marker = r.wait_ready(colour, 0)
        else:
            standby = _standby_for(r, colours)
            colour = standby["colour"] if standby else _idle_slot(colours, states, [])
            marker = r.bring_up(colour, standby)
            out["warm"] = bool(r.timings.get("warm"))
    except _StartFailed as e:
        return _start_failed(out, r, e, [], t0)
    except (OSError, xmlrpc.client.Error) as e:
        raise AgentFailure("SupervisorDown", "supervisord failed during the start: %s" % e)
    if action == "keep":  # nothing started: no last restart to record
        _park_next(r, colours, colour)
        out.update(ok=True, colour=colour, pid=marker.get("pid"), node=marker.get("node"),
                   revision=marker.get("revision"), timings=r.timings)
        return out
    return _started(out, r, colours, colour, marker, t0)


# ---------------------------------------------------------------- framing


def read_exactly(stream, n):
    """Read exactly n bytes or raise EOFError. A buffered stream returns them in one read
    (the whole frame, no copy); a raw one may return fewer, and the rest is read on."""
    block = stream.read(n)
    if len(block) == n:
        return block
    buf = bytearray(block)
    while len(buf) < n:
        block = stream.read(n - len(buf))
        if not block:
            raise EOFError("stream closed after %d of %d bytes" % (len(buf), n))
        buf += block
    return bytes(buf)


def read_frame(stream):
    (n,) = struct.unpack(">I", read_exactly(stream, 4))
    if n > MAX_FRAME:
        raise AgentFailure("Protocol", "frame of %d bytes exceeds the limit" % n)
    return read_exactly(stream, n) if n else b""


def write_frame(stream, payload):
    stream.write(struct.pack(">I", len(payload)))
    stream.write(payload)


def _send(out, obj):
    write_frame(out, json.dumps(obj).encode())
    out.flush()


def _request(inp):
    raw = read_frame(inp)
    try:
        req = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise AgentFailure("Protocol", "request is not JSON")
    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        raise AgentFailure("Protocol", "request must be an object with an 'op'")
    return req


class _Upload:
    """One upload's data frames as an iterable of chunks; once they are read, ``vouched`` says
    whether the end frame was VOUCHED (see the module doc)."""

    __slots__ = ("inp", "vouched", "ended")

    def __init__(self, inp):
        self.inp = inp
        self.vouched = False
        self.ended = False  # past the end frame: never reads into the next upload's frames

    def __iter__(self):
        return self

    def __next__(self):
        if self.ended:
            raise StopIteration
        (n,) = _LENGTH.unpack(read_exactly(self.inp, 4))
        if not n or n == VOUCHED:
            self.ended = True
            self.vouched = bool(n)
            raise StopIteration
        if n > MAX_FRAME:
            self.ended = True  # no draining past it: what follows cannot be trusted
            raise AgentFailure("Protocol", "data frame of %d bytes exceeds the limit" % n)
        return read_exactly(self.inp, n)


_LENGTH = struct.Struct(">I")


def _data_chunks(inp):
    """``chunks_for`` of a request's stream: each upload's frames, read as it is written."""
    return lambda _upload: _Upload(inp)


def _root(req):
    root = req.get("root")
    if not isinstance(root, str) or not root or "\0" in root:
        raise AgentFailure("Config", "request needs a 'root' path")
    root = os.path.abspath(os.path.expanduser(root))
    check_state_dir(root)
    return root


def handle(req, inp):
    """Serve one request; returns the response body (without "error")."""
    op = req["op"]
    if op == "ping":
        return {"pong": True}
    if op == "manifest":
        root = _root(req)
        mem = _memory(root)
        if not os.path.isdir(root):  # empty, and named by a token: a batch will claim it
            body = mem.answer({}, req.get("since"))
            body.update({"root": root, "exists": False, "problems": [], "revision": None})
            return body
        entries, problems, held = scan_root(root, req.get("rules", []), req.get("protect", []),
                                            mem)
        body = mem.answer(entries, req.get("since"))  # "entries", or a "delta" since then
        body.update({"root": root, "exists": True, "problems": problems, "protected": held,
                     "revision": read_revision(root),
                     "provisioned": os.path.exists(supervisor_socket(root)),
                     "imports": live_imports(root), "owed": restart_owed(root)})
        return body
    if op == "apply":
        root = _root(req)
        batch = req.get("batch")
        if not isinstance(batch, dict):
            raise AgentFailure("Protocol", "apply needs a 'batch' object")
        mem = _MEMORY.get(root)
        if mem is not None and mem.sent is not None:  # as the sender does with its copy
            mem.sent = batch_claims(mem.sent, batch)
        out = apply_batch(root, batch, _data_chunks(inp), req.get("protect", []))
        out["imports"] = live_imports(root)
        return out
    if op == "restart":
        return restart_worker(_root(req), str(req.get("revision") or ""),
                              str(req.get("mode") or "blue-green"),
                              float(req.get("timeout") or 120), float(req.get("grace") or 3))
    if op == "start":
        return start_worker(_root(req), str(req.get("revision") or ""),
                            bool(req.get("restart")), float(req.get("timeout") or 120))
    if op == "worker":
        root = _root(req)
        return {"worker": worker_state(root), "revision": read_revision(root), "root": root,
                "owed": restart_owed(root)}
    if op == "logs":
        root = _root(req)
        state = worker_state(root) or {}
        colour = req.get("colour") or (state.get("live") or {}).get("colour") or "blue"
        if colour not in COLOURS:  # it names a file: never a path
            raise AgentFailure("Protocol", "unknown colour %r" % (colour,))
        offset = req.get("offset")
        size = _log_size(root, "worker", colour)
        if offset is None or offset > size:  # first call, or the log was rotated
            offset = max(0, size - int(req.get("bytes") or 8192))
        return {"colour": colour, "offset": size,
                "lines": log_tail(root, "worker", colour, int(offset), int(req.get("lines") or 200))}
    raise AgentFailure("Protocol", "unknown op %r" % op)


def serve(inp, out):
    """Banner, then one response per request until EOF or a 'bye'."""
    _send(out, {"agent": MAGIC, "protocol": PROTOCOL, "pid": os.getpid(),
                "python": "%d.%d.%d" % sys.version_info[:3], "error": None})
    while True:
        try:
            req = _request(inp)
        except EOFError:
            save_kept()
            return 0
        except AgentFailure as e:
            _send(out, {"error": {"type": e.kind, "message": e.message}})
            save_kept()
            return 1  # the stream can no longer be trusted
        if req["op"] == "bye":
            _send(out, {"bye": True, "error": None})
            save_kept()
            return 0
        try:
            body = handle(req, inp)
            body["error"] = None
        except EOFError:
            save_kept()
            return 0
        except AgentFailure as e:
            body = {"error": {"type": e.kind, "message": e.message}}
        except OSError as e:
            f = _os_failure(e)
            body = {"error": {"type": f.kind, "message": f.message}}
        except Exception as e:  # never a traceback over the wire
            body = {"error": {"type": "Internal", "message": type(e).__name__}}
        _send(out, body)
        _save_when_quiet(inp)


SAVE_QUIET_S = 0.25  # no request for this long after an answer: the kept caches are written


def _save_when_quiet(inp):
    """``save_kept()``, unless a request is waiting or comes within ``SAVE_QUIET_S``: the
    next request of a busy client (a watch's next batch, a push right after a push) is then
    not kept waiting behind the cache write (0.3-0.5 s at 100,000 files); it is written after
    the next answer that no request follows, or at the end."""
    if not _UNSAVED:
        return
    try:
        fd = inp.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (tests feed a BytesIO)
        save_kept()
        return
    if _buffered(inp, fd) or select.select([fd], [], [], SAVE_QUIET_S)[0]:
        return
    save_kept()


def _buffered(inp, fd):
    """True if a request has begun to arrive: bytes in ``inp``'s buffer or in the pipe
    (looked at without blocking: ``peek`` on an empty buffer would wait for them)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        return bool(inp.peek(1))
    except BlockingIOError:
        return False
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


STDIN_BUFFER = 256 * 1024
STDIN_PIPE = 1 << 20  # Linux's default limit for an unprivileged pipe (fs.pipe-max-size)


def _stdin():
    """stdin with a larger buffer, and a larger pipe when it is one (sshd's pipe to us):
    an upload of small files is then read in a few large reads rather than two or three per
    frame, and sshd blocks on a full 64 KB pipe less often."""
    fd = sys.stdin.fileno()
    try:
        if sys.platform.startswith("linux") and stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), STDIN_PIPE)
    except OSError:
        pass  # a smaller pipe only costs more reads
    return open(fd, "rb", buffering=STDIN_BUFFER, closefd=False)


def main():
    os.umask(0o022)
    return serve(_stdin(), sys.stdout.buffer)


if __name__ == "__main__":
    sys.exit(main())
