"""Remote side of ``syncagent provision``: ``python -m worker configure``.

Writes the supervisord configs (only when their text changed), starts supervisord when it does
not answer on its unix socket (it daemonizes and outlives the SSH session) or reloads it when
the configs changed. Prints one JSON object. It starts no worker itself: supervisord's
autostart runs the first slot, and provision then asks the agent's slot controller
(``syncagent/agent.py``, ``start_worker``) to start, wait for or restart the worker and park
a standby: one controller, one readiness rule, one failure report, for provision and restarts.
"""
from __future__ import annotations

import http.client
import os
import socket
import subprocess
import time
import xmlrpc.client
from pathlib import Path
from typing import Any, Mapping

from worker import ready
from worker import supervisor_conf as sc

__all__ = ["configure", "configs_differ", "rpc"]

_NOT_RUNNING = 70


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


def _forget_failed_starts(layout: sc.Layout) -> None:
    """Slots (re)started with supervisord start afresh: failed starts recorded before do not
    count (the launcher would give up at once on a slot that used up its starts)."""
    for colour in ready.COLOURS:
        ready.clear_failed_start(layout.root, colour)


def configure(layout: sc.Layout, extra_env: Mapping[str, str],
              timeout: float = 60.0) -> dict[str, Any]:
    """Bring supervisord up with the current configs; change only what differs.

    Args:
        layout: remote layout (absolute root and venv).
        extra_env: extra program environment (PYTHONPATH of the shipped runtime).
        timeout: seconds to wait for supervisord to answer.

    Returns:
        ``{"ok", "actions", "conf", "supervisorctl", "supervisord_pid", "fresh"}``: ``fresh``
        when supervisord was started or reloaded (its autostart runs the first slot anew).
    """
    deadline = time.monotonic() + timeout
    out: dict[str, Any] = {"ok": False, "actions": [], "conf": layout.conf_path,
                           "supervisorctl": sc.supervisorctl_command(layout.conf_path,
                                                                     layout.venv)}
    proxy = rpc(layout.socket_path)
    try:
        actions = out["actions"]
        changed = configs_differ(layout, extra_env)
        if changed:
            sc.write_configs(layout, extra_env)
            actions.append("wrote supervisord config")
        if _state(proxy) is None:
            _forget_failed_starts(layout)
            _start_supervisord(layout, proxy, deadline)
            actions.append("started supervisord")
        elif changed:
            _forget_failed_starts(layout)
            _reload(proxy)
            actions.append("reloaded supervisord")
        out.update(ok=True, supervisord_pid=proxy.supervisor.getPID(),
                   fresh=any(a in actions for a in ("started supervisord",
                                                    "reloaded supervisord")))
        return out
    finally:
        proxy("close")()
