"""The page and its charts, pure: what a reader sees of an offline device, the shared and
logarithmic scales, gaps and markers, the rollout panel, the sites table, escaping."""

from __future__ import annotations

import json
import re

from converter.monitor.charts import (
    downsample,
    format_ms,
    linear_axis,
    log_axis,
    nice_ceiling,
    svg_path,
)
from converter.monitor.device_charts import DeviceHistory, device_rows
from converter.monitor.history import DevicePoint, GatePoint, LatencyPoint, RolloutStep, StoredEvent
from converter.monitor.http_server import device_json
from converter.monitor.live import DeviceView, FleetLive
from converter.monitor.page import (
    FLEET_HEADERS,
    NOW_COLUMNS,
    SITE_HEADER,
    expiry_line,
    fleet_rows,
    render_page,
    sites_table,
)
from converter.monitor.payloads import parse_metrics, parse_state
from converter.monitor.rollout_section import RolloutPanel, rollouts_section
from converter.monitor.rollouts import RolloutView, parse_rollout
from converter.monitor.sites import apply_site_message
from converter.monitor.store import Received
from tests.support.payloads import agent_payload, state_payload

NOW = 1_800_003_600.0


def fleet(*devices: tuple[str, bool, float], now: float = NOW) -> list[DeviceView]:
    """Devices ``(id, online, seconds since its last metrics message)``, as the live view has them."""
    live = FleetLive(started=now - 7200)
    for device_id, online, ago in devices:
        state = parse_state(device_id, state_payload(device_id=device_id, online=online))
        sample = parse_metrics(device_id, agent_payload(device_id, seq=1, ts=now - ago))
        live.apply([(Received(state, now - ago), False), (Received(sample, now - ago), False)])
    snap = live.snapshot(now)
    return [v for v in (snap.device(d[0]) for d in devices) if v is not None]


def points(values: list[tuple[float, float | None, float | None]], version: str = "1") -> list[LatencyPoint]:
    return [LatencyPoint(ts, version, p50, p99, 10.0, 5.0) for ts, p50, p99 in values]


def history(
    device_id: str, view: DeviceView | None, p50: float, p99: float, start: float = NOW - 600
) -> DeviceHistory:
    lat = tuple(points([(start + 10 * i, p50, p99) for i in range(40)]))
    dev = tuple(DevicePoint(start + 10 * i, 10.0, 3.0, 12.0, 48 * 2**20) for i in range(40))
    return DeviceHistory(device_id, view, (("digits", lat),), dev)


# -- numbers and axes -------------------------------------------------------------------------
def test_nice_ceiling_and_format() -> None:
    assert [nice_ceiling(v) for v in (0.7, 1.0, 1.3, 2.2, 4.0, 7.0, 0.013)] == [1, 1, 2, 2.5, 5, 10, 0.02]
    assert nice_ceiling(0.0) == 1.0
    assert format_ms(0.0213) == "21.3 µs" and format_ms(4.5) == "4.5 ms" and format_ms(None) == "-"


def test_log_axis_spans_whole_decades_and_labels_them() -> None:
    narrow = log_axis([0.4, 2.6])  # 400 µs .. 2.6 ms: two decades, labelled 1-2-5
    assert (narrow.lo, narrow.hi, narrow.log) == (0.1, 10.0, True)
    assert [label for _, label in narrow.ticks] == [
        "100 µs", "200 µs", "500 µs", "1 ms", "2 ms", "5 ms", "10 ms",
    ]  # fmt: skip
    wide = log_axis([0.002, 900.0])  # 2 µs .. 900 ms: decades only, grey lines at 2 and 5
    assert [label for _, label in wide.ticks] == [
        "1 µs",
        "10 µs",
        "100 µs",
        "1 ms",
        "10 ms",
        "100 ms",
        "1e+03 ms",
    ]
    assert len(wide.minor) == 12
    capped = log_axis([1e-9, 1.0])  # at most 6 decades, the top kept
    assert (capped.lo, capped.hi) == (1e-6, 1.0)
    # p50 and p99 a factor of 5 apart are far apart on the plot, not both at the bottom
    y = narrow.scale(100.0, 0.0)
    assert y(0.4) - y(2.0) > 30 and y(0.05) == 100.0 and y(50.0) == 0.0
    assert linear_axis([3.0, 37.0]).description == "linear 0..50" and linear_axis([]).hi == 1.0


