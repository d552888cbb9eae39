"""Looking at and acting on a target's worker: status, restart, logs.

Each call opens the target's session, asks its agent, and returns plain data for the CLI.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from typing import Callable

from concurrent.futures import ThreadPoolExecutor

from . import guard
from . import restart as restart_mod
from .config import Project, Target
from .errors import OperationalError, SyncAgentError
from .manifest import local_rules, scan_local
from .plan import revision
from .push import PushOptions, Syncer
from .session import Session

__all__ = ["status", "restart", "restart_many", "logs", "doctor"]


# Will the worker come back after a reboot? Asked of the shipped runtime (stdlib only).
_BOOT = ("import json, os, sys; r = os.path.realpath(os.path.expanduser(sys.argv[1])); "
         "sys.path.insert(0, os.path.join(r, '.syncagent', 'runtime')); "
         "from worker.boot import state; print(json.dumps(state(r)))")


def _boot_state(session: Session, target: Target) -> dict:
    rc, out, _ = session.run(f"{shlex.quote(target.python)} -c {shlex.quote(_BOOT)} "
                             f"{shlex.quote(target.remote_path)}", timeout=30)
    try:
        return json.loads(out.strip().splitlines()[-1]) if rc == 0 else {"boot": "unknown"}
    except (ValueError, IndexError):
        return {"boot": "unknown"}


def status(project: Project, target: Target) -> dict:
    """Local vs pushed vs live revision, the worker's programs, whether it comes back after a
    reboot, and the remote's paths.

    ``failing`` holds the failed start of the pushed revision (its ``error`` line, ``count``,
    ``colour``), and ``exit_code`` is then 1, as when supervisord is down; a target a watch
    halted for safety (``halted``) gives 3.
    """
    rules = local_rules(str(project.root), project.exclude)
    local = revision(scan_local(str(project.root), rules).entries)
    with Session.open(target) as session:
        body = session.worker(target.remote_path)
        boot = _boot_state(session, target) if body.get("worker") is not None else {}
    pushed = (body.get("revision") or {}).get("revision")
    halted_record = halted(project, target)
    worker = body.get("worker")
    live = (worker or {}).get("live") or {}
    failing = (worker or {}).get("failing")
    return {
        "target": target.name,
        "remote_root": target.remote_path,
        "local_revision": local,
        "pushed_revision": pushed,
        "live_revision": live.get("revision"),
        "live_node": live.get("node"),
        "live_colour": live.get("colour"),
        "in_sync": local == pushed,
        "live": bool(pushed) and live.get("revision") == pushed,
        "provisioned": worker is not None,
        "supervisord": (worker or {}).get("supervisord"),
        "programs": {c: {"state": p["state"], "pid": p["pid"],
                         "revision": (p.get("marker") or {}).get("revision")}
                     for c, p in ((worker or {}).get("programs") or {}).items()},
        "standby": _standby(worker),
        "supervisorctl": (worker or {}).get("supervisorctl"),
        "last_restart": (worker or {}).get("last_restart"),
        "boot": boot.get("boot"),
        "boot_unit": boot.get("unit"),
        "halted": halted_record,
        # the pushed revision failed to start (the launcher's error line, secrets masked)
        "failing": failing,
        # a committed push whose restart never ran (agent.restart_owed): the next push runs it
        "owed": body.get("owed"),
        # 1: the pushed code does not run (it fails to start, or supervisord is gone);
        # 3: a watch halted the target for safety
        "exit_code": (1 if failing or (worker or {}).get("supervisord") == "down" else
                      3 if halted_record else 0),
    }


def _standby(worker: dict | None) -> dict | None:
    """The parked standby slot (the next restart starts warm from it when ``fresh``)."""
    found = (worker or {}).get("standby")
    if not found:
        return None
    return {k: found.get(k) for k in ("colour", "state", "fresh", "pid", "modules", "import_s")}


def halted(project: Project, target: Target) -> dict | None:
    """The halt a `watch` recorded on this machine for ``target`` (a mass delete it refused):
    counts, since when, and the way out. None when the target is not halted."""
    record = guard.load(project.root, target)
    return record.halted if record else None


def restart(project: Project, target: Target, mode: str | None = None,
            timeout: float = 120.0) -> dict:
    """Restart the worker onto the pushed revision and wait until it is live.

    Raises:
        OperationalError: nothing pushed or no worker provisioned; WorkerStartError.
    """
    syncer = Syncer(project, target, PushOptions(mode=mode, restart_timeout=timeout))
    try:
        syncer.connect()
        if not syncer.provisioned:
            raise OperationalError(f"{target.name}: no worker provisioned",
                                   hint=f"run `syncagent provision {target.name}`")
        pushed = (syncer.session.worker(syncer.remote_root).get("revision") or {}).get(
            "revision")
        if not pushed:
            raise OperationalError(f"{target.name}: nothing pushed yet",
                                   hint=f"run `syncagent push {target.name}`")
        t0 = time.perf_counter()
        out = syncer.restart(pushed)
        out["seconds"] = round(time.perf_counter() - t0, 4)
        out["target"] = target.name
        return out
    finally:
        syncer.close()


def restart_many(project: Project, targets: list[Target], mode: str | None = None,
                 timeout: float = 120.0, policy: str = "rolling"
                 ) -> tuple[dict[str, dict], dict[str, SyncAgentError]]:
    """:func:`restart` on each target, in the fleet order ``syncagent/restart.py`` gives
    (rolling: one at a time, stopping at the first that fails; parallel: all at once).

    Returns:
        ({target: restart answer}, {target: its error}); a target a rolling restart did not
        reach has an OperationalError saying why.
    """
    by_name = {t.name: t for t in targets}
    names = list(by_name)
    done: dict[str, dict] = {}
    errors: dict[str, SyncAgentError] = {}

    def one(name: str) -> None:
        try:
            done[name] = restart(project, by_name[name], mode, timeout)
        except SyncAgentError as e:
            errors[name] = e

    reached = 0
    with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        for wave in restart_mod.waves(policy, names):
            list(pool.map(one, wave))
            reached += len(wave)
            failed = next((n for n in wave if n in errors), None)
            skipped = (restart_mod.stopped_after(policy, failed, names[reached:])
                       if failed else {})
            errors.update({n: OperationalError(why) for n, why in skipped.items()})
            if skipped:
                break
    return done, errors


def logs(target: Target, emit: Callable[[str], None], follow: bool = False,
         lines: int = 50, stop: threading.Event | None = None, interval: float = 0.5) -> None:
    """Print the live worker's log (supervisord's program log); ``follow`` keeps reading."""
    stop = stop or threading.Event()
    with Session.open(target) as session:
        body = session.logs(target.remote_path, None, lines)
        for line in body["lines"]:
            emit(line)
        offset = body["offset"]
        while follow and not stop.wait(interval):
            body = session.logs(target.remote_path, offset, 10_000)
            for line in body["lines"]:
                emit(line)
            offset = body["offset"]


def doctor(target: Target) -> tuple[int, dict]:
    """Run ``python -m worker doctor --json`` on the remote, in the provisioned venv.

    Returns:
        (its exit code: 0 ok, 1 a check failed, 2 invalid .env.worker; its JSON report).
    """
    import json
    import shlex

    with Session.open(target) as session:
        body = session.worker(target.remote_path)
        worker = body.get("worker")
        if worker is None:
            raise OperationalError(f"{target.name}: no worker provisioned",
                                   hint=f"run `syncagent provision {target.name}`")
        root = body.get("root") or target.remote_path
        python = worker["supervisorctl"].split()[0].rsplit("/", 1)[0] + "/python"
        runtime = f"{root}/.syncagent/runtime"
        code, out, err = session.run(
            f"cd {shlex.quote(root)} && PYTHONPATH={shlex.quote(runtime)} "
            f"{shlex.quote(python)} -m worker doctor --json", timeout=120)
    try:
        return code, json.loads(out)
    except ValueError:
        raise OperationalError(f"{target.name}: doctor did not run: "
                               f"{(err.strip().splitlines() or [f'exit {code}'])[-1]}") from None
