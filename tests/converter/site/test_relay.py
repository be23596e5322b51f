"""The site's relay: the CONNACK and /proc/net/tcp parsers (pure), then a real relay between
a plain MQTT 5 client and a real TLS Mosquitto that knows the site's certificate."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from converter.broker.certs import make_ca, new_key, pem_cert
from converter.broker.mosquitto import free_port
from converter.broker.uplink import load_uplink
from converter.site.relay import (
    Relay,
    Upstream,
    connack_reason,
    same_user_peer,
    socket_owner_uid,
    upstream_context,
)
from tests.support.secure import Client, connect, refused
from tests.support.sites import Central, start_central, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
    reason="mosquitto is not installed",
)
B = "litefleet/v1"


@pytest.mark.parametrize(
    ("head", "want"),
    [
        (b"", None),
        (b"\x20", None),
        (b"\x20\x03\x00", None),
        (b"\x20\x03\x00\x00\x00", 0),  # MQTT 5 success, no properties
        (b"\x20\x03\x00\x87\x00", 0x87),  # not authorized
        (b"\x20\x02\x00\x05", 5),  # MQTT 3.1.1 refused
        (b"\x20\x83\x01\x00\x00", 0),  # a two-byte remaining length (131)
        (b"\x20\x83", None),
        (b"\x30\x03\x00\x00\x00", -1),  # a PUBLISH first: not a CONNACK
        (b"\x20\x80\x80\x80\x80\x01", -1),  # a remaining length of five bytes
    ],
)
def test_connack_reason(head: bytes, want: int | None) -> None:
    assert connack_reason(head) == want


PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:A1B2 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 1 1 0 20 4 30 10 -1
   1: 0100007F:1F90 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
"""


def test_socket_owner_uid_reads_proc_net_tcp() -> None:
    assert socket_owner_uid(PROC_NET_TCP, ("127.0.0.1", 0xA1B2), ("127.0.0.1", 0x1F90)) == 1000
    assert socket_owner_uid(PROC_NET_TCP, ("127.0.0.1", 0x1F90), ("127.0.0.1", 0xA1B2)) == 0
    assert socket_owner_uid(PROC_NET_TCP, ("127.0.0.1", 1), ("127.0.0.1", 2)) is None


def test_a_connection_from_our_own_user_is_accepted() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    with srv, socket.create_connection(srv.getsockname()):
        conn, _ = srv.accept()
        with conn:
            assert same_user_peer(conn)


# -- a real relay -------------------------------------------------------------------


@pytest.fixture
def central(tmp_path: Path) -> Iterator[Central]:
    c = start_central(tmp_path, {"a": ["dev-a1"]})
    try:
        yield c
    finally:
        c.stop()


def relay_for(
    central: Central,
    *,
    port: int | None = None,
    context: ssl.SSLContext | None = None,
    sessions: list[int] | None = None,
) -> Relay:
    _, paths = load_uplink(central.dir.site_dir("a"))
    ctx = context or upstream_context(paths.ca_cert, paths.uplink_cert, paths.uplink_key)
    relay = Relay(
        Upstream("127.0.0.1", port or central.cert_port, ctx),
        on_session=None if sessions is None else sessions.append,
        connect_timeout_s=5,
    )
    relay.start()
    return relay


def bridge_like(relay: Relay) -> Client:
    """What Mosquitto's bridge does: plain MQTT 5 to the relay."""
    return connect(relay.port, ca=None, tls=False, client_id="_site-a")


