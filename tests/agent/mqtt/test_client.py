"""agent.mqtt.client against a real Mosquitto: what an operator reads in the journal."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import pytest

from agent.mqtt.client import RETAINED_READ_QOS, ConnectionSettings, MqttClient, wait_until
from tests.support.monitor import publish_many


def test_own_disconnects_log_no_errors(broker: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A clean stop (and a start again) is routine: paho's "Client is not connected" from
    its loop's last turn must not reach the log as an ERROR."""
    caplog.set_level(logging.DEBUG)  # (the agent's log_level = "debug"; paho is chattier then)
    client = MqttClient(
        ConnectionSettings(
            host="127.0.0.1",
            port=broker.port,
            client_id="pi-log",
            will_topic="litefleet/v1/devices/pi-log/state",
            will_payload=b'{"online": false}',
        )
    )
    client.connect(10)
    for n in range(10):
        for _ in range(3):  # as after an activation: events and state in flight
            client.publish("litefleet/v1/devices/pi-log/events", b"{}" * 100, qos=1)
        client.stop()
        client.set_will(b'{"online": false, "n": %d}' % n)
        client.start()
        deadline = time.monotonic() + 10
        time.sleep(0.2)
        while not client.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.connected
    client.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def test_a_lost_broker_is_still_reported(broker: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    client = MqttClient(ConnectionSettings(host="127.0.0.1", port=broker.port, client_id="pi-lost"))
    client.connect(10)
    try:
        broker.kill()
        deadline = time.monotonic() + 10
        while client.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not client.connected
        time.sleep(0.5)
    finally:
        client.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("disconnected from the broker" in m for m in warnings), warnings


def test_pahos_not_connected_line_stays_out_of_an_info_log() -> None:
    """What the agent's log setup does (a root handler at ``info`` that takes every level):
    paho's "Client is not connected" (logged at ERROR from its loop's last turn after every
    disconnect) must not reach it. Relabelled to DEBUG but passed on, it reached the journal."""
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    root = logging.getLogger()
    handler, level = Keep(), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        paho = logging.getLogger("paho")  # the logger MqttClient hands to paho
        paho.error("Client is not connected")
        paho.error("Connection refused: other")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert [r.getMessage() for r in seen] == ["Connection refused: other"]


def test_messages_reach_exact_wildcard_and_shared_subscriptions(broker: Any) -> None:
    """Exact filters are matched by string comparison, the others by paho's matcher: each
    message reaches every subscription that matches it, and no other."""
    import queue

    from tests.support.harness import publish_many

    got: queue.Queue[tuple[str, str]] = queue.Queue()
    client = MqttClient(ConnectionSettings(host="127.0.0.1", port=broker.port, client_id="pi-match"))
    for f in ("t/a", "t/+", "$share/g/t/#", "t/a/b", "end"):
        client.subscribe(f, lambda m, f=f: got.put((f, m.topic)), qos=1)
    client.connect(10)
    client.sync()
    assert client.wait_synced(10)
    # one connection delivers in order: once "end" is here, everything before it is too
    publish_many(broker.port, [(t, b"x", False) for t in ("t/a", "t/ab", "t/a/b", "u/a", "end")])
    seen: set[tuple[str, str]] = set()
    deadline = time.monotonic() + 10
    while ("end", "end") not in seen and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            seen.add(got.get(timeout=0.2))
    client.stop()
    assert seen == {
        ("t/a", "t/a"), ("t/+", "t/a"), ("$share/g/t/#", "t/a"),
        ("t/+", "t/ab"), ("$share/g/t/#", "t/ab"),
        ("t/a/b", "t/a/b"), ("$share/g/t/#", "t/a/b"),
        ("end", "end"),
    }  # fmt: skip


@pytest.mark.parametrize("count", [100, 1000])
def test_the_sync_barrier_covers_every_retained_message_on_a_stock_broker(
    stock_broker: Any, count: int
) -> None:
    """The barrier's SUBACK follows every retained message of a subscription at
    RETAINED_READ_QOS, on a Mosquitto with stock limits (20 in flight, 1,000 queued): at
    QoS 1 only 20 came before it (the agent's metadata, status and the repository's sweep
    read their retained messages this way)."""
    topics = [f"litefleet/v1/repo/metadata/{i}.root.json" for i in range(count)]
    publish_many(stock_broker.port, [(t, t.encode()) for t in topics], retain=True)
    client = MqttClient(ConnectionSettings(host="127.0.0.1", port=stock_broker.port, client_id="pi-sync"))
    got: list[str] = []
    client.subscribe("litefleet/v1/repo/metadata/+", lambda m: got.append(m.topic), qos=RETAINED_READ_QOS)
    client.connect(10)
    try:
        assert client.wait_synced(30)
        assert sorted(got) == sorted(topics)  # all of them at the barrier, before any wait
    finally:
        client.stop()


def test_a_state_published_on_reconnect_lands_after_the_one_left_unacknowledged(broker: Any) -> None:
    """The last connection ended before the broker's PUBACK of a retained state: paho re-sends
    that older state after a reconnect. What the connect listener publishes (the state as it
    is now) must reach the broker after it, or the broker keeps the older one (seen in the
    two-site test: a device served v4 while its site broker held "checking v3")."""
    from tests.support.tcp_proxy import FaultProxy

    topic = "litefleet/v1/devices/pi-order/state"
    seen: list[bytes] = []
    observer = MqttClient(ConnectionSettings(host="127.0.0.1", port=broker.port, client_id="observer"))
    observer.subscribe(topic, lambda m: seen.append(m.payload), qos=1)
    observer.connect(10)
    latest = [b"v1"]
    with FaultProxy(broker.port) as proxy:
        client = MqttClient(ConnectionSettings(host="127.0.0.1", port=proxy.port, client_id="pi-order"))
        client.add_connect_listener(lambda: client.publish(topic, latest[0], qos=1, retain=True))
        try:
            client.connect(10)
            assert wait_until(lambda: seen[-1:] == [b"v1"], 30), "v1 never reached the broker"
            proxy.mute_down = True  # the broker's PUBACK of v2 never arrives
            client.publish(topic, b"v2", qos=1, retain=True)
            assert wait_until(lambda: seen[-1:] == [b"v2"], 30), "v2 never reached the broker"
            latest[0] = b"v3"  # what changed while v2 waited for its PUBACK
            mark = len(seen)
            proxy.cut()
            proxy.mute_down = False
            # both arrive once the client is back: v2 re-sent by paho, v3 from the listener
            assert wait_until(lambda: {b"v2", b"v3"} <= set(seen[mark:]), 30), seen[mark:]
        finally:
            client.stop()
    observer.stop()
    assert seen[-1] == b"v3", seen
    reader = MqttClient(ConnectionSettings(host="127.0.0.1", port=broker.port, client_id="reader"))
    retained: list[bytes] = []
    reader.subscribe(topic, lambda m: retained.append(m.payload), qos=RETAINED_READ_QOS)
    reader.connect(10)
    try:
        assert reader.wait_synced(10)
        assert retained == [b"v3"], retained
    finally:
        reader.stop()
