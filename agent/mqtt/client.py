"""The one module that talks to paho-mqtt.

:class:`MqttClient` connects (MQTT 5, TLS and credentials as configured),
reconnects on its own, and re-subscribes everything after each reconnect.
Incoming messages are copied into frozen :class:`agent.mqtt.transport.Message`
objects on paho's network thread and handed to the handler registered for the
matching filter; handlers must only queue work (they run on paho's thread).
paho's return codes become :class:`agent.errors.TransportError`; paho's own
log goes through :mod:`logging`; payloads never appear in logs.

Sync barrier: :meth:`MqttClient.wait_synced` returns once every retained
message of the subscriptions made before it has been handed to its handler.
After (re)subscribing, the client sends one more SUBSCRIBE and waits for its
SUBACK: Mosquitto queues a subscription's retained messages while it handles
that SUBSCRIBE, before it reads the next packet, and one connection delivers
in order. This is how the agent tells "no such retained message" (MQTT has
no "not found") without a timeout, for subscriptions at :data:`RETAINED_READ_QOS`.
``network``: one shared network thread instead of paho's (:mod:`agent.mqtt.network`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import TransportError
from agent.mqtt.filters import has_wildcard, topic_filter_of
from agent.mqtt.inflight import PublishInFlight
from agent.mqtt.network import SharedNetwork
from agent.mqtt.paho_log import PAHO_LOG, quiet_paho_log
from agent.mqtt.transport import Message

logger = logging.getLogger(__name__)


def _properties(packet_type: int) -> Properties:
    """MQTT 5 properties for one packet (paho's constructor has no type hints)."""
    return Properties(packet_type)  # type: ignore[no-untyped-call]


quiet_paho_log()

Handler = Callable[[Message], None]

# QoS of a subscription read for its retained messages behind the sync barrier (metadata,
# status, the monitor's states). A stock Mosquitto sent 20 of N retained QoS 1 messages before
# the barrier's SUBACK and dropped those beyond 1,020; at QoS 0 all of 5,000 came before it
# (docs/protocol.md 3.3). A reconnect re-subscribes: the retained ones come again.
RETAINED_READ_QOS = 0


@dataclass(frozen=True)
class ConnectionSettings:
    """How to reach the broker. Built from :class:`agent.service.config.AgentConfig` or the host CLI."""

    host: str
    port: int
    client_id: str
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30
    # > 0: a persistent session (MQTT 5 Session Expiry Interval): the broker keeps this
    # client's subscriptions and queues its QoS 1 messages while it is away that long
    session_expiry_s: int = 0
    will_topic: str | None = None
    will_payload: bytes = b""
    will_retain: bool = True


STOP_DRAIN_S = 5.0  # stop(): bound on waiting for the broker to acknowledge what was sent


def _describe_rc(rc: Any) -> str:
    if isinstance(rc, ReasonCode):
        return str(rc)
    if isinstance(rc, MQTTErrorCode):
        return paho.error_string(rc)
    return str(rc)


class MqttClient:
    """A reconnecting MQTT 5 client. Thread-safe: publish/subscribe from any thread."""

    def __init__(self, settings: ConnectionSettings, *, network: SharedNetwork | None = None) -> None:
        """``network``: drive this connection from a shared network thread (the fleet
        simulator's, :mod:`agent.mqtt.network`) instead of paho's own thread."""
        self.settings = settings
        self._network = network
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=paho.MQTTv5,
        )
        self._client.enable_logger(PAHO_LOG)
        self._client.reconnect_delay_set(min_delay=1, max_delay=15)
        # paho's default of 20 in flight stalls large pushes; the broker allows 50
        self._client.max_inflight_messages_set(50)
        self._client.max_queued_messages_set(0)
        if settings.tls:
            ctx = ssl.create_default_context(cafile=settings.ca_file or None)
            if settings.cert_file:
                ctx.load_cert_chain(settings.cert_file, settings.key_file or None)
            self._client.tls_set_context(ctx)
        if settings.username:
            self._client.username_pw_set(settings.username, settings.password)
        if settings.will_topic and settings.will_payload:
            self._client.will_set(
                settings.will_topic, settings.will_payload, qos=1, retain=settings.will_retain
            )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_socket_open = self._on_socket_open
        if network is not None:
            self._client.on_socket_close = lambda c, u, sock: network.socket_close(c, sock)
            self._client.on_socket_register_write = lambda c, u, sock: network.register_write(c)
            self._client.on_socket_unregister_write = lambda c, u, sock: network.unregister_write(c)
        # mid -> reason of publishes the broker refused (bounded)
        self._refused: dict[int, str] = {}
        self._lock = threading.Lock()
        # filter -> (qos, handler); re-subscribed after every reconnect
        self._subs: dict[str, tuple[int, Handler]] = {}
        self._connected = threading.Event()
        self._synced = threading.Event()
        self._barrier_mids: set[int] = set()
        self._sub_lock = threading.RLock()
        self._disconnected = threading.Event()
        self._stopping = False
        self._acked_mids: set[int] = set()
        self._connect_error: str | None = None
        self._on_connected: list[Callable[[], None]] = []
        self._connect_barrier: int | None = None  # its SUBACK runs the connect listeners
        self._started = False
        # a persistent session keeps its subscriptions: one barrier topic per session, not
        # one more per process
        token = (
            hashlib.sha256(settings.client_id.encode()).hexdigest()[:32]
            if settings.session_expiry_s > 0
            else uuid.uuid4().hex
        )
        self._barrier_topic = f"$litefleet-sync/{token}"
        self.connects = 0
        self._last_delivery: PublishInFlight | None = None
        self._will_factory: Callable[[], bytes] | None = None

    # -- lifecycle -------------------------------------------------------------
    def add_connect_listener(self, fn: Callable[[], None]) -> None:
        """``fn()`` runs on paho's thread after each (re)connect, once the broker has
        answered the re-subscribe: after paho has re-sent the publishes the last
        connection left unacknowledged, so what ``fn`` publishes reaches the broker
        after them (paho re-sends them only after ``on_connect`` returns: a retained
        state published from there was overwritten by the older one re-sent)."""
        self._on_connected.append(fn)

    def start(self) -> None:
        """Connect in the background; keeps retrying until :meth:`stop`."""
        if self._started:
            return
        self._started = True
        props = None
        if self.settings.session_expiry_s > 0:
            props = _properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.settings.session_expiry_s
        try:
            self._client.connect_async(
                self.settings.host,
                self.settings.port,
                keepalive=self.settings.keepalive_s,
                clean_start=self.settings.session_expiry_s <= 0,
                properties=props,
            )
        except (OSError, ValueError) as exc:
            where = f"{self.settings.host}:{self.settings.port}"
            raise TransportError(f"cannot connect to {where}: {exc}") from exc
        if self._network is not None:
            self._network.attach(self._client, on_lost=self._on_connect_failed)
        else:
            self._client.loop_start()

    def connect(self, timeout_s: float = 10.0) -> None:
        """Start and wait until connected, or raise :class:`TransportError`."""
        self.start()
        if not self._connected.wait(timeout_s):
            self.stop()
            why = self._connect_error or "no answer"
            raise TransportError(
                f"could not connect to the broker at {self.settings.host}:{self.settings.port} "
                f"within {timeout_s:g} s ({why})"
            )

    def stop(self, *, publish_will: bool = False) -> None:
        """Disconnect cleanly (the will is not sent unless ``publish_will``), once the broker
        acknowledged every QoS 1 publish (up to ``STOP_DRAIN_S`` while connected)."""
        if not self._started:
            return
        self._started = False
        self._stopping = True  # the disconnect that follows is ours: not worth a warning
        last = self._last_delivery
        if last is not None and self._connected.is_set():
            # the broker acknowledges QoS 1 in order: once the last is, all are. A DISCONNECT
            # written while acknowledgements are still coming makes the close a reset, and
            # a broker that fails to write to it drops the connection without reading the
            # DISCONNECT: it publishes the will (seen on 23 of 1,000 simulated devices)
            last.wait(STOP_DRAIN_S)
        try:
            reason = ReasonCode(PacketTypes.DISCONNECT, identifier=4) if publish_will else None
            if self._network is not None:
                self._network.disconnect(self._client, reason)
            else:
                self._client.disconnect(reasoncode=reason)
            # return once paho has sent the DISCONNECT and closed the socket
            # (on_disconnect), not while its loop may still be mid-turn
            self._disconnected.wait(2.0)
        finally:
            if self._network is not None:
                self._network.detach(self._client)
            else:
                self._client.loop_stop()
            self._connected.clear()
            self._stopping = False

    def set_will(self, payload: bytes | Callable[[], bytes]) -> None:
        """Set the will before :meth:`start`; a callable is asked again (on the network thread)
        when a connection ends, for the next one: a will that carries its connection's time."""
        if not self.settings.will_topic:
            raise ValueError("no will_topic in the connection settings")
        self._will_factory = payload if callable(payload) else None
        data = payload() if callable(payload) else payload
        self._client.will_set(self.settings.will_topic, data, qos=1, retain=self.settings.will_retain)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def wait_synced(self, timeout_s: float) -> bool:
        """True once the retained messages of all current subscriptions were handled."""
        return self._synced.wait(timeout_s)

    # -- publish ---------------------------------------------------------------
    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        content_type: str | None = None,
        user_properties: list[tuple[str, str]] | None = None,
    ) -> PublishInFlight:
        if not self._connected.is_set():
            raise TransportError("not connected to the broker")
        props = None
        if response_topic or correlation_data or content_type or user_properties:
            props = _properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation_data is not None:
                props.CorrelationData = correlation_data
            if content_type:
                props.ContentType = content_type
            if user_properties:
                props.UserProperty = user_properties
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"publish to {topic} failed: {_describe_rc(info.rc)}")
        self._refused.pop(info.mid, None)
        delivery = PublishInFlight(info, self._refused)
        if qos:
            self._last_delivery = delivery
        return delivery

    # -- subscribe ---------------------------------------------------------------
    # _sub_lock orders subscriptions and barriers against (re)connects: a filter is
    # either in the snapshot a reconnect re-subscribes, or sent once connected, and a
    # barrier is always sent after every subscription made before it.
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Subscribe now (if connected) and after every reconnect."""
        self.subscribe_many([topic_filter], handler, qos)

    def subscribe_many(self, filters: list[str], handler: Handler, qos: int = 1) -> None:
        with self._sub_lock:
            with self._lock:
                for f in filters:
                    self._subs[f] = (qos, handler)
            if filters and self._connected.is_set():
                self._client.subscribe([(f, qos) for f in filters])

    def unsubscribe(self, *topic_filters: str) -> None:
        with self._sub_lock:
            with self._lock:
                gone = [f for f in topic_filters if self._subs.pop(f, None) is not None]
            if gone and self._connected.is_set():
                self._client.unsubscribe(gone)

    def sync(self) -> None:
        """Start a new sync barrier (see module docstring); :meth:`wait_synced` waits for it."""
        with self._sub_lock:
            with self._lock:
                # older barriers no longer count: their SUBACKs say nothing about
                # subscriptions made since
                self._barrier_mids = set()
                self._synced.clear()
            if self._connected.is_set():
                self._send_barrier()

    def _send_barrier(self) -> int | None:
        """Send a barrier SUBSCRIBE; its mid, or None when it was answered already or
        could not be sent."""
        # a filter nobody publishes to; only its SUBACK matters. A broker that
        # refuses it still answers with a SUBACK, which is all we need.
        rc, mid = self._client.subscribe(self._barrier_topic, qos=0)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return None
        with self._lock:
            # the SUBACK may have been handled already, on paho's thread
            if mid in self._acked_mids:
                self._acked_mids.discard(mid)
                self._synced.set()
                return None
            self._barrier_mids.add(mid)
        return mid

    # -- paho callbacks (paho's network thread) ---------------------------------------
    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, properties: Any = None
    ) -> None:
        if rc.is_failure:
            self._connect_error = str(rc)
            logger.warning("broker refused the connection: %s", rc)
            return
        self.connects += 1
        self._connect_error = None
        with self._sub_lock:
            with self._lock:
                subs = list(self._subs.items())
                self._barrier_mids = set()
                self._acked_mids.clear()
                self._synced.clear()
            if subs:
                client.subscribe([(f, q) for f, (q, _) in subs])
            barrier = self._send_barrier()
            with self._lock:
                self._connect_barrier = barrier
            self._disconnected.clear()
            self._connected.set()
        logger.info("connected to %s:%s", self.settings.host, self.settings.port)
        if barrier is None:  # nothing will answer: run them now
            self._run_connect_listeners()

    def _run_connect_listeners(self) -> None:
        for fn in self._on_connected:
            try:
                fn()
            except Exception:  # a listener's bug must not kill paho's thread
                logger.exception("connect listener failed")

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, properties: Any = None
    ) -> None:
        was = self._connected.is_set()
        # ours: during stop(), or after it (on a shared network thread, the DISCONNECT of a
        # stopped client may be written after stop() returned)
        ours = self._stopping or not self._started
        self._connected.clear()
        self._synced.clear()
        if self._network is not None and not ours:
            self._network.reconnect_later(self._client)
        if self._will_factory is not None and self.settings.will_topic:
            # paho's loop reconnects with the will set now (this runs on its thread first)
            self._client.will_set(
                self.settings.will_topic, self._will_factory(), qos=1, retain=self.settings.will_retain
            )
        self._disconnected.set()
        if was and not ours:
            logger.warning("disconnected from the broker: %s", rc)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Any = None,
    ) -> None:
        with self._lock:
            is_barrier = mid in self._barrier_mids
            self._barrier_mids.discard(mid)
            connected_now = mid == self._connect_barrier
            if connected_now:
                self._connect_barrier = None
            if is_barrier:
                self._synced.set()
            else:
                self._acked_mids.add(mid)
                if len(self._acked_mids) > 256:
                    self._acked_mids.pop()
        if connected_now:
            self._run_connect_listeners()
        if not is_barrier and any(rc.is_failure for rc in reason_codes):
            logger.warning(
                "broker refused a subscription (mid %s): %s", mid, ", ".join(str(rc) for rc in reason_codes)
            )

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho leaves Nagle on: every small SUBSCRIBE then waits ~40 ms for a
        # delayed ACK, and a windowed chunk download crawls at 6 MB/s (measured
        # here; 300 MB/s with TCP_NODELAY)
        with contextlib.suppress(OSError, AttributeError):  # not TCP: a test double
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._network is not None:
            self._network.socket_open(client, sock)

    def _on_connect_failed(self) -> None:  # the shared network thread: an attempt failed
        self._connect_error = "connection refused or unreachable"

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, rc: ReasonCode, properties: Any = None
    ) -> None:
        # 0x10 "no matching subscribers" is a success; >= 0x80 is a refusal
        if isinstance(rc, ReasonCode) and rc.is_failure:
            if len(self._refused) > 1024:
                self._refused.pop(next(iter(self._refused)))
            self._refused[mid] = str(rc)
            logger.warning("broker refused publish %s: %s", mid, rc)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        message = Message(
            topic=msg.topic,
            payload=bytes(msg.payload),
            retain=bool(msg.retain),
            qos=int(msg.qos),
            response_topic=getattr(props, "ResponseTopic", None) if props else None,
            correlation_data=getattr(props, "CorrelationData", None) if props else None,
            content_type=getattr(props, "ContentType", None) if props else None,
            user_properties=tuple(getattr(props, "UserProperty", ()) or ()) if props else (),
        )
        # a filter without wildcards matches only its own topic: compare strings, and leave
        # paho's matcher (10 us a call here) to wildcard and shared filters (a chunk download
        # holds up to 8 exact filters; this ran for every chunk, metadata file and request)
        topic = msg.topic
        with self._lock:
            handlers = [
                h
                for f, (_, h) in self._subs.items()
                if f == topic or (has_wildcard(f) and paho.topic_matches_sub(topic_filter_of(f), topic))
            ]
        if not handlers:
            logger.debug("message on %s (%d bytes) matches no subscription", msg.topic, len(message.payload))
            return
        for handler in handlers:
            try:
                handler(message)
            except Exception:
                logger.exception("handler for %s failed", msg.topic)


def wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` passes (for CLI and tests)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()
