"""Reconciling the local tree onto one target: the full push, and the partial sync of a batch.

A :class:`Syncer` holds one target's session and what it knows of both trees. ``reconcile()``
scans everything (the one-shot ``push`` and every "after any doubt" moment of ``watch``);
``sync_paths()`` re-reads only the paths an event batch named and plans against the remote
manifest kept in memory.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable

from . import agent, guard
from . import restart as restart_mod
from .config import Project, Target
from .errors import (Interrupted, MassDeleteError, OperationalError, PathEscapeError,
                     SyncAgentError, WorkerStartError)
from .ignore import Rules, restart_matcher
from .manifest import Entry, LocalScan, local_rules, scan_local, unchanged
from .plan import (MASS_DELETE_MIN, Ledger, Plan, Revisions, TouchedRevision, Verdict,
                   apply_plan, changed_paths, escaping_links, judge, plan, replan)
from .session import RemoteTree, Session

__all__ = ["PushOptions", "PushResult", "FleetResult", "Syncer", "Warm", "push", "push_many"]

MAX_PASSES = 3  # files that change while being sent get another pass
Progress = Callable[[int, int, int, int], None]  # bytes sent, bytes total, files sent, total


@dataclass(frozen=True)
class PushOptions:
    dry_run: bool = False
    restart: bool = True
    allow_mass_delete: bool = False
    trust_new_host: bool = False
    mode: str | None = None  # restart mode; None: the target's (default blue-green)
    restart_timeout: float = 120.0
    requeue_grace: float = 3.0  # requeue mode: seconds of warm stop before the cold stop
    scope: str = "imports"  # restart for: "imports" (the worker's code) or "any" change


@dataclass
class PushResult:
    target: str
    remote_root: str
    revision: str
    changed: bool
    dry_run: bool = False
    files_sent: int = 0
    bytes_sent: int = 0
    deleted: int = 0
    links: int = 0
    dirs: int = 0
    chmods: int = 0
    local_files: int = 0
    paths: list[str] = field(default_factory=list)  # what changed (uploads, links, deletes...)
    unsettled: int = 0  # files that changed while being sent (another pass follows)
    plan: Plan | None = None
    warnings: list[str] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)
    restart: dict | None = None  # filled by the worker restart step
    restart_why: str | None = None  # why the batch did or did not restart the worker

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("plan", "paths")}
        out["durations"] = {k: round(v, 4) for k, v in self.durations.items()}
        if self.dry_run and self.plan is not None:
            out["plan"] = list(self.plan.lines())
        return out


class Warm:
    """What one process keeps of both trees from one command to the next: the local digest
    cache, and each target's remote manifest as its agent last sent it (with the token that
    lets the agent answer the next request with only what changed). A holder
    (``syncagent.holder``) keeps one for as long as it lives; a direct command starts with an
    empty one: the same code, nothing known. Nothing here is trusted without a look: the
    cache vouches for a file only when its stat still matches, and a remote manifest is only
    the base the agent's own fresh walk is compared with.
    """

    held: ClassVar["Warm | None"] = None  # set in a holder process: its commands share it

    def __init__(self, root: str, keep: bool = False):
        self.root = root
        self.keep = keep  # a holder's: the cache is saved after the answer (``save``)
        self.cache: agent.DigestCache | None = None
        self.remote: dict[tuple[str, str], tuple[str, dict[str, Entry]]] = {}
        self._revisions = Revisions()  # the local manifest's revision, kept up to date
        self._revisions_lock = threading.Lock()  # a fleet's targets ask from their threads
        self._rules: tuple | None = None  # (config patterns, Rules, stamps, when found)
        self._plan: tuple | None = None  # (local, remote, keep, the plan for them)
        self._next: tuple | None = None  # (local, remote, keep) after the last batch
        self._claims: dict[tuple[str, str], tuple] = {}  # key -> (batch, local, keep) owed
        self._claims_lock = threading.Lock()

    @classmethod
    def for_command(cls, root: str) -> "Warm":
        """The holder's, when this process is one for ``root``; else an empty one."""
        held = cls.held
        if held is not None and held.root == os.path.realpath(root):
            return held
        return cls(os.path.realpath(root))

    def digest_cache(self) -> "agent.DigestCache":
        if self.cache is None:
            self.cache = agent.load_digest_cache(self.root)
        return self.cache

    def rules(self, project: Project) -> Rules:
        """The tree's rules: the .gitignore files found again only when a look at what the
        last search saw (its directories and .gitignore files) finds a change."""
        key = (tuple(project.exclude), tuple(project.protect))
        kept = self._rules
        if kept is None or kept[0] != key or not unchanged(kept[2], kept[3]):
            stamps: dict = {}
            since = time.time_ns()
            rules = local_rules(str(project.root), project.exclude, project.protect, stamps)
            kept = self._rules = (key, rules, stamps, since)
        rules = kept[1]
        compiled = rules.compiled()
        if self.keep and compiled.seen is None:  # the same rules scan the same tree again
            compiled.seen = {}
        return rules

    def knows(self, target: Target) -> bool:
        return (target.name, target.remote_path or "") in self.remote

    def known(self, target: Target) -> tuple[str, dict[str, Entry]] | None:
        self._take_claims()
        return self.remote.get((target.name, target.remote_path or ""))

    def remember(self, target: Target, tree: RemoteTree) -> None:
        """Keep ``tree`` as the agent sent it (a copy: the command changes its own)."""
        key = (target.name, target.remote_path or "")
        self._claims.pop(key, None)  # what it claimed is in the tree now, or not: it says
        if tree.token:
            self.remote[key] = (tree.token, dict(tree.entries))
        else:
            self.remote.pop(key, None)

    def claim(self, target: Target, batch: dict, local: dict[str, Entry],
              keep: list[str]) -> None:
        """After a batch: the kept remote manifest is to become what the batch says the tree
        now is (``agent.batch_claims``; the agent did the same with its copy, so the next
        request carries only what the batch did not do as it says). ``local``, ``keep``: what
        the batch was planned from (see ``prepare``). Taken in when the manifest is next
        asked for (``known``) or after the answer (``prepare``): off the command's clock
        (20,000 claims of an initial push took 0.05 s)."""
        key = (target.name, target.remote_path or "")
        if key in self.remote:
            self._claims[key] = (batch, local, list(keep))

    def _take_claims(self) -> None:
        with self._claims_lock:
            while self._claims:
                key, (batch, local, keep) = self._claims.popitem()
                kept = self.remote.get(key)
                if kept is not None:
                    claimed = agent.batch_claims(kept[1], batch)
                    self.remote[key] = (kept[0], claimed)
                    self._next = (local, claimed, keep) if self.keep else None

    def prepare(self) -> None:
        """Off the clock (a holder, after its answer): plan for the trees as the last batch
        left them, so that the next command, when neither side changed since, finds that
        plan in the memo (its own call to ``plan`` compares the manifests)."""
        self._take_claims()
        if self._next is not None:
            local, remote, keep = self._next
            self._next = None
            self.plan(local, remote, keep)

    def revision(self, local: dict[str, Entry]) -> str:
        """``plan.revision(local)``, hashed again only for the directories whose entries
        changed since the last call (``plan.Revisions``, which is not thread-safe)."""
        with self._revisions_lock:
            return self._revisions.of(local)

    def plan(self, local: dict[str, Entry], remote: dict[str, Entry], keep: list[str]) -> Plan:
        """``plan.plan(local, remote, keep)`` (a pure function), planned again only for the
        paths whose entries changed since the last call (``plan.replan``; planning 20,000
        paths took 0.025 s). Only a holder's: one command plans each pair of manifests once."""
        if not self.keep:
            return plan(local, remote, keep=keep)
        memo = self._plan
        if memo is None or memo[2] != keep:
            p = plan(local, remote, keep=keep)
        elif memo[0] == local and memo[1] == remote:  # one C-level compare each
            return memo[3]
        else:
            changed = changed_paths(memo[0], local) | changed_paths(memo[1], remote)
            p = (replan(memo[3], changed, local, remote, keep)
                 if len(changed) * 4 < len(local) + len(remote)  # else merging costs more
                 else plan(local, remote, keep=keep))
        self._plan = (dict(local), dict(remote), list(keep), p)
        return p

    def forget(self) -> None:
        """After a failed command: the next one reads the remote in full."""
        self.remote.clear()

    def save(self) -> None:
        """Write the digest cache (only if it changed), as a direct command does at once."""
        if self.cache is not None:
            agent.save_digest_cache(self.root, self.cache)


