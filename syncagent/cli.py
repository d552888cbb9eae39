"""The ``syncagent`` command: parse, call one library function, render.

Typed errors become exit codes here and only here: 0 ok, 1 operational, 2 usage or config,
3 refused for safety.

Start-up is part of every command's time, so this module imports only click and the light
modules that declare options (config, errors). Each command imports what it uses (paramiko via
push/transport, watchdog via watch, rich for rendering) inside its own body: ``--help`` and
``--version`` load none of them, and a command that needs no SSH never loads paramiko
(``tests/test_push.py::test_version_and_help_import_nothing_heavy`` keeps it so).
"""

from __future__ import annotations

import base64
import json
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from . import __version__
from .config import (CONFIG_NAME, INIT_TEMPLATE, RESTART_MODES, RESTART_POLICIES, Project,
                     Target, expand_specs, find_root, load_project, resolve_target)
from .errors import ConfigError, SyncAgentError, mass_delete_counts

if TYPE_CHECKING:  # imported by the commands that use them (see the module docstring)
    from .push import PushResult

__all__ = ["cli", "main"]


# A file name may hold anything but "/" and NUL: a newline (which would fake a line of output),
# a terminal escape, or bytes that are not UTF-8 (Python keeps them as lone surrogates, which a
# strict UTF-8 stdout refuses to encode). Shown escaped, a name stays on its one line.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _shown(text: str) -> str:
    """``text`` as one printable line: control characters and undecodable bytes escaped
    (``new\\nline.txt``, ``bad\\udcff.txt``)."""
    return _escaped(_UNPRINTABLE, text)


def _escaped(pattern: re.Pattern, text: str) -> str:
    return pattern.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


# --json: a lone surrogate is legal in Python's JSON but refused by strict parsers (and by
# UTF-8 itself), so the output never holds one. See the README's "--json and file names".
_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogates(text: str) -> str:
    return _escaped(_SURROGATE, text)


def _raw_b64(text: str) -> str:
    """The bytes ``text`` was decoded from (a file name's, with surrogateescape), base64."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no byte decodes to: keep it as it came
        raw = text.encode("utf-8", "surrogatepass")
    return base64.b64encode(raw).decode("ascii")


def _raw_form(value):
    """``<field>_b64`` for a field holding undecodable bytes (a string, or a list of them:
    one entry per item, null for a clean one); None when the field is clean."""
    if isinstance(value, str):
        return _raw_b64(value) if _SURROGATE.search(value) else None
    if isinstance(value, (list, tuple)) and any(isinstance(v, str) and _SURROGATE.search(v)
                                                for v in value):
        return [_raw_form(v) if isinstance(v, str) else None for v in value]
    return None


def _json_safe(value):
    """``value`` with every string valid Unicode: undecodable bytes escaped as the text output
    escapes them (``bad\\udcff.txt``), the exact bytes beside them in ``<field>_b64``."""
    if isinstance(value, str):
        return _escape_surrogates(value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            name = _escape_surrogates(key) if isinstance(key, str) else key
            out[name] = _json_safe(item)
            raw = _raw_form(item)
            if raw is not None:
                out[f"{name}_b64"] = raw
        return out
    return value


def _dumps(value) -> str:
    """What every ``--json`` prints: strict JSON (see :func:`_json_safe`)."""
    return json.dumps(_json_safe(value))


def _project(path: str | None) -> Project:
    return load_project(find_root(explicit=path))


def _targets(project: Project, specs: tuple[str, ...], all_: bool, remote_path: str | None,
             identity: str | None) -> list[Target]:
    names = expand_specs(project, specs, all_)
    if remote_path and len(names) > 1:
        raise ConfigError("--remote-path applies to a single TARGET")
    return [resolve_target(s, project, remote_path=remote_path, identity=identity) for s in names]


def _remote_path_given(ctx, param, value: str | None) -> str | None:
    """An empty --remote-path (e.g. an unset shell variable) is a mistake, never "the
    default": refuse it rather than push to another directory than the user named."""
    if value is not None and not value.strip():
        raise click.BadParameter("must not be empty (leave the option out for the default)")
    return value


def common_target_options(f):
    """Options shared by commands that act on targets (the interface contract)."""
    for option in reversed([
        click.option("--path", "path", type=click.Path(file_okay=False), default=None,
                     help="Local project root (default: nearest dir with syncagent.toml, or .)."),
        click.option("--remote-path", default=None, callback=_remote_path_given,
                     help="Remote project root for the target."),
        click.option("--identity", type=click.Path(dir_okay=False), default=None,
                     help="SSH private key to use."),
        click.option("--all", "all_", is_flag=True, help="Every configured target."),
        click.option("--trust-new-host", is_flag=True,
                     help="Record an unknown host key in known_hosts (never a changed one)."),
    ]):
        f = option(f)
    return f


