"""Read the fleet's retained state from the broker (for ``status`` and ``monitor``).

:func:`collect_states` subscribes to every device's retained ``state`` topic,
waits for the sync barrier (all retained messages delivered), and returns one
row per device. Pure helpers turn rows into a table.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from agent.errors import TransportError
from agent.mqtt_client import MqttClient
from agent.protocol import Topics
from agent.transport import Message

logger = logging.getLogger(__name__)

STATUS_FIELDS = ("device_id", "online", "model", "version", "status", "error",
                 "latency_ms_p50", "inferences")


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


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def format_table(rows: list[dict[str, Any]], columns: tuple[str, ...] = STATUS_FIELDS,
                 max_width: int = 48) -> str:
    if not rows:
        return "no devices have reported yet\n"
    cells = [[_cell(r.get(c))[:max_width] for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"
