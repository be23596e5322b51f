"""Fast tests of the fleet monitor's pure parts: payloads, decisions, exposition, SVG, the store.

Payloads are built with the agent's own builders (``agent.telemetry.metrics``), so a
change in what the agent publishes that the monitor cannot read fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from agent.mqtt.filters import topic_filter_of as subscription_topic_filter
from agent.serving.stats import ModelStats
from agent.telemetry.metrics import build_metrics_payload, model_report
from converter.errors import BadInputError
from converter.fleet.view import merge_metrics, state_row
from converter.monitor.charts import format_ms
from converter.monitor.collector import check_share_group, retention_cutoff, shared_filter
from converter.monitor.http_server import device_json, parse_listen
from converter.monitor.live import FleetLive
from converter.monitor.page import FLEET_HEADERS, fleet_rows
from converter.monitor.payloads import (
    EventRecord,
    Malformed,
    MetricsSample,
    StateCleared,
    StateRecord,
    device_health,
    is_newer,
    parse_event,
    parse_message,
    parse_metrics,
    parse_state,
    shown_model,
)
from converter.monitor.prometheus import LE_SECONDS, metric_names, rebucket, render
from converter.monitor.store import MonitorStore, Received
from tests.support.payloads import agent_payload, state_payload


# -- payloads ------------------------------------------------------------------------------
def test_metrics_from_the_agents_builder() -> None:
    m = parse_metrics("pi-1", agent_payload())
    assert isinstance(m, MetricsSample)
    assert (m.seq, m.ts, m.interval_s, m.agent_version) == (7, 1_800_000_000.5, 10.0, "0.1.0")
    assert m.rss_bytes == 48234496 and m.load_avg == (0.21, 0.18, 0.1) and m.temperature_c == 51.0
    assert m.throttled_raw == 0x50005 and dict(m.throttled)["throttled"] is True
    assert (m.queue_pending, m.queue_dropped_total) == (2, 5)
    assert m.api == (("rest", "2xx", 3), ("rest", "4xx", 1))
    (model,) = m.models
    assert (model.name, model.version, model.active) == ("digits", "3", True)
    assert (model.requests, model.ok, model.errors, model.bad_requests) == (5, 3, 1, 1)
    assert model.p50_ms is not None and 0.45 < model.p50_ms < 0.55
    assert model.p99_ms is not None and 1.8 < model.p99_ms <= 2.2
    assert sum(n for _, n in model.histogram_ms) == 3


def test_metrics_of_a_machine_without_sensors() -> None:
    m = parse_metrics("pc", agent_payload("pc", temperature_c=None, throttled=None, load_avg=None))
    assert isinstance(m, MetricsSample)
    assert m.temperature_c is None and m.throttled == () and m.throttled_raw is None and m.load_avg is None


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"ts": 1.0}', "no valid seq and ts"),
        (b'{"seq": true, "ts": 1.0}', "no valid seq and ts"),
        (b'{"seq": -1, "ts": 1.0}', "no valid seq and ts"),
        (b'{"seq": 1, "ts": NaN}', "no valid seq and ts"),
        (b'{"seq": 1, "ts": "yesterday"}', "no valid seq and ts"),
        (b'{"seq": 1, "ts": 1.0, "device_id": "pi-2"}', "device_id differs from the topic's"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_malformed_metrics_say_why(payload: bytes, reason: str) -> None:
    got = parse_metrics("pi-1", payload)
    assert got == Malformed("metrics", "pi-1", reason)


def test_huge_payload_is_refused_before_parsing() -> None:
    got = parse_metrics("pi-1", b'{"seq": 1, "ts": 1, "x": "' + b"a" * 300_000 + b'"}')
    assert isinstance(got, Malformed) and "too large" in got.reason


def test_odd_fields_are_ignored_not_fatal() -> None:
    doc = json.loads(agent_payload())
    doc["models"].append({"name": 5})  # no usable name: skipped
    doc["models"][0]["histogram_ms"] = [[1.0, "many"]]  # unreadable histogram: dropped
    doc["device"] = "broken"
    doc["future_field"] = {"x": 1}
    m = parse_metrics("pi-1", json.dumps(doc).encode())
    assert isinstance(m, MetricsSample)
    assert len(m.models) == 1 and m.models[0].histogram_ms == () and m.rss_bytes is None


def test_event_and_state() -> None:
    ev = parse_event(
        "pi-1",
        json.dumps(
            {
                "ts": 5.0,
                "device_id": "pi-1",
                "boot": "b1",
                "seq": 17,
                "event": "rejected",
                "model": "digits",
                "version": 4,
                "reason": "golden",
                "message": "differs",
            }
        ).encode(),
    )
    assert isinstance(ev, EventRecord)
    assert (ev.boot, ev.seq, ev.event, ev.version, ev.reason) == ("b1", 17, "rejected", "4", "golden")
    assert isinstance(parse_event("pi-1", b'{"seq": 1}'), Malformed)
    s = parse_state("pi-1", state_payload())
    assert isinstance(s, StateRecord)
    assert s.online and s.status == "serving" and s.models[0].version == "3" and s.groups == ("kitchen",)
    assert parse_state("pi-1", state_payload(online=False)).online is False  # type: ignore[union-attr]
    assert parse_state("pi-1", b"") == StateCleared("pi-1")
    assert isinstance(parse_message("infer", "pi-1", b"{}"), Malformed)


# -- decisions -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "latest, seq, ts, newer",
    [
        (None, 1, 1.0, True),
        ((5, 50.0), 6, 60.0, True),  # the next message
        ((5, 50.0), 5, 50.0, False),  # a QoS 1 duplicate
        ((5, 50.0), 3, 30.0, False),  # replayed from before an outage, arriving late
        ((500, 50.0), 1, 60.0, True),  # the device lost its queue file: seq restarts, time goes on
        ((5, 50.0), 6, 40.0, True),  # the device's clock stepped back (NTP): seq still orders
    ],
)
def test_is_newer(latest: tuple[int, float] | None, seq: int, ts: float, newer: bool) -> None:
    assert is_newer(latest, seq, ts) is newer


def test_device_health() -> None:
    assert device_health(None, 100.0, 10.0, 100.0) == "unknown"
    assert device_health(False, 100.0, 10.0, 100.0) == "offline"
    assert device_health(True, 100.0, 10.0, 129.0) == "online"
    assert device_health(True, 100.0, 10.0, 131.0) == "stale"  # 3 intervals, but at least 30 s
    assert device_health(True, 100.0, 60.0, 250.0) == "online"  # slow reporter: 3 x 60 s
    assert device_health(True, 100.0, 60.0, 281.0) == "stale"


def test_share_helpers() -> None:
    assert shared_filter("g1", "lf/v1/devices/+/metrics") == "$share/g1/lf/v1/devices/+/metrics"
    assert shared_filter(None, "a/b") == "a/b"
    assert subscription_topic_filter("$share/g1/lf/v1/devices/+/metrics") == "lf/v1/devices/+/metrics"
    assert subscription_topic_filter("lf/v1/devices/+/state") == "lf/v1/devices/+/state"
    assert check_share_group("collectors") == "collectors"
    for bad in ("", "a/b", "a+", "#", "x" * 65):
        with pytest.raises(BadInputError):
            check_share_group(bad)
    assert retention_cutoff(100_000.0, 0) is None
    assert retention_cutoff(100_000.0, 1) == 100_000.0 - 86400


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen(":9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    for bad in ("9464", "host:", "host:http", "h:70000"):
        with pytest.raises(BadInputError):
            parse_listen(bad)


# -- live view ---------------------------------------------------------------------------------
def received(parsed: object, at: float = 1000.0) -> Received:
    return Received(parsed, at)  # type: ignore[arg-type]


def test_live_view_keeps_the_newest_metrics_and_counts() -> None:
    live = FleetLive(started=0.0)
    new = parse_metrics("pi-1", agent_payload(seq=10, ts=2000.0))
    old = parse_metrics("pi-1", agent_payload(seq=4, ts=1400.0))
    live.apply(
        [
            (received(new, 2001.0), False),
            (received(old, 2002.0), False),
            (received(parse_metrics("pi-1", b"junk"), 2003.0), False),
        ]
    )
    snap = live.snapshot(2005.0)
    dev = snap.device("pi-1")
    assert dev is not None and dev.metrics is not None and dev.metrics.seq == 10
    assert dev.last_seen == 2002.0 and dev.health == "unknown"  # junk does not count; no state yet
    assert snap.stats.received["metrics"] == 3 and snap.stats.malformed["metrics"] == 1


def test_retained_state_counts_with_its_own_time() -> None:
    live = FleetLive(started=0.0)
    st = parse_state("pi-1", state_payload(ts=500.0))
    live.apply([(received(st, 10_000.0), True)])
    dev = live.snapshot(10_000.0).device("pi-1")
    assert dev is not None and dev.last_seen == 500.0 and dev.health == "stale"
    live.apply([(received(parse_state("pi-1", b""), 10_001.0), False)])
    assert live.snapshot(10_001.0).devices == ()


# -- Prometheus exposition ------------------------------------------------------------------------
SAMPLE_RE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r'(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")(?:,[a-zA-Z_][a-zA-Z0-9_]*='
    r'"(?:[^"\\\n]|\\[\\"n])*")*)\})? (?P<value>\S+)$'
)
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def check_exposition(text: str) -> dict[str, list[str]]:
    """Validate the text format's structure; return sample lines by family."""
    assert text.endswith("\n")
    families: dict[str, list[str]] = {}
    current: str | None = None
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in families, f"family {name} appears twice"
            families[name] = []
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == current and kind in ("gauge", "counter", "histogram", "summary")
            types[name] = kind
        else:
            m = SAMPLE_RE.match(line)
            assert m, f"bad sample line: {line!r}"
            assert current is not None
            allowed = [current + suffix for suffix in SUFFIXES.get(types[current], ("",))]
            assert m["name"] in allowed, f"{m['name']} outside its family {current}"
            float(m["value"].replace("+Inf", "inf"))
            families[current].append(line)
    for name, lines in families.items():
        assert len(lines) == len(set(ln.rsplit(" ", 1)[0] for ln in lines)), f"repeated series in {name}"
    return families