def _holder_option(f):
    return click.option("--no-holder", is_flag=True,
                        help="Run directly: neither use nor leave a background holder.")(f)


def _via_holder(project: Project, resolved: list[Target], no_holder: bool,
                fleet: bool = False) -> None:
    """Hand the whole command to the holder of its target (``fleet``: of its targets, however
    many) when one serves it, and exit with its answer; return when none does (the command
    then runs here)."""
    from . import holder

    argv = (click.get_current_context().obj or {}).get("argv")
    if (argv is None or (len(resolved) != 1 and not fleet)
            or not holder.enabled(project, no_holder)):
        return
    answer = holder.forward(project.root, resolved, argv)
    if answer is not None:
        click.echo(answer.out, nl=False)
        click.echo(answer.err, nl=False, err=True)
        sys.exit(answer.code)


def _leave_holder(project: Project, resolved: list[Target], no_holder: bool,
                  fleet: bool = False, warm_up: bool = False) -> None:
    """After a direct run for one target (``fleet``: for its targets, however many): start
    their holder for the commands that follow (``warm_up``: after a push, it walks both
    trees before it serves, for the next push)."""
    from . import holder

    if ((len(resolved) == 1 or fleet) and holder.enabled(project, no_holder)
            and (click.get_current_context().obj or {}).get("argv") is not None):
        why = holder.spawn(project, resolved, warm_up)
        if why:
            _warn(f"no holder for the next commands: {why}")


