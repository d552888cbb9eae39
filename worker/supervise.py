"""Remote side of ``syncagent provision``: ``python -m worker configure``.

Writes the supervisord configs (only when their text changed), starts supervisord when it does
not answer on its unix socket (it daemonizes and outlives the SSH session) or reloads it when
the configs changed, starts the worker if it is not running (restarts it if it runs another
revision), then waits for the readiness marker of the pushed revision. Prints one JSON object.
A worker that fails to start is reported at once with its error line (the launcher records it
when it exits before the readiness marker) and the redacted tail of its log.
"""
from __future__ import annotations

import http.client
import os
import socket
import subprocess
import time
import xmlrpc.client
from pathlib import Path
from typing import Any, Callable, Mapping

from worker import ready
from worker import supervisor_conf as sc

__all__ = ["configure", "configs_differ", "log_tail", "rpc"]

LOG_TAIL_LINES = 20
_LIVE = ("STARTING", "RUNNING", "BACKOFF")
_ALREADY_STARTED, _NOT_RUNNING = 60, 70


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        # kept, as the base class does, so close() reaches it (no leaked socket per call)
        if not self._connection or self._connection[0] != host:
            self._connection = host, _UnixConnection(self._path)
        return self._connection[1]


def rpc(socket_path: str) -> xmlrpc.client.ServerProxy:
    """XML-RPC proxy for supervisord's unix socket."""
    return xmlrpc.client.ServerProxy("http://localhost", transport=_UnixTransport(socket_path))


def _state(proxy: xmlrpc.client.ServerProxy) -> str | None:
    try:
        return proxy.supervisor.getState()["statename"]
    except (OSError, xmlrpc.client.Error):
        return None


def configs_differ(layout: sc.Layout, extra_env: Mapping[str, str]) -> bool:
    """True when the files on disk differ from what :func:`sc.write_configs` would write."""
    wanted = {layout.conf_path: sc.render_supervisord_conf(layout),
              layout.program_conf_path: sc.render_program_conf(layout, extra_env)}
    for path, text in wanted.items():
        try:
            if Path(path).read_text(encoding="utf-8") != text:
                return True
        except OSError:
            return True
    return False


def log_tail(layout: sc.Layout, colour: str, lines: int = LOG_TAIL_LINES) -> list[str]:
    """Last lines of the worker's log with every secret of the worker env redacted."""
    from worker import env as envmod

    path = Path(layout.state) / "logs" / f"{layout.name}-{colour}.log"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    secrets = envmod.secrets_of(envmod.load_values(layout.root))
    return [envmod.redact_text(line, secrets) for line in text.splitlines()[-lines:]]