def _changed_paths(p: Plan) -> list[str]:
    return sorted({u.path for u in p.uploads} | {ln.path for ln in p.links}
                  | {d.path for d in p.dirs} | {c.path for c in p.chmods}
                  | {d.path for d in p.deletes})


class Syncer:
    """One target: its session, the local and remote manifests as last seen, and the rules."""

    def __init__(self, project: Project, target: Target, options: PushOptions = PushOptions(),
                 rules: Rules | None = None, cache: dict | None = None,
                 warm: Warm | None = None):
        self.project = project
        self.warm = warm  # None: a watch's, which keeps its own manifests in memory
        self.target = target
        self.options = options
        self.root = str(project.root)
        self.rules = rules or local_rules(self.root, project.exclude, project.protect)
        self._compiled = self.rules.compiled()
        self.session: Session | None = None
        self.remote: dict[str, Entry] = {}
        self.remote_root = target.remote_path or ""
        self.local: dict[str, Entry] = {}
        self._revision = TouchedRevision()  # of self.local, for a watch (no Warm)
        # the local digest cache: one per process, shared by the targets of a fleet
        self.cache = agent.load_digest_cache(self.root) if cache is None else cache
        self.revision: str | None = None
        self.provisioned = False
        self.needs_restart = restart_matcher(project.restart_on)
        self.imports: list[str] | None = None  # what the serving worker imported, as last told
        self.owed: dict | None = None  # a restart an earlier command committed but never ran
        # The safety policy's memory: losses since the last confirmation (opened with the
        # first remote manifest; see ``plan.judge``), and the confirmation the options carry,
        # spent by the first reconcile (a watch's flag covers its initial reconcile only).
        self.ledger: Ledger | None = None
        self.allow = options.allow_mass_delete
        self.started = False  # the first reconcile has run: the session has started
        self.lost: dict[str, str | None] = {}  # applied losses not yet confirmed
        self._recorded: frozenset[str] = frozenset()  # the losses guard's record holds
        self._keep: list[str] = []  # local paths that could not be read, as last planned
        self.sending = False  # a batch is on its way: whether it committed is not known yet
        self.owes = False  # the last batch committed a restart on record (agent.restart_owed)

    # ---------------------------------------------------------------- connection

    def connect(self, session: Session | None = None) -> RemoteTree:
        """Open the session (or take ``session``, opened already) and read the remote
        manifest."""
        self.close()
        self.session = session or Session.open(self.target,
                                               trust_new=self.options.trust_new_host)
        return self._read_remote()

    def _read_remote(self) -> RemoteTree:
        known = self.warm.known(self.target) if self.warm is not None else None
        tree = self.session.manifest(self.target.remote_path, self.rules.to_wire(),
                                     self.rules.protect_wire(), known)
        if self.warm is not None:
            self.warm.remember(self.target, tree)
        self.remote = tree.entries
        self.remote_root = tree.root
        self.provisioned = tree.provisioned
        self.imports = tree.imports
        self.owed = tree.owed
        return tree

    # ---------------------------------------------------------------- the worker

    def restart_decision(self, result: PushResult, live: str | None = None,
                         nothing_serving: bool = False, owed: bool = True
                         ) -> restart_mod.Decision:
        """Whether ``result`` restarts the worker (``syncagent/restart.py`` decides), given the
        revision the serving worker runs (None: unknown); ``owed=False``: for this batch's own
        changes only, leaving out a restart an earlier command left owed."""
        return restart_mod.decide(result.paths if result.changed else (), self.needs_restart,
                                  result.revision, live, enabled=self.options.restart,
                                  provisioned=self.provisioned, nothing_serving=nothing_serving,
                                  imports=self.imports, scope=self.options.scope,
                                  owed=(self.owed or {}).get("why") if owed else None)

    def restart_wanted(self, result: PushResult) -> bool:
        """One-shot: the decision, asking the remote for its live revision only when a restart
        is otherwise due (a push that returns the tree to the live revision restarts nothing).
        Why is kept in ``result.restart_why``."""
        decision = self.restart_decision(result)
        if decision.restart:
            try:
                worker = self.session.worker(self.remote_root).get("worker") or {}
            except SyncAgentError:  # unknown: the restart step reports the target's trouble
                worker = None
            if worker is not None:
                decision = self.restart_decision(result,
                                                 (worker.get("live") or {}).get("revision"))
        result.restart_why = decision.why
        return decision.restart

    def restart(self, revision: str, session: Session | None = None) -> dict:
        """Restart the worker onto ``revision`` and wait until it is live.

        Raises:
            WorkerStartError: the new code did not start (the log tail is in the message).
        """
        mode = self.options.mode or self.target.restart_mode
        out = (session or self.session).restart(self.remote_root, revision, mode,
                                                self.options.restart_timeout,
                                                self.options.requeue_grace)
        self.owed = None  # the agent settles it with the attempt
        if not out["ok"]:
            serving = out.get("serving")
            note = f" (previous worker still serving: {', '.join(serving)})" if serving else ""
            raise WorkerStartError(f"{self.target.name}: {out['failure']}{note}",
                                   out.get("log_tail", []),
                                   f"{self.remote_root}/.syncagent/logs/worker-"
                                   f"{out.get('colour')}.log")
        return out

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    # ---------------------------------------------------------------- full reconcile

    def reconcile(self, progress: Progress | None = None, local: LocalScan | None = None,
                  remote: RemoteTree | None = None, durations: dict | None = None
                  ) -> PushResult:
        """Scan both trees in full and make the remote equal to the local one."""
        t_start = time.perf_counter()
        durations = {} if durations is None else durations
        if local is None:
            t0 = time.perf_counter()
            local = self.scan_all()
            durations["scan"] = time.perf_counter() - t0
        if remote is None:
            t0 = time.perf_counter()
            remote = self._read_remote()
            durations["manifest"] = time.perf_counter() - t0
        warnings = [f"skipped {path}: {why}" for path, why in local.problems]
        warnings += [f"kept {path} (protected on the remote)"
                     for path in sorted(set(local.protected) | set(remote.protected))]
        result = None
        for _pass in range(MAX_PASSES):
            self.local, self._keep = local.entries, local.unreadable
            t0 = time.perf_counter()
            p = (plan(local.entries, self.remote, keep=local.unreadable) if self.warm is None
                 else self.warm.plan(local.entries, self.remote, local.unreadable))
            durations.setdefault("plan", time.perf_counter() - t0)
            if self.warm is None:  # a watch keeps its manifests: one copy of what is equal
                self.remote = _share_equal(self.remote, self.local)
            if _pass == 0:
                self._check_safety(p)
            rev = self._local_revision()  # once a pass: 0.35 s at 100,000 files
            step = self._apply(p, progress, dry_run=self.options.dry_run,
                               force_marker=remote.revision != rev, rev=rev)
            result = step if result is None else _merge(result, step)
            if self.options.dry_run or not step.unsettled:
                break
            # Some files changed while being sent: rescan and send what they hold now.
            local = self.scan_all()
            remote = self._read_remote()
        else:
            result.warnings.append("files kept changing during the push; push again when "
                                   "they settle")
        result.warnings[:0] = warnings
        if not self.options.dry_run:
            self._start_session()
        durations.setdefault("transfer", 0.0)
        durations["transfer"] += result.durations.get("transfer", 0.0)
        durations["total"] = time.perf_counter() - t_start
        result.durations = durations
        return result

    def _local_revision(self) -> str:
        if self.warm is None:  # a watch's: its local manifest changes in place, batch by batch
            return self._revision.of(self.local)
        return self.warm.revision(self.local)

    def scan_all(self) -> LocalScan:
        """The whole local tree (re-hashing only what the digest cache cannot vouch for). The
        digest cache is written at once by a one-shot command; a holder writes it after its
        answer, a watch once the tree has been quiet for a while (``watch``)."""
        return scan_local(self.root, self.rules, self.cache,
                          save=self.warm is not None and not self.warm.keep)

    # ---------------------------------------------------------------- partial sync

    def sync_paths(self, paths: Iterable[str], fresh: dict | None = None,
                   problems: list | None = None, _pass: int = 1,
                   confirmed: str | None = None) -> PushResult:
        """Send what the filesystem holds now at ``paths`` (and below, for directories).

        Named files are compared by content, never skipped on size and mtime.

        Args:
            fresh, problems: what ``agent.scan_paths`` found at ``paths`` and could not read,
                when the caller has read them already (a watch reads once for all targets).
            confirmed: why this batch's own deletions need no confirmation (``"git"``: git
                made the change and keeps every content it removed; ``plan.judge``'s
                ``confirmed``), or None: judged as any plan.
        """
        t_start = time.perf_counter()
        paths = set(paths)
        problems = [] if problems is None else list(problems)
        p = self.note_paths(paths, fresh, problems)
        result = self._apply(p, None, dry_run=False, force_marker=False,
                             confirmed=confirmed is not None)
        result.warnings[:0] = [f"skipped {path}: {why}" for path, why in problems]
        result.durations["total"] = time.perf_counter() - t_start
        if result.unsettled and _pass < MAX_PASSES:
            result = _merge(result, self.sync_paths(paths, None, None, _pass + 1, confirmed))
        return result

    def save_cache(self) -> None:
        """Write the digest cache, if it changed since it was read or written (a watch: when
        its tree has been quiet for a while, not before each batch's answer)."""
        agent.save_digest_cache(self.root, self.cache)

    def note_paths(self, paths: set[str], fresh: dict | None, problems: list) -> Plan:
        """Take what the filesystem holds at ``paths`` into the local manifest; return the
        plan that brings the remote there (applying it is the caller's business: a halted
        target only takes note)."""
        if fresh is None:
            fresh = agent.scan_paths(self.root, self._compiled, paths, self.cache, problems)
        subtrees = {p for p in paths
                    if any(m.get(p) is not None and m[p].kind == "d"
                           for m in (fresh, self.local, self.remote))}

        def covered(m: dict) -> dict:
            """The entries of ``m`` this batch speaks for: the paths, what lies below the
            directories among them, and (from the fresh scan) their ancestors."""
            out = {p: m[p] for p in paths if p in m}
            out.update((p, m[p]) for p in fresh if p in m)
            if subtrees:
                out.update((p, e) for p, e in m.items() if agent.under_any(p, subtrees))
            return out

        unreadable = [p for p, _ in problems]
        p = plan(fresh, covered(self.remote), keep=unreadable)
        gone = [path for path in covered(self.local) if path not in unreadable]
        for path in gone:
            self.local.pop(path)
        self.local.update(fresh)
        self._revision.touched(gone)
        self._revision.touched(fresh)
        return p

    # ---------------------------------------------------------------- applying

    def _check_safety(self, p: Plan) -> None:
        bad = escaping_links(self.local)
        if bad:
            raise PathEscapeError(
                f"symlink points outside the project root: {bad[0]}"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""),
                hint="make it relative and inside the tree, or exclude it")

    # ---------------------------------------------------------------- the safety policy

    def open_ledger(self) -> Ledger:
        """The losses not yet confirmed: this machine's record (left by an earlier command),
        counted against the remote as it is now."""
        if self.ledger is None:
            record = guard.load(self.root, self.target) or {}
            lost = record.get("lost") or {}
            self.ledger = Ledger.confirmed(self.remote, lost, int(record.get("base") or 0))
            self.lost = {p: d for p, d in lost.items() if p in self.ledger.lost}
            self._recorded = frozenset(lost)
        return self.ledger

    def judge(self, p: Plan, confirmed: bool = False) -> Verdict:
        """``plan.judge`` on ``p`` against the remote as known (``confirmed``: see there).

        Raises:
            MassDeleteError: refused (exit 3).
        """
        verdict = judge(p, self.remote, self.open_ledger(),
                        ratio=self.project.mass_delete_ratio, minimum=MASS_DELETE_MIN,
                        allow=self.allow, confirmed=confirmed)
        if verdict.refused:
            raise MassDeleteError(verdict.count, verdict.base, self.target.name,
                                  hint=guard.way_out(self.target.name),
                                  paths=tuple(sorted(verdict.lost)[:10]))
        return verdict

    def judge_whole(self) -> Verdict:
        """The verdict on the whole difference between the trees as known (no I/O): what
        a halted watch asks after each batch to know whether the files are back."""
        return judge(plan(self.local, self.remote), self.remote, self.open_ledger(),
                     ratio=self.project.mass_delete_ratio, minimum=MASS_DELETE_MIN)

    def _start_session(self) -> None:
        """After the first reconcile: a confirmation is spent (what follows is judged again),
        and a tree that now holds no unconfirmed loss is the confirmed one (the ratio's base
        becomes its file count, fixed for the rest of the session)."""
        if not self.started:
            self.started, self.allow = True, False
            if not self.lost:
                self.ledger = Ledger.confirmed(self.remote)

    def _settle(self, verdict: Verdict, confirmed: bool = False) -> None:
        """Keep the ledger of an applied plan, and the record when its losses changed."""
        if self.allow:  # the user confirmed: the remote as it is now is the new baseline,
            self.ledger, self.lost = Ledger.confirmed(self.remote), {}
            self.record()  # and a halt (a watch's, elsewhere) is lifted
        else:
            self.ledger, self.lost = verdict.ledger, dict(verdict.lost)
            # (a confirmed batch also moves the base the record keeps)
            if frozenset(self.lost) != self._recorded or (confirmed and self.lost):
                self.record()

    def record(self, halted: dict | None = None) -> None:
        """Write (or clear) this target's record: the unconfirmed losses, and a halt."""
        if self.lost or halted:
            guard.save(self.root, self.target, self.open_ledger().base, self.lost, halted)
        else:
            guard.clear(self.root, self.target)
        self._recorded = frozenset(self.lost)

    def unconfirm(self) -> None:
        """Forget the ledger: the next reconcile opens it again from the record and the
        remote, as a session start (after the user confirmed elsewhere)."""
        self.ledger, self.lost, self.started = None, {}, False

    def _apply(self, p: Plan, progress: Progress | None, dry_run: bool,
               force_marker: bool, confirmed: bool = False, rev: str | None = None
               ) -> PushResult:
        rev = rev or self._local_revision()
        result = PushResult(target=self.target.name, remote_root=self.remote_root, revision=rev,
                            changed=not p.empty, dry_run=dry_run, local_files=len(self.local),
                            plan=p, paths=_changed_paths(p))
        verdict = self.judge(p, confirmed)
        if dry_run or (p.empty and not force_marker):
            self.revision = rev
            if not dry_run:
                self._settle(verdict, confirmed)
            return result
        # where links lead changes only with links, or directories where something was deleted
        bad = escaping_links(self.local) if p.links or (p.dirs and p.deletes) else []
        if bad:
            raise PathEscapeError(f"symlink points outside the project root: {bad[0]}")
        total = p.bytes

        def report(sent: int, files: int) -> None:
            if progress:
                progress(sent, total, files, len(p.uploads))

        # decided before sending, so that the commit keeps it even if the restart never runs
        # (this batch's own reason: what an earlier one owed is on record already)
        owes = self.restart_decision(result, owed=False)
        t0 = time.perf_counter()
        self.sending = True
        batch = p.to_wire(rev, len(self.local))
        out = self.session.apply(self.target.remote_path, self.root, p, rev, len(self.local),
                                 report, self.rules.protect_wire(),
                                 restart=owes.why if owes.restart else None, local=self.local,
                                 batch=batch)
        self.sending, self.owes = False, owes.restart
        if self.warm is not None:  # as the agent did with the manifest it sent
            self.warm.claim(self.target, batch, self.local, self._keep)
        result.durations["transfer"] = time.perf_counter() - t0
        self.remote = apply_plan(self.remote, p, self.local)
        self.revision = rev
        self._settle(verdict, confirmed)
        result.files_sent, result.bytes_sent, result.deleted = (
            out["written"], out["bytes"], out["deleted"])
        result.links, result.dirs, result.chmods = len(p.links), len(p.dirs), len(p.chmods)
        result.warnings += [f"kept remote directory {k}/: it still holds files that are not "
                            "synced (excluded or protected)" for k in out.get("kept", [])]
        result.warnings += [f"kept {r['path']} (protected on the remote: {r['op']} refused)"
                            for r in out.get("refused", [])]
        result.warnings += [_undone_warning(u) for u in out.get("undone", [])]
        for u in out.get("undone", []):  # what the remote holds there now: not what we sent
            if u["code"] == "EISDIR":
                self.remote[u["path"]] = Entry("d", mode=0)
            elif u["op"] != "delete":
                self.remote.pop(u["path"], None)
        result.unsettled = len(out["changed"])
        if "imports" in out:  # an agent that knows: what the serving worker imports now
            self.imports = out["imports"]
        if out["changed"]:
            for path in out["changed"]:  # what the remote holds is unknown: re-check next time
                e = self.remote.get(path)
                if e is not None:
                    self.remote[path] = Entry(e.kind, e.size, e.mtime_ns, e.mode, None, e.link)
        return result