def series(text: str) -> Series:
    """Every sample as (name, labels) -> value, read by prometheus_client's own parser."""
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(got: Series, name: str, **labels: str) -> float | None:
    return got.get((name, frozenset(labels.items())))


def test_label_values_are_escaped() -> None:
    live = FleetLive(started=1.0)
    live.apply([(received(parse_state("pi-1", state_payload(status='a\\b"c', agent_version="1\n2"))), False)])
    text = render(live.snapshot(1001.0))
    assert 'litefleet_device_info{agent_version="1\\n2",device="pi-1",status="a\\\\b\\"c"} 1.0' in text
    assert (
        value(series(text), "litefleet_device_info", device="pi-1", status='a\\b"c', agent_version="1\n2")
        == 1
    )


def test_exposition_of_a_hostile_fleet_is_valid() -> None:
    """Model names, versions and statuses come from devices: any text must stay one label value."""
    live = FleetLive(started=1.0)
    doc = json.loads(agent_payload("pi-1"))
    doc["models"][0]["name"] = 'evil"}\nlitefleet_pwned 1 #'
    doc["models"].append(dict(doc["models"][0]))  # the same version twice in one message
    doc["models"][1]["name"] = 'evil"}\nlitefleet_pwned 1 #'
    live.apply(
        [
            (received(parse_metrics("pi-1", json.dumps(doc).encode())), False),
            (received(parse_state("pi-1", state_payload(status='a\\b"c', agent_version="1\n2"))), False),
            (received(parse_state("pi-2", state_payload(online=False))), False),
        ]
    )
    text = render(live.snapshot(1001.0))
    families = check_exposition(text)
    assert list(families) == metric_names()
    assert "\nlitefleet_pwned" not in text
    got = series(text)
    assert len(families["litefleet_device_online"]) == 2
    assert value(got, "litefleet_device_online", device="pi-1") == 1
    assert value(got, "litefleet_device_online", device="pi-2") == 0
    assert value(got, "litefleet_devices", health="offline") == 1
    assert len(families["litefleet_model_requests_total"]) == 1