class _LazyProgress:
    """A rich progress bar that appears only once a transfer has run for a second."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled = label, enabled
        self.t0 = time.monotonic()
        self.bar = None
        self.task = None

    def __call__(self, sent: int, total: int, files: int, nfiles: int) -> None:
        if not self.enabled or (self.bar is None and time.monotonic() - self.t0 < 1.0):
            return
        if self.bar is None:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(),
                                console=Console(stderr=True),
                                transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=total)
        self.bar.update(self.task, completed=sent,
                        description=f"{self.label} {files}/{nfiles} files")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _summary(r: PushResult) -> str:
    if r.dry_run:
        return (f"{r.target}: dry run: {len(r.plan.uploads)} to send "
                f"({r.plan.bytes:,} B), {len(r.plan.deletes)} to delete, "
                f"{len(r.plan.chmods)} mode changes -> {r.remote_root}")
    ms = r.durations.get("total", 0) * 1000
    if not r.changed:
        return f"{r.target}: up to date, revision {r.revision[:7]} ({ms:.0f} ms)"
    parts = [f"{r.files_sent} files ({r.bytes_sent:,} B) sent"]
    if r.deleted:
        parts.append(f"{r.deleted} deleted")
    if r.chmods:
        parts.append(f"{r.chmods} mode changes")
    if r.links:
        parts.append(f"{r.links} links")
    line = (f"{r.target}: {', '.join(parts)} -> {r.remote_root}, revision {r.revision[:7]} "
            f"({ms:.0f} ms)")
    if r.restart:
        line += "\n" + _live_line(r.target, r.revision, r.restart["timings"],
                                  r.durations.get("transfer", 0.0))
    elif r.restart_why:
        line += f"\n{r.target}: synced, no restart: {r.restart_why}"
    return line


def _scope(project: Project, any_change: bool) -> str:
    return "any" if any_change else project.restart_scope


def _live_line(target: str, rev: str, timings: dict, sync: float | None = None) -> str:
    """"revision 3fa2c1 live on gpu in 1.2 s (sync 40 ms, start 1.1 s)"."""
    parts = [] if sync is None else [f"sync {sync * 1000:.0f} ms"]
    if "stop" in timings:
        parts.append(f"stop {timings['stop']:.1f} s")
    parts.append(f"start {timings.get('start', 0):.1f} s")
    total = timings.get("total", 0) + (sync or 0)
    return f"revision {rev[:7]} live on {target} in {total:.1f} s ({', '.join(parts)})"


def _env_pairs(ctx, param, value):
    """``--env KEY=VALUE`` (repeatable) -> pairs; the message never shows a value."""
    try:
        from .provision import parse_env_pairs

        return parse_env_pairs(value or ())
    except ConfigError as e:
        raise click.BadParameter(str(e)) from e


def _env_option(f):
    return click.option("--env", "env_pairs", multiple=True, metavar="KEY[=VALUE]",
                        callback=_env_pairs,
                        help="A .env.worker setting (repeatable); a bare KEY takes its value "
                             "from your environment, keeping secrets off command lines. Used "
                             "only when the remote has no .env.worker; sent over SSH stdin, "
                             "never shown.")(f)


def _provision_summary(r) -> str:
    w = r.worker
    live = (f"worker {w.get('node')} (pid {w.get('pid')}) ready on revision "
            f"{r.revision[:7]}")
    if not r.changed:
        return f"{r.target}: nothing changed; {live}"
    return f"{r.target}: {len(r.changes)} change{'s' if len(r.changes) > 1 else ''}; {live}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="syncagent")
def cli() -> None:
    """Push code to a remote Celery GPU worker over one SSH connection."""


@cli.command("push")
@click.argument("targets", nargs=-1)
@common_target_options
@click.option("--dry-run", is_flag=True, help="Print the plan, change nothing.")
@click.option("--no-restart", is_flag=True, help="Sync only; leave the worker running.")
@click.option("--restart-on-any-change", "any_change", is_flag=True,
              help="Restart for any change matching restart_on, also to Python files the "
                   "worker never imported (restart_scope = \"any\").")
@click.option("--allow-mass-delete", is_flag=True,
              help="Confirm deletes the mass-delete guard refuses (lifts a watch's halt).")
@click.option("--mode", type=click.Choice(RESTART_MODES), default=None,
              help="Restart mode (default: the target's restart_mode, else blue-green).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--policy", type=click.Choice(RESTART_POLICIES), default=None,
              help="Across targets: rolling (default, one at a time) or parallel.")
@_holder_option
def push_cmd(targets, path, remote_path, identity, all_, trust_new_host, dry_run, no_restart,
             any_change, allow_mass_delete, mode, policy, as_json, no_holder):
    """Make the remote tree equal to the local one (one-shot), on each TARGET at once."""
    project = _project(path)
    resolved = _targets(project, targets, all_, remote_path, identity)
    _via_holder(project, resolved, no_holder, fleet=True)  # before the heavy imports
    from .push import PushOptions, push_many

    options = PushOptions(dry_run=dry_run, restart=not no_restart,
                          allow_mass_delete=allow_mass_delete, trust_new_host=trust_new_host,
                          mode=mode, scope=_scope(project, any_change))
    bar = _LazyProgress(f"push {resolved[0].name}", enabled=not as_json and len(resolved) == 1)
    try:
        fleet = push_many(project, resolved, options, policy or project.restart_policy, bar)
    finally:
        bar.close()
    if len(resolved) == 1 and fleet.errors:
        raise next(iter(fleet.errors.values()))
    if as_json:
        payload = {t.name: (fleet.results[t.name].to_json() if t.name in fleet.results else {})
                   for t in resolved}
        for name, e in fleet.errors.items():
            payload[name].update(target=name, error=str(e), exit_code=e.exit_code)
        click.echo(_dumps(payload[resolved[0].name] if len(resolved) == 1
                              else {"targets": list(payload.values())}))
    else:
        for t in resolved:
            result = fleet.results.get(t.name)
            if result is not None:
                for w in result.warnings:
                    _warn(w)
                if dry_run:
                    for line in result.plan.lines():
                        click.echo(f"  {_shown(line)}")
                click.echo(_summary(result))
            if t.name in fleet.errors:
                click.echo(f"syncagent: error: {fleet.errors[t.name]}", err=True)
        if len(resolved) > 1:
            revisions = {r.revision for r in fleet.results.values()}
            ok = len(resolved) - len(fleet.errors)
            click.echo(f"{ok}/{len(resolved)} targets on revision "
                       f"{next(iter(revisions))[:7] if len(revisions) == 1 else '(mixed)'}")
    if not fleet.exit_code:
        _leave_holder(project, resolved, no_holder, fleet=True, warm_up=True)
    sys.exit(fleet.exit_code)


def _warn(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    # a path in the message is text, not markup: "kept a[/b]" must not end a style (or raise)
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[yellow]warning:[/] {escape(_shown(message))}", markup=True)


def _render_event(event: dict) -> str:
    """One human line per watch event."""
    name, kind = event.get("target", "?"), event["event"]
    stamp = time.strftime("%H:%M:%S")
    if kind == "synced":
        if not event["changed"]:
            return f"{stamp} {name}: up to date, revision {event['revision'][:7]}"
        what = (", ".join(map(_shown, event["paths"][:3]))
                + (" ..." if len(event["paths"]) > 3 else ""))
        parts = [f"{event['files_sent']} sent"]
        by_git = event.get("confirmed") == "git"  # why a mass delete was let through
        if event["deleted"]:
            parts.append(f"{event['deleted']} deleted" + (" by git" if by_git else ""))
        latency = event.get("latency")
        took = f" in {latency * 1000:.0f} ms" if latency is not None else ""
        return (f"{stamp} {name}: {', '.join(parts)} ({what}){took}, revision "
                f"{event['revision'][:7]}"
                + ("; confirmed: git keeps what it deletes" if by_git else ""))
    if kind == "connected":
        return f"{stamp} {name}: connected, watching -> {event['remote_root']}"
    if kind == "disconnected":
        return (f"{stamp} {name}: connection lost ({event['error']}); retrying in "
                f"{event['retry_in']:g} s, edits are collected meanwhile")
    if kind == "stopped":
        return f"{stamp} {name}: stopped watching (remote left running)"
    if kind == "restart":
        return f"{stamp} {name}: restarting the worker onto {event['revision'][:7]}"
    if kind == "restart-skipped":
        return f"{stamp} {name}: synced, no restart: {event['why']}"
    if kind == "ready":
        return (f"{stamp} " + _live_line(name, event["revision"], event["timings"])
                + f"; save -> live {event['latency']:.1f} s, node {event.get('node')}")
    if kind == "halted":
        return f"{stamp} {name}: HALTED: {event['message']}: {event['way_out']}"
    if kind == "resumed":
        return f"{stamp} {name}: resumed ({event['reason']}), reconciling"
    if kind == "warning":  # one line, often naming a path
        return f"{stamp} {name}: warning: {_shown(event['message'])}"
    return f"{stamp} {name}: {kind}: {event.get('message') or event.get('error') or ''}"


@cli.command("watch")
@click.argument("targets", nargs=-1)
@common_target_options
@click.option("--no-restart", is_flag=True, help="Sync only; leave the worker running.")
@click.option("--restart-on-any-change", "any_change", is_flag=True,
              help="Restart for any change matching restart_on, also to Python files the "
                   "worker never imported (restart_scope = \"any\").")
@click.option("--allow-mass-delete", is_flag=True,
              help="Allow the initial reconcile to delete more than half of the remote files.")
@click.option("--quiet-ms", type=click.IntRange(1, 10_000), default=50, show_default=True,
              help="Cut a batch after this long without events.")
@click.option("--max-wait-ms", type=click.IntRange(1, 60_000), default=1000, show_default=True,
              help="... or this long after its first event.")
@click.option("--polling", is_flag=True, help="Poll instead of inotify (network filesystems).")
@click.option("--mode", type=click.Choice(RESTART_MODES), default=None,
              help="Restart mode (default: the target's restart_mode, else blue-green).")
@click.option("--policy", type=click.Choice(RESTART_POLICIES), default=None,
              help="Across targets: rolling (default, one at a time) or parallel.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
def watch_cmd(targets, path, remote_path, identity, all_, trust_new_host, no_restart,
              any_change, allow_mass_delete, quiet_ms, max_wait_ms, polling, mode, policy,
              as_json):
    """Initial reconcile, then push every change as it happens."""
    from .push import PushOptions
    from .watch import WatchOptions, watch

    project = _project(path)
    resolved = _targets(project, targets, all_, remote_path, identity)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    board = _StatusBoard([t.name for t in resolved], live=not as_json and sys.stdout.isatty())
    lock = threading.Lock()  # each target's threads report too

    def emit(event: dict) -> None:
        with lock:
            if as_json:
                click.echo(_dumps(event))
                sys.stdout.flush()
            else:
                board.show(event, _render_event(event))

    try:
        watch(project, resolved, emit, stop,
              PushOptions(restart=not no_restart, allow_mass_delete=allow_mass_delete,
                          trust_new_host=trust_new_host, mode=mode,
                          scope=_scope(project, any_change)),
              WatchOptions(quiet=quiet_ms / 1000, max_wait=max_wait_ms / 1000,
                           polling=polling),
              policy or project.restart_policy)
    finally:
        board.close()


class _StatusBoard:
    """Event lines scroll; on a terminal, one status line per target stays at the bottom:
    target, state, last revision, last latency."""

    def __init__(self, names: list[str], live: bool):
        self.state = {n: {"state": "connecting", "revision": "-", "sync": None, "live": None}
                      for n in names}
        self.live = None
        if live:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(self._render(), console=Console(), auto_refresh=False,
                             transient=True)
            self.live.start()

    def _render(self):
        from rich.text import Text

        lines = []
        for name, st in self.state.items():
            sync = f"{st['sync'] * 1000:.0f} ms" if st["sync"] is not None else "-"
            live = f"{st['live']:.1f} s" if st["live"] is not None else "-"
            lines.append(f"[{name}] {st['state']} · revision {st['revision']} · "
                         f"last sync {sync} · save->live {live}")
        return Text("\n".join(lines), style="bold")

    def show(self, event: dict, line: str) -> None:
        st = self.state.get(event.get("target"))
        kind = event["event"]
        if st is not None:
            if kind in ("connected", "disconnected", "stopped") and not (
                    st["state"].startswith("HALTED") and kind != "stopped"):
                st["state"] = {"connected": "watching", "disconnected": "reconnecting",
                               "stopped": "stopped"}[kind]
            elif kind == "synced":
                st["revision"] = event["revision"][:7]
                st["sync"] = event.get("latency")
            elif kind == "restart":
                st["state"] = "restarting"
            elif kind == "ready":
                st["state"], st["live"] = "watching", event["latency"]
            elif kind == "error" and not st["state"].startswith("HALTED"):
                st["state"] = "error (see above)"
            elif kind == "halted":
                st["state"] = (f"HALTED (refused to delete "
                               f"{mass_delete_counts(event['lost'], event['files'])}; "
                               f"push --allow-mass-delete or restore them)")
            elif kind == "resumed":
                st["state"] = "watching"
        if self.live is None:
            click.echo(line)
            sys.stdout.flush()
        else:
            self.live.console.print(line, markup=False, highlight=False, soft_wrap=True)
            self.live.update(self._render(), refresh=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def _update_env_pairs(ctx, param, value):
    """``--update-env KEY[=VALUE]`` (repeatable) -> pairs, as ``--env``."""
    try:
        from .provision import parse_env_pairs

        return parse_env_pairs(value or (), option="--update-env")
    except ConfigError as e:
        raise click.BadParameter(str(e)) from e


# installer output worth a line while requirements build (the rest shows only on failure)
_PROGRESS_PREFIXES = ("Collecting", "Installing collected", "Successfully installed",
                      "Resolved", "Prepared", "Installed", "Uninstalled", "waiting for",
                      "uv failed",
                      "ERROR", "error")


class _ProvisionLines:
    """Renders provision's progress: one flushed line as each step starts and ends."""

    def __init__(self, target: str):
        self.target, self.done = target, []

    def __call__(self, event) -> None:
        t = self.target
        if event.state == "start":
            click.echo(f"{t}: {event.step} ...")
        elif event.state == "line":
            if event.detail.lstrip().startswith(_PROGRESS_PREFIXES):
                click.echo(f"{t}:   {event.detail.strip()[:160]}")
        elif event.state == "done":
            self.done.append(event.step)
            click.echo(f"{t}: {event.step} done in {event.seconds:.1f} s: {event.detail}")
        else:
            click.echo(f"{t}: {event.step} FAILED after {event.seconds:.1f} s")
            click.echo(f"{t}: provision stopped at {event.step}; done before it: "
                       f"{', '.join(self.done) or 'nothing'}")