def _undone_warning(u: dict) -> str:
    """What a commit left as it was on the remote (``agent._commit``), as the user reads it."""
    path = u["path"]
    if u["code"] == "EISDIR":
        return (f"not sent: {path} (a remote directory {path}/ stands there, holding files "
                "that are not synced: move them, then push again)")
    what = {"write": "not sent", "link": "not linked", "chmod": "mode not changed",
            "delete": "not deleted"}.get(u["op"], u["op"])
    return f"{what}: {path} (on the remote: {u['why']})"


def _share_equal(remote: dict[str, Entry], local: dict[str, Entry]) -> dict[str, Entry]:
    """The remote manifest, holding the local Entry object, and the local path string,
    wherever both sides agree (planning compares kind, mode, digest and link only): a
    100k-file watch keeps one copy of each, not two."""
    out = {}
    for path, mine in local.items():
        e = remote.get(path)
        if e is not None:
            same = (mine.kind, mine.mode, mine.digest, mine.link) == (
                e.kind, e.mode, e.digest, e.link)
            out[path] = mine if same else e
    if len(out) != len(remote):  # remote-only paths keep their own
        out.update((p, e) for p, e in remote.items() if p not in local)
    return out


def _merge(a: PushResult, b: PushResult) -> PushResult:
    for name in ("files_sent", "bytes_sent", "deleted", "links", "dirs", "chmods"):
        setattr(a, name, getattr(a, name) + getattr(b, name))
    a.changed = a.changed or b.changed
    a.revision, a.local_files = b.revision, b.local_files
    a.paths = sorted(set(a.paths) | set(b.paths))
    a.warnings += b.warnings
    a.unsettled = b.unsettled
    a.durations["transfer"] = a.durations.get("transfer", 0) + b.durations.get("transfer", 0)
    return a


