"""One network thread for many MQTT connections (the fleet simulator's, ``agent.service.simulate``).

A device runs one :class:`agent.mqtt.client.MqttClient` with paho's own network
thread (``loop_start``). A simulation of many devices in one process gives each
of them its own client and connection, but drives every socket from one
:class:`SharedNetwork` thread through paho's external-loop interface
(``reconnect``, ``loop_read``, ``loop_write``, ``loop_misc`` and the
``on_socket_*`` callbacks): a thousand connections need no thousand threads.

Threads: the network thread owns the selector and is the only one that calls
paho's loop functions, connects and reconnects. Other threads (a device's work
loop publishing, subscribing) only queue a request and wake it through a socket
pair; paho queues their packets itself and asks for the socket's write
readiness through ``on_socket_register_write``.

Guarantees:

- a client attached with :meth:`SharedNetwork.attach` is connected, and after a
  lost connection reconnected, by this thread with a back-off of 1 s doubling to
  15 s (paho's ``reconnect_delay_set(1, 15)``, as the device's own thread uses)
  until it is detached;
- each connected client's ``loop_misc`` (keep-alive) runs at least once a
  second, and a packet queued for it is written within about a second even when
  paho lost the write registration (see :meth:`SharedNetwork._recover_write`);
- a callback of one client that raises is logged and does not stop the others;
- a client disconnected through :meth:`SharedNetwork.disconnect` gets no
  keep-alive check any more (paho's would close it without its DISCONNECT);
- a detached or disconnected client whose socket is still open (its last publish and DISCONNECT
  not yet written: a busy machine) keeps being served, never reconnected, until
  paho closes its socket; :meth:`SharedNetwork.stop` waits for those (up to its
  drain bound) so that stopping many devices at once says every goodbye instead
  of leaving the broker to publish their wills.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import paho.mqtt.client as paho

logger = logging.getLogger(__name__)

MIN_DELAY_S = 1.0
MAX_DELAY_S = 15.0
MISC_EVERY_S = 1.0


def _discard_unread(sock: Any) -> None:
    """Read what has arrived on a socket paho is about to close after its DISCONNECT:
    closing with unread data sends a reset instead of a FIN, and a broker that then fails
    a write drops the connection before it reads the DISCONNECT (and publishes the will)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sock.setblocking(False)
        for _ in range(16):
            if not sock.recv(65536):
                return


@dataclass
class _Conn:
    """One client's connection (network thread only)."""

    client: paho.Client
    on_lost: Callable[[], None]  # called on this thread when a connection attempt fails
    sock: Any = None
    want_write: bool = False
    delay_s: float = MIN_DELAY_S
    connect_at: float = 0.0  # monotonic time of the next connection attempt; 0: none due
    closing: bool = False  # detached: served until paho closes the socket, then forgotten


class _Ask(Enum):
    ATTACH = "attach"
    DISCONNECT = "disconnect"
    DETACH = "detach"
    LOST = "lost"
    OPEN = "open"
    CLOSE = "close"
    WRITE = "write"
    NO_WRITE = "no_write"


@dataclass(frozen=True)
class _Request:
    what: _Ask
    client: paho.Client
    on_lost: Callable[[], None] | None = None
    sock: Any = None
    reasoncode: Any = None


