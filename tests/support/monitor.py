"""A monitor collector running in the test process, and publishing device messages as a device would."""

from __future__ import annotations

import contextlib
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt.client import ConnectionSettings
from agent.protocol import Topics
from converter.monitor.collector import Collector, CollectorConfig, make_client
from converter.monitor.http_server import MonitorHttpServer
from converter.monitor.store import MonitorStore


@dataclass
class RunningMonitor:
    collector: Collector
    http: MonitorHttpServer
    db: Path

    @property
    def url(self) -> str:
        host, port = self.http.address
        return f"http://{host}:{port}"

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return resp.read().decode()

    def metric(self, line_prefix: str) -> float | None:
        for line in self.get("/metrics").splitlines():
            if line.startswith(line_prefix + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def received(self, kind: str) -> int:
        return self.collector.snapshot().stats.received.get(kind, 0)


@contextlib.contextmanager
def running_monitor(broker_port: int, db: Path, share: str | None = None) -> Iterator[RunningMonitor]:
    store = MonitorStore.open(db)
    client_id = f"_lf-test-monitor-{uuid.uuid4().hex[:6]}"
    client = make_client(ConnectionSettings("127.0.0.1", broker_port, client_id))
    collector = Collector(client, Topics(), store, CollectorConfig(share_group=share))
    http = MonitorHttpServer(collector, "127.0.0.1", 0)
    collector.start(10)
    http.start()
    try:
        yield RunningMonitor(collector, http, db)
    finally:
        http.stop()
        collector.stop()


def publish_many(port: int, messages: list[tuple[str, bytes]], *, retain: bool = False) -> None:
    """Publish QoS 1 as a device would and wait for every PUBACK (disconnecting before
    stopping the loop: the other order costs paho's 1 s select timeout)."""
    c = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
    )
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        infos = [c.publish(topic, payload, qos=1, retain=retain) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        c.disconnect()
        c.loop_stop()


def publish_one(port: int, topic: str, payload: bytes, *, retain: bool = False) -> None:
    publish_many(port, [(topic, payload)], retain=retain)