@dataclass
class FleetResult:
    """A push to several targets: each one's result, or the error that stopped it."""

    results: dict[str, PushResult] = field(default_factory=dict)
    errors: dict[str, SyncAgentError] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return max((e.exit_code for e in self.errors.values()), default=0)


def push_many(project: Project, targets: list[Target], options: PushOptions = PushOptions(),
              policy: str = "rolling", progress: Progress | None = None,
              warm: Warm | None = None) -> FleetResult:
    """Make every target equal to the local tree, then restart the workers that need it.

    The local tree is scanned and hashed once; connections and transfers run concurrently,
    one connection per target. Restarts follow ``policy``: ``rolling`` restarts one target at
    a time, the next only once the previous reports the new revision live (and stops at the
    first that fails to start, so broken code never takes the whole fleet down);
    ``parallel`` restarts them all at once. A target that fails does not stop the others.

    Args:
        progress: called as for :func:`push`; only used with a single target.
        warm: what is known of both trees from earlier commands (default: a holder's, in a
            holder process; else nothing).
    """
    t_start = time.perf_counter()
    warm = Warm.for_command(str(project.root)) if warm is None else warm
    fleet = FleetResult()
    trees: dict[str, tuple[RemoteTree, float]] = {}
    syncers: list[Syncer] = []
    handed: set[str] = set()  # targets whose opened session a Syncer owns (and closes)
    pool = ThreadPoolExecutor(max_workers=len(targets))
    # The handshake and the agent start need no rules: they begin before anything local.
    opening = {t.name: pool.submit(Session.open, t, trust_new=options.trust_new_host)
               for t in targets}

    def connect(s: Syncer) -> None:
        session = opening[s.target.name].result()
        handed.add(s.target.name)
        trees[s.target.name] = (s.connect(session), time.perf_counter() - t_start)

    def reconcile(s: Syncer) -> None:
        tree, t_connect = trees[s.target.name]
        durations = {"scan": t_scan, "connect": t_connect}
        fleet.results[s.target.name] = s.reconcile(
            progress if len(syncers) == 1 else None, local=local, remote=tree,
            durations=durations)

    def restart(s: Syncer) -> None:
        result = fleet.results[s.target.name]
        t0 = time.perf_counter()
        result.restart = s.restart(result.revision)
        result.durations["restart"] = time.perf_counter() - t0

    try:
        rules = warm.rules(project)
        cache = warm.digest_cache()
        syncers += [Syncer(project, t, options, rules, cache, warm) for t in targets]
        connecting = _each(pool, connect, syncers)
        t0 = time.perf_counter()
        local = syncers[0].scan_all()  # once, while the connections come up
        warm.revision(local.entries)  # once here: the targets' threads then find it
        t_scan = time.perf_counter() - t0
        up = _collect(connecting, fleet)
        _collect(_each(pool, reconcile, up), fleet)
        synced = [s for s in up if s.target.name not in fleet.errors]
        wanted = [s for s in synced if s.restart_wanted(fleet.results[s.target.name])]
        _warn_unprovisioned(synced, fleet, options)
        _restart_in_waves(pool, restart, wanted, policy, fleet)
    except KeyboardInterrupt:  # Ctrl-C: say what stands, not just "aborted"
        for s in syncers:  # a batch still on its way ends here, uncommitted
            if s.session is not None:
                s.session.abort()
        raise Interrupted(_what_stands(fleet, syncers)) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for s in syncers:
            s.close()
        for name, future in opening.items():  # opened, but never handed to a Syncer
            if name not in handed and future.done() and not future.exception():
                future.result().close()
    total = time.perf_counter() - t_start
    for result in fleet.results.values():
        result.durations["total"] = total
    return fleet


