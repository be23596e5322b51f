"""``litefleet status``: the retained-state table, and ``--metrics`` for fresh figures."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from converter.cli.status import status_table
from converter.fleet.view import METRICS_COLUMNS, STATUS_FIELDS, TABLE_COLUMNS, merge_metrics, state_row
from converter.monitor.payloads import MetricsSample, StateRecord, parse_metrics, parse_state
from tests.support.harness import litefleet, must
from tests.support.monitor import publish_many, publish_one
from tests.support.payloads import agent_payload, state_payload


def test_merge_metrics_takes_the_fresh_figures() -> None:
    state = parse_state("pi-1", state_payload(latency_ms_p50=9.9, inferences=1))
    assert isinstance(state, StateRecord)
    row = state_row(state)
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
    table = status_table([merged, unchanged], METRICS_COLUMNS)
    assert "LATENCY_MS_P99" in table.splitlines()[0] and "12.40" in table


def test_a_refused_newer_version_is_said_under_the_table_and_kept_in_json() -> None:
    """After a rollback the state's error clears at the next good refresh; ``refused`` is
    what still tells an operator why the device runs an older version."""
    refused = {
        "digits": {"version": 4, "reason": "crash_loop"},
        "kws": {"version": 2, "reason": "golden"},
        "junk": {"version": "two", "reason": "golden"},  # not a version: left out
    }
    rows = []
    for dev, doc in (("pi-1", {"refused": refused}), ("pi-2", {})):
        state = parse_state(dev, state_payload(device_id=dev, **doc))
        assert isinstance(state, StateRecord)
        rows.append(state_row(state))
    assert rows[0]["refused"] == {k: v for k, v in refused.items() if k != "junk"}
    assert rows[1]["refused"] == {}  # an agent before refused, or nothing to say
    lines = status_table(rows).splitlines()
    assert "pi-1 refused digits v4 (crash_loop) and runs v3" in lines
    assert "pi-1 refused kws v2 (golden) and runs no version of it" in lines
    assert not any("pi-2 refused" in line for line in lines)


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


def test_status_reads_the_state_with_the_monitors_parser(broker) -> None:
    """``status`` and the monitor take a state message the same way: validated and clipped,
    a malformed one is no row, unknown fields are left out."""
    odd = state_payload(device_id="pi-odd", online="yes", status="s" * 100, future={"x": 1})
    publish_many(
        broker.port,
        [
            ("litefleet/v1/devices/pi-odd/state", odd),
            ("litefleet/v1/devices/pi-bad/state", b"[1, 2]"),
            ("litefleet/v1/devices/pi-ok/state", state_payload(device_id="pi-ok")),
        ],
        retain=True,
    )
    rows = json.loads(must("status", "--broker", broker.url, "--json"))
    assert [r["device_id"] for r in rows] == ["pi-odd", "pi-ok"]
    expected = parse_state("pi-odd", odd)
    assert isinstance(expected, StateRecord)
    assert rows[0] == state_row(expected)
    assert rows[0]["online"] is False and rows[0]["status"] == "s" * 32 and "future" not in rows[0]
    assert rows[1]["models"] == {"digits": {"version": "3", "sha256": "ab" * 32, "trial": False}}
    table = must("status", "--broker", broker.url)
    assert table.splitlines()[0].split() == [f.upper() for f in TABLE_COLUMNS]
    assert table.splitlines()[1].split()[:2] == ["pi-odd", "no"]


def test_status_lists_a_thousand_devices_on_a_stock_broker(stock_broker) -> None:
    """A stock Mosquitto sends 20 retained QoS 1 messages before the sync barrier's SUBACK
    (max_inflight_messages); ``status`` read its state subscription at QoS 1 and listed
    20-22 of 100 devices (issue 11). At QoS 0 every retained state comes before the SUBACK."""
    ids = [f"pi-{i:04d}" for i in range(1000)]
    publish_many(
        stock_broker.port,
        [(f"litefleet/v1/devices/{d}/state", state_payload(device_id=d)) for d in ids],
        retain=True,
    )
    for _ in range(2):
        rows = json.loads(must("status", "--broker", stock_broker.url, "--json"))
        assert [r["device_id"] for r in rows] == ids


def test_a_fleet_with_sites_gets_a_site_column_and_a_filter(broker) -> None:
    """Devices behind site brokers say their site in their state (docs/sites.md): ``status``
    shows it (``-`` for a device of the central broker) and ``--site NAME`` keeps that site's."""
    publish_many(
        broker.port,
        [
            ("litefleet/v1/devices/pi-a1/state", state_payload(device_id="pi-a1", site="a")),
            ("litefleet/v1/devices/pi-b1/state", state_payload(device_id="pi-b1", site="b")),
            ("litefleet/v1/devices/pi-c/state", state_payload(device_id="pi-c")),
        ],
        retain=True,
    )
    rows = json.loads(must("status", "--broker", broker.url, "--json"))
    assert {r["device_id"]: r["site"] for r in rows} == {"pi-a1": "a", "pi-b1": "b", "pi-c": None}
    table = must("status", "--broker", broker.url).splitlines()
    head = table[0].split()
    assert head[head.index("GROUPS") + 1] == "SITE"
    assert {ln.split()[0]: ln.split()[head.index("SITE")] for ln in table[1:]} == {
        "pi-a1": "a",
        "pi-b1": "b",
        "pi-c": "-",
    }
    only_b = json.loads(must("status", "--broker", broker.url, "--json", "--site", "b"))
    assert [r["device_id"] for r in only_b] == ["pi-b1"]
    assert (
        must("status", "--broker", broker.url, "--site", "x").strip()
        == "no device of site x has reported yet"
    )


def test_a_site_whose_uplink_is_down_is_named_with_its_device_count(broker) -> None:
    """At central, a cut-off site's devices keep their last retained states (they may say
    online): status warns, from the site's retained link word (the bridge's will: 0)."""
    publish_many(
        broker.port,
        [
            ("litefleet/v1/devices/pi-a1/state", state_payload(device_id="pi-a1", site="a")),
            ("litefleet/v1/devices/pi-b1/state", state_payload(device_id="pi-b1", site="b")),
            ("litefleet/v1/devices/pi-b2/state", state_payload(device_id="pi-b2", site="b")),
            ("litefleet/v1/sites/a/bridge", b"1"),
            ("litefleet/v1/sites/b/bridge", b"0"),
        ],
        retain=True,
    )
    code, out, err = litefleet("status", "--broker", broker.url)
    assert code == 0 and "pi-b2" in out
    warnings = [ln for ln in err.splitlines() if "uplink" in ln]
    assert warnings == [
        "litefleet: warning: site b's uplink to this broker is down: the rows of its 2 device(s) "
        "are their last states from before (docs/sites.md, Outages)"
    ], err
    _, _, only_a = litefleet("status", "--broker", broker.url, "--site", "a")
    assert "uplink" not in only_a, only_a
