"""Metrics: /proc and /sys parsing (pure), the device probe on a fake root, the
per-version reports, and the payload."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.serving.inference import ModelRunner
from agent.serving.registry import ActiveModel, ModelRegistry
from agent.serving.stats import ApiCounters
from agent.telemetry.metrics import (
    DeviceProbe,
    MetricsRecorder,
    MetricsReporter,
    build_metrics_payload,
    cpu_percent,
    parse_proc_stat,
    parse_statm_rss,
    parse_throttled,
    read_rss_bytes,
)
from agent.telemetry.metrics_queue import MetricsQueue


# -- pure parsers -------------------------------------------------------------------------
def test_proc_stat_and_cpu_percent() -> None:
    before = parse_proc_stat("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n")
    after = parse_proc_stat("cpu  200 0 200 800 100 0 0 0 0 0\n")
    assert before == (200, 1000) and after == (400, 1300)
    assert cpu_percent(before, after) == pytest.approx(66.7)
    assert cpu_percent(after, after) is None
    assert cpu_percent(None, after) is None
    assert parse_proc_stat("intr 1 2 3") is None
    assert parse_proc_stat("cpu  x y z") is None


def test_statm_rss() -> None:
    assert parse_statm_rss("765 422 394 5 0 123 0", 4096) == 422 * 4096
    assert parse_statm_rss("", 4096) is None
    rss = read_rss_bytes()
    assert rss is not None and rss > 10 * 1024 * 1024  # this test process, with numpy loaded
    assert read_rss_bytes(os.getpid()) == pytest.approx(rss, rel=0.2)
    assert read_rss_bytes(2**22 + 12345) is None


def test_throttled_flags() -> None:
    flags = parse_throttled("0x50005\n")
    assert flags is not None and flags["raw"] == "0x50005"
    assert flags["under_voltage"] and flags["throttled"] and not flags["freq_capped"]
    assert flags["under_voltage_occurred"] and flags["throttled_occurred"]
    assert not flags["soft_temp_limit_occurred"]
    assert parse_throttled("0")["under_voltage"] is False  # type: ignore[index]
    assert parse_throttled("nonsense") is None


# -- the probe on a fake filesystem --------------------------------------------------------
def fake_root(tmp_path: Path, *, pi: bool) -> Path:
    root = tmp_path / "root"
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/stat").write_text("cpu  100 0 100 700 100 0 0 0 0 0\n")
    (root / "proc/self/statm").write_text("1000 250 10 1 0 100 0\n")
    if pi:
        for i, (kind, milli) in enumerate((("cpu-thermal", "48312"), ("gpu-thermal", "51000"))):
            zone = root / f"sys/class/thermal/thermal_zone{i}"
            zone.mkdir(parents=True)
            (zone / "temp").write_text(milli + "\n")
            (zone / "type").write_text(kind + "\n")
        (root / "sys/class/thermal/cooling_device0").mkdir()
        fw = root / "sys/devices/platform/soc/soc:firmware"
        fw.mkdir(parents=True)
        (fw / "get_throttled").write_text("50000\n")
    return root


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_probe_reads_a_raspberry_pi(tmp_path: Path) -> None:
    root = fake_root(tmp_path, pi=True)
    clock, cpu = Clock(), Clock()
    cpu.t = 5.0
    probe = DeviceProbe(
        tmp_path, root=root, clock=clock, process_cpu_s=cpu, loadavg=lambda: (0.5, 0.25, 0.125)
    )
    clock.t += 10
    cpu.t += 2.5
    (root / "proc/stat").write_text("cpu  200 0 200 800 100 0 0 0 0 0\n")
    s = probe.sample()
    assert s["cpu_percent_process"] == 25.0
    assert s["cpu_percent_system"] == pytest.approx(66.7)
    assert s["rss_bytes"] == 250 * os.sysconf("SC_PAGE_SIZE")
    assert s["load_avg"] == [0.5, 0.25, 0.12]
    assert s["temperature_c"] == 51.0
    assert s["thermal_zones"] == {"cpu-thermal": 48.3, "gpu-thermal": 51.0}
    assert s["throttled"]["throttled_occurred"] and not s["throttled"]["throttled"]
    assert s["disk_free_bytes"] > 0 and s["disk_total_bytes"] >= s["disk_free_bytes"]
    assert s["uptime_s"] == 10.0
    json.dumps(s, allow_nan=False)


def test_probe_on_a_machine_without_sensors(tmp_path: Path) -> None:
    probe = DeviceProbe(tmp_path / "missing", root=fake_root(tmp_path, pi=False), loadavg=None)
    s = probe.sample()
    for key in ("temperature_c", "thermal_zones", "throttled", "load_avg", "disk_free_bytes"):
        assert s[key] is None, key
    empty = DeviceProbe(tmp_path, root=tmp_path / "nothing")
    assert empty.sample()["cpu_percent_system"] is None


# -- per model version -----------------------------------------------------------------------
class TinyInterpreter:
    def get_input_details(self) -> list[dict[str, Any]]:
        return [
            {
                "name": "in",
                "index": 0,
                "shape": np.array([1, 2]),
                "dtype": np.float32,
                "quantization": (0.0, 0),
            }
        ]

    def get_output_details(self) -> list[dict[str, Any]]:
        return [
            {
                "name": "out",
                "index": 1,
                "shape": np.array([1, 2]),
                "dtype": np.float32,
                "quantization": (0.0, 0),
            }
        ]

    def set_tensor(self, index: int, value: Any) -> None:
        if np.shape(value) != (1, 2):
            raise ValueError("shape")

    def invoke(self) -> None:
        pass

    def get_tensor(self, index: int) -> np.ndarray:
        return np.zeros((1, 2), np.float32)


def runner(version: str) -> ModelRunner:
    return ModelRunner(TinyInterpreter(), name="m", version=version)


def test_recorder_reports_intervals_and_a_replaced_version_once() -> None:
    registry, clock = ModelRegistry(), Clock()
    v1 = runner("1")
    registry.activate(ActiveModel("m", "1", "a", v1))
    recorder = MetricsRecorder(registry, clock=clock)
    x = np.zeros((1, 2), np.float32)
    for _ in range(20):
        v1.predict(x)
    with pytest.raises(Exception):  # noqa: B017 - a bad request, counted
        v1.predict(np.zeros((1, 3)))
    clock.t += 10
    (entry,), interval = recorder.reports()
    assert interval == 10
    assert (entry["version"], entry["active"], entry["ok"], entry["bad_requests"]) == ("1", True, 20, 1)
    assert entry["interval"] == {"requests": 21, "ok": 20, "errors": 0, "bad_requests": 1}
    assert entry["throughput_rps"] == 2.0
    assert entry["latency_ms"]["p50"] is not None and entry["histogram_ms"]
    assert sum(n for _, n in entry["histogram_ms"]) == 20
    # v2 replaces v1 between two reports: v1's last requests are still reported, once
    for _ in range(5):
        v1.predict(x)
    v2 = runner("2")
    registry.activate(ActiveModel("m", "2", "b", v2))
    v2.predict(x)
    clock.t += 5
    entries, _ = recorder.reports()
    by_version = {e["version"]: e for e in entries}
    assert by_version["1"]["active"] is False and by_version["1"]["interval"]["ok"] == 5
    assert by_version["2"]["active"] is True and by_version["2"]["interval"]["ok"] == 1
    clock.t += 5
    entries, _ = recorder.reports()
    assert [(e["version"], e["interval"]["ok"], e["latency_ms"]["p50"]) for e in entries] == [("2", 0, None)]
    registry.deactivate("m")
    entries, _ = recorder.reports()
    assert [(e["version"], e["active"]) for e in entries] == [("2", False)]
    assert recorder.reports()[0] == []


def test_payload_is_strict_json_with_seq_and_ts() -> None:
    payload = build_metrics_payload(
        device_id="pi-1",
        seq=7,
        ts=1_700_000_000.123456,
        interval_s=10.0,
        models=[],
        device={"rss_bytes": 1},
        api={"rest": {"2xx": 3}},
        queue={"pending": 0, "dropped_total": 2},
        agent_version="0.1.0",
    )
    doc = json.loads(payload)
    assert doc["v"] == 1 and doc["seq"] == 7 and doc["ts"] == 1_700_000_000.123
    assert doc["queue"]["dropped_total"] == 2 and doc["api"]["rest"]["2xx"] == 3
    with pytest.raises(ValueError):
        build_metrics_payload(
            device_id="x",
            seq=1,
            ts=1.0,
            interval_s=1.0,
            models=[],
            device={"t": float("nan")},
            api={},
            queue={},
        )


def test_reporter_queues_one_message_per_call(tmp_path: Path) -> None:
    registry = ModelRegistry()
    registry.activate(ActiveModel("m", "1", "a", runner("1")))
    counters = ApiCounters()
    counters.record("rest", 200)
    queue = MetricsQueue(tmp_path / "q.sqlite3", max_rows=10)
    woken: list[bool] = []
    reporter = MetricsReporter(
        device_id="pi-1",
        topic="litefleet/v1/devices/pi-1/metrics",
        recorder=MetricsRecorder(registry, counters=counters),
        probe=DeviceProbe(tmp_path, root=fake_root(tmp_path, pi=True)),
        queue=queue,
        wall_clock=lambda: 1234.5,
        agent_version="0.1.0",
        on_queued=lambda: woken.append(True),
    )
    assert reporter.report_once() == 1
    assert reporter.report_once() == 2
    (first, second) = queue.peek(10)
    doc = json.loads(second.payload)
    assert first.topic == "litefleet/v1/devices/pi-1/metrics" and first.ts == 1234.5
    assert doc["seq"] == 2 and doc["ts"] == 1234.5 and doc["queue"] == {"pending": 1, "dropped_total": 0}
    assert doc["models"][0]["name"] == "m" and doc["device"]["temperature_c"] == 51.0
    assert doc["api"] == {"rest": {"2xx": 1}} and woken == [True, True]
    queue.close()
    assert reporter.report_once() is None  # a broken queue is logged, not raised


def test_a_version_entry_carries_its_output_sketch_and_its_shadow() -> None:
    """outputs: cumulative since loading, like histogram_ms; shadow: the report of whatever
    the activation code attached (docs/agent-api.md, metrics)."""
    registry, clock = ModelRegistry(), Clock()
    v1 = runner("1")
    registry.activate(ActiveModel("m", "1", "a", v1))
    recorder = MetricsRecorder(registry, clock=clock)
    for _ in range(3):
        v1.predict(np.zeros((1, 2), np.float32))
    clock.t += 1
    (entry,), _ = recorder.reports()
    # [0, 0] is no probability vector: softmax top-1 0.5, the bucket [0.5, 0.55)
    assert entry["outputs"] == {"kind": "classes", "n": 3, "classes": [[0, 3]], "confidence": [[0.55, 3]]}
    assert "shadow" not in entry
    v1.stats.shadow = lambda: {"off": "no_previous"}
    v1.predict(np.zeros((1, 2), np.float32))
    (entry,), _ = recorder.reports()
    assert entry["outputs"]["n"] == 4 and entry["shadow"] == {"off": "no_previous"}
    payload = build_metrics_payload(
        device_id="pi-1",
        seq=1,
        ts=1.0,
        interval_s=1.0,
        models=[entry],
        device={},
        api={},
        queue={},
        boot="b00t",
    )
    assert json.loads(payload)["boot"] == "b00t"