def _supervisord_env() -> dict[str, str]:
    from worker import env as envmod

    drop = set(envmod.KNOWN_VARIABLES) | {"PYTHONPATH"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _start_supervisord(layout: sc.Layout, proxy: xmlrpc.client.ServerProxy,
                       deadline: float) -> None:
    proc = subprocess.run([layout.bin("supervisord"), "-c", layout.conf_path], cwd=layout.root,
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=_supervisord_env(),
                          start_new_session=True, timeout=60, check=False)
    if proc.returncode != 0:
        last = proc.stderr.decode(errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"supervisord did not start: {last[0] if last else proc.returncode}")
    while _state(proxy) != "RUNNING":
        if time.monotonic() > deadline:
            raise RuntimeError(f"supervisord did not answer on {layout.socket_path}")
        time.sleep(0.05)


def _reload(proxy: xmlrpc.client.ServerProxy) -> None:
    added, changed, removed = proxy.supervisor.reloadConfig()[0]
    for group in removed + changed:
        try:
            proxy.supervisor.stopProcessGroup(group)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode != _NOT_RUNNING:
                raise
        proxy.supervisor.removeProcessGroup(group)
    for group in changed + added:
        proxy.supervisor.addProcessGroup(group)


def _start(proxy: xmlrpc.client.ServerProxy, layout: sc.Layout, colour: str) -> None:
    """Start a slot on purpose: its earlier failed starts no longer count."""
    ready.clear_failed_start(layout.root, colour)
    try:
        proxy.supervisor.startProcess(f"{layout.name}:{layout.name}-{colour}", False)
    except xmlrpc.client.Fault as fault:
        if fault.faultCode != _ALREADY_STARTED:
            raise


def _failed_since(layout: sc.Layout, colour: str, supervisor: int, since: float
                  ) -> dict[str, Any] | None:
    """The slot's failed-start record written under this supervisord after ``since``."""
    failed = ready.read_failed_start(layout.root, colour)
    if failed and failed.get("supervisor") == supervisor and failed.get("time", 0) >= since:
        return failed
    return None


def configure(layout: sc.Layout, extra_env: Mapping[str, str], revision: str,
              timeout: float = 60.0, restart: bool = False,
              on_started: Callable[[list[str]], None] | None = None) -> dict[str, Any]:
    """Bring supervisord and the worker up on ``revision``; change only what differs.

    Args:
        layout: remote layout (absolute root and venv).
        extra_env: extra program environment (PYTHONPATH of the shipped runtime).
        revision: the pushed revision the worker must report.
        timeout: seconds to wait for supervisord and the readiness marker.
        restart: restart a running worker even on the same revision (its runtime or
            dependencies changed).
        on_started: called with the actions so far once supervisord runs the worker, before
            the wait for its readiness marker.

    Returns:
        ``{"ok", "actions", "conf", "supervisorctl", "colour", "pid", "node", ...}``; on
        failure ``ok`` is False with ``error`` and ``log_tail`` (redacted).
    """
    deadline = time.monotonic() + timeout
    out: dict[str, Any] = {"ok": False, "actions": [], "conf": layout.conf_path,
                           "supervisorctl": sc.supervisorctl_command(layout.conf_path,
                                                                     layout.venv)}
    proxy = rpc(layout.socket_path)
    try:
        return _configure(layout, extra_env, revision, timeout, restart, on_started, proxy,
                          out, deadline)
    finally:
        proxy("close")()


def _configure(layout: sc.Layout, extra_env: Mapping[str, str], revision: str, timeout: float,
               restart: bool, on_started: Callable[[list[str]], None] | None,
               proxy: xmlrpc.client.ServerProxy, out: dict[str, Any], deadline: float
               ) -> dict[str, Any]:
    began = time.time()
    actions = out["actions"]
    changed = configs_differ(layout, extra_env)
    if changed:
        sc.write_configs(layout, extra_env)
        actions.append("wrote supervisord config")
    if _state(proxy) is None:
        _start_supervisord(layout, proxy, deadline)
        actions.append("started supervisord")
    elif changed:
        _reload(proxy)
        actions.append("reloaded supervisord")
    out["supervisord_pid"] = proxy.supervisor.getPID()
    group = layout.name
    infos = {c: proxy.supervisor.getProcessInfo(f"{group}:{group}-{c}") for c in ready.COLOURS}
    live = [c for c in ready.COLOURS if infos[c]["statename"] in _LIVE]
    colour = live[0] if live else "blue"
    name = f"{group}:{group}-{colour}"
    if not live:
        _start(proxy, layout, colour)
        actions.append(f"started worker ({colour})")
    else:
        marker = ready.read_marker(layout.root, colour)
        stale = (marker and marker.get("pid") == infos[colour]["pid"]
                 and marker.get("revision") != revision)
        if stale or (restart and "started supervisord" not in actions):
            proxy.supervisor.stopProcess(name, True)
            _start(proxy, layout, colour)
            actions.append(f"restarted worker ({colour})" + (" on the new revision" if stale
                                                             else " on the new runtime"))
    out["colour"] = colour
    if on_started is not None:
        on_started(actions)
    while True:
        info = proxy.supervisor.getProcessInfo(name)
        marker = ready.read_marker(layout.root, colour)
        if (info["statename"] == "RUNNING" and marker and marker.get("pid") == info["pid"]
                and marker.get("revision") == revision):
            out.update(ok=True, pid=info["pid"], node=marker.get("node"),
                       revision=marker.get("revision"))
            return out
        failed = _failed_since(layout, colour, out["supervisord_pid"], began)
        if failed:  # it exited before it was ready: no waiting for supervisord's retries
            out.update(error=f"worker failing: {failed.get('error')}", failing=failed)
            break
        if info["statename"] in ("FATAL", "EXITED", "STOPPED"):
            out.update(error=f"the worker did not start ({info['statename'].lower()})")
            break
        if time.monotonic() > deadline:
            out.update(error=f"the worker was not ready on revision {revision[:7]} "
                             f"after {timeout:g} s")
            break
        time.sleep(0.1)
    out["log_tail"] = log_tail(layout, colour)
    return out