def test_the_relay_carries_a_session_as_the_site_and_counts_each_direction(central: Central) -> None:
    sessions: list[int] = []
    relay = relay_for(central, sessions=sessions)
    host = central.host()
    try:
        c = bridge_like(relay)
        assert c.connected.is_set(), c.connack
        wait_until(lambda: relay.counters().link_up, 5, "link up")
        assert sessions == [1]
        c.subscribe(f"{B}/repo/#")
        payload = b"x" * 300_000
        assert not host.publish(f"{B}/repo/targets/f/0", payload, retain=True).is_failure
        assert c.wait_for(f"{B}/repo/targets/f/0") is not None
        # central's ACL holds for the relayed session: the site may not write the repository
        assert c.publish(f"{B}/repo/metadata/evil.json", b"x").value == 0x87
        assert c.publish(f"{B}/devices/dev-a1/state", b"{}").value in (0, 0x10)
        n = relay.counters()
        assert len(payload) < n.bytes_down < len(payload) * 1.01
        assert 0 < n.bytes_up < 2000 and n.failures == 0
        c.close()
        wait_until(lambda: not relay.counters().link_up, 5, "link down after the bridge left")
    finally:
        host.close()
        relay.stop()


def test_a_new_bridge_connection_replaces_the_old_one(central: Central) -> None:
    relay = relay_for(central)
    try:
        first = bridge_like(relay)
        assert first.connected.is_set()
        second = bridge_like(relay)
        assert second.connected.is_set()
        assert first.disconnected.wait(5)  # the relay dropped it (central would too: same CN)
        assert relay.counters().sessions == 2
        second.close()
    finally:
        relay.stop()


def test_a_wrong_ca_is_a_counted_failure_not_a_session(central: Central, tmp_path: Path) -> None:
    """The fault that hangs a TLS bridge inside Mosquitto 2.0.11: here the bridge's
    connection is closed at once, and the relay goes on serving the next one."""
    import datetime as dt

    other_ca = tmp_path / "other-ca.pem"
    key = new_key()
    other_ca.write_bytes(pem_cert(make_ca(key, dt.datetime.now(dt.UTC))))
    _, paths = load_uplink(central.dir.site_dir("a"))
    relay = relay_for(central, context=upstream_context(other_ca, paths.uplink_cert, paths.uplink_key))
    try:
        c = bridge_like(relay)
        assert refused(c)
        n = relay.counters()
        assert n.failures == 1 and n.sessions == 0 and not n.link_up
        assert n.last_error and "certificate verify failed" in n.last_error
    finally:
        relay.stop()


def test_central_down_closes_the_bridge_connection_at_once(central: Central) -> None:
    relay = relay_for(central, port=free_port())
    try:
        c = bridge_like(relay)
        assert refused(c)
        assert relay.counters().failures == 1 and "cannot connect" in str(relay.counters().last_error)
    finally:
        relay.stop()


def test_a_revoked_site_certificate_fails_after_the_handshake(central: Central) -> None:
    relay = relay_for(central)
    try:
        central.dir.add_site("a", renew=True)  # the bundle the relay holds is now revoked (CRL)
        assert central.dir.reload_broker() is not None
        c = bridge_like(relay)
        assert refused(c)
        wait_until(lambda: relay.counters().failures == 1, 5, "a failure")
        assert relay.counters().sessions == 0
        # TLS 1.3: the server checks the client certificate after the client's handshake is done
        assert "closed before central's CONNACK" in str(relay.counters().last_error)
    finally:
        relay.stop()


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK), reason="needs root and a system python3"
)
def test_a_connection_from_another_user_is_refused_before_central_is_dialled(central: Central) -> None:
    """Any local process reaching the relay would speak to central as the site: one of
    another user gets its connection closed, and central is never contacted for it."""
    relay = relay_for(central)
    try:
        code = (
            "import socket, sys\n"
            f"s = socket.create_connection(('127.0.0.1', {relay.port}))\n"
            "s.settimeout(5)\n"
            "sys.exit(0 if s.recv(1) == b'' else 1)\n"
        )
        # the system interpreter: the test's venv may not be readable by another user
        r = subprocess.run(["/usr/bin/python3", "-c", code], user="nobody", capture_output=True, timeout=20)
        assert r.returncode == 0, r.stderr  # closed at once, nothing relayed
        n = relay.counters()
        assert (n.sessions, n.failures, n.bytes_up, n.bytes_down) == (0, 0, 0, 0), n
    finally:
        relay.stop()