def test_real_values_appear() -> None:
    live = FleetLive(started=1.0)
    live.apply(
        [
            (received(parse_metrics("pi-1", agent_payload())), False),
            (received(parse_state("pi-1", state_payload())), False),
        ]
    )
    text = render(live.snapshot(1001.0))
    fam = check_exposition(text)
    got = series(text)
    lbl = {"device": "pi-1", "model": "digits", "version": "3"}
    assert value(got, "litefleet_model_requests_total", **lbl) == 5
    assert value(got, "litefleet_model_inferences_total", **lbl) == 3
    assert value(got, "litefleet_model_errors_total", **lbl) == 1
    assert value(got, "litefleet_device_temperature_celsius", device="pi-1") == 51
    assert value(got, "litefleet_device_throttled", device="pi-1", flag="throttled") == 1
    assert value(got, "litefleet_device_cpu_percent", device="pi-1", scope="system") == 12.4
    assert value(got, "litefleet_device_disk_total_bytes", device="pi-1") == 31914983424
    info = {"device": "pi-1", "model": "digits", "version": "3", "sha256": "ab" * 32, "trial": "false"}
    assert value(got, "litefleet_model_info", **info) == 1
    assert fam["litefleet_model_refused"] == []  # it refused nothing
    behind = state_payload(refused={"digits": {"version": 4, "reason": "golden"}})
    live.apply([(received(parse_state("pi-1", behind)), False)])
    refused = series(render(live.snapshot(1002.0)))
    v4 = {"device": "pi-1", "model": "digits", "version": "4", "reason": "golden"}
    assert value(refused, "litefleet_model_refused", **v4) == 1
    assert value(refused, "litefleet_model_info", **info) == 1  # and still runs v3
    hist = "litefleet_model_inference_duration_seconds"
    assert value(got, hist + "_bucket", **lbl, le="+Inf") == 3
    # 0.4 ms and 0.5 ms lie below 2**19 ns = 0.524288 ms; 2 ms below 2**21 ns
    assert value(got, hist + "_bucket", **lbl, le="0.000524288") == 2
    assert value(got, hist + "_bucket", **lbl, le="0.001048576") == 2
    assert value(got, hist + "_bucket", **lbl, le="0.002097152") == 3
    # the latency quantiles are a summary; its _sum and _count are the histogram's
    assert "# TYPE litefleet_model_latency_seconds summary" in text
    p50 = value(got, "litefleet_model_latency_seconds", **lbl, quantile="0.5")
    assert p50 is not None and 0.00045 < p50 < 0.00055
    assert value(got, "litefleet_model_latency_seconds_count", **lbl) == 3
    assert value(got, "litefleet_model_latency_seconds_sum", **lbl) == value(got, hist + "_sum", **lbl)
    lean_text = render(live.snapshot(1001.0), histograms=False)
    lean = check_exposition(lean_text)
    assert lean[hist] == []
    assert lean["litefleet_model_requests_total"] == fam["litefleet_model_requests_total"]
    assert lean["litefleet_model_latency_seconds"] == fam["litefleet_model_latency_seconds"]