def _warn_unprovisioned(synced: list[Syncer], fleet: FleetResult, options: PushOptions) -> None:
    for s in synced:
        if options.restart and not s.provisioned and fleet.results[s.target.name].changed:
            fleet.results[s.target.name].warnings.append(
                f"no worker provisioned on {s.target.name}: synced only "
                f"(run `syncagent provision {s.target.name}`)")


def _restart_in_waves(pool: ThreadPoolExecutor, restart, wanted: list[Syncer], policy: str,
                      fleet: FleetResult) -> None:
    """Restart ``wanted`` in the fleet order ``restart.waves`` gives; a rolling restart stops
    at the first target that fails, and the rest are reported as not restarted."""
    names = [s.target.name for s in wanted]
    by_name = {s.target.name: s for s in wanted}
    done = 0
    for wave in restart_mod.waves(policy, names):
        _collect(_each(pool, restart, [by_name[n] for n in wave]), fleet)
        done += len(wave)
        failed = next((n for n in wave if n in fleet.errors), None)
        skipped = restart_mod.stopped_after(policy, failed, names[done:]) if failed else {}
        for name, why in skipped.items():
            fleet.results[name].warnings.append(
                f"not restarted: the rolling restart stopped after {failed} failed")
            fleet.errors[name] = OperationalError(why)
        if skipped:
            return


