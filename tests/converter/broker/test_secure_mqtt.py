"""The secure broker against real clients: TLS, authentication, ACLs and abuse.

A real Mosquitto with the generated config, real paho clients (MQTT 5 and
3.1.1). Mosquitto drops a denied publish silently (MQTT 5 QoS 1 gets PUBACK
0x87, 3.1.1 gets a plain PUBACK), so every "denied" check runs beside an
allowed publish on the same connection, published after the denied ones: the
host-side subscriber must see the allowed one arrive and nothing else.
"""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.protocol import Topics
from converter.broker.certs import make_ca, make_client_cert, new_key
from converter.broker.layout import HOST_CLIENT_ID_PREFIX, MAX_PACKET_SIZE_BYTES
from converter.broker.registry import AUTH_PASSWORD
from tests.support.secure import (
    GRACE_S,
    V5,
    V311,
    WAIT_S,
    B,
    Client,
    Secure,
    connect,
    refused,
    start_secure,
    tls_context,
)

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
    reason="mosquitto is not installed",
)


# -- a small synchronous client for tests --------------------------------------------


# -- the broker ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    s = start_secure(
        tmp_path_factory.mktemp("secure"), {"dev-a": "cert", "dev-b": "cert", "dev-p": "password"}
    )
    try:
        yield s
    finally:
        s.broker.kill()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Secure]:
    """A broker of its own, for tests that change identities."""
    s = start_secure(tmp_path, {"dev-a": "cert", "dev-p": "password"})
    try:
        yield s
    finally:
        s.broker.kill()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for c in opened:
        if c.connected.is_set():
            c.close()


def host_watcher(secure: Secure, clients: list[Client]) -> Client:
    """A host client reading everything the host may read."""
    h = secure.host()
    clients.append(h)
    assert h.connected.is_set(), h.connack
    for f in (f"{B}/repo/#", f"{B}/devices/#", f"{B}/replies/#"):
        assert not h.subscribe(f)[0].is_failure
    return h


def nonce() -> bytes:
    return uuid.uuid4().hex.encode()


# -- TLS and authentication ------------------------------------------------------------


@pytest.mark.parametrize("protocol", [V5, V311])
def test_device_with_certificate_connects_over_tls(
    secure: Secure, clients: list[Client], protocol: int
) -> None:
    c = secure.device("dev-a", protocol=protocol)
    clients.append(c)
    assert c.connected.is_set(), c.connack
    # the server presented the certificate made for localhost by our CA
    sock = c.client.socket()
    assert isinstance(sock, ssl.SSLSocket)
    peer = sock.getpeercert()
    assert ("DNS", "localhost") in peer["subjectAltName"]
    assert sock.version() in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("protocol", [V5, V311])
def test_device_with_password_connects_over_tls(secure: Secure, clients: list[Client], protocol: int) -> None:
    c = secure.device("dev-p", protocol=protocol)
    clients.append(c)
    assert c.connected.is_set(), c.connack


def test_server_certificate_names_are_checked(secure: Secure, clients: list[Client]) -> None:
    """127.0.0.1 is in the certificate, a name that is not is refused by the client."""
    ok = secure.device("dev-a", host="127.0.0.1")
    clients.append(ok)
    assert ok.connected.is_set(), ok.connack
    ctx = tls_context(secure.dir.paths.ca_cert)
    with (
        socket.create_connection(("127.0.0.1", secure.ports.cert)) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="mismatch"),
    ):
        ctx.wrap_socket(raw, server_hostname="not-the-broker.example")


def test_broker_is_not_trusted_without_its_ca(secure: Secure) -> None:
    c = connect(secure.ports.password, ca=None, username="dev-p", password="x")
    assert refused(c)
    assert isinstance(c.connack, ssl.SSLCertVerificationError)