def test_path_breaks_at_gaps_and_missing_values() -> None:
    pts = [(0.0, 1.0), (10.0, 2.0), (20.0, None), (30.0, 1.5), (40.0, 1.0), (200.0, 1.0)]
    d = svg_path(pts, lambda t: t, lambda v: v * 10, gap_s=30.0)
    assert d == "M0.0,10.0 L10.0,20.0 M30.0,15.0 L40.0,10.0 M200.0,10.0"


def test_downsampling_keeps_the_spike() -> None:
    p99 = [(float(i), 2.0) for i in range(1000)]
    p99[500] = (500.0, 90.0)
    out = downsample(p99, 0.0, 1000.0, 100, "max")
    assert len(out) == 100 and max(v or 0 for _, v in out) == 90.0
    mean = downsample([(float(i), float(i % 2)) for i in range(1000)], 0.0, 1000.0, 100)
    assert all(v == 0.5 for _, v in mean)


# -- the fleet table ----------------------------------------------------------------------------
def test_an_offline_or_stale_device_shows_its_last_report_with_its_age_not_as_current() -> None:
    online, stale, offline = fleet(("pi-on", True, 5), ("pi-stale", True, 300), ("pi-off", False, 1200))
    assert (online.health, stale.health, offline.health) == ("online", "stale", "offline")
    rows = {
        d.device_id: row
        for d, row in zip((online, stale, offline), fleet_rows([online, stale, offline], NOW), strict=True)
    }
    assert len(rows["pi-on"]) == len(FLEET_HEADERS)
    p50 = dict(zip(FLEET_HEADERS, rows["pi-on"], strict=True))["p50"]
    assert p50.cls == "num" and p50.text.endswith("µs")
    for device_id, word, ago in (("pi-off", "offline", "20 min ago"), ("pi-stale", "stale", "5 min ago")):
        cells = rows[device_id]
        (was,) = [c for c in cells if c.cls == "was"]
        assert was.span == NOW_COLUMNS and len(cells) == len(FLEET_HEADERS) - NOW_COLUMNS + 1
        assert was.text.startswith(word) and f"last metrics {ago}: p50 " in was.text, was.text
        assert not any(c.cls == "num" for c in cells)  # no figure in a column of current figures
    page = render_page(devices=[online, stale, offline], charts=[], events=[], now=NOW, window_s=3600)
    assert re.search(
        r'<tr data-device="pi-off" data-health="offline">(?:(?!</tr>).)*<td class="was" colspan="8">offline',
        page,
        re.S,
    )
    assert "1 of 3 devices online" in page and '<span class="offline">1 offline</span>' in page
    api = device_json(offline)
    assert api["metrics_current"] is False and api["metrics_ts"] == NOW - 1200 and api["health"] == "offline"
    assert device_json(online)["metrics_current"] is True


