"""The site's relay: the bridge's plain MQTT on loopback in, TLS to central out, bytes counted.

Mosquitto 2.0.11 hangs (a spinning broker that answers no client and ignores
SIGTERM) after a TLS failure on a bridge: a wrong server name or CA, a reset
during the handshake (docs/sites.md). So the site's bridge never does TLS: it
connects to this relay on 127.0.0.1, and the relay makes the TLS connection to
central with the site's certificate. The same faults then cost a refused
connection and the bridge's next retry.

Guarantees:

* one bridge connection at a time: a new one replaces the old (the bridge
  reconnects after it notices a dead link before the relay does);
* it accepts only connections from processes of its own user (Linux: the
  peer's uid from ``/proc/net/tcp``), so another local user cannot use the
  site's identity through it; elsewhere it logs that it cannot check;
* central's certificate is checked against central's CA and the upstream host
  name (:func:`ssl.create_default_context`); a failure closes the bridge's
  connection at once and is counted, never retried here (the bridge retries);
* ``bytes_down``/``bytes_up`` count every MQTT byte relayed in each direction
  (plain text, what the bridge sent and received; TLS adds its framing on the
  wire); the link counts as up from central's successful CONNACK.

Thread ownership: all I/O runs on the relay's own event-loop thread (``start``
makes it, ``stop`` ends it). Counters are written there and read from any thread
through :meth:`Relay.counters` under a lock. ``on_session`` runs on the loop
thread: it must only hand work over (set an event).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

logger = logging.getLogger(__name__)

CONNACK = 0x20
PIPE_BYTES = 64 * 1024


@dataclass(frozen=True)
class RelayCounters:
    """A snapshot. Times are :func:`time.monotonic` seconds."""

    bytes_down: int = 0
    bytes_up: int = 0
    sessions: int = 0  # bridge sessions central accepted (successful CONNACKs)
    failures: int = 0  # connections that never became a session
    link_up: bool = False
    last_error: str | None = None
    last_byte_down_at: float = 0.0


@dataclass
class _Session:
    """One bridge connection, on the loop thread: the first bytes from central and the
    CONNACK's reason once they hold it."""

    head: bytes = b""
    reason: int | None = None


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    context: ssl.SSLContext

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"


def upstream_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """TLS towards central: its CA, host name checked, the site's client certificate."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


# -- pure helpers ------------------------------------------------------------------


def connack_reason(head: bytes) -> int | None:
    """The reason code of the CONNACK at the start of ``head`` (the first bytes central
    sends), None while too few bytes arrived; -1 when it is not a CONNACK at all."""
    if not head:
        return None
    if head[0] != CONNACK:
        return -1
    # remaining length: a variable byte integer of 1-4 bytes
    i = 1
    while i < len(head) and head[i] & 0x80:
        i += 1
        if i > 4:
            return -1
    # then the acknowledge flags byte and the reason (MQTT 5) / return code (3.1.1)
    if i + 2 >= len(head):
        return None
    return head[i + 2]


def _hex_addr(host: str, port: int) -> str:
    """An IPv4 address as /proc/net/tcp writes it: the 32-bit word in host order (little
    endian here), then the port, both upper-case hex."""
    packed = socket.inet_aton(host)
    return f"{int.from_bytes(packed, 'little'):08X}:{port:04X}"


def socket_owner_uid(proc_net_tcp: str, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The uid owning the IPv4 socket ``local`` -> ``remote`` in a /proc/net/tcp listing."""
    want_local, want_remote = _hex_addr(*local), _hex_addr(*remote)
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 7 and fields[1] == want_local and fields[2] == want_remote:
            return int(fields[7])
    return None


def same_user_peer(sock: socket.socket) -> bool:
    """Whether the process at the other end of loopback connection ``sock`` runs as our uid."""
    try:
        table = Path("/proc/net/tcp").read_text()
    except OSError:
        logger.warning("cannot read /proc/net/tcp: the relay does not check who connects to it")
        return True
    peer = sock.getpeername()[:2]
    ours = sock.getsockname()[:2]
    uid = socket_owner_uid(table, peer, ours)
    if uid != os.getuid():
        logger.warning("relay: refused a connection from %s:%s (uid %s)", peer[0], peer[1], uid)
        return False
    return True