@pytest.mark.parametrize("protocol", [V5, V311])
def test_anonymous_refused_on_every_listener(secure: Secure, protocol: int) -> None:
    ca = secure.dir.paths.ca_cert
    for port in (secure.ports.cert, secure.ports.password, secure.ports.host):
        c = connect(port, ca=ca, protocol=protocol)
        assert refused(c), port
    # the password listeners answer with a CONNACK refusal
    c = connect(secure.ports.password, ca=ca, protocol=protocol)
    assert c.connack is not None and getattr(c.connack, "is_failure", False)


def test_plain_mqtt_is_not_spoken(secure: Secure) -> None:
    for port in (secure.ports.cert, secure.ports.password, secure.ports.host):
        assert refused(connect(port, ca=None, tls=False, username="dev-p", password="x"))


@pytest.mark.parametrize("protocol", [V5, V311])
def test_wrong_password_refused(secure: Secure, protocol: int) -> None:
    ca = secure.dir.paths.ca_cert
    good = (secure.dir.paths.device_dir("dev-p") / "password").read_text().strip()
    host_pw = secure.dir.host_client_settings()["password"]
    cases = [
        (secure.ports.password, "dev-p", good + "x"),
        (secure.ports.password, "dev-p", ""),
        (secure.ports.password, "nobody", good),
        (secure.ports.host, "litefleet-host", host_pw[:-1]),
        # identities do not cross listeners
        (secure.ports.password, "litefleet-host", host_pw),
        (secure.ports.host, "dev-p", good),
    ]
    for port, user, pw in cases:
        c = connect(port, ca=ca, username=user, password=pw, protocol=protocol)
        assert refused(c), (port, user)
        assert getattr(c.connack, "is_failure", False), (port, user, c.connack)
    c = connect(secure.ports.password, ca=ca, username="dev-p", password=good, protocol=protocol)
    assert c.connected.is_set()
    c.close()


