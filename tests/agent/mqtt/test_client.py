"""agent.mqtt.client against a real Mosquitto: what an operator reads in the journal."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from agent.mqtt.client import ConnectionSettings, MqttClient


def test_own_disconnects_log_no_errors(broker: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A will renewal (disconnect + reconnect) and a clean stop are routine: paho's
    "Client is not connected" from its loop's last turn must not reach the log as an ERROR."""
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
        client.replace_will(b'{"online": false, "n": %d}' % n)
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


def test_pahos_not_connected_line_stays_out_of_an_info_log(broker: Any) -> None:
    """What the agent's log setup does (``logging.basicConfig`` at ``info``: the root handler
    takes every level): a will renewal's "Client is not connected" from paho must not reach
    it. Relabelled to DEBUG but passed on, it did reach the journal."""
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    root = logging.getLogger()
    handler, level = Keep(), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    client = MqttClient(
        ConnectionSettings(
            host="127.0.0.1",
            port=broker.port,
            client_id="pi-quiet",
            will_topic="litefleet/v1/devices/pi-quiet/state",
            will_payload=b'{"online": false}',
        )
    )
    try:
        client.connect(10)
        for n in range(5):
            client.publish("litefleet/v1/devices/pi-quiet/events", b"{}", qos=1)
            client.replace_will(b'{"online": false, "n": %d}' % n)
            deadline = time.monotonic() + 10
            time.sleep(0.2)
            while not client.connected and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.connected
    finally:
        client.stop()
        root.removeHandler(handler)
        root.setLevel(level)
    paho_lines = [r.getMessage() for r in seen if r.name == "paho"]
    assert not [m for m in paho_lines if "not connected" in m], paho_lines
    assert any(r.name == "agent.mqtt.client" for r in seen)  # the handler did see our own lines