@cli.command("provision")
@click.argument("targets", nargs=-1)
@common_target_options
@click.option("--venv", default=None, metavar="PATH",
              help="Reuse this remote virtualenv (default: <remote path>/venv, created).")
@_env_option
@click.option("--update-env", "update_pairs", multiple=True, metavar="KEY[=VALUE]",
              callback=_update_env_pairs,
              help="Set KEY in the remote .env.worker (repeatable), keeping its other lines; "
                   "a bare KEY takes its value from your environment. Validated with the rest "
                   "of the file before anything is written; restarts the worker.")
@click.option("--allow-mass-delete", is_flag=True,
              help="Allow the initial push to delete more than half of the remote files.")
@click.option("--timeout", type=click.FloatRange(1), default=90.0, show_default=True,
              help="Seconds to wait for the worker to be ready.")
@click.option("--boot", is_flag=True,
              help="Enable a systemd unit that starts supervisord (and the worker) at boot: a "
                   "system unit via sudo where allowed, else a user unit with lingering; "
                   "prints the exact commands when it cannot.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def provision_cmd(targets, path, remote_path, identity, all_, trust_new_host, venv, env_pairs,
                  update_pairs, allow_mass_delete, timeout, boot, as_json):
    """Set up the worker on TARGET (idempotent): venv, runtime, requirements, .env.worker,
    supervisord; then wait until the worker serves the pushed revision. Each step prints a
    line as it starts and as it ends."""
    project = _project(path)
    from .provision import ProvisionOptions, provision

    options = ProvisionOptions(venv=venv, env=env_pairs, update_env=update_pairs,
                               trust_new_host=trust_new_host,
                               allow_mass_delete=allow_mass_delete, timeout=timeout,
                               boot=boot)
    results = []
    for target in _targets(project, targets, all_, remote_path, identity):
        result = provision(project, target, options,
                           None if as_json else _ProvisionLines(target.name))
        results.append(result)
        if not as_json:
            for w in result.warnings:
                _warn(w)
            click.echo(_provision_summary(result))
            click.echo(f"  status: {result.supervisorctl}")
    if as_json:
        payload = [r.to_json() for r in results]
        click.echo(_dumps(payload[0] if len(payload) == 1 else {"targets": payload}))


