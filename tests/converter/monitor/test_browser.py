"""The monitor's page as its users see it: ``litefleet monitor`` against a real Mosquitto,
devices publishing (one offline, one in a rollout), the page loaded in headless Chromium.

The devices are publishers in the agent's exact wire format (``build_metrics_payload``,
tests/support/payloads.py), with half an hour of history (``ts`` in the past), so the
charts have something to show; the rollout record is in the controller's format
(docs/protocol.md 6.4), published as the controller would (retained). What is checked is
the DOM Chromium built, as a reader would read it: the offline device is marked offline
and its last figures are not in the columns of current figures, the rollout view shows
the gates' values, every chart of a kind has the same axis labels, latency on a log axis,
and the page asked for nothing off this host. A screenshot is kept (``monitor-page.png``
in the test's folder, and in ``$LITEFLEET_ARTIFACTS`` when set).
"""

from __future__ import annotations

import json
import math
import re
import signal
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from agent.mqtt.client import wait_until
from tests.support.browser import RecordingProxy, keep_artifact, run_chromium
from tests.support.monitor import publish_many, run_cli, scraped_value
from tests.support.payloads import agent_payload, state_payload

B = "litefleet/v1"
HISTORY_S = 1800
STEP_S = 10


def metrics(device_id: str, seq: int, ts: float, version: str, scale: float) -> bytes:
    k = seq / 12
    lat = (*(int((0.4 + 0.1 * math.sin(k + i)) * scale * 1e6) for i in range(30)), int(2.5 * scale * 1e6))
    doc = json.loads(
        agent_payload(
            device_id,
            seq=seq,
            ts=ts,
            latencies_ns=lat,
            cpu_percent_process=6 * scale + 3 * math.sin(k),
            cpu_percent_system=18 + 6 * math.sin(k / 2),
            rss_bytes=int((46 + 4 * scale + seq * 0.01) * 2**20),
        )
    )
    doc["interval_s"] = STEP_S
    for m in doc["models"]:
        m["version"] = version
        m["throughput_rps"] = round(8 + 4 * math.sin(k + scale), 2)
    return json.dumps(doc).encode()


def fleet_history(now: float) -> list[tuple[str, bytes]]:
    """pi-1 moves to v4 ten minutes ago (the rollout's canary), pi-3 stops 20 minutes ago."""
    out = []
    for device_id, scale, ends_ago in (
        ("pi-1", 1.0, 0),
        ("pi-2", 1.6, 0),
        ("pi-3", 3.0, 1200),
        ("pi-4", 0.6, 0),
    ):
        for seq, ts in enumerate(range(int(now - HISTORY_S), int(now - ends_ago), STEP_S), start=1):
            version = "4" if device_id == "pi-1" and ts > now - 600 else "3"
            out.append(
                (f"{B}/devices/{device_id}/metrics", metrics(device_id, seq, float(ts), version, scale))
            )
    return out


def rollout_record(now: float, k: int) -> bytes:
    return json.dumps(
        {
            "name": "digits", "version": 4, "previous": 3, "state": "baking", "wave": 0 if k < 6 else 1,
            "waves": [5, 25, 100], "canary_pct": 5 if k < 6 else 25, "target": "all",
            "started": now - 720, "updated": now - 720 + 60 * k, "wave_started": now - 360, "bake_s": 600.0,
            "devices": {"canary": 1, "control": 2, "selected": ["pi-1"], "known": 4},
            "gates": {
                "latency_p99_ratio": {"value": round(1.02 + 0.03 * math.sin(k), 3), "threshold": 1.5,
                                      "op": "<=", "verdict": "pass", "samples": 400 + 60 * k},
                "agreement": {"value": round(0.97 - 0.004 * k, 3), "threshold": 0.9, "op": ">=",
                              "verdict": "pass", "samples": 40 * k},
                "drift_js": {"value": None, "threshold": 0.1, "op": "<=", "verdict": "wait", "samples": 12},
            },
            "reason": None,
        }
    ).encode()  # fmt: skip