class SharedNetwork:
    """The network thread of many paho clients. :meth:`start` once, :meth:`stop` at the end."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._requests: list[_Request] = []  # from other threads, for the network thread
        self._conns: dict[int, _Conn] = {}  # id(client) -> connection (network thread only)
        self._stop = threading.Event()
        self._drain_until = 0.0  # monotonic bound on waiting for closing connections at stop
        self._thread: threading.Thread | None = None
        self.connects = 0
        # how late the keep-alive checks ran at worst (s): past paho's keep-alive, a client
        # is dropped for silence (a process too busy to run this thread: the simulator's)
        self.max_misc_lag_s = 0.0

    # -- any thread ------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mqtt-shared-network", daemon=True)
            self._thread.start()

    def stop(self, drain_s: float = 30.0) -> None:
        """Stop the thread once every detached client's socket is closed (its queued packets
        written), or after ``drain_s``; the clients still attached are dropped as they are."""
        self._drain_until = time.monotonic() + drain_s
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(drain_s + 5.0)
            self._thread = None

    def attach(self, client: paho.Client, on_lost: Callable[[], None]) -> None:
        """Connect ``client`` (after ``connect_async``) and keep it connected; ``on_lost()``
        runs on this thread after each failed connection attempt."""
        self._ask(_Request(_Ask.ATTACH, client, on_lost))

    def disconnect(self, client: paho.Client, reasoncode: Any = None) -> None:
        """``client.disconnect(reasoncode)``, done on the network thread, which then stops
        reconnecting it and no longer runs its keep-alive: paho's keep-alive check closes
        a disconnecting client's socket without writing its queued DISCONNECT once the
        keep-alive time has passed since it last heard from the broker (seen on 53 of
        1,000 simulated devices stopping at once: the broker published their wills).
        Queued packets (the goodbye, the DISCONNECT) are still written; then it is
        forgotten, as after :meth:`detach`."""
        self._ask(_Request(_Ask.DISCONNECT, client, reasoncode=reasoncode))

    def detach(self, client: paho.Client) -> None:
        """Stop reconnecting ``client`` (after its ``disconnect()``); what paho still has queued
        for it is written before its socket is forgotten."""
        self._ask(_Request(_Ask.DETACH, client))

    def reconnect_later(self, client: paho.Client) -> None:
        """The connection was lost: connect again after the back-off."""
        self._ask(_Request(_Ask.LOST, client))

    # paho's socket callbacks: open and close come on the network thread (paho opens and
    # closes sockets only inside its loop functions and reconnect); writes from any thread
    def socket_open(self, client: paho.Client, sock: Any) -> None:
        self._ask(_Request(_Ask.OPEN, client, sock=sock))

    def socket_close(self, client: paho.Client, sock: Any) -> None:
        self._ask(_Request(_Ask.CLOSE, client, sock=sock))

    def register_write(self, client: paho.Client) -> None:
        self._ask(_Request(_Ask.WRITE, client))

    def unregister_write(self, client: paho.Client) -> None:
        self._ask(_Request(_Ask.NO_WRITE, client))

    def _ask(self, request: _Request) -> None:
        if threading.current_thread() is self._thread:
            # at once: a closed socket must leave the selector before its fd is reused
            self._handle(request)
            return
        with self._lock:
            self._requests.append(request)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"x")

    # -- the network thread -------------------------------------------------------------
    def _run(self) -> None:
        next_misc = time.monotonic() + MISC_EVERY_S
        while not self._finished():
            self._handle_requests()
            now = time.monotonic()
            due = [c.connect_at for c in self._conns.values() if c.connect_at]
            timeout = max(0.0, min([next_misc, *due]) - now)
            for key, mask in self._sel.select(timeout):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        self._wake_r.recv(4096)
                    continue
                self._service(key.data, mask)
            self._handle_requests()
            now = time.monotonic()
            for conn in list(self._conns.values()):
                if conn.connect_at and conn.connect_at <= now:
                    self._connect(conn)
            if now >= next_misc:
                self.max_misc_lag_s = max(self.max_misc_lag_s, now - next_misc)
                next_misc = now + MISC_EVERY_S
                for conn in list(self._conns.values()):
                    if conn.sock is not None:
                        if not conn.closing:  # see disconnect(): no keep-alive once closing
                            self._call(conn.client.loop_misc)
                        self._recover_write(conn)
                    elif conn.closing:
                        self._drop(conn)
        for conn in list(self._conns.values()):
            self._forget_socket(conn)
        self._sel.close()

    def _finished(self) -> bool:
        if not self._stop.is_set():
            return False
        closing = any(c.closing and c.sock is not None for c in self._conns.values())
        return not closing or time.monotonic() >= self._drain_until

    def _drop(self, conn: _Conn) -> None:
        self._forget_socket(conn)
        self._conns.pop(id(conn.client), None)

    def _handle_requests(self) -> None:
        with self._lock:
            requests, self._requests = self._requests, []
        for request in requests:
            self._handle(request)

    def _handle(self, r: _Request) -> None:
        key = id(r.client)
        if r.what is _Ask.ATTACH:
            assert r.on_lost is not None
            self._conns[key] = _Conn(r.client, r.on_lost, connect_at=time.monotonic())
            return
        conn = self._conns.get(key)
        if conn is None:
            return
        if r.what in (_Ask.DISCONNECT, _Ask.DETACH):
            conn.closing = True
            conn.connect_at = 0.0
            if conn.sock is None:
                self._drop(conn)
            if r.what is _Ask.DISCONNECT:
                self._call(lambda: r.client.disconnect(reasoncode=r.reasoncode))
        elif r.what is _Ask.LOST:
            if conn.closing:
                self._drop(conn)
                return
            conn.connect_at = time.monotonic() + conn.delay_s
            conn.delay_s = min(conn.delay_s * 2, MAX_DELAY_S)
        elif r.what is _Ask.OPEN:
            self._watch(conn, r.sock)
        elif r.what is _Ask.CLOSE:
            if r.sock is conn.sock:
                self._forget_socket(conn)
                if conn.closing:
                    _discard_unread(r.sock)
                    self._drop(conn)
        else:
            conn.want_write = r.what is _Ask.WRITE
            self._update(conn)

    def _connect(self, conn: _Conn) -> None:
        conn.connect_at = 0.0
        try:
            conn.client.reconnect()  # opens the socket (socket_open) and queues the CONNECT
            self.connects += 1
        except (OSError, ValueError) as exc:
            logger.debug("connection attempt failed: %s", exc)
            conn.connect_at = time.monotonic() + conn.delay_s
            conn.delay_s = min(conn.delay_s * 2, MAX_DELAY_S)
            self._call(conn.on_lost)
            return
        conn.delay_s = MIN_DELAY_S

    def _watch(self, conn: _Conn, sock: Any) -> None:
        if sock is None or sock is conn.sock:
            return
        self._forget_socket(conn)
        conn.sock = sock
        self._sel.register(sock, self._mask(conn), conn)

    def _forget_socket(self, conn: _Conn) -> None:
        if conn.sock is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(conn.sock)
            conn.sock = None

    @staticmethod
    def _mask(conn: _Conn) -> int:
        return selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.want_write else 0)

    def _update(self, conn: _Conn) -> None:
        if conn.sock is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.modify(conn.sock, self._mask(conn), conn)

    def _recover_write(self, conn: _Conn) -> None:
        """paho can lose a write registration: a thread queues a packet just after the
        network thread's ``loop_write`` found the queue empty and before it unregisters,
        and the packet waits for the next one (a device's last goodbye and DISCONNECT
        never went out). So each second the queue itself is read."""
        if conn.sock is not None and not conn.want_write and conn.client.want_write():
            conn.want_write = True
            self._update(conn)

    def _service(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            self._call(conn.client.loop_read)
        if mask & selectors.EVENT_WRITE and conn.sock is not None:
            self._call(conn.client.loop_write)
            # follow the queue, not only paho's callbacks: after _recover_write paho does not
            # know it is registered and would never unregister (a writable socket spins)
            if conn.sock is not None and conn.want_write and not conn.client.want_write():
                conn.want_write = False
                self._update(conn)

    @staticmethod
    def _call(fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception:  # one client's bug must not stop every other connection
            logger.exception("network work for one client failed")