def test_a_site_devices_uplink_counters_are_exported_with_its_site() -> None:
    uplink = {"site": "b", "up": True, "outages": 2, "events_held": 0, "events_dropped": 17}
    m = parse_metrics("pi-1", agent_payload(uplink=uplink))
    assert isinstance(m, MetricsSample)
    assert (m.uplink_site, m.uplink_outages, m.uplink_events_dropped) == ("b", 2, 17)
    live = FleetLive(started=1.0)
    live.apply([(received(m), False), (received(parse_metrics("pi-2", agent_payload("pi-2"))), False)])
    text = render(live.snapshot(1001.0))
    fam = check_exposition(text)
    got = series(text)
    assert value(got, "litefleet_device_uplink_outages_total", device="pi-1", site="b") == 2
    assert value(got, "litefleet_device_uplink_events_dropped_total", device="pi-1", site="b") == 17
    # a device without a site has no such series
    assert len(fam["litefleet_device_uplink_outages_total"]) == 1
    bad = parse_metrics("pi-3", agent_payload("pi-3", uplink={"site": ["b"], "outages": -1}))
    assert isinstance(bad, MetricsSample) and bad.uplink_site is None and bad.uplink_outages is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2**40), min_size=1, max_size=60))
def test_rebucketing_is_exact_at_every_bound(latencies_ns: list[int]) -> None:
    stats = ModelStats("m", "1")
    for ns in latencies_ns:
        stats.record_ok(ns)
    report = model_report(stats.snapshot(), None, 1.0, active=True)
    hist = [(u, n) for u, n in report["histogram_ms"]]
    cumulative = rebucket(hist)
    for le_s, count in zip(LE_SECONDS, cumulative, strict=False):
        le_ns = round(le_s * 1e9)
        # every latency in a bucket whose upper bound is <= le counts; those are exactly
        # the latencies below le, because le is itself a bucket boundary
        assert count == sum(1 for ns in latencies_ns if ns < le_ns)
    assert cumulative[-1] == len(latencies_ns)


