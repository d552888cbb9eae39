"""One-shot reconcile of the local tree onto one target: scan, plan, one batch, verify."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import Project, Target
from .errors import MassDeleteError, PathEscapeError
from .ignore import Rules
from .manifest import LocalScan, local_rules, scan_local
from .plan import Plan, escaping_links, plan, revision
from .session import RemoteTree, Session

__all__ = ["PushOptions", "PushResult", "push", "MASS_DELETE_MIN"]

MASS_DELETE_MIN = 20
MAX_PASSES = 3  # files that change while being sent get another pass


@dataclass(frozen=True)
class PushOptions:
    dry_run: bool = False
    restart: bool = True
    allow_mass_delete: bool = False
    trust_new_host: bool = False


@dataclass
class PushResult:
    target: str
    remote_root: str
    revision: str
    changed: bool
    dry_run: bool
    files_sent: int = 0
    bytes_sent: int = 0
    deleted: int = 0
    links: int = 0
    dirs: int = 0
    chmods: int = 0
    local_files: int = 0
    plan: Plan | None = None
    warnings: list[str] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)
    restart: dict | None = None  # filled by the worker restart step (not yet provisioned)

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "plan"}
        out["durations"] = {k: round(v, 4) for k, v in self.durations.items()}
        if self.dry_run and self.plan is not None:
            out["plan"] = list(self.plan.lines())
        return out


def _check_safety(p: Plan, remote: RemoteTree, local: LocalScan, ratio: float,
                  allow_mass_delete: bool) -> None:
    bad = escaping_links(local.entries)
    if bad:
        raise PathEscapeError(f"symlink points outside the project root: {bad[0]}"
                              + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""),
                              hint="make it relative and inside the tree, or exclude it")
    remote_files = sum(1 for e in remote.entries.values() if e.kind != "d")
    if (not allow_mass_delete and p.file_deletes > MASS_DELETE_MIN
            and p.file_deletes > ratio * remote_files):
        raise MassDeleteError(p.file_deletes, remote_files)


def _connect_and_list(target: Target, rules: Rules, trust_new: bool, out: dict) -> None:
    """Runs in a thread while the local tree is scanned: both take about as long."""
    try:
        t0 = time.perf_counter()
        session = Session.open(target, trust_new=trust_new)
        out["session"] = session
        out["connect"] = time.perf_counter() - t0
        out["remote"] = session.manifest(target.remote_path, rules.to_wire())
        out["manifest"] = time.perf_counter() - t0 - out["connect"]
    except BaseException as e:  # re-raised in the caller's thread
        out["error"] = e


def push(project: Project, target: Target, options: PushOptions = PushOptions(),
         progress: Callable[[int, int, int, int], None] | None = None) -> PushResult:
    """Make the remote tree under ``target.remote_path`` equal to the local tree.

    Args:
        project: the local root and its configuration.
        target: a resolved target (``remote_path`` set).
        options: dry run, restart, safety overrides.
        progress: called with (bytes sent, bytes total, files sent, files total).

    Returns:
        What was done (or, with ``dry_run``, what would be), with per-stage durations.

    Raises:
        SyncAgentError subclasses: connection, agent, safety (mass delete, path escape).
    """
    t_start = time.perf_counter()
    root = str(project.root)
    rules = local_rules(root, project.exclude)
    remote_out: dict = {}
    worker = threading.Thread(target=_connect_and_list,
                              args=(target, rules, options.trust_new_host, remote_out),
                              daemon=True)
    worker.start()
    t0 = time.perf_counter()
    local = scan_local(root, rules)
    t_scan = time.perf_counter() - t0
    worker.join()
    if "error" in remote_out:
        if "session" in remote_out:
            remote_out["session"].close()
        raise remote_out["error"]
    session: Session = remote_out["session"]
    try:
        return _push_with(session, project, target, options, rules, local,
                          remote_out["remote"], progress,
                          {"scan": t_scan, "connect": remote_out["connect"],
                           "manifest": remote_out["manifest"]}, t_start)
    finally:
        session.close()


def _push_with(session: Session, project: Project, target: Target, options: PushOptions,
               rules: Rules, local: LocalScan, remote: RemoteTree, progress, durations: dict,
               t_start: float) -> PushResult:
    root = str(project.root)
    warnings = [f"skipped {path}: {why}" for path, why in local.problems]
    totals = {"files_sent": 0, "bytes_sent": 0, "deleted": 0, "links": 0, "dirs": 0,
              "chmods": 0}
    first_plan = None
    changed_any = False
    rev = revision(local.entries)
    t_transfer = 0.0
    for _pass in range(MAX_PASSES):
        t0 = time.perf_counter()
        p = plan(local.entries, remote.entries, keep=local.unreadable)
        durations.setdefault("plan", time.perf_counter() - t0)
        first_plan = first_plan or p
        if _pass == 0:
            _check_safety(p, remote, local, project.mass_delete_ratio, options.allow_mass_delete)
        if options.dry_run:
            break
        if p.empty and remote.revision == rev:
            break
        t0 = time.perf_counter()
        total_bytes = p.bytes

        def report(sent: int, files: int, _total=total_bytes, _n=len(p.uploads)) -> None:
            if progress:
                progress(sent, _total, files, _n)

        result = session.apply(target.remote_path, root, p, rev, len(local.entries), report)
        t_transfer += time.perf_counter() - t0
        changed_any = changed_any or not p.empty
        totals["files_sent"] += result["written"]
        totals["bytes_sent"] += result["bytes"]
        totals["deleted"] += result["deleted"]
        totals["links"] += len(p.links)
        totals["dirs"] += len(p.dirs)
        totals["chmods"] += len(p.chmods)
        warnings += [f"kept remote directory {k}/: it holds protected files"
                     for k in result.get("kept", [])]
        if not result["changed"]:
            break
        # Some files changed while being sent: rescan and send what they hold now.
        local = scan_local(root, rules)
        rev = revision(local.entries)
        remote = session.manifest(target.remote_path, rules.to_wire())
    else:
        warnings.append("files kept changing during the push; run it again when they settle")
    durations["transfer"] = t_transfer
    # The worker restart (when options.restart and changed_any) plugs in here, while `session`
    # is still open: only after a whole batch has been committed.
    durations["total"] = time.perf_counter() - t_start
    return PushResult(
        target=target.name, remote_root=remote.root, revision=rev, changed=changed_any,
        dry_run=options.dry_run, local_files=len(local.entries), plan=first_plan,
        warnings=warnings, durations=durations, **totals,
    )