def test_page_escapes_device_text_and_fetches_nothing() -> None:
    live = FleetLive(started=1.0)
    bad = "<script>alert(1)</script>"
    live.apply(
        [
            (Received(parse_state("pi-1", state_payload(error=bad, status=bad)), 1000.0), False),
            (Received(parse_metrics("pi-1", agent_payload()), 1000.0), False),
        ]
    )
    snap = live.snapshot(1001.0)
    ev = StoredEvent("pi-1", 1000.0, "rejected", "digits", "4", "golden", bad)
    rows = device_rows([history(bad, snap.devices[0], 0.5, 1.0, start=400.0)], 0.0, 1000.0, 1001.0)
    page = render_page(devices=snap.devices, charts=rows, events=[ev], now=1001.0, window_s=3600)
    assert "<script" not in page and "&lt;script&gt;" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from elsewhere
    assert '<link rel="icon" href="data:,">' in page  # not even a favicon
    assert '<meta http-equiv="refresh"' in page and '<path d="M' in page
    assert device_json(snap.devices[0])["inferences"] == 3
    assert '<a href="?device=pi-1">pi-1</a>' in page
    one = render_page(
        devices=snap.devices, charts=[], events=[], now=1001.0, window_s=3600, only_device="pi 1&x"
    )
    assert 'href="?hours=6&amp;device=pi%201%26x"' in one and 'href="?">whole fleet' in one
    down = render_page(devices=[], charts=[], events=[], now=1.0, window_s=60, broker_connected=False)
    assert "not connected to the broker" in down


# -- the charts -----------------------------------------------------------------------------------
def scales(html_text: str, kind: str) -> list[str]:
    return re.findall(rf'data-kind="{kind}" data-scale="([^"]+)"', html_text)


def test_charts_of_one_kind_share_one_scale_across_devices() -> None:
    fast, slow = fleet(("pi-fast", True, 5), ("pi-slow", True, 5))
    rows = "".join(
        device_rows(
            [history("pi-fast", fast, 0.05, 0.2), history("pi-slow", slow, 8.0, 40.0)], NOW - 900, NOW, NOW
        )
    )
    lat = scales(rows, "latency")
    assert len(lat) == 2 and lat[0] == lat[1] == "log 10 µs..100 ms", lat
    for kind in ("throughput", "cpu", "memory"):
        found = scales(rows, kind)
        assert len(found) == 2 and found[0] == found[1] and found[0].startswith("linear 0"), (kind, found)
    # both lines of the fast device lie low on the shared axis, the slow one's high
    first_y = [float(y) for y in re.findall(r'<path d="M[\d.]+,([\d.]+)[^"]*"[^>]*class="p50"', rows)]
    assert first_y[0] > first_y[1] + 40  # SVG y grows downwards


def test_chart_has_gaps_version_marks_and_an_offline_span() -> None:
    (off,) = fleet(("pi-off", False, 300))
    lat = points([(NOW - 900 + 10 * i, 0.5, 1.0) for i in range(10)])
    lat += points([(NOW - 500 + 10 * i, 0.6, 1.4) for i in range(10)], version="2")
    h = DeviceHistory("pi-off", off, (("digits", tuple(lat)),), ())
    (row,) = device_rows([h], NOW - 1000, NOW, NOW)
    svg = re.search(r'<svg[^>]*data-kind="latency".*?</svg>', row, re.S)
    assert svg is not None
    p50 = re.search(r'<path d="([^"]+)"[^>]*class="p50"', svg.group(0))
    assert p50 is not None and p50.group(1).count("M") == 2  # the outage is a gap
    assert (
        ">v2</text>" in svg.group(0)
        and 'class="shaded"' in svg.group(0)
        and ">offline</text>" in svg.group(0)
    )
    # nothing in a legend reads as current for a device that is offline
    assert re.search(r'class="legend">.*?µs', svg.group(0)) is None
    assert "last metrics 5 min ago" in row and 'data-health="offline"' in row
    (empty,) = device_rows([DeviceHistory("pi-x", None, (("digits", ()),), ())], 0.0, 10.0, 10.0)
    assert "no requests in this window" in empty