def test_one_model_stands_for_the_device_everywhere() -> None:
    """Two active models, the state names the second: status, the page and /api/devices
    all show that model's figures next to its name."""
    reports = []
    for name, ns, n in (("digits", 400_000, 2), ("faces", 9_000_000, 4)):
        stats = ModelStats(name, "3")
        for _ in range(n):
            stats.record_ok(ns)
        reports.append(model_report(stats.snapshot(), None, 10.0, active=True))
    payload = build_metrics_payload(
        device_id="pi-1", seq=1, ts=1000.0, interval_s=10.0, models=reports, device={}, api={}, queue={}
    )
    sample = parse_metrics("pi-1", payload)
    assert isinstance(sample, MetricsSample) and [m.name for m in sample.models] == ["digits", "faces"]
    faces = shown_model(sample, "faces")
    assert faces is not None and faces.name == "faces" and faces.p50_ms is not None and faces.p50_ms > 5
    assert shown_model(sample, "gone") is sample.models[0] and shown_model(None, "faces") is None
    state = state_payload(model="faces", version="3", inferences=6)
    live = FleetLive(started=1.0)
    live.apply([(received(parse_state("pi-1", state)), False), (received(sample), False)])
    (dev,) = live.snapshot(1001.0).devices
    api = device_json(dev)
    assert (api["model"], api["latency_ms_p50"]) == ("faces", faces.p50_ms)
    assert api["latency_ms_p99"] == faces.p99_ms
    assert api["inferences"] == 6  # as the state counts: every active model's answers
    (row,) = fleet_rows([dev], 1001.0)
    cells = dict(zip(FLEET_HEADERS, (c.text for c in row), strict=True))
    assert cells["model"] == "faces v3" and cells["p50"] == format_ms(faces.p50_ms)
    assert cells["requests"] == "4"
    status = parse_state("pi-1", state)
    assert isinstance(status, StateRecord)
    merged = merge_metrics(state_row(status), sample)
    assert (merged["latency_ms_p50"], merged["latency_ms_p99"]) == (faces.p50_ms, faces.p99_ms)
    assert merged["inferences"] == 6


# -- the store ------------------------------------------------------------------------------------------
def test_store_deduplicates_and_keeps_a_reset_device(tmp_path: Path) -> None:
    store = MonitorStore.open(tmp_path / "m.db")
    try:
        a = parse_metrics("pi-1", agent_payload(seq=1, ts=1000.0))
        b = parse_metrics("pi-1", agent_payload(seq=2, ts=1010.0))
        r1 = store.write([received(a), received(b)])
        r2 = store.write([received(a), received(b)])  # the replay, byte for byte
        reset = parse_metrics("pi-1", agent_payload(seq=1, ts=5000.0))  # queue file lost
        r3 = store.write([received(reset)])
        assert (r1.samples, r2.samples, r2.duplicate_samples, r3.samples) == (2, 0, 2, 1)
        ev = parse_event("pi-1", b'{"ts": 1001, "boot": "b1", "seq": 1, "event": "activated"}')
        ev_next_boot = parse_event("pi-1", b'{"ts": 1002, "boot": "b2", "seq": 1, "event": "activated"}')
        r4 = store.write([received(ev), received(ev), received(ev_next_boot)])
        assert (r4.events, r4.duplicate_events) == (2, 1)
        with store.reader() as r:
            assert r.sample_keys() == [("pi-1", 1, 1000.0), ("pi-1", 1, 5000.0), ("pi-1", 2, 1010.0)]
            assert r.count("model_samples") == 3 and r.count("events") == 2
            series = r.latency_series("pi-1", "digits", 0.0)
            assert [p.ts for p in series] == [1000.0, 1010.0, 5000.0] and series[0].p99_ms is not None
    finally:
        store.close()


def test_store_retention(tmp_path: Path) -> None:
    store = MonitorStore.open(tmp_path / "m.db")
    try:
        old = parse_metrics("pi-1", agent_payload(seq=1, ts=100.0))
        new = parse_metrics("pi-1", agent_payload(seq=2, ts=2000.0))
        res = store.write([received(old), received(new)], cutoff_ts=1000.0)
        assert (res.samples, res.too_old) == (1, 1)
        store.write([received(old)])  # written without a cutoff ...
        assert store.prune(1000.0) == 2  # ... and pruned: its sample row and its model row
        store.write([received(parse_state("pi-1", state_payload()))])
        with store.reader() as r:
            assert r.count("samples") == 1 and [d["device_id"] for d in r.devices()] == ["pi-1"]
        store.write([received(parse_state("pi-1", b""))])
        with store.reader() as r:
            assert r.devices() == [] and r.count("samples") == 1  # history stays until retention
    finally:
        store.close()