def test_certificate_listener_needs_a_certificate_from_our_ca(secure: Secure, tmp_path: Path) -> None:
    ca = secure.dir.paths.ca_cert
    # no client certificate, even with the right device password
    good = (secure.dir.paths.device_dir("dev-p") / "password").read_text().strip()
    assert refused(connect(secure.ports.cert, ca=ca, username="dev-p", password=good))
    # a certificate for CN=dev-a made by another CA
    now = dt.datetime.now(dt.UTC)
    other_key = new_key()
    other_ca = make_ca(other_key, now)
    key = new_key()
    cert = make_client_cert(other_key, other_ca, key, "dev-a", now)
    from cryptography.hazmat.primitives import serialization

    (tmp_path / "evil.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "evil.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    c = connect(secure.ports.cert, ca=ca, cert=tmp_path / "evil.pem", key=tmp_path / "evil.key")
    assert refused(c)


# -- ACLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [V5, V311])
def test_device_publishes_only_to_its_own_topics(
    secure: Secure, clients: list[Client], protocol: int
) -> None:
    watcher = host_watcher(secure, clients)
    a = secure.device("dev-a", protocol=protocol)
    clients.append(a)
    assert a.connected.is_set()
    tag = nonce()
    denied = [
        f"{B}/devices/dev-b/state",
        f"{B}/devices/dev-b/events",
        f"{B}/devices/dev-b/metrics",
        f"{B}/devices/dev-b/infer",
        f"{B}/devices/dev-a/infer",  # requests come from the host, not from the device
        f"{B}/devices/dev-a/other",
        f"{B}/repo/metadata/timestamp.json",
        f"{B}/repo/targets/x/0",
        f"{B}/replies/{HOST_CLIENT_ID_PREFIX}x/dev-b",
        f"{B}/replies/{HOST_CLIENT_ID_PREFIX}x",
        "litefleet/v2/devices/dev-a/state",
        "elsewhere",
    ]
    for topic in denied:
        rc = a.publish(topic, tag)
        if protocol == V5:
            assert rc.value == 0x87, (topic, rc)  # Not authorized
    allowed = [
        f"{B}/devices/dev-a/state",
        f"{B}/devices/dev-a/events",
        f"{B}/devices/dev-a/metrics",
        f"{B}/replies/{HOST_CLIENT_ID_PREFIX}x/dev-a",
    ]
    for topic in allowed:
        rc = a.publish(topic, tag)
        if protocol == V5:
            assert not rc.is_failure, (topic, rc)
    for topic in allowed:
        assert watcher.wait_for(topic, tag) is not None, topic
    time.sleep(GRACE_S)
    got = [m.topic for m in watcher.messages if m.payload == tag]
    assert sorted(got) == sorted(allowed)


def test_device_cannot_overwrite_or_clear_the_repository(secure: Secure, clients: list[Client]) -> None:
    host = host_watcher(secure, clients)
    topic = f"{B}/repo/metadata/{uuid.uuid4().hex}.json"
    signed = nonce()
    assert not host.publish(topic, signed, retain=True).is_failure
    a = secure.device("dev-a", protocol=V311)  # 3.1.1: the device is told nothing
    clients.append(a)
    a.publish(topic, b"forged", retain=True)
    a.publish(topic, b"", retain=True)  # an attempt to delete the retained message
    reader = secure.device("dev-b")
    clients.append(reader)
    reader.subscribe(topic)
    m = reader.wait_for(topic)
    assert m is not None and m.retain and m.payload == signed
    time.sleep(GRACE_S)
    assert [x.payload for x in reader.messages] == [signed]
    assert [x.payload for x in host.messages if x.topic == topic] == [signed]


def test_devices_read_the_repository_and_only_their_own_requests(
    secure: Secure, clients: list[Client]
) -> None:
    host = secure.host()
    clients.append(host)
    meta, chunk = f"{B}/repo/metadata/timestamp.json", f"{B}/repo/targets/abc.model.tflite/0"
    host.publish(meta, b"ts", retain=True)
    host.publish(chunk, b"chunk0", retain=True)
    a, b = secure.device("dev-a"), secure.device("dev-p")
    clients += [a, b]
    for c in (a, b):
        assert not c.subscribe(f"{B}/repo/metadata/+")[0].is_failure
        c.subscribe(f"{B}/repo/targets/abc.model.tflite/0")
        c.subscribe(f"{B}/devices/dev-a/infer")  # b may subscribe, but receives nothing
        assert c.wait_for(meta, b"ts") is not None
        assert c.wait_for(chunk, b"chunk0") is not None
    tag = nonce()
    assert not host.publish(f"{B}/devices/dev-a/infer", tag).is_failure
    assert a.wait_for(f"{B}/devices/dev-a/infer", tag) is not None
    time.sleep(GRACE_S)
    assert b.wait_for(f"{B}/devices/dev-a/infer", timeout_s=0) is None


@pytest.mark.parametrize(
    "wildcard", ["#", "litefleet/#", f"{B}/devices/+/state", f"{B}/devices/#", f"{B}/replies/#", "$SYS/#"]
)
def test_wildcard_subscription_yields_only_what_the_device_may_read(
    secure: Secure, clients: list[Client], wildcard: str
) -> None:
    """Mosquitto 2.0's ACL file grants every SUBSCRIBE and checks read access per
    message delivered, so a device's ``#`` sees its own topics and the repository
    and nothing of other devices."""
    host = host_watcher(secure, clients)
    b = secure.device("dev-b")
    clients.append(b)
    tag = nonce()
    # retained before the subscription, and live after it
    b.publish(f"{B}/devices/dev-b/state", tag, retain=True)
    spy = secure.device("dev-a")
    clients.append(spy)
    spy.subscribe(wildcard)
    host.publish(f"{B}/devices/dev-b/infer", tag)
    b.publish(f"{B}/devices/dev-b/metrics", tag)
    b.publish(f"{B}/replies/{HOST_CLIENT_ID_PREFIX}x/dev-b", tag)
    host.publish(f"{B}/repo/metadata/marker-{tag.decode()}", tag)
    assert host.wait_for(f"{B}/devices/dev-b/metrics", tag) is not None
    assert host.wait_for(f"{B}/replies/{HOST_CLIENT_ID_PREFIX}x/dev-b", tag) is not None
    if wildcard in ("#", "litefleet/#"):
        assert spy.wait_for(f"{B}/repo/metadata/marker-{tag.decode()}", tag) is not None
    time.sleep(GRACE_S)
    leaked = [t for t in spy.topics() if "/devices/dev-b/" in t or "/replies/" in t or t.startswith("$")]
    assert leaked == []


def test_host_writes_the_repository_and_reads_devices(secure: Secure, clients: list[Client]) -> None:
    host = host_watcher(secure, clients)
    tag = nonce()
    rc = host.publish(f"{B}/repo/targets/x.tflite/0", tag, retain=True)
    assert not rc.is_failure
    p = secure.device("dev-p")
    clients.append(p)
    p.publish(f"{B}/devices/dev-p/events", tag)
    assert host.wait_for(f"{B}/devices/dev-p/events", tag) is not None
    # the host may clear a device's retained state, but not impersonate its events
    assert not host.publish(f"{B}/devices/dev-p/state", b"", retain=True).is_failure
    assert host.publish(f"{B}/devices/dev-p/events", tag).value == 0x87
    assert host.publish("elsewhere", tag).value == 0x87


def test_inference_reply_scheme(secure: Secure, clients: list[Client]) -> None:
    """The host asks dev-a with an MQTT 5 response topic in its own reply space;
    dev-a answers there; dev-a cannot answer into dev-b's reply space."""
    host = secure.host()
    clients.append(host)
    host_id = host.client._client_id.decode()
    assert host_id.startswith(HOST_CLIENT_ID_PREFIX)
    host.subscribe(f"{B}/replies/{host_id}/#")
    a = secure.device("dev-a")
    clients.append(a)
    a.subscribe(f"{B}/devices/dev-a/infer")
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = Topics("litefleet").reply(host_id, "dev-a")
    props.CorrelationData = b"req-1"
    host.publish(f"{B}/devices/dev-a/infer", b'{"instances": [1]}', props=props)
    req = a.wait_for(f"{B}/devices/dev-a/infer")
    assert req is not None
    assert req.props.ResponseTopic == f"{B}/replies/{host_id}/dev-a"
    answer = Properties(PacketTypes.PUBLISH)
    answer.CorrelationData = req.props.CorrelationData
    assert not a.publish(req.props.ResponseTopic, b"ok", props=answer).is_failure
    assert a.publish(f"{B}/replies/{host_id}/dev-b", b"spoof").value == 0x87
    got = host.wait_for(f"{B}/replies/{host_id}/dev-a", b"ok")
    assert got is not None and got.props.CorrelationData == b"req-1"
    time.sleep(GRACE_S)
    assert host.topics() == [f"{B}/replies/{host_id}/dev-a"]


def _drop(c: Client) -> None:
    """Lose the connection without DISCONNECT: the broker sends the will."""
    c.client.socket().close()
    c.client.loop_stop()


def test_will_only_on_own_topics(secure: Secure, clients: list[Client]) -> None:
    """A will is a publish too. Mosquitto 2.0.11 accepts the CONNECT but checks the
    will against the ACL when it would send it: a will on dev-b's state is dropped,
    one on the device's own state arrives."""
    host = host_watcher(secure, clients)
    tag = nonce().decode()
    forged = f'{{"online": false, "tag": "{tag}"}}'.encode()
    own = f'{{"online": false, "own": "{tag}"}}'.encode()
    a = secure.device("dev-a", will=(f"{B}/devices/dev-b/state", forged))
    p = secure.device("dev-p", will=(f"{B}/devices/dev-p/state", own))
    assert a.connected.is_set() and p.connected.is_set()
    _drop(a)
    _drop(p)
    assert host.wait_for(f"{B}/devices/dev-p/state", own, timeout_s=10) is not None
    time.sleep(GRACE_S)
    assert host.wait_for(f"{B}/devices/dev-b/state", forged, timeout_s=0) is None


# -- sessions and packet size ---------------------------------------------------------------


def test_reused_device_identity_takes_over_the_older_session(secure: Secure, clients: list[Client]) -> None:
    first = secure.device("dev-b")
    clients.append(first)
    second = secure.device("dev-b", client_id="anything-else")
    clients.append(second)
    assert second.connected.is_set()
    assert second.client._client_id.decode() == "anything-else"  # paho's view...
    assert first.disconnected.wait(WAIT_S)  # ...but the broker made it dev-b
    # Mosquitto 2.0.11 just closes the older connection (paho: "Unspecified error")
    # where newer brokers send DISCONNECT 0x8E "Session taken over"
    assert first.disconnect_rc.value in (0x80, 0x8E)
    assert not first.client.is_connected()


def test_device_cannot_take_over_another_devices_session(secure: Secure, clients: list[Client]) -> None:
    victim = secure.device("dev-b", client_id="dev-b")  # as the agent does
    clients.append(victim)
    for make in (
        lambda: secure.device("dev-a", client_id="dev-b"),
        lambda: secure.device("dev-p", client_id="dev-b"),
    ):
        attacker = make()
        clients.append(attacker)
        assert attacker.connected.is_set()
    assert not victim.disconnected.wait(1.0)
    tag = nonce()
    assert not victim.publish(f"{B}/devices/dev-b/events", tag).is_failure


def test_host_clients_coexist(secure: Secure, clients: list[Client]) -> None:
    one, two = secure.host(), secure.host()
    clients += [one, two]
    assert one.connected.is_set() and two.connected.is_set()
    assert not one.disconnected.wait(0.5)


def _wait_refused_or_dropped(c: Client) -> None:
    assert c.disconnected.wait(WAIT_S), "the broker kept the connection"


def test_oversized_packet_disconnects(secure: Secure, clients: list[Client]) -> None:
    host = host_watcher(secure, clients)
    # MQTT 3.1.1 clients learn no limit: the broker cuts them off
    a = secure.device("dev-a", protocol=V311)
    clients.append(a)
    topic = f"{B}/devices/dev-a/metrics"
    ok = nonce() + b"." * (1024 * 1024)  # well above a 256 KiB chunk, below the cap
    a.publish(topic, ok)
    assert host.wait_for(topic, ok) is not None
    a.client.publish(topic, b"x" * (MAX_PACKET_SIZE_BYTES + 1), qos=1)
    _wait_refused_or_dropped(a)
    # the host's own big publishes are held to the same limit
    h = secure.host(protocol=V311)
    clients.append(h)
    h.client.publish(f"{B}/repo/targets/big/0", b"x" * (MAX_PACKET_SIZE_BYTES + 1), qos=1)
    _wait_refused_or_dropped(h)
    time.sleep(GRACE_S)
    seen = [len(m.payload) for m in host.messages if m.topic in (topic, f"{B}/repo/targets/big/0")]
    assert seen == [len(ok)]


def test_mqtt5_clients_are_told_the_limit(secure: Secure, clients: list[Client]) -> None:
    """CONNACK carries Maximum Packet Size; paho 2.2 does not enforce it on publish,
    so an oversized publish from an MQTT 5 client is cut off by the broker too."""
    a = secure.device("dev-a")
    clients.append(a)
    assert a.connected.is_set()
    assert a.connack_props.MaximumPacketSize == MAX_PACKET_SIZE_BYTES
    a.client.publish(f"{B}/devices/dev-a/metrics", b"x" * MAX_PACKET_SIZE_BYTES, qos=1)
    _wait_refused_or_dropped(a)


# -- changing identities while the broker runs --------------------------------------------


def test_added_device_connects_without_a_restart(fresh: Secure, clients: list[Client]) -> None:
    fresh.dir.add_device("dev-new")
    fresh.dir.add_device("dev-new-p", auth=AUTH_PASSWORD)
    # reload_broker returns once Mosquitto logged the reload: no sleep needed
    assert fresh.dir.reload_broker() == fresh.broker.proc.pid
    for d in ("dev-new", "dev-new-p"):
        c = fresh.device(d)
        clients.append(c)
        assert c.connected.is_set(), (d, c.connack)
        assert not c.publish(f"{B}/devices/{d}/state", b"{}").is_failure


def test_removed_device_is_locked_out(fresh: Secure, clients: list[Client]) -> None:
    host = host_watcher(fresh, clients)
    ca = fresh.dir.paths.ca_cert
    a_dir = fresh.dir.paths.device_dir("dev-a")
    cert, key = a_dir / "dev-a.pem", a_dir / "dev-a.key"
    saved = {p.name: p.read_bytes() for p in (cert, key)}
    password = (fresh.dir.paths.device_dir("dev-p") / "password").read_text().strip()
    a, p = fresh.device("dev-a"), fresh.device("dev-p")
    clients += [a, p]
    a.subscribe(f"{B}/repo/#")
    fresh.dir.remove_device("dev-a")
    fresh.dir.remove_device("dev-p")
    assert fresh.dir.reload_broker()
    # a password session is closed by the reload
    assert p.disconnected.wait(WAIT_S)
    # a certificate session stays open but has no rights left
    tag = nonce()
    host.publish(f"{B}/repo/metadata/after-removal", tag, retain=True)
    a.publish(f"{B}/devices/dev-a/state", tag)
    time.sleep(GRACE_S)
    assert a.wait_for(f"{B}/repo/metadata/after-removal", timeout_s=0) is None
    assert host.wait_for(f"{B}/devices/dev-a/state", tag, timeout_s=0) is None
    # new connections: the certificate is revoked (CRL), the password is gone
    for name, data in saved.items():
        (fresh.dir.root / name).write_bytes(data)
    again = connect(
        fresh.ports.cert, ca=ca, cert=fresh.dir.root / "dev-a.pem", key=fresh.dir.root / "dev-a.key"
    )
    assert refused(again)
    again_p = connect(fresh.ports.password, ca=ca, username="dev-p", password=password)
    assert refused(again_p)


def test_renewed_certificate_replaces_the_old_one(fresh: Secure, clients: list[Client]) -> None:
    a_dir = fresh.dir.paths.device_dir("dev-a")
    old = {p: (a_dir / p).read_bytes() for p in ("dev-a.pem", "dev-a.key")}
    for name, data in old.items():
        (fresh.dir.root / f"old-{name}").write_bytes(data)
    fresh.dir.add_device("dev-a", renew=True)
    assert fresh.dir.reload_broker()
    new = fresh.device("dev-a")
    clients.append(new)
    assert new.connected.is_set()
    stale = connect(
        fresh.ports.cert,
        ca=fresh.dir.paths.ca_cert,
        cert=fresh.dir.root / "old-dev-a.pem",
        key=fresh.dir.root / "old-dev-a.key",
    )
    assert refused(stale)


def test_retained_repository_survives_a_restart(fresh: Secure, clients: list[Client]) -> None:
    host = fresh.host()
    host.publish(f"{B}/repo/metadata/1.root.json", b"root", retain=True)
    host.close()
    time.sleep(0.1)
    fresh.broker.restart()
    a = fresh.device("dev-a")
    clients.append(a)
    a.subscribe(f"{B}/repo/#")
    assert a.wait_for(f"{B}/repo/metadata/1.root.json", b"root") is not None