# -- rollouts, sites, expiry ------------------------------------------------------------------------
RECORD = {
    "name": "digits", "version": 4, "previous": 3, "state": "aborted", "wave": 1, "waves": [5, 25, 100],
    "canary_pct": 25, "target": "all", "started": NOW - 600, "updated": NOW - 60, "wave_started": NOW - 300,
    "bake_s": 600.0, "devices": {"canary": 5, "control": 15, "selected": ["pi-1", "pi-7"], "known": 20},
    "gates": {
        "latency_p99_ratio": {"value": 2.3, "threshold": 1.5, "op": "<=", "verdict": "fail", "samples": 812},
        "agreement": {"value": None, "threshold": 0.9, "op": ">=", "verdict": "wait", "samples": 3},
    },
    "reason": "latency_p99_ratio 2.3 (<= 1.5 fails, 812 samples) <script>",
}  # fmt: skip


def test_rollout_panel_shows_versions_waves_gates_and_events() -> None:
    record = parse_rollout("digits", json.dumps(RECORD).encode())
    assert isinstance(record, RolloutView)
    gates = [
        GatePoint(NOW - 600 + 30 * i, 0 if i < 10 else 1, "latency_p99_ratio", "pass", 1.0 + i / 10, 1.5)
        for i in range(15)
    ]
    steps = [
        RolloutStep(NOW - 600, "baking", 0, 5, (5, 25, 100)),
        RolloutStep(NOW - 300, "baking", 1, 25, (5, 25, 100)),
    ]
    ev = StoredEvent(
        "pi-7", NOW - 100, "rolled_back", "digits", "4", "inference_errors", "<img src=x>3 errors"
    )
    panel = RolloutPanel(
        record,
        {"3": ["pi-2", "pi-3"], "4": ["pi-1"]},
        frozenset({"pi-1", "pi-2"}),
        gates,
        steps,
        {"rolled_back": 1, "activated": 2},
        [ev],
    )
    html_text = rollouts_section([panel], NOW)
    assert 'data-model="digits" data-state="aborted"' in html_text
    assert "v3 → v4" in html_text and "wave 2 of 3 (25 %)" in html_text
    assert (
        '<span class="done">5 %</span>→ <span class="aborted">25 %</span>→ <span class="todo">100 %</span>'
        in html_text
    )
    assert re.search(
        r'data-gate="latency_p99_ratio"><td>latency_p99_ratio</td><td class="num value">2.3</td>'
        r'<td class="rule">&lt;= 1.5</td><td class="verdict-fail">fail',
        html_text,
    )
    assert '<td class="verdict-wait">wait</td>' in html_text
    assert "<script" not in html_text and "&lt;script&gt;" in html_text and "<img" not in html_text
    assert (
        "<b>v4 (new)</b>: 1 device (1 online)" in html_text
        and "v3 (previous)</b>: 2 devices (1 online)" in html_text
    )
    assert '<span class="bad">rolled_back on 1 device</span>' in html_text
    (chart,) = re.findall(
        r'<svg[^>]*data-kind="gate".*?</svg>', html_text, re.S
    )  # agreement has no values yet
    assert (
        'data-gate="latency_p99_ratio"' in chart and 'class="threshold"' in chart and ">25 %</text>" in chart
    )
    assert rollouts_section([], NOW) == ""
    assert "is it running?" not in html_text  # aborted: nothing more to come
    quiet = parse_rollout("digits", json.dumps({**RECORD, "state": "baking", "updated": NOW - 900}).encode())
    assert isinstance(quiet, RolloutView)
    assert "is it running?" in rollouts_section([RolloutPanel(quiet, {})], NOW)