def test_store_filters_one_device_in_sql(tmp_path: Path) -> None:
    """``?device=ID`` must not depend on what the rest of the fleet did lately."""
    store = MonitorStore.open(tmp_path / "m.db")
    try:
        first = b'{"ts": 10, "boot": "q", "seq": 1, "event": "activated"}'
        quiet = [
            received(parse_event("pi-quiet", first)),
            received(parse_metrics("pi-quiet", agent_payload("pi-quiet", seq=1, ts=10.0))),
        ]
        busy = [
            received(
                parse_event(
                    f"pi-{i % 7}",
                    json.dumps({"ts": 100 + i, "boot": "b", "seq": i, "event": "activated"}).encode(),
                )
            )
            for i in range(300)
        ]
        busy += [
            received(parse_metrics(f"pi-{i}", agent_payload(f"pi-{i}", seq=1, ts=20.0))) for i in range(5)
        ]
        store.write(quiet + busy)
        with store.reader() as r:
            assert all(e.device_id != "pi-quiet" for e in r.recent_events(200))
            (ev,) = r.recent_events(50, device_id="pi-quiet")
            assert (ev.device_id, ev.ts) == ("pi-quiet", 10.0)
            assert len(r.recent_events(50, device_id="pi-1")) == 43
            assert [e.ts for e in r.recent_events(2, device_id="pi-1")] == [395.0, 388.0]
            # a site's devices (?site=NAME): only theirs, the newest first, however few
            among = r.recent_events(50, device_ids={"pi-quiet", "pi-2"})
            assert {e.device_id for e in among} == {"pi-quiet", "pi-2"} and len(among) == 44
            assert among[0].ts > among[-1].ts and among[-1].device_id == "pi-quiet"
            assert r.recent_events(50, device_ids=set()) == []
            assert ("pi-quiet", "digits") not in r.charted_models(0.0, 3)
            assert r.charted_models(0.0, 3, device_id="pi-quiet") == [("pi-quiet", "digits")]
            assert r.charted_models(0.0, 3, device_id="pi-none") == []
    finally:
        store.close()


def test_store_refuses_a_foreign_file(tmp_path: Path) -> None:
    from agent.errors import StorageError

    path = tmp_path / "not.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError):
        MonitorStore.open(path)


# -- the docs say what the code does ------------------------------------------------------------------
DOCS = Path(__file__).resolve().parents[3] / "docs"


def test_every_metric_is_documented_and_the_dashboard_uses_only_real_ones() -> None:
    names = metric_names()
    text = (DOCS / "monitor.md").read_text()
    table = set(re.findall(r"^\| `(litefleet_[a-z0-9_]+)` \|", text, re.M))
    assert table == set(names)
    dash = json.loads((DOCS / "grafana-litefleet.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    hist = "litefleet_model_inference_duration_seconds"
    known = set(names) | {hist + suffix for suffix in ("_bucket", "_sum", "_count")}
    used = {m for e in exprs for m in re.findall(r"litefleet_[a-z0-9_]+", e)}
    assert used and used <= known, used - known


def test_a_will_keeps_the_last_known_model_and_never_changes_it() -> None:
    """A state without models and not online is a will (docs/protocol.md 6.1): after_will
    makes it "offline, last known model"; a full state replaces what was known."""
    from agent.state_message import will_document
    from converter.monitor.payloads import after_will
    from tests.support.payloads import state_payload

    known = parse_state("pi-1", state_payload(device_id="pi-1", boot="b1", ts=10.0))
    will = parse_state("pi-1", json.dumps(will_document(device_id="pi-1", boot="b1", ts=5.0)).encode())
    goodbye = parse_state("pi-1", state_payload(device_id="pi-1", online=False, status="offline", models={}))
    assert isinstance(known, StateRecord) and isinstance(will, StateRecord)
    assert isinstance(goodbye, StateRecord)
    assert will.will and not known.will and not goodbye.will  # a clean stop is a full state
    assert (will.model, will.models, will.online) == (None, (), False)
    merged = after_will(known, will)
    assert merged.will and not merged.online and merged.status == "offline"
    assert (merged.model, merged.version, merged.models) == (known.model, known.version, known.models)
    assert merged.groups == known.groups and merged.ts == 5.0 and merged.raw_json == will.raw_json
    assert after_will(None, will) == will
    assert after_will(merged, will).model == known.model  # the same will again
    assert after_will(known, goodbye) == goodbye  # not a will: it replaces
    other = parse_state("pi-2", state_payload(device_id="pi-2"))
    assert isinstance(other, StateRecord) and after_will(other, will) == will
    # status shows it as unknown, and its row says why
    row = state_row(will)
    assert row["last_will"] is True and row["model"] is None
    assert state_row(known)["last_will"] is False
