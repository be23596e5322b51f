"""A secure broker for tests, and a raw MQTT client that reports exactly what the broker did."""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties

from converter.broker.mosquitto import BrokerProcess, free_port
from converter.broker.registry import AUTH_PASSWORD, ListenerPorts
from converter.broker.secure import SecureDir

V5, V311 = paho.MQTTv5, paho.MQTTv311
B = "litefleet/v1"


WAIT_S = 10.0


# after the marker (allowed) message arrived, how long to keep listening for
# anything a denied publish might have let through
GRACE_S = 0.3


@dataclass
class Got:
    topic: str
    payload: bytes
    retain: bool
    props: Any = None


@dataclass
class Client:
    """A paho client with events for CONNACK, SUBACK, PUBACK and disconnects.
    Callbacks run on paho's network thread; tests wait on the events."""

    client: paho.Client
    protocol: int
    connack: Any = None
    connack_props: Any = None
    connected: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    disconnect_rc: Any = None
    messages: list[Got] = field(default_factory=list)
    new_message: threading.Condition = field(default_factory=threading.Condition)
    acks: dict[int, Any] = field(default_factory=dict)
    subacks: dict[int, Any] = field(default_factory=dict)
    ack_event: threading.Condition = field(default_factory=threading.Condition)

    def topics(self) -> list[str]:
        with self.new_message:
            return [m.topic for m in self.messages]

    def wait_for(self, topic: str, payload: bytes | None = None, timeout_s: float = WAIT_S) -> Got | None:
        deadline = time.monotonic() + timeout_s
        with self.new_message:
            while True:
                for m in self.messages:
                    if m.topic == topic and (payload is None or m.payload == payload):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.new_message.wait(left)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        props: Properties | None = None,
    ) -> Any:
        """Publish and wait for the broker's PUBACK; return its reason code (MQTT 5)
        or 0 (3.1.1). QoS 0: return None once sent."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if qos == 0:
            info.wait_for_publish(WAIT_S)
            return None
        deadline = time.monotonic() + WAIT_S
        with self.ack_event:
            while info.mid not in self.acks:
                left = deadline - time.monotonic()
                assert left > 0, f"no PUBACK for {topic}"
                self.ack_event.wait(left)
            return self.acks.pop(info.mid)

    def subscribe(self, topic: str, qos: int = 1) -> list[Any]:
        rc, mid = self.client.subscribe(topic, qos=qos)
        assert rc == paho.MQTT_ERR_SUCCESS
        deadline = time.monotonic() + WAIT_S
        with self.ack_event:
            while mid not in self.subacks:
                left = deadline - time.monotonic()
                assert left > 0, f"no SUBACK for {topic}"
                self.ack_event.wait(left)
            return list(self.subacks.pop(mid))

    def close(self) -> None:
        try:
            if not self.disconnected.is_set():
                self.client.disconnect()
        finally:
            self.client.loop_stop()


def tls_context(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def connect(
    port: int,
    *,
    ca: Path | None,
    cert: Path | None = None,
    key: Path | None = None,
    username: str | None = None,
    password: str | None = None,
    client_id: str = "",
    protocol: int = V5,
    host: str = "localhost",
    will: tuple[str, bytes] | None = None,
    tls: bool = True,
    clean: bool = True,
) -> Client:
    """Connect and wait for CONNACK (or for the connection to fail). The caller
    checks ``c.connack`` (a ReasonCode; ``is_failure``) or ``c.connected``."""
    p = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion(protocol),
        clean_session=None if protocol == V5 else clean,
    )
    c = Client(p, protocol)
    if tls:
        p.tls_set_context(tls_context(ca, cert, key))
    if username is not None:
        p.username_pw_set(username, password)
    if will is not None:
        p.will_set(will[0], will[1], qos=1, retain=True)

    def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        c.connack, c.connack_props = rc, props
        if not rc.is_failure:
            c.connected.set()
        else:
            c.disconnected.set()

    def on_disconnect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        c.disconnect_rc = rc
        c.disconnected.set()

    def on_message(client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with c.new_message:
            props = getattr(msg, "properties", None)
            c.messages.append(Got(msg.topic, bytes(msg.payload), bool(msg.retain), props))
            c.new_message.notify_all()

    def on_publish(client: Any, userdata: Any, mid: int, rc: Any, props: Any = None) -> None:
        with c.ack_event:
            c.acks[mid] = rc
            c.ack_event.notify_all()

    def on_subscribe(client: Any, userdata: Any, mid: int, rcs: Any, props: Any = None) -> None:
        with c.ack_event:
            c.subacks[mid] = rcs
            c.ack_event.notify_all()

    p.on_connect, p.on_disconnect, p.on_message = on_connect, on_disconnect, on_message
    p.on_publish, p.on_subscribe = on_publish, on_subscribe
    try:
        p.connect(host, port, keepalive=30)
    except (ssl.SSLError, OSError) as exc:
        c.connack = exc
        c.disconnected.set()
        return c
    # Drive the loop here until CONNACK: the TLS handshake may leave the CONNACK in
    # OpenSSL's buffer, where paho's select() in loop_start() would sit on it for 1 s.
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and not (c.connected.is_set() or c.disconnected.is_set()):
        if p.loop_read() not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_AGAIN):
            break
        time.sleep(0.005)
    if c.connected.is_set():
        p.loop_start()
    return c


def refused(c: Client) -> bool:
    """The connection never got a successful CONNACK (TLS failure, CONNACK refusal
    or the broker closing the socket)."""
    return not c.connected.is_set()


@dataclass
class Secure:
    dir: SecureDir
    broker: BrokerProcess
    ports: ListenerPorts

    def device(self, device_id: str, **kw: Any) -> Client:
        d = self.dir.paths.device_dir(device_id)
        rec = next(r for r in self.dir.devices() if r.device_id == device_id)
        if rec.auth == AUTH_PASSWORD:
            return connect(
                self.ports.password,
                ca=self.dir.paths.ca_cert,
                username=device_id,
                password=(d / "password").read_text().strip(),
                **kw,
            )
        return connect(
            self.ports.cert,
            ca=self.dir.paths.ca_cert,
            cert=d / f"{device_id}.pem",
            key=d / f"{device_id}.key",
            **kw,
        )

    def host(self, **kw: Any) -> Client:
        s = self.dir.host_client_settings()
        kw.setdefault("client_id", f"{s['client_id_prefix']}{uuid.uuid4().hex[:8]}")
        return connect(
            s["port"],
            ca=Path(s["ca_file"]),
            username=s["username"],
            password=s["password"],
            host=s["host"],
            **kw,
        )


def start_secure(root: Path, devices: dict[str, str]) -> Secure:
    sd = SecureDir(root / "secure")
    ports = ListenerPorts(free_port(), free_port(), free_port())
    sd.ensure(ports=ports)
    for device_id, auth in devices.items():
        sd.add_device(device_id, auth=auth)
    broker = BrokerProcess(sd.broker_config())
    broker.start()
    return Secure(sd, broker, ports)