@cli.command("status")
@click.argument("targets", nargs=-1)
@common_target_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_holder_option
def status_cmd(targets, path, remote_path, identity, all_, trust_new_host, as_json, no_holder):
    """Local, pushed and live revisions; worker programs; the supervisorctl line."""
    project = _project(path)
    resolved = _targets(project, targets, all_, remote_path, identity)
    _via_holder(project, resolved, no_holder)
    from . import control

    results = []
    for t in resolved:
        try:
            results.append(control.status(project, t))
        except SyncAgentError as e:  # a target that is down does not hide the others
            results.append({"target": t.name, "remote_root": t.remote_path, "error": str(e),
                            "exit_code": e.exit_code})
    if as_json:
        click.echo(_dumps(results[0] if len(results) == 1 else {"targets": results}))
    elif len(results) == 1 and "error" not in results[0]:
        _status_detail(results[0])
    else:
        _status_table(results)
    code = max((r.get("exit_code", 0) for r in results), default=0)
    if not code:
        _leave_holder(project, resolved, no_holder)
    sys.exit(code)


def _supervisord_down(r: dict) -> bool:
    """Provisioned, but its supervisord is gone (killed, or the box rebooted without --boot):
    nothing serves, which status must say (and exit 1 for), not show as an old revision."""
    return bool(r.get("provisioned")) and r.get("supervisord") == "down"


