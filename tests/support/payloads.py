"""Device payloads as the agent builds them, for monitor, status and rollout tests."""

from __future__ import annotations

import json
from typing import Any

from agent.serving.stats import ModelStats
from agent.telemetry.metrics import build_metrics_payload, model_report

THROTTLED = {
    "raw": "0x50005",
    "under_voltage": True,
    "freq_capped": False,
    "throttled": True,
    "soft_temp_limit": False,
    "under_voltage_occurred": True,
    "freq_capped_occurred": False,
    "throttled_occurred": True,
    "soft_temp_limit_occurred": False,
}


def agent_payload(
    device_id: str = "pi-1",
    seq: int = 7,
    ts: float = 1_800_000_000.5,
    latencies_ns: tuple[int, ...] = (400_000, 500_000, 2_000_000),
    uplink: dict[str, Any] | None = None,
    **device: object,
) -> bytes:
    """A metrics message exactly as the agent builds one."""
    stats = ModelStats("digits", "3")
    for ns in latencies_ns:
        stats.record_ok(ns)
    stats.record_error()
    stats.record_bad_request()
    report = model_report(stats.snapshot(), None, 10.0, active=True)
    dev = {
        "cpu_percent_process": 3.1,
        "cpu_percent_system": 12.4,
        "rss_bytes": 48234496,
        "load_avg": [0.21, 0.18, 0.1],
        "temperature_c": 51.0,
        "thermal_zones": {"cpu-thermal": 51.0},
        "throttled": THROTTLED,
        "disk_free_bytes": 2147483648,
        "disk_total_bytes": 31914983424,
        "uptime_s": 86400.0,
    }
    dev.update(device)
    return build_metrics_payload(
        device_id=device_id,
        seq=seq,
        ts=ts,
        interval_s=10.0,
        models=[report],
        device=dev,
        api={"rest": {"2xx": 3, "4xx": 1}},
        queue={"pending": 2, "dropped_total": 5},
        agent_version="0.1.0",
        uplink=uplink,
    )


def state_payload(**fields: object) -> bytes:
    doc = {
        "device_id": "pi-1",
        "online": True,
        "status": "serving",
        "model": "digits",
        "version": "3",
        "error": None,
        "models": {"digits": {"version": 3, "sha256": "ab" * 32, "trial": False}},
        "groups": ["kitchen"],
        "repo_version": 12,
        "inferences": 3,
        "latency_ms_p50": 0.41,
        "agent_version": "0.1.0",
        "boot": "b1",
        "ts": 1_800_000_000.0,
    }
    doc.update(fields)
    return json.dumps(doc).encode()
