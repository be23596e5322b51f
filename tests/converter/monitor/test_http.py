"""The monitor's HTTP server over a real socket, with a real collector on a real Mosquitto:
every path, method, status and body it promises (docs/monitor.md)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.mqtt.client import wait_until
from tests.support.monitor import RunningMonitor, publish_one, running_monitor
from tests.support.payloads import state_payload


@pytest.fixture
def monitor(broker: Any, tmp_path: Path) -> Iterator[RunningMonitor]:
    with running_monitor(broker.port, tmp_path / "mon.sqlite3") as mon:
        publish_one(
            broker.port,
            "litefleet/v1/devices/pi-h/state",
            state_payload(device_id="pi-h", refused={"digits": {"version": 4, "reason": "crash_loop"}}),
            retain=True,
        )
        assert wait_until(lambda: mon.received("state") >= 1, 10)
        yield mon


def fetch(mon: RunningMonitor, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(*mon.http.address, timeout=10)
    try:
        conn.request(method, path, body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_every_route_answers(monitor: RunningMonitor) -> None:
    status, headers, body = fetch(monitor, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert b'litefleet_device_online{device="pi-h"} 1' in body
    for path in ("/", "/index.html", "/?hours=2&device=pi-h"):
        status, headers, body = fetch(monitor, "GET", path)
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8", path
        assert b"pi-h" in body
    # one site's page: pi-h is central's, so not on it
    assert b"No device of site north has reported yet." in fetch(monitor, "GET", "/?site=north")[2]
    status, headers, body = fetch(monitor, "GET", "/api/devices")
    assert status == 200 and headers["content-type"] == "application/json"
    assert [d["device_id"] for d in json.loads(body)] == ["pi-h"]
    assert json.loads(body)[0]["refused"] == {"digits": {"version": 4, "reason": "crash_loop"}}
    assert fetch(monitor, "GET", "/healthz")[::2] == (200, b'{"status": "ok"}')
    assert headers["cache-control"] == "no-store" and headers["server"].startswith("litefleet-monitor")


def test_head_is_get_without_a_body(monitor: RunningMonitor) -> None:
    status, headers, body = fetch(monitor, "HEAD", "/healthz")
    assert (status, body, headers["content-length"]) == (200, b"", "16")


def test_unknown_paths_and_methods(monitor: RunningMonitor) -> None:
    assert fetch(monitor, "GET", "/nope")[::2] == (404, b"not found\n")
    assert fetch(monitor, "GET", "/index.htm")[0] == 404
    assert fetch(monitor, "HEAD", "/nope")[0] == 404
    # only GET and HEAD exist here: any other method is 405, on any path
    for method, path in (("POST", "/metrics"), ("PUT", "/"), ("DELETE", "/nope"), ("PATCH", "/healthz")):
        status, headers, body = fetch(monitor, method, path, b"{}")
        assert (status, body) == (405, b"method not allowed\n"), (method, path)
        assert headers["cache-control"] == "no-store"
    assert fetch(monitor, "OPTIONS", "/")[0] == 501
