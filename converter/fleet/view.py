"""Read the fleet from the broker for ``litefleet status``.

:func:`collect_states` subscribes to every device's retained ``state`` topic,
waits for the sync barrier (all retained messages delivered), and returns one
row per device. :func:`collect_metrics` optionally waits a little for each
online device's next metrics message (metrics are not retained), and the pure
:func:`merge_metrics` puts its fresh figures into the row. Pure helpers turn
rows into a table.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from agent.errors import TransportError
from agent.mqtt.client import MqttClient
from agent.mqtt.transport import Message
from agent.protocol import Topics
from converter.monitor.payloads import Malformed, MetricsSample, is_newer, parse_metrics, shown_model

logger = logging.getLogger(__name__)

STATUS_FIELDS = ("device_id", "online", "model", "version", "status", "error", "latency_ms_p50", "inferences")
# the table with --metrics: the same rows plus what the newest metrics message says
METRICS_COLUMNS = (
    "device_id",
    "online",
    "model",
    "version",
    "status",
    "latency_ms_p50",
    "latency_ms_p99",
    "throughput_rps",
    "inferences",
    "cpu_percent",
    "temperature_c",
    "rss_mb",
    "error",
)


def parse_state(device_id: str, payload: bytes) -> dict[str, Any] | None:
    """A device's state message as a row; None for an empty or malformed one."""
    if not payload:
        return None
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    row = {k: doc.get(k) for k in STATUS_FIELDS}
    row["device_id"] = device_id
    row["online"] = bool(doc.get("online"))
    for k, v in doc.items():
        row.setdefault(k, v)
    return row


def collect_states(client: MqttClient, topics: Topics, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def handle(msg: Message) -> None:  # paho thread
        dev = topics.device_of(msg.topic)
        if dev is None:
            return
        row = parse_state(dev[0], msg.payload)
        with lock:
            if row is None:
                rows.pop(dev[0], None)
            else:
                rows[dev[0]] = row

    client.subscribe(topics.devices_filter("state"), handle, qos=1)
    client.sync()
    if not client.wait_synced(timeout_s):
        raise TransportError("the broker did not answer the state subscription")
    with lock:
        return [rows[k] for k in sorted(rows)]


def collect_metrics(
    client: MqttClient, topics: Topics, device_ids: list[str], timeout_s: float
) -> dict[str, MetricsSample]:
    """The newest metrics message of each of ``device_ids`` that sends one within
    ``timeout_s`` (devices report every ``metrics_interval_s``, 10 s by default)."""
    wanted = set(device_ids)
    if not wanted:
        return {}
    pending: list[tuple[str, bytes]] = []
    cond = threading.Condition()

    def handle(msg: Message) -> None:  # paho thread: only hand the payload over
        dev = topics.device_of(msg.topic)
        if dev is not None and dev[0] in wanted:
            with cond:
                pending.append((dev[0], msg.payload))
                cond.notify_all()

    got: dict[str, MetricsSample] = {}
    topic_filter = topics.devices_filter("metrics")
    client.subscribe(topic_filter, handle, qos=1)
    deadline = time.monotonic() + timeout_s
    try:
        while not wanted <= set(got):
            with cond:
                left = deadline - time.monotonic()
                if not pending and left > 0:
                    cond.wait(left)
                batch, pending[:] = list(pending), []
            for device_id, payload in batch:
                sample = parse_metrics(device_id, payload)
                old = got.get(device_id)
                if not isinstance(sample, Malformed) and is_newer(
                    (old.seq, old.ts) if old else None, sample.seq, sample.ts
                ):
                    got[device_id] = sample
            if time.monotonic() >= deadline:
                break
    finally:
        client.unsubscribe(topic_filter)
    return got


def merge_metrics(row: dict[str, Any], sample: MetricsSample | None) -> dict[str, Any]:
    """``row`` with the figures of a metrics message (pure): latency of its last
    interval (the retained state's p50 is since loading), throughput, inferences
    since loading, CPU, temperature and memory."""
    out = dict(row)
    for key in ("latency_ms_p99", "throughput_rps", "cpu_percent", "temperature_c", "rss_mb", "metrics_ts"):
        out.setdefault(key, None)
    if sample is None:
        return out
    model = row.get("model")
    shown = shown_model(sample, model if isinstance(model, str) else None)
    if shown is not None:
        if shown.p50_ms is not None:
            out["latency_ms_p50"] = shown.p50_ms
        out["latency_ms_p99"] = shown.p99_ms
        out["throughput_rps"] = shown.throughput_rps
        out["inferences"] = sum(m.ok or 0 for m in sample.models if m.active)
    out["cpu_percent"] = sample.cpu_percent_system
    out["temperature_c"] = sample.temperature_c
    out["rss_mb"] = round(sample.rss_bytes / 2**20, 1) if sample.rss_bytes is not None else None
    out["metrics_ts"] = sample.ts
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def format_table(
    rows: list[dict[str, Any]], columns: tuple[str, ...] = STATUS_FIELDS, max_width: int = 48
) -> str:
    if not rows:
        return "no devices have reported yet\n"
    cells = [[_cell(r.get(c))[:max_width] for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"
