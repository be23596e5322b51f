"""The monitor and what the host side publishes, on a real Mosquitto: retained rollout records
(kept in the history, shown on /metrics and /api/rollouts), the repository's expiry, a site's
status, counted events, the broker link; ``--prometheus`` and ``--http`` on one address."""

from __future__ import annotations

import json
import re
import signal
import urllib.request
from pathlib import Path
from typing import Any

from agent.mqtt.client import wait_until
from converter.broker.mosquitto import free_port
from tests.support.harness import litefleet
from tests.support.monitor import (
    promtool_check,
    publish_many,
    publish_one,
    run_cli,
    running_monitor,
    scraped_value,
    status_of,
)
from tests.support.payloads import state_payload

B = "litefleet/v1"


def rollout(updated: float, state: str = "baking", wave: int = 0, value: float = 1.04) -> bytes:
    """A record in the controller's format (docs/protocol.md 6.4), built here as a test would."""
    return json.dumps(
        {
            "name": "digits", "version": 4, "previous": 3, "state": state, "wave": wave,
            "waves": [5, 25, 100], "canary_pct": [5, 25, 100][wave], "target": "all",
            "started": 1_800_000_000.0, "updated": updated, "wave_started": 1_800_000_000.0, "bake_s": 600.0,
            "devices": {"canary": 1, "control": 2, "selected": ["pi-1"], "known": 3},
            "gates": {
                "latency_p99_ratio": {
                    "value": value, "threshold": 1.5, "op": "<=", "verdict": "pass", "samples": 812,
                },
                "agreement": {"value": None, "threshold": 0.9, "op": ">=", "verdict": "wait", "samples": 4},
            },
            "reason": None,
        }
    ).encode()  # fmt: skip


def metadata(expires: str) -> bytes:
    return json.dumps({"signed": {"_type": "timestamp", "expires": expires}, "signatures": []}).encode()


def event(device_id: str, seq: int, kind: str, reason: str | None = None) -> bytes:
    doc = {"ts": 1_800_000_100.0 + seq, "device_id": device_id, "boot": "b1", "seq": seq, "event": kind,
           "model": "digits", "version": 4, "reason": reason}  # fmt: skip
    return json.dumps(doc).encode()


