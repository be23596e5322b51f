"""A fault-injecting TCP proxy for tests: throttle, delay, slice and cut connections.

``FaultProxy(upstream_port)`` listens on a free loopback port and forwards
each accepted connection to the upstream port. While it runs, a test can:

* ``rate_bytes_s``: limit the downstream direction (upstream -> client);
* ``delay_s``: hold each forwarded piece for a while (this also caps throughput);
* ``latency_s``: a one-way delay line in each direction that does not cap
  throughput (read when a connection is accepted: a satellite-like link);
* ``slice_bytes``: forward in tiny pieces (exercises partial reads);
* ``cut()``: drop every open connection at once (a network drop);
* ``refuse``: refuse new connections (the network stays down);
* ``mute_down``: drop what the upstream sends meanwhile (a PUBACK that never arrives);
* ``stall``: drop what either side sends meanwhile, connections left open (a link that
  goes silent: only keep-alives notice it);
* ``bytes_down``: count what went to clients.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.rate_bytes_s: float | None = None
        self.delay_s = 0.0
        self.latency_s = 0.0
        self.slice_bytes: int | None = None
        self.refuse = False
        self.mute_down = False
        self.stall = False
        self.bytes_down = 0
        self.bytes_up = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True, name="proxy-accept").start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            try:
                up = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                client.close()
                continue
            up.settimeout(None)
            with self._lock:
                self._socks.update((client, up))
                self.connections += 1
            latency = self.latency_s
            threading.Thread(target=self._pump, args=(up, client, True, latency), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, up, False, latency), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool, latency: float = 0.0) -> None:
        line: queue.Queue[tuple[float, bytes] | None] | None = None
        if latency:
            line = queue.Queue()
            threading.Thread(target=self._delay_line, args=(line, src, dst), daemon=True).start()
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                pieces = [data]
                if self.slice_bytes:
                    n = self.slice_bytes
                    pieces = [data[i : i + n] for i in range(0, len(data), n)]
                if (downstream and self.mute_down) or self.stall:
                    continue
                for piece in pieces:
                    if self.delay_s:
                        time.sleep(self.delay_s)
                    if downstream and self.rate_bytes_s:
                        time.sleep(len(piece) / self.rate_bytes_s)
                    if line is not None:
                        line.put((time.monotonic() + latency, piece))
                    else:
                        dst.sendall(piece)
                    with self._lock:
                        if downstream:
                            self.bytes_down += len(piece)
                        else:
                            self.bytes_up += len(piece)
        except OSError:
            pass
        finally:
            if line is not None:
                line.put(None)  # the delay line closes both sockets after what it holds
            else:
                self._close_pair(src, dst)

    def _delay_line(
        self, line: queue.Queue[tuple[float, bytes] | None], src: socket.socket, dst: socket.socket
    ) -> None:
        try:
            while (item := line.get()) is not None:
                due, piece = item
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(piece)
        except OSError:
            pass
        finally:
            self._close_pair(src, dst)

    def _close_pair(self, src: socket.socket, dst: socket.socket) -> None:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
            with self._lock:
                self._socks.discard(s)

    def cut(self) -> int:
        """Drop every open connection; returns how many sockets were closed."""
        with self._lock:
            socks = list(self._socks)
            self._socks.clear()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        return len(socks)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