def _status_detail(r: dict) -> None:
    sync = "in sync" if r["in_sync"] else "local changes not pushed"
    click.echo(f"{r['target']}: {r['remote_root']}")
    click.echo(f"  local   {r['local_revision'][:7]}  ({sync})")
    click.echo(f"  pushed  {(r['pushed_revision'] or '-')[:7]}")
    if r.get("halted"):
        h = r["halted"]
        click.echo(f"  HALTED  a watch refused to delete "
                   f"{mass_delete_counts(h['lost'], h['files'])}; nothing is applied there: "
                   f"{h['way_out']}")
    if not r["provisioned"]:
        click.echo(f"  worker  none (run `syncagent provision {r['target']}`)")
        return
    if _supervisord_down(r):
        click.echo(f"  worker  DOWN: supervisord is not running, so no worker is (run "
                   f"`syncagent provision {r['target']}`)")
        return
    owed = r.get("owed")
    click.echo(f"  live    {(r['live_revision'] or '-')[:7]}  {r['live_node'] or ''} "
               + ("(the pushed revision)" if r["live"] else
                  f"(older than the push, whose restart never ran: {owed['why']}; the next "
                  f"push restarts it, or run `syncagent restart {r['target']}`)" if owed else
                  "(older than the push: no restart-worthy change since, or not restarted)"))
    standby = r.get("standby") or {}
    for colour, p in sorted(r["programs"].items()):
        click.echo(f"  {colour:<6}  {p['state']:<9} pid {p['pid'] or '-'}"
                   + (_standby_note(standby) if standby.get("colour") == colour else ""))
    if r.get("failing"):
        click.echo(_failing_line(r["failing"]))
    last = r.get("last_restart")
    if last:
        warm = {True: "warm, ", False: "cold, "}.get(last["timings"].get("warm"), "")
        click.echo(f"  last restart: {last['mode']} onto {last['revision'][:7]}, {warm}"
                   f"{last['timings'].get('total', 0):.1f} s, "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last['time']))}")
    if r.get("boot") == "enabled":
        click.echo(f"  boot    comes back after a reboot ({r['boot_unit']} enabled)")
    elif r.get("boot"):
        click.echo(f"  boot    will NOT come back after a reboot ({r['boot_unit'] or 'unit'} "
                   f"{r['boot']}; run `syncagent provision --boot`)")
    click.echo(f"  on the remote: {r['supervisorctl']}")


def _standby_note(standby: dict) -> str:
    if standby["state"] != "parked":
        return f"  standby ({standby['state']}): the next restart is cold"
    if not standby["fresh"]:
        return "  standby (stale, being replaced): the next restart is cold"
    return (f"  standby: {standby['modules']} modules imported ahead, the next restart is "
            "warm")


def _failing_line(failing: dict) -> str:
    return (f"  worker failing: {failing.get('error')} ({failing.get('colour')}, "
            f"{failing.get('count')} failed start{'s' if failing.get('count') != 1 else ''} "
            f"of {(failing.get('revision') or '-')[:7]})")


