"""``litefleet status``: the retained-state table, and ``--metrics`` for fresh figures."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from converter.fleet.view import METRICS_COLUMNS, STATUS_FIELDS, format_table, merge_metrics, parse_state
from converter.monitor.payloads import MetricsSample, parse_metrics
from tests.support.harness import litefleet, must
from tests.support.monitor import publish_many, publish_one
from tests.support.payloads import agent_payload, state_payload


def test_merge_metrics_takes_the_fresh_figures() -> None:
    row = parse_state("pi-1", state_payload(latency_ms_p50=9.9, inferences=1))
    assert row is not None
    sample = parse_metrics("pi-1", agent_payload())
    assert isinstance(sample, MetricsSample)
    merged = merge_metrics(row, sample)
    assert merged["inferences"] == 3 and merged["latency_ms_p50"] != 9.9
    assert merged["latency_ms_p99"] is not None and merged["cpu_percent"] == 12.4
    assert merged["temperature_c"] == 51.0 and merged["rss_mb"] == 46.0
    assert row["inferences"] == 1  # the input row is not changed
    unchanged = merge_metrics(row, None)
    assert unchanged["latency_ms_p50"] == 9.9 and unchanged["cpu_percent"] is None
    assert set(STATUS_FIELDS) <= set(merged)
    table = format_table([merged, unchanged], METRICS_COLUMNS)
    assert "LATENCY_MS_P99" in table.splitlines()[0] and "12.40" in table


def test_status_with_metrics_against_a_broker(broker, tmp_path: Path) -> None:
    publish_many(
        broker.port,
        [
            ("litefleet/v1/devices/pi-on/state", state_payload(device_id="pi-on")),
            ("litefleet/v1/devices/pi-off/state", state_payload(device_id="pi-off", online=False)),
        ],
        retain=True,
    )
    stop = threading.Event()

    def device() -> None:  # pi-on reports every 0.2 s, like an agent with a short interval
        seq = 0
        while not stop.is_set():
            seq += 1
            publish_one(
                broker.port,
                "litefleet/v1/devices/pi-on/metrics",
                agent_payload("pi-on", seq=seq, ts=time.time()),
            )
            stop.wait(0.2)

    t = threading.Thread(target=device, daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        rows = json.loads(must("status", "--broker", broker.url, "--json", "--metrics", "30"))
        elapsed = time.monotonic() - t0
        table = must("status", "--broker", broker.url, "--metrics", "5")
        plain = json.loads(must("status", "--broker", broker.url, "--json"))
    finally:
        stop.set()
        t.join()
    by_id = {r["device_id"]: r for r in rows}
    assert by_id["pi-on"]["cpu_percent"] == 12.4 and by_id["pi-on"]["inferences"] == 3
    assert by_id["pi-on"]["metrics_ts"] is not None
    assert by_id["pi-off"]["cpu_percent"] is None  # offline: not waited for
    # --metrics 30 is a longest wait: it ends once every online device has reported
    assert elapsed < 20, "status waited although every online device had reported"
    assert "CPU_PERCENT" in table and "pi-on" in table
    assert "cpu_percent" not in plain[0] and plain[0]["inferences"] == 3  # without --metrics: as before
    code, _, err = litefleet("status", "--broker", broker.url, "--metrics", "-1")
    assert code == 2 and "--metrics" in err