def test_devices_at_sites_get_a_site_column_and_a_cut_site_is_said() -> None:
    """A site column once any device is at a site; a device whose site's uplink is down says
    so (its row is what crossed the bridge before the cut); the sites table links to a page
    of one site's devices."""
    live = FleetLive(started=NOW - 7200)
    for device_id, site in (("pi-c", None), ("pi-n", "north"), ("pi-s", "south")):
        state = parse_state(device_id, state_payload(device_id=device_id, site=site))
        sample = parse_metrics(device_id, agent_payload(device_id, seq=1, ts=NOW - 5))
        live.apply([(Received(state, NOW - 5), False), (Received(sample, NOW - 5), False)])
    # a device whose state does not say its site (not crossed yet): its metrics do
    uplink = {"site": "north", "up": True, "outages": 0, "events_held": 0, "events_dropped": 0}
    state = parse_state("pi-m", state_payload(device_id="pi-m"))
    sample = parse_metrics("pi-m", agent_payload("pi-m", seq=1, ts=NOW - 5, uplink=uplink))
    live.apply([(Received(state, NOW - 5), False), (Received(sample, NOW - 5), False)])
    for name, word in (("north", b"1"), ("south", b"0")):
        live.apply_site(name, "bridge", word)
    snap = live.snapshot(NOW)
    page = render_page(devices=snap.devices, charts=[], events=[], now=NOW, window_s=3600, sites=snap.sites)
    headers = re.findall(r"<th>([^<]*)</th>", page.split('<table class="fleet">')[1].split("</tr>")[0])
    assert headers[:3] == ["device", SITE_HEADER, "health"] and len(headers) == len(FLEET_HEADERS) + 1
    rows = {
        d.device_id: row
        for d, row in zip(
            snap.devices, fleet_rows(snap.devices, NOW, {s.name: s for s in snap.sites}), strict=True
        )
    }
    assert rows["pi-c"][1].text == "-" and rows["pi-n"][1].text == rows["pi-m"][1].text == "north"
    assert (rows["pi-s"][1].text, rows["pi-s"][1].cls) == ("south · uplink down", "offline")
    assert '<td class="offline">south · uplink down</td>' in page
    assert '<a href="?site=south">south</a>' in page
    # one site's page: its devices and its site row only, links keep the site
    north = [d for d in snap.devices if d.site == "north"]
    assert [d.device_id for d in north] == ["pi-m", "pi-n"]
    one = render_page(
        devices=north, charts=[], events=[], now=NOW, window_s=3600, sites=snap.sites, only_site="north"
    )
    assert "<h2>Devices of site north</h2>" in one and 'data-device="pi-n"' in one
    assert 'data-site="north"' in one and 'data-site="south"' not in one
    assert "?hours=6&amp;site=north" in one and '<a href="?">whole fleet</a>' in one
    empty = render_page(devices=[], charts=[], events=[], now=NOW, window_s=3600, only_site="west")
    assert "No device of site west has reported yet." in empty
    # no device at a site: no site column
    central = render_page(devices=snap.devices[:1], charts=[], events=[], now=NOW, window_s=3600)
    assert f"<th>{SITE_HEADER}</th>" not in central


def test_sites_table_and_expiry_line() -> None:
    status = {
        "site": "north", "ts": NOW - 4, "upstream": "hub:8883", "link": "up", "bytes_down": 4_211_607,
        "bytes_up": 52_330, "sessions": 2, "failures": 1, "last_error": "<refused>", "broker_restarts": 0,
    }  # fmt: skip
    site = apply_site_message(None, "north", "status", json.dumps(status).encode())
    assert site is not None and not isinstance(site, type(None)) and getattr(site, "link_up", None) is True
    down = apply_site_message(site, "north", "bridge", b"0")  # the bridge's will: the link is gone
    text = sites_table([down], NOW)  # type: ignore[list-item]
    assert '<td class="offline">down</td>' in text and "4.2 / 0.1" in text and "&lt;refused&gt;" in text
    assert apply_site_message(site, "north", "status", b"") is None
    assert "names another site" in str(
        apply_site_message(None, "south", "status", json.dumps(status).encode())
    )
    line = expiry_line({"timestamp": NOW + 2 * 86400, "root": NOW + 300 * 86400, "targets": NOW - 86400}, NOW)
    assert line.index("timestamp") < line.index("root")
    assert '<span class="warn">timestamp expires in 2.0 d</span>' in line
    assert '<span class="bad">targets EXPIRED 1.0 d ago</span>' in line and "root expires in 300 d" in line