def _status_table(results: list[dict]) -> None:
    """One line per target, and whether they all run the same code."""
    click.echo(f"{'TARGET':<14} {'STATE':<13} {'PUSHED':<8} {'LIVE':<8} {'RESTART':>8}  NODE")
    for r in results:
        if "error" in r:
            click.echo(f"{r['target']:<14} {'unreachable':<13} {'-':<8} {'-':<8} {'-':>8}  "
                       f"{r['error']}")
            continue
        state = ("HALTED" if r.get("halted") else "no worker" if not r["provisioned"] else
                 "DOWN" if _supervisord_down(r) else "failing" if r.get("failing") else
                 "live" if r["live"] else "stale")
        last = (r.get("last_restart") or {}).get("timings", {}).get("total")
        click.echo(f"{r['target']:<14} {state:<13} {(r['pushed_revision'] or '-')[:7]:<8} "
                   f"{(r['live_revision'] or '-')[:7]:<8} "
                   f"{f'{last:.1f} s' if last is not None else '-':>8}  {r['live_node'] or ''}")
        if r.get("failing"):
            click.echo(f"{'':<14}" + _failing_line(r["failing"]))
    for r in results:
        if r.get("halted"):
            click.echo(f"{r['target']}: halted, refused to delete "
                       f"{mass_delete_counts(r['halted']['lost'], r['halted']['files'])}: "
                       f"{r['halted']['way_out']}")
    live = {r["live_revision"] for r in results if r.get("live_revision")}
    if len(live) > 1:
        by = ", ".join(f"{r['target']} {r['live_revision'][:7]}" for r in results
                       if r.get("live_revision"))
        click.echo(f"mixed revisions: {by}")


@cli.command("restart")
@click.argument("targets", nargs=-1)
@common_target_options
@click.option("--mode", type=click.Choice(RESTART_MODES), default=None,
              help="blue-green (no gap), drain (finish tasks first) or requeue.")
@click.option("--timeout", type=click.FloatRange(1), default=120.0, show_default=True,
              help="Seconds to wait for the new worker to be ready.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_holder_option
def restart_cmd(targets, path, remote_path, identity, all_, trust_new_host, mode, timeout,
                as_json, no_holder):
    """Restart the worker onto the pushed revision, verified live."""
    project = _project(path)
    resolved = _targets(project, targets, all_, remote_path, identity)
    _via_holder(project, resolved, no_holder)
    from . import control

    done, errors = control.restart_many(project, resolved, mode, timeout,
                                        project.restart_policy)
    for t in resolved:
        out = done.get(t.name)
        if out is not None:
            click.echo(_dumps(out) if as_json else
                       _live_line(t.name, out["revision"], out["timings"]) +
                       f" [{out['mode']}, {out['colour']}, node {out.get('node')}]")
        elif len(resolved) > 1:
            click.echo(f"syncagent: error: {errors[t.name]}", err=True)
    if errors:
        raise max(errors.values(), key=lambda e: e.exit_code)
    _leave_holder(project, resolved, no_holder)


@cli.command("logs")
@click.argument("target", required=False)
@common_target_options
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", type=click.IntRange(1), default=50, show_default=True)
@_holder_option
def logs_cmd(target, path, remote_path, identity, all_, trust_new_host, follow, lines,
             no_holder):
    """The live worker's log (through the agent; secrets masked)."""
    project = _project(path)
    (resolved,) = _targets(project, (target,) if target else (), False, remote_path, identity)
    if not follow:  # a holder answers once; following streams, so it runs here
        _via_holder(project, [resolved], no_holder)
    from . import control

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    control.logs(resolved, click.echo, follow=follow, lines=lines, stop=stop)
    _leave_holder(project, [resolved], no_holder)


@cli.command("doctor")
@click.argument("target", required=False)
@common_target_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor_cmd(target, path, remote_path, identity, all_, trust_new_host, as_json):
    """Run the worker's preflight checks on the remote (python -m worker doctor)."""
    from . import control

    project = _project(path)
    (resolved,) = _targets(project, (target,) if target else (), False, remote_path, identity)
    code, report = control.doctor(resolved)
    if as_json:
        click.echo(_dumps(report))
    else:
        for problem in report.get("problems", []):
            click.echo(f"  env     {problem}")
        for c in report.get("checks", []):
            fix = f" -> {c['fix']}" if c.get("fix") and c["status"] != "ok" else ""
            click.echo(f"  {c['status']:<5} {c['name']:<22} {c['detail']}{fix}")
    sys.exit(code)


@cli.command("init")
@click.option("--path", type=click.Path(file_okay=False), default=".",
              help="Project root to write syncagent.toml into.")
@click.option("--force", is_flag=True, help="Overwrite an existing syncagent.toml.")
def init_cmd(path, force):
    """Write a commented syncagent.toml."""
    target = Path(path) / CONFIG_NAME
    if target.exists() and not force:
        raise ConfigError(f"{target} exists", hint="pass --force to overwrite")
    target.write_text(INIT_TEMPLATE)
    click.echo(f"wrote {target}")


@cli.command("trust")
@click.argument("target")
@click.option("--path", type=click.Path(file_okay=False), default=None)
def trust_cmd(target, path):
    """Show TARGET's host key fingerprint and record it in known_hosts."""
    from .transport import connect

    resolved = resolve_target(target, _project(path), check_path=False)
    client, ep, recorded = connect(resolved, trust_new=True)
    client.close()
    if recorded:
        click.echo(f"trusted {ep.host_key_name}: {recorded[0]} {recorded[1]} "
                   f"(recorded in {ep.known_hosts})")
    else:
        click.echo(f"{ep.host_key_name} is already trusted ({ep.known_hosts})")


@cli.group("sandbox")
def sandbox_group():
    """A local stand-in remote (real sshd on 127.0.0.1) for the demo and tests."""


def _sandbox_options(f):
    f = click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
                     help="Where the sandbox keeps its keys, configs and remote tree.")(f)
    return click.option("--name", default="sandbox", show_default=True,
                        help="Target name to register.")(f)


