"""Read the fleet from the broker for ``litefleet status``.

:func:`collect_states` subscribes to every device's retained ``state`` topic,
waits for the sync barrier (all retained messages delivered), and returns one
row per device. :func:`collect_metrics` optionally waits a little for each
online device's next metrics message (metrics are not retained), and the pure
:func:`merge_metrics` puts its fresh figures into the row.

Guarantees:

* a state message is read by the monitor's parser
  (:func:`converter.monitor.payloads.parse_state`): ``status`` and the monitor
  accept, refuse and clip the same messages; a malformed one leaves the device's
  previous row (or none), an empty one (a removed device) removes it;
* rows are plain JSON values; ``litefleet status`` (:mod:`converter.cli.status`)
  prints them as a table or as JSON;
* :func:`collect_sites` reads each site broker's retained link word and status (for
  ``status``'s warning about sites cut off: their devices' rows are their last states);
* :func:`collect_expiry` reads the signed expiry of the newest retained metadata of
  each role (for ``status``'s warning; nothing is trusted from it), and
  :func:`clear_state` deletes a removed device's retained state.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import Any

from agent.errors import TransportError
from agent.mqtt.client import RETAINED_READ_QOS, MqttClient
from agent.mqtt.transport import Message
from agent.protocol import Topics
from converter.monitor.payloads import (
    Malformed,
    MetricsSample,
    StateCleared,
    StateRecord,
    is_newer,
    parse_metrics,
    parse_state,
    refused_json,
    shown_model,
)
from converter.monitor.repo_expiry import metadata_role, signed_expiry
from converter.monitor.sites import SiteView, apply_site_message

logger = logging.getLogger(__name__)

STATUS_FIELDS = ("device_id", "online", "model", "version", "status", "error", "latency_ms_p50", "inferences")
# the table of `litefleet status`: the contract's fields plus the groups (push targets them)
TABLE_COLUMNS = (*STATUS_FIELDS[:2], "groups", *STATUS_FIELDS[2:])
# the table with --metrics: the same rows plus what the newest metrics message says
METRICS_COLUMNS = (
    "device_id",
    "online",
    "groups",
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


def state_row(state: StateRecord) -> dict[str, Any]:
    """A device's row: the contract's fields (:data:`STATUS_FIELDS`) first, then the rest of
    its state, all as :func:`converter.monitor.payloads.parse_state` validated them."""
    return {
        "device_id": state.device_id,
        "online": state.online,
        "model": state.model,
        "version": state.version,
        "status": state.status,
        "error": state.error,
        "latency_ms_p50": state.latency_ms_p50,
        "inferences": state.inferences,
        "models": {
            m.name: {"version": m.version, "sha256": m.sha256, "trial": m.trial} for m in state.models
        },
        # why it is not on a newer version it was offered (docs/protocol.md 6.1)
        "refused": refused_json(state.refused),
        "groups": list(state.groups),
        "site": state.site,
        "repo_version": state.repo_version,
        "agent_version": state.agent_version,
        "boot": state.boot,
        "ts": state.ts,
        # offline by its will (docs/protocol.md 6.1): it does not say the model, and a
        # one-shot read has nothing older to take it from
        "last_will": state.will,
    }


def collect_states(client: MqttClient, topics: Topics, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def handle(msg: Message) -> None:  # paho thread
        dev = topics.device_of(msg.topic)
        if dev is None:
            return
        state = parse_state(dev[0], msg.payload)
        with lock:
            if isinstance(state, StateRecord):
                rows[dev[0]] = state_row(state)
            elif isinstance(state, StateCleared):
                rows.pop(dev[0], None)
            else:
                logger.debug("state of %.64s: %s", dev[0], state.reason)

    client.subscribe(topics.devices_filter("state"), handle, qos=RETAINED_READ_QOS)
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


def clear_state(client: MqttClient, topics: Topics, device_id: str, timeout_s: float = 5.0) -> bool:
    """Delete ``device_id``'s retained state (an empty retained message, the MQTT rule), so
    ``status`` and the monitor stop listing it. False when the broker held none."""
    topic = topics.state(device_id)
    held = threading.Event()

    def handle(msg: Message) -> None:  # paho thread
        if msg.topic == topic and msg.payload:
            held.set()

    client.subscribe(topic, handle, qos=1)
    client.sync()
    if not client.wait_synced(timeout_s):
        raise TransportError("the broker did not answer the state subscription")
    client.unsubscribe(topic)
    if not held.is_set():
        return False
    if not client.publish(topic, b"", qos=1, retain=True).wait(timeout_s):
        raise TransportError(f"the broker did not acknowledge clearing {topic}")
    return True


def collect_sites(client: MqttClient, topics: Topics, timeout_s: float = 5.0) -> dict[str, SiteView]:
    """name -> what the broker's retained ``sites/<name>/bridge`` and ``.../status`` say
    (docs/sites.md); malformed ones are left out."""
    views: dict[str, SiteView] = {}
    lock = threading.Lock()
    head = f"{topics.base}/sites/"

    def handle(msg: Message) -> None:  # paho thread
        name, _, leaf = msg.topic.removeprefix(head).partition("/")
        if not msg.topic.startswith(head) or not name or leaf not in ("bridge", "status"):
            return
        with lock:
            got = apply_site_message(views.get(name), name, leaf, msg.payload)
            if got is None:
                views.pop(name, None)
            elif not isinstance(got, Malformed):
                views[name] = got

    client.subscribe(topics.sites_filter, handle, qos=RETAINED_READ_QOS)
    client.sync()
    if not client.wait_synced(timeout_s):
        raise TransportError("the broker did not answer the sites subscription")
    client.unsubscribe(topics.sites_filter)
    with lock:
        return dict(views)


def collect_expiry(client: MqttClient, topics: Topics, timeout_s: float = 5.0) -> dict[str, datetime]:
    """role -> the signed expiry of the newest metadata of that role the broker holds
    (read, not verified: it only decides whether ``status`` warns)."""
    newest: dict[str, tuple[int, bytes]] = {}
    lock = threading.Lock()

    def handle(msg: Message) -> None:  # paho thread
        name = topics.metadata_filename(msg.topic)
        if name is None or not msg.payload:
            return
        role, number = metadata_role(name)
        if role is None:
            return
        with lock:
            if number >= newest.get(role, (-1, b""))[0]:
                newest[role] = (number, msg.payload)

    client.subscribe(topics.metadata_filter, handle, qos=1)
    client.sync()
    if not client.wait_synced(timeout_s):
        raise TransportError("the broker did not answer the metadata subscription")
    client.unsubscribe(topics.metadata_filter)
    out: dict[str, datetime] = {}
    with lock:
        for role, (_, payload) in newest.items():
            expires = signed_expiry(payload)
            if expires is not None:
                out[role] = expires
    return out
