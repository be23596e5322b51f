"""A monitor collector running in the test process, and publishing device messages as a device would."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from agent.mqtt.client import ConnectionSettings
from agent.protocol import Topics
from converter.monitor.collector import Collector, CollectorConfig, make_client
from converter.monitor.http_server import MonitorHttpServer
from converter.monitor.store import MonitorStore
from tests.support.harness import REPO_ROOT

_SELECTOR = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scraped_value(text: str, selector: str) -> float | None:
    """The value of one series of a ``/metrics`` body, ``selector`` written as in a scrape
    (``name{label="value",...}``, labels in any order), read with prometheus_client's parser."""
    m = _SELECTOR.match(selector)
    assert m, selector
    want = dict(_LABEL.findall(m["labels"] or ""))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == m["name"] and sample.labels == want:
                return float(sample.value)
    return None


def promtool_check(text: str) -> None:
    """``promtool check metrics`` (Debian's ``prometheus`` package) on a ``/metrics`` body:
    the format and Prometheus' naming rules. Skipped where promtool is missing, except
    under CI (``scripts/setup.sh`` installs it there)."""
    tool = shutil.which("promtool")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: scripts/setup.sh setup_test_tools installs it")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    done = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"promtool: {done.stdout}{done.stderr}"


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
            return str(resp.read().decode())

    def metric(self, selector: str) -> float | None:
        """One series of a fresh scrape (see :func:`scraped_value`), None if absent."""
        return scraped_value(self.get("/metrics"), selector)

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


def run_cli(*args: str) -> subprocess.Popen[str]:
    """``litefleet ARGS`` as a process of this checkout (stdout and stderr piped)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "converter", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )


def status_of(url: str) -> int:
    """The HTTP status of a GET (an error status too, not an exception)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


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