def _what_stands(fleet: FleetResult, syncers: list[Syncer]) -> str:
    """After Ctrl-C: what each target holds now, in one line (a committed batch stays, its
    restart is on record as owed; a batch cut off while sending leaves nothing)."""
    parts = []
    for s in syncers:
        name, result = s.target.name, fleet.results.get(s.target.name)
        if result is None:
            parts.append(f"{name}: batch cut off while sending; the remote keeps its previous "
                         "tree unless it had just committed (`syncagent status` shows which)"
                         if s.sending else f"{name}: nothing was sent")
        elif not result.changed or result.dry_run:
            parts.append(f"{name}: nothing to send")
        elif result.restart is not None or not s.owes:
            parts.append(f"{name}: revision {result.revision[:7]} committed")
        else:
            parts.append(f"{name}: revision {result.revision[:7]} committed, its worker "
                         "restart cut off (owed: the next push or watch runs it; "
                         "`syncagent status` shows it)")
    return "interrupted; " + "; ".join(parts)


def _each(pool: ThreadPoolExecutor, fn, syncers: list[Syncer]) -> dict:
    return {pool.submit(fn, s): s for s in syncers}


def _collect(futures: dict, fleet: FleetResult) -> list[Syncer]:
    """Wait for ``futures``; typed errors are recorded per target. Returns the ones that ran."""
    ok = []
    for future, s in futures.items():
        try:
            future.result()
            ok.append(s)
        except SyncAgentError as e:
            fleet.errors[s.target.name] = e
    return ok


def push(project: Project, target: Target, options: PushOptions = PushOptions(),
         progress: Progress | None = None) -> PushResult:
    """Make the remote tree under ``target.remote_path`` equal to the local tree (one-shot),
    then restart its worker if code changed.

    The connection (key exchange, agent start, remote manifest) comes up while the local tree
    is scanned: both take about as long.

    Raises:
        SyncAgentError subclasses: connection, agent, safety (mass delete, path escape),
        WorkerStartError.
    """
    fleet = push_many(project, [target], options, progress=progress)
    if target.name in fleet.errors:
        raise fleet.errors[target.name]
    return fleet.results[target.name]