def test_rollouts_sites_expiry_and_events_over_a_real_broker(broker: Any, tmp_path: Path) -> None:
    # retained before the monitor starts: delivered at its subscription
    publish_many(
        broker.port,
        [
            (f"{B}/rollouts/digits", rollout(1_800_000_010.0)),
            (f"{B}/repo/metadata/timestamp.json", metadata("2030-01-01T00:00:00Z")),
            (f"{B}/sites/north/status", json.dumps({"site": "north", "ts": 1.0, "link": "up"}).encode()),
            (f"{B}/sites/north/bridge", b"1"),
            (f"{B}/devices/pi-1/state", state_payload(device_id="pi-1", models={"digits": {"version": 4}})),
            (f"{B}/devices/pi-2/state", state_payload(device_id="pi-2", models={"digits": {"version": 3}})),
        ],
        retain=True,
    )
    with running_monitor(broker.port, tmp_path / "m.db") as mon:
        gate = 'litefleet_rollout_gate_value{gate="latency_p99_ratio",model="digits"}'
        retained = {  # six retained messages, handled in any order: wait for all of them
            gate: 1.04,
            'litefleet_repo_metadata_expiry_timestamp_seconds{role="timestamp"}': 1893456000.0,
            'litefleet_site_link_up{site="north"}': 1,
            "litefleet_monitor_broker_connected": 1,
            'litefleet_model_devices{model="digits",version="4"}': 1,
        }
        assert wait_until(lambda: all(mon.metric(k) == v for k, v in retained.items()), 60), {
            k: mon.metric(k) for k in retained
        }
        # events: one sent twice (a QoS 1 redelivery) counts once
        rolled = event("pi-1", 1, "rolled_back", "inference_errors")
        publish_many(
            broker.port,
            [
                (f"{B}/devices/pi-1/events", rolled),
                (f"{B}/devices/pi-1/events", rolled),
                (f"{B}/devices/pi-2/events", event("pi-2", 1, "activated")),
            ],
        )
        series = 'litefleet_device_events_total{device="pi-1",event="rolled_back",reason="inference_errors"}'
        counted = {
            'litefleet_monitor_duplicates_total{kind="events"}': 1,
            series: 1,
            'litefleet_device_events_total{device="pi-2",event="activated",reason=""}': 1,
        }
        assert wait_until(lambda: all(mon.metric(k) == v for k, v in counted.items()), 60), {
            k: mon.metric(k) for k in counted
        }
        # the controller moves on: wave 2, a new gate value; the site's link drops
        publish_one(
            broker.port, f"{B}/rollouts/digits", rollout(1_800_000_040.0, wave=1, value=1.2), retain=True
        )
        publish_one(broker.port, f"{B}/sites/north/bridge", b"0", retain=True)
        assert wait_until(lambda: mon.metric('litefleet_rollout_wave{model="digits"}') == 1, 60)
        assert wait_until(lambda: mon.metric('litefleet_site_link_up{site="north"}') == 0, 60)
        assert (
            mon.metric(gate) == 1.2 and mon.metric('litefleet_rollout_canary_percent{model="digits"}') == 25
        )
        (doc,) = json.loads(mon.get("/api/rollouts"))
        assert (doc["name"], doc["version"], doc["wave"], doc["selected"]) == ("digits", "4", 1, ["pi-1"])
        assert doc["gates"]["latency_p99_ratio"]["value"] == 1.2
        assert mon.collector.wait_idle(60)
        with mon.collector.store.reader() as r:
            assert [
                (g.value, g.wave) for g in r.gate_series("digits", "4") if g.gate == "latency_p99_ratio"
            ] == [
                (1.04, 0),
                (1.2, 1),
            ]
            assert r.version_event_devices("digits", "4") == {"rolled_back": 1, "activated": 1}
        page = mon.get("/")
        assert 'data-model="digits" data-state="baking"' in page and "rolled_back on 1 device" in page
        assert (
            '<tr data-site="north"><td><a href="?site=north">north</a></td><td class="offline">down</td>'
            in page
        )
        body = mon.get("/metrics")
        # the controller clears the record: the rollout leaves the view, its history stays
        publish_one(broker.port, f"{B}/rollouts/digits", b"", retain=True)
        assert wait_until(lambda: mon.metric('litefleet_rollout_wave{model="digits"}') is None, 60)
        with mon.collector.store.reader() as r:
            assert r.count("rollout_records") == 2
    promtool_check(body)


def test_broker_connected_follows_the_link(broker: Any, tmp_path: Path) -> None:
    with running_monitor(broker.port, tmp_path / "m.db") as mon:
        assert mon.metric("litefleet_monitor_broker_connected") == 1
        broker.kill()
        assert wait_until(lambda: mon.metric("litefleet_monitor_broker_connected") == 0, 15)
        assert "not connected to the broker" in mon.get("/")
        broker.start()
        assert wait_until(lambda: mon.metric("litefleet_monitor_broker_connected") == 1, 30)


def test_one_address_for_both_serves_both(broker: Any, tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = run_cli("monitor", "--broker", broker.url, "--db", str(tmp_path / "m.db"), "--prometheus", address,
                   "--http", address, "--quiet")  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert re.search(
            rf"serving the page on http://127\.0\.0\.1:{port}/ and Prometheus on .*/metrics", line
        ), line
        url = f"http://{address}"
        assert [status_of(url + p) for p in ("/", "/metrics", "/api/devices", "/healthz")] == [
            200,
            200,
            200,
            200,
        ]
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            assert scraped_value(resp.read().decode(), "litefleet_monitor_broker_connected") == 1
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_http_flag_errors(tmp_path: Path) -> None:
    code, _, err = litefleet("monitor", "--broker", "mqtt://127.0.0.1:1", "--db", str(tmp_path / "x.db"),
                               "--http", "nonsense")  # fmt: skip
    assert code == 2 and "--http" in err and "HOST:PORT" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.db").exists()