# -- the relay ----------------------------------------------------------------------


class Relay:
    def __init__(
        self,
        upstream: Upstream,
        *,
        connect_timeout_s: float = 10.0,
        on_session: Callable[[int], None] | None = None,
        check_peer: Callable[[socket.socket], bool] = same_user_peer,
    ) -> None:
        self.upstream = upstream
        self.connect_timeout_s = connect_timeout_s
        self._on_session = on_session
        self._check_peer = check_peer
        self._lock = threading.Lock()
        self._counters = RelayCounters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._current: asyncio.Task[None] | None = None
        self.port = 0

    # -- any thread ---------------------------------------------------------------
    def counters(self) -> RelayCounters:
        with self._lock:
            return self._counters

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> int:
        """Listen on 127.0.0.1 (a free port) and return the port."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="site-relay", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), loop
        ).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        logger.info("relay on 127.0.0.1:%s -> %s (TLS)", self.port, self.upstream.label)
        return self.port

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        loop.close()
        self._loop = None

    # -- the loop thread ----------------------------------------------------------
    def _update(self, **changes: object) -> None:
        with self._lock:
            self._counters = replace(self._counters, **changes)  # type: ignore[arg-type]

    def _count(self, direction: str, n: int) -> None:
        with self._lock:
            c = self._counters
            if direction == "down":
                self._counters = replace(c, bytes_down=c.bytes_down + n, last_byte_down_at=time.monotonic())
            else:
                self._counters = replace(c, bytes_up=c.bytes_up + n)

    def _fail(self, why: str) -> None:
        with self._lock:
            c = self._counters
            self._counters = replace(c, failures=c.failures + 1, last_error=why, link_up=False)
        logger.warning("uplink to %s: %s", self.upstream.label, why)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._current is not None:
            self._current.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._current

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is None or not self._check_peer(sock):
            writer.close()
            return
        if self._current is not None and not self._current.done():
            self._current.cancel()  # a new bridge connection replaces the old one
        me = self._current = asyncio.current_task()
        try:
            await self._serve(reader, writer)
        finally:
            if self._current is me:  # a replaced connection must not mark its successor down
                self._update(link_up=False)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up = self.upstream
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(up.host, up.port, ssl=up.context, server_hostname=up.host),
                self.connect_timeout_s,
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self._fail(f"cannot connect: {exc or type(exc).__name__}")
            return
        for s in (writer.get_extra_info("socket"), up_writer.get_extra_info("socket")):
            with contextlib.suppress(OSError, AttributeError):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = _Session()
        pumps = [
            asyncio.ensure_future(self._pump(reader, up_writer, "up")),
            asyncio.ensure_future(self._pump(up_reader, writer, "down", session)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pumps:
                p.cancel()
            for p in pumps:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await p
            up_writer.close()
        if session.reason is None:
            # e.g. central refused the site's certificate after the handshake (TLS 1.3)
            self._fail("the connection closed before central's CONNACK")

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        direction: str,
        session: _Session | None = None,
    ) -> None:
        """Copy ``src`` to ``dst`` until either end closes; ``session``: watch for the CONNACK."""
        try:
            while True:
                data = await src.read(PIPE_BYTES)
                if not data:
                    return
                dst.write(data)
                await dst.drain()
                self._count(direction, len(data))
                if session is not None and session.reason is None:
                    session.head += data
                    session.reason = connack_reason(session.head)
                    if session.reason is not None:
                        self._on_connack(session.reason)
                        if session.reason != 0:
                            return
        except (OSError, ssl.SSLError) as exc:
            if direction == "down":
                logger.info("uplink to %s closed: %s", self.upstream.label, exc)

    def _on_connack(self, reason: int) -> None:
        if reason != 0:
            self._fail(f"central refused the bridge (CONNACK reason {reason:#x})")
            return
        with self._lock:
            c = self._counters
            self._counters = replace(c, sessions=c.sessions + 1, link_up=True, last_error=None)
            sessions = self._counters.sessions
        logger.info("uplink to %s up (session %d)", self.upstream.label, sessions)
        if self._on_session is not None:
            self._on_session(sessions)