class Dom(HTMLParser):
    """What the test reads from Chromium's DOM: table rows by device, charts with their
    axis labels, gate rows."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[tuple[str, str]]] = {}  # device -> [(td class, text)]
        self.charts: list[dict[str, Any]] = []
        self.gates: dict[str, list[str]] = {}
        self._row: str | None = None
        self._gate: str | None = None
        self._cell: tuple[str, list[str]] | None = None
        self._in_y_axis = False
        self._text_in_axis: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "tr" and "data-device" in a:
            self._row = a["data-device"]
            self.rows[self._row] = []
        elif tag == "tr" and "data-gate" in a:
            self._gate = a["data-gate"]
            self.gates[self._gate] = []
        elif tag == "td" and (self._row or self._gate):
            self._cell = (a.get("class", ""), [])
        elif tag == "svg" and "data-kind" in a:
            self.charts.append({**a, "y": [], "paths": []})
        elif tag == "g" and a.get("class") == "y-axis":
            self._in_y_axis = True
        elif tag == "text" and self._in_y_axis:
            self._text_in_axis = []
        elif tag == "path" and self.charts:
            self.charts[-1]["paths"].append(a.get("class", ""))
        elif tag == "rect" and a.get("class") == "shaded" and self.charts:
            self.charts[-1]["shaded"] = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            text = "".join(self._cell[1]).strip()
            if self._row:
                self.rows[self._row].append((self._cell[0], text))
            elif self._gate:
                self.gates[self._gate].append(text)
            self._cell = None
        elif tag == "tr":
            self._row = self._gate = None
        elif tag == "g":
            self._in_y_axis = False
        elif tag == "text" and self._text_in_axis is not None:
            self.charts[-1]["y"].append("".join(self._text_in_axis))
            self._text_in_axis = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[1].append(data)
        if self._text_in_axis is not None:
            self._text_in_axis.append(data)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def start_monitor(broker: Any, db: Path) -> tuple[Any, str, str]:
    proc = run_cli("monitor", "--broker", broker.url, "--db", str(db), "--http", "127.0.0.1:0",
                   "--prometheus", "127.0.0.1:0", "--quiet")  # fmt: skip
    assert proc.stderr is not None
    urls = {}
    for _ in range(2):
        line = proc.stderr.readline()
        found = re.search(r"serving (the page|Prometheus) on (http://[\d.]+:\d+)/", line)
        assert found, line + (proc.stderr.read() if proc.poll() is not None else "")
        urls[found.group(1)] = found.group(2)
    return proc, urls["the page"], urls["Prometheus"]


def test_the_page_in_a_real_browser(broker: Any, tmp_path: Path) -> None:
    now = time.time()
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 10 * 86400))
    site = {"site": "north", "ts": now - 3, "upstream": "hub.lan:8883", "link": "up", "bytes_down": 4_211_607,
            "bytes_up": 52_330, "sessions": 2, "failures": 1, "broker_restarts": 0}  # fmt: skip
    retained = [
        (
            f"{B}/devices/pi-1/state",
            state_payload(device_id="pi-1", version="4", models={"digits": {"version": 4}}),
        ),
        (  # runs v3 and refused v4: its error has cleared, the refusal stays
            f"{B}/devices/pi-2/state",
            state_payload(device_id="pi-2", refused={"digits": {"version": 4, "reason": "golden"}}),
        ),
        (f"{B}/devices/pi-3/state", state_payload(device_id="pi-3", online=False, ts=now - 1200)),
        (f"{B}/devices/pi-4/state", state_payload(device_id="pi-4", site="north")),
        (f"{B}/devices/pi-5/state", state_payload(device_id="pi-5", site="south")),
        (f"{B}/repo/metadata/timestamp.json", json.dumps({"signed": {"expires": expires}}).encode()),
        (f"{B}/sites/north/status", json.dumps(site).encode()),
        (f"{B}/sites/north/bridge", b"1"),
        (f"{B}/sites/south/bridge", b"0"),  # south's uplink is down (the bridge's will)
    ]
    publish_many(broker.port, retained, retain=True)
    proc, page_url, prom_url = start_monitor(broker, tmp_path / "monitor.db")
    proxy = RecordingProxy()
    try:
        history = fleet_history(now)
        publish_many(broker.port, history)
        for k in range(12):  # the controller's record as it moved, then as it is
            publish_many(broker.port, [(f"{B}/rollouts/digits", rollout_record(now, k))], retain=True)
        events = [
            {"ts": now - 590, "boot": "b1", "seq": 1, "event": "activated", "model": "digits", "version": 4},
        ]
        publish_many(broker.port, [(f"{B}/devices/pi-1/events", json.dumps(e).encode()) for e in events])

        def stored() -> float | None:
            return scraped_value(fetch(prom_url + "/metrics"), "litefleet_monitor_samples_stored_total")

        assert wait_until(lambda: stored() == len(history), 30), stored()
        assert wait_until(
            lambda: '"updated": %r' % (now - 720 + 660) in fetch(page_url + "/api/rollouts"), 10
        )

        dom_text = run_chromium(page_url + "/", "--dump-dom", proxy=proxy)
        south_text = run_chromium(page_url + "/?site=south", "--dump-dom", proxy=proxy)
        shot = tmp_path / "monitor-page.png"
        run_chromium(page_url + "/", f"--screenshot={shot}", "--window-size=1400,2600", "--hide-scrollbars",
                     proxy=proxy)  # fmt: skip
    finally:
        proxy.close()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    kept = keep_artifact(shot)
    print(f"screenshot: {kept}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    dom = Dom()
    dom.feed(dom_text)

    # devices at sites: a site column, and south's device says its site's uplink is down
    assert dom.rows["pi-4"][1] == ("", "north") and dom.rows["pi-2"][1] == ("", "-")
    assert dom.rows["pi-5"][1] == ("offline", "south · uplink down")
    south = Dom()
    south.feed(south_text)
    assert list(south.rows) == ["pi-5"] and "Devices of site south" in south_text
    assert 'href="?site=north"' in dom_text

    # the offline device: marked offline; its last figures in one grey cell with their age,
    # none in the columns of current figures
    off = dom.rows["pi-3"]
    assert ("offline", "offline") in off
    (was,) = [text for cls, text in off if cls == "was"]
    assert re.match(r"offline · last metrics 2\d min ago: p50 [\d.]+ (µs|ms), p99 ", was), was
    assert not [text for cls, text in off if cls == "num"]
    on = dom.rows["pi-2"]
    assert ("online", "online") in on and len([t for c, t in on if c == "num"]) == 7
    assert on[-1] == ("err", "refused digits v4 (golden)") and dom.rows["pi-4"][-1] == ("err", "")
    # its charts end in a grey "offline" span; the others' do not
    pi3 = [c for c in dom.charts if c.get("data-device") == "pi-3"]
    assert len(pi3) == 4 and all(c.get("shaded") for c in pi3)
    assert not any(c.get("shaded") for c in dom.charts if c.get("data-device") == "pi-2")

    # the rollout view: the gates of the current wave with their values, rules and verdicts
    assert dom.gates["latency_p99_ratio"][:4] == [
        "latency_p99_ratio",
        f"{1.02 + 0.03 * math.sin(11):.4g}",
        "<= 1.5",
        "pass",
    ]
    assert dom.gates["agreement"][1:4] == [f"{0.97 - 0.004 * 11:.4g}", ">= 0.9", "pass"]
    assert dom.gates["drift_js"][1:4] == ["-", "<= 0.1", "wait"]
    gate_charts = [c for c in dom.charts if c["data-kind"] == "gate"]
    assert sorted(c["data-gate"] for c in gate_charts) == ["agreement", "latency_p99_ratio"]
    assert "v4 (new): 1 device (1 online): pi-1" in dom_text.replace("<b>", "").replace("</b>", "")

    # one scale per kind of chart: the same axis labels on every device's chart
    for kind, rows in (("latency", 4), ("throughput", 4), ("cpu", 4), ("memory", 4)):
        charts = [c for c in dom.charts if c["data-kind"] == kind]
        assert len(charts) == rows, kind
        assert len({tuple(c["y"]) for c in charts}) == 1, (kind, [c["y"] for c in charts])
        assert len({c["data-scale"] for c in charts}) == 1
    latency = [c for c in dom.charts if c["data-kind"] == "latency"]
    labels = latency[0]["y"]
    assert (
        latency[0]["data-scale"].startswith("log ") and labels[0].endswith("µs") and labels[-1].endswith("ms")
    )
    assert all(c["paths"].count("p50") == 1 and c["paths"].count("p99") == 1 for c in latency)

    # nothing was asked of any other host (Chromium's own services aside)
    assert proxy.page_hosts() == [], proxy.requests


def test_the_recording_proxy_sees_what_a_page_fetches_off_host(tmp_path: Path) -> None:
    """The control for the check above: a page that fetches from elsewhere is caught."""
    page = tmp_path / "leaky.html"
    page.write_text(
        '<!DOCTYPE html><html><head><link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Roboto">'
        '</head><body><img src="http://198.51.100.7/logo.png"></body></html>'
    )
    proxy = RecordingProxy()
    try:
        run_chromium(page.as_uri(), "--dump-dom", proxy=proxy)
    finally:
        proxy.close()
    assert {"fonts.googleapis.com", "198.51.100.7"} <= set(proxy.page_hosts()), proxy.requests