@sandbox_group.command("up")
@_sandbox_options
@click.option("--redis-url", default=None, metavar="URL",
              help="Use this Redis (else $REDIS_URL, else start redis-server on a free port).")
@click.option("--no-worker", is_flag=True,
              help="sshd only: no Redis, no demo app, no supervised worker.")
@_env_option
@click.option("--timeout", type=click.FloatRange(1), default=90.0, show_default=True,
              help="Seconds to wait for the demo worker to be ready.")
@click.option("--json", "as_json", is_flag=True)
def sandbox_up(name, directory, redis_url, no_worker, env_pairs, timeout, as_json):
    """Start the sandbox, register target NAME and (unless --no-worker) run the demo app's
    worker under supervisord, with Redis as its broker."""
    from . import sandbox as sandbox_mod

    box = sandbox_mod.up(name, directory, provision=not no_worker, redis_url=redis_url,
                         env=dict(env_pairs), timeout=timeout)
    if as_json:
        click.echo(_dumps(box.to_json()))
        return
    click.echo(f"sandbox '{box.name}' up: {box.user}@{box.host}:{box.port} (sshd pid "
               f"{box.sshd_pid})\n  remote root: {box.remote_root}\n"
               f"  ssh: ssh -F {box.ssh_config} {box.name}")
    if box.last_provision is None:
        click.echo(f"  try: syncagent push {box.name}")
        return
    r = box.last_provision
    from .provision import redact

    click.echo(f"  redis: {redact(box.redis_url)}"
               f"{f' (pid {box.redis_pid})' if box.redis_pid else ' (external)'}\n"
               f"  demo worker: queue {sandbox_mod.DEMO_QUEUE} on db {sandbox_mod.DEMO_BROKER_DB}"
               f" (results db {sandbox_mod.DEMO_RESULT_DB}); your projects: any other db\n"
               f"  demo project: {box.project}\n"
               f"  worker: {r.worker.get('node')} (pid {r.worker.get('pid')}) ready on "
               f"revision {r.revision[:7]}\n"
               f"  status: {r.supervisorctl}\n"
               f"  try: syncagent watch {box.name} --path {box.project}, then edit "
               f"{box.project}/app/version.py")


@sandbox_group.command("down")
@_sandbox_options
def sandbox_down(name, directory):
    """Stop everything started through the sandbox (every supervisord and worker, wherever
    provisioned), then its Redis and sshd."""
    from . import sandbox as sandbox_mod

    stopped = sandbox_mod.down(name, directory)
    click.echo(f"sandbox '{name}': stopped pid {', '.join(map(str, stopped))}" if stopped
               else f"sandbox '{name}': not running")


@sandbox_group.command("status")
@_sandbox_options
@click.option("--json", "as_json", is_flag=True)
def sandbox_status(name, directory, as_json):
    """Say whether the sandbox runs (exit 1 if it does not)."""
    from . import sandbox as sandbox_mod

    box = sandbox_mod.status(name, directory)
    if as_json:
        click.echo(_dumps(box.to_json() if box else {"name": name, "running": False}))
    elif box is None:
        click.echo(f"sandbox '{name}': none")
    else:
        click.echo(f"sandbox '{name}': {'running' if box.running else 'stopped'} on "
                   f"{box.host}:{box.port} (pid {box.sshd_pid}), remote root {box.remote_root}")
    if box is None or not box.running:
        sys.exit(1)


def _tolerant_output() -> None:
    """Never fail over printing: an error message may quote a file name whose bytes are not
    UTF-8, and a UTF-8 locale's stdout (en_US.UTF-8, unlike C.UTF-8) refuses them."""
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: typed errors -> one line on stderr and the documented exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _tolerant_output()
    try:  # the argv travels to a holder (syncagent.holder) when one serves the target
        cli.main(args=argv, prog_name="syncagent", standalone_mode=False, obj={"argv": argv})
    except SyncAgentError as e:
        click.echo(f"syncagent: error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.UsageError as e:  # one line like every other error, and where to look
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        click.echo(f"syncagent: error: {_shown(e.format_message())}{where}", err=True)
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.Abort:
        click.echo("syncagent: aborted", err=True)
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
