"""What the monitor reads besides devices, pure: rollout records, site status, the repository's
expiry, event counts and the broker link, through the parser, the live view, the store and
the Prometheus exposition."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from converter.monitor.live import FleetLive
from converter.monitor.payloads import Malformed, parse_event, parse_metrics, parse_state
from converter.monitor.prometheus import render
from converter.monitor.repo_expiry import RepoExpiry, metadata_role
from converter.monitor.rollouts import RolloutCleared, RolloutView, devices_per_version, parse_rollout
from converter.monitor.store import MonitorStore, Received
from tests.support.monitor import scraped_value
from tests.support.payloads import agent_payload, state_payload

# the example of docs/protocol.md 6.4
RECORD = {
    "name": "digits", "version": 4, "previous": 3, "state": "baking", "wave": 1, "waves": [5, 25, 100],
    "canary_pct": 25, "target": "all", "started": 1795666000.0, "updated": 1795666120.0,
    "wave_started": 1795666090.0, "bake_s": 600.0,
    "devices": {"canary": 5, "control": 15, "selected": ["pi-1", "pi-7"], "known": 20},
    "gates": {"latency_p99_ratio": {"value": 1.04, "threshold": 1.5, "op": "<=", "verdict": "pass",
                                    "samples": 812, "detail": "p99 0.41 ms vs 0.39 ms"}},
    "ignored": {"pi-9": 3}, "reason": None,
}  # fmt: skip


def record(**changes: object) -> bytes:
    return json.dumps({**RECORD, **changes}).encode()


def test_a_rollout_record_as_the_controller_writes_it() -> None:
    r = parse_rollout("digits", record())
    assert isinstance(r, RolloutView)
    assert (r.version, r.previous, r.state, r.wave, r.waves, r.canary_pct) == (
        "4",
        "3",
        "baking",
        1,
        (5, 25, 100),
        25,
    )
    assert (r.canary_devices, r.control_devices, r.known_devices, r.selected) == (5, 15, 20, ("pi-1", "pi-7"))
    (g,) = r.gates
    assert (g.name, g.value, g.threshold, g.op, g.verdict, g.samples) == (
        "latency_p99_ratio",
        1.04,
        1.5,
        "<=",
        "pass",
        812,
    )
    assert r.ignored == (("pi-9", 3),) and r.reason is None and not r.terminal
    assert isinstance(parse_rollout("digits", b""), RolloutCleared)
    # the design's minimal record (no target, bake, known, ignored) is read too
    minimal = {k: v for k, v in RECORD.items() if k not in ("target", "wave_started", "bake_s", "ignored")}
    assert isinstance(parse_rollout("digits", json.dumps(minimal).encode()), RolloutView)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{", "not JSON"),
        (b"[1]", "not a JSON object"),
        (record(name="other"), "name differs"),
        (record(version="four"), "no valid version and state"),
        (record(state="Baking!"), "no valid version and state"),
        (record(wave=3), "no valid wave and waves"),
        (record(waves=[5, "x", 100]), "no valid wave and waves"),
        (record(waves=[]), "no valid wave and waves"),
        (b" " * (2 * 1024 * 1024), "too large"),
    ],
)
def test_unusable_rollout_records_say_why(payload: bytes, reason: str) -> None:
    got = parse_rollout("digits", payload)
    assert isinstance(got, Malformed) and reason in got.reason, got


def test_odd_gate_entries_are_dropped_not_fatal() -> None:
    gates = {
        "ok": {"value": 0.5, "verdict": "pass"},
        "bad name!": {"value": 1, "verdict": "pass"},
        "no_verdict": {"value": 1},
        "weird": {"value": "high", "threshold": "x", "op": "~", "verdict": "fail"},
    }
    r = parse_rollout("digits", record(gates=gates, devices="many", ignored=[1]))
    assert isinstance(r, RolloutView)
    assert [(g.name, g.value, g.threshold, g.op) for g in r.gates] == [
        ("ok", 0.5, None, None),
        ("weird", None, None, None),
    ]
    assert r.selected == () and r.canary_devices is None and r.ignored == ()


def test_devices_per_version_counts_what_states_say() -> None:
    states = []
    for device_id, version in (("pi-1", 4), ("pi-2", 3), ("pi-3", 3), ("pi-4", None)):
        models = {"digits": {"version": version}} if version else {"faces": {"version": 1}}
        st = parse_state(device_id, state_payload(device_id=device_id, models=models))
        assert not isinstance(st, Malformed)
        states.append(st)
    assert devices_per_version(states, "digits") == {"3": ["pi-2", "pi-3"], "4": ["pi-1"]}  # type: ignore[arg-type]


def test_repo_expiry_keeps_the_newest_file_of_each_role() -> None:
    def meta(expires: str) -> bytes:
        return json.dumps({"signed": {"expires": expires}, "signatures": []}).encode()

    exp = RepoExpiry()
    assert exp.apply("timestamp.json", meta("2030-01-01T00:00:00Z"))
    assert exp.apply("3.targets.json", meta("2030-03-01T00:00:00Z"))
    assert exp.apply("2.targets.json", meta("2029-01-01T00:00:00Z"))
    assert not exp.apply("junk.json", meta("2030-01-01T00:00:00Z")) and not exp.apply("1.root.json", b"{}")
    assert exp.by_role() == {"targets": 1898553600.0, "timestamp": 1893456000.0}
    exp.apply("3.targets.json", b"")  # cleared: the older one counts again
    assert exp.by_role()["targets"] == 1861920000.0
    assert metadata_role("12.snapshot.json") == ("snapshot", 12) and metadata_role("x.root.json") == (None, 0)


def test_store_keeps_each_rollout_record_once_with_its_gates(tmp_path: Path) -> None:
    store = MonitorStore.open(tmp_path / "m.db")
    try:
        first = parse_rollout("digits", record())
        later = parse_rollout("digits", record(updated=1795666130.0, state="promoting", gates={}))
        store.write([Received(first, 1.0), Received(first, 2.0)])  # the retained record, delivered again
        result = store.write([Received(first, 3.0), Received(later, 3.0)])
        assert result.rollout_records == 1
        with store.reader() as r:
            assert r.count("rollout_records") == 2 and r.count("rollout_gates") == 1
            (g,) = r.gate_series("digits", "4")
            assert (g.ts, g.gate, g.value, g.threshold, g.verdict, g.wave) == (
                1795666120.0, "latency_p99_ratio", 1.04, 1.5, "pass", 1,
            )  # fmt: skip
            assert [(s.state, s.wave, s.waves) for s in r.rollout_steps("digits", "4")] == [
                ("baking", 1, (5, 25, 100)),
                ("promoting", 1, (5, 25, 100)),
            ]
        assert store.prune(1795666125.0) == 2  # the first record and its gate
    finally:
        store.close()


def test_a_schema_1_history_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema', '1');"
        "CREATE TABLE events (id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, boot TEXT NOT NULL,"
        " seq INTEGER, ts REAL NOT NULL, received REAL NOT NULL, event TEXT NOT NULL, model TEXT,"
        " version TEXT, reason TEXT, message TEXT, payload TEXT NOT NULL, UNIQUE (device_id, boot, seq));"
        "INSERT INTO events VALUES (1, 'pi-1', 'b', 1, 10.0, 10.0, 'activated', 'digits', '3', NULL, NULL,"
        " '{}');"
    )
    db.commit()
    db.close()
    store = MonitorStore.open(path)
    try:
        store.write([Received(parse_rollout("digits", record()), 1.0)])
        with store.reader() as r:
            assert r.count("events") == 1 and r.count("rollout_records") == 1
    finally:
        store.close()
    assert sqlite3.connect(path).execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("2",)


def test_exposition_of_rollouts_sites_expiry_events_and_the_broker_link() -> None:
    live = FleetLive(started=1.0)
    for device_id, version in (("pi-1", 4), ("pi-2", 3)):
        st = parse_state(
            device_id, state_payload(device_id=device_id, models={"digits": {"version": version}})
        )
        live.apply([(Received(st, 10.0), False)])
    live.apply_rollouts([parse_rollout("digits", record()), parse_rollout("faces", b"{")])
    live.apply_site("north", "status", json.dumps({"site": "north", "ts": 5.0, "link": "up"}).encode())
    live.apply_site("north", "bridge", b"0")
    live.apply_metadata(
        "timestamp.json", json.dumps({"signed": {"expires": "2030-01-01T00:00:00Z"}}).encode()
    )
    ev = parse_event(
        "pi-1", b'{"ts": 9, "boot": "b", "seq": 1, "event": "rolled_back", "reason": "crash_loop"}'
    )
    odd = parse_event("pi-1", b'{"ts": 9, "boot": "b", "seq": 2, "event": "made_up", "reason": "whatever"}')
    assert not isinstance(ev, Malformed) and not isinstance(odd, Malformed)
    live.count_events([ev, odd, odd])
    text = render(live.snapshot(20.0, broker_connected=True))

    def value(selector: str) -> float | None:
        return scraped_value(text, selector)

    assert value('litefleet_rollout_info{model="digits",previous="3",target="all",version="4"}') == 1
    assert value('litefleet_rollout_state{model="digits",state="baking"}') == 1
    assert value('litefleet_rollout_state{model="digits",state="aborted"}') == 0
    assert (
        value('litefleet_rollout_wave{model="digits"}') == 1
        and value('litefleet_rollout_waves{model="digits"}') == 3
    )
    assert value('litefleet_rollout_canary_percent{model="digits"}') == 25
    assert value('litefleet_rollout_devices{model="digits",role="selected"}') == 2
    assert value('litefleet_rollout_gate_value{gate="latency_p99_ratio",model="digits"}') == 1.04
    assert value('litefleet_rollout_gate_threshold{gate="latency_p99_ratio",model="digits",op="<="}') == 1.5
    assert (
        value('litefleet_rollout_gate_verdict{gate="latency_p99_ratio",model="digits",verdict="pass"}') == 1
    )
    assert (
        value('litefleet_rollout_gate_verdict{gate="latency_p99_ratio",model="digits",verdict="fail"}') == 0
    )
    assert value('litefleet_model_devices{model="digits",version="3"}') == 1
    assert value('litefleet_site_link_up{site="north"}') == 0  # the bridge's will outranks the last status
    assert value('litefleet_repo_metadata_expiry_timestamp_seconds{role="timestamp"}') == 1893456000.0
    assert value('litefleet_device_events_total{device="pi-1",event="rolled_back",reason="crash_loop"}') == 1
    assert value('litefleet_device_events_total{device="pi-1",event="other",reason="other"}') == 2
    assert value("litefleet_monitor_broker_connected") == 1
    assert value('litefleet_monitor_malformed_total{kind="rollouts"}') == 1
    assert scraped_value(render(live.snapshot(20.0)), "litefleet_monitor_broker_connected") == 0


def test_an_offline_device_exports_no_current_gauges_only_counters() -> None:
    live = FleetLive(started=1.0)
    for device_id, online in (("pi-on", True), ("pi-off", False)):
        st = parse_state(device_id, state_payload(device_id=device_id, online=online))
        m = parse_metrics(device_id, agent_payload(device_id, seq=1, ts=990.0))
        live.apply([(Received(st, 1000.0), False), (Received(m, 1000.0), False)])
    text = render(live.snapshot(1001.0))
    labels = 'device="{}",model="digits",version="3"'
    for dev, present in (("pi-on", True), ("pi-off", False)):
        assert (
            scraped_value(text, f'litefleet_device_cpu_percent{{device="{dev}",scope="system"}}') is not None
        ) is present
        assert (
            scraped_value(text, f'litefleet_device_resident_memory_bytes{{device="{dev}"}}') is not None
        ) is present
        assert (
            scraped_value(text, f"litefleet_model_throughput_per_second{{{labels.format(dev)}}}") is not None
        ) is present
        q = f'litefleet_model_latency_seconds{{{labels.format(dev)},quantile="0.99"}}'
        assert (scraped_value(text, q) is not None) is present
        # counters stay true for a device that went away
        assert scraped_value(text, f"litefleet_model_requests_total{{{labels.format(dev)}}}") == 5
        assert scraped_value(text, f'litefleet_device_metrics_timestamp_seconds{{device="{dev}"}}') == 990.0
