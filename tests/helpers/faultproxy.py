"""A loopback TCP fault proxy: put it between syncagent and sshd, then break the link on cue.

Threaded, bounded (every socket has a timeout, the proxy stops itself after ``lifetime``
seconds), and stopped by the fixture that started it. Controls:

* :meth:`FaultProxy.drop` closes every connection now (a network drop, an sshd restart);
* :meth:`FaultProxy.stall` stops forwarding in both directions for N seconds (bytes are held,
  not lost: a stall, not a drop);
* :meth:`FaultProxy.drop_after` closes the connections once N more bytes have gone towards
  the server (a drop in the middle of a batch);
* :meth:`FaultProxy.refuse` closes new connections as soon as they are accepted.
"""
from __future__ import annotations

import select
import socket
import threading
import time

__all__ = ["FaultProxy"]

_BLOCK = 65536


class _Pair:
    def __init__(self, client: socket.socket, server: socket.socket):
        self.client, self.server = client, server
        self.closed = False

    def close(self) -> None:
        self.closed = True
        for s in (self.client, self.server):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class FaultProxy:
    """Forward 127.0.0.1:<port> to ``upstream`` until :meth:`stop` (or ``lifetime`` s)."""

    def __init__(self, upstream_port: int, lifetime: float = 300.0,
                 upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.deadline = time.monotonic() + lifetime
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.pairs: list[_Pair] = []
        self.threads: list[threading.Thread] = []
        self.stopping = threading.Event()
        self.stalled_until = 0.0
        self.budget: int | None = None  # bytes towards the server before a drop
        self.refusing = False
        self.accepted = 0
        self.dropped = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._acceptor = threading.Thread(target=self._accept, name="faultproxy-accept",
                                          daemon=True)

    # ---------------------------------------------------------------- controls

    def start(self) -> "FaultProxy":
        self._acceptor.start()
        return self

    def drop(self) -> int:
        """Close every open connection; returns how many."""
        with self.lock:
            pairs, self.pairs = [p for p in self.pairs if not p.closed], []
            self.budget = None
            self.dropped += len(pairs)
        for p in pairs:
            p.close()
        return len(pairs)

    def stall(self, seconds: float) -> None:
        """Forward nothing, either way, for ``seconds`` (connections stay open)."""
        self.stalled_until = time.monotonic() + seconds

    def drop_after(self, nbytes: int) -> None:
        """Drop every connection once ``nbytes`` more bytes went towards the server."""
        with self.lock:
            self.budget = nbytes

    def refuse(self, on: bool = True) -> None:
        self.refusing = on

    @property
    def open_connections(self) -> int:
        with self.lock:
            return sum(1 for p in self.pairs if not p.closed)

    def stop(self) -> None:
        self.stopping.set()
        self.drop()
        self._acceptor.join(timeout=5)
        for t in self.threads:
            t.join(timeout=5)
        self.listener.close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- threads

    def _alive(self) -> bool:
        return not self.stopping.is_set() and time.monotonic() < self.deadline

    def _accept(self) -> None:
        while self._alive():
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(30)
            server.settimeout(30)
            pair = _Pair(client, server)
            with self.lock:
                self.pairs.append(pair)
                self.accepted += 1
            t = threading.Thread(target=self._pump, args=(pair,), name="faultproxy-pump",
                                 daemon=True)
            self.threads.append(t)
            t.start()
        self.stopping.set()
        self.drop()

    def _pump(self, pair: _Pair) -> None:
        """Both directions in one thread with select (a stall holds both)."""
        try:
            while self._alive() and not pair.closed:
                if time.monotonic() < self.stalled_until:
                    time.sleep(0.02)
                    continue
                try:
                    ready, _, _ = select.select([pair.client, pair.server], [], [], 0.1)
                except (OSError, ValueError):
                    break
                for src in ready:
                    dst = pair.server if src is pair.client else pair.client
                    try:
                        data = src.recv(_BLOCK)
                    except OSError:
                        data = b""
                    if not data:
                        pair.close()
                        break
                    if src is pair.client:
                        with self.lock:
                            if self.budget is not None:
                                if len(data) >= self.budget:
                                    data = data[:self.budget]
                                    self.budget = 0
                                else:
                                    self.budget -= len(data)
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                    try:
                        dst.sendall(data)
                    except OSError:
                        pair.close()
                        break
                    if self.budget == 0:
                        self.drop()
                        break
        finally:
            if not pair.closed:
                pair.close()
