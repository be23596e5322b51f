"""The device messages the fleet monitor reads, as frozen records (pure).

Guarantees:

- Parsing never raises: a payload that is not what ``docs/protocol.md`` (6.1,
  6.2) and ``docs/agent-api.md`` (metrics) describe gives a
  :class:`Malformed` with a short reason, never a half-filled record. Fields a
  device does not report (a PC has no throttling word) are ``None``; unknown
  fields are ignored, as the protocol asks of consumers.
- The device id is the one in the topic (a secure broker lets a device write
  only its own topics); a metrics message naming another device is malformed.
- :func:`is_newer` and :func:`device_health` are the monitor's two decisions
  about time: which metrics message is the device's latest (replayed and
  duplicated messages are not), and whether a device counts as online.
- A will (a state without ``models``, not online) is marked ``will``;
  :func:`after_will` turns it into "offline, last known model" and never
  into a device that changed model.

No socket, file or clock is touched here; the collector passes the time in.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from agent.telemetry.metrics import THROTTLE_BITS
from converter.monitor.sketches import OutputSketch, ShadowCounts, parse_outputs, parse_shadow

# a metrics message is ~1-3 KB; anything far larger is not from an agent
MAX_PAYLOAD_BYTES = 256 * 1024
# the raw JSON of an event kept in the database
MAX_EVENT_JSON_CHARS = 8192
# a state's ``refused`` entries read (one per model name the device has)
MAX_REFUSALS = 64
# the flags of the agent's ``device.throttled``, in bit order
THROTTLE_FLAGS = tuple(THROTTLE_BITS[bit] for bit in sorted(THROTTLE_BITS))
# a device is "stale" when nothing arrived for this many metrics intervals
STALE_INTERVALS = 3.0
DEFAULT_INTERVAL_S = 10.0
# the event words of docs/protocol.md 6.2 (the agent spells them at the call sites)
EVENT_KINDS = ("downloading", "verified", "activated", "marked_good", "rejected", "rolled_back", "skipped")


@dataclass(frozen=True)
class Malformed:
    """A message the monitor cannot use; ``reason`` is short and safe to log."""

    kind: str
    device_id: str
    reason: str


@dataclass(frozen=True)
class ModelSample:
    """One model version's entry of a metrics message."""

    name: str
    version: str
    active: bool = True
    requests: int | None = None
    ok: int | None = None
    errors: int | None = None
    bad_requests: int | None = None
    interval_requests: int | None = None
    interval_errors: int | None = None
    throughput_rps: float | None = None
    # latency over the interval since the previous message
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    # since the version was loaded
    mean_ms_total: float | None = None
    # sparse (upper bound in ms, None for the open bucket; count) since loading
    histogram_ms: tuple[tuple[float | None, int], ...] = ()
    # since loading (converter.monitor.sketches); None when absent or unusable
    outputs: OutputSketch | None = None
    shadow: ShadowCounts | None = None
    # why a present ``outputs``/``shadow`` was unusable (it is then None)
    junk: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricsSample:
    """One metrics message (``docs/agent-api.md``)."""

    device_id: str
    seq: int
    ts: float
    interval_s: float | None = None
    agent_version: str | None = None
    models: tuple[ModelSample, ...] = ()
    boot: str | None = None
    cpu_percent_process: float | None = None
    cpu_percent_system: float | None = None
    rss_bytes: int | None = None
    load_avg: tuple[float, float, float] | None = None
    temperature_c: float | None = None
    throttled_raw: int | None = None
    throttled: tuple[tuple[str, bool], ...] = ()
    disk_free_bytes: int | None = None
    disk_total_bytes: int | None = None
    uptime_s: float | None = None
    queue_pending: int | None = None
    queue_dropped_total: int | None = None
    # a device of a site (docs/sites.md): its site, and since its agent started the
    # outages of the site's uplink it saw and the events it held and dropped
    uplink_site: str | None = None
    uplink_outages: int | None = None
    uplink_events_dropped: int | None = None
    # (channel, status class, count): ("rest", "2xx", 5000)
    api: tuple[tuple[str, str, int], ...] = ()


@dataclass(frozen=True)
class EventRecord:
    """One event (``docs/protocol.md`` 6.2). ``boot`` and ``seq`` identify it."""

    device_id: str
    boot: str
    seq: int | None
    ts: float
    event: str
    model: str | None = None
    version: str | None = None
    reason: str | None = None
    message: str | None = None
    raw_json: str = "{}"


@dataclass(frozen=True)
class InstalledModel:
    name: str
    version: str
    sha256: str | None = None
    trial: bool = False


@dataclass(frozen=True)
class Refusal:
    """The newest release of a model a device refused, newer than what it runs (6.1's
    ``refused``)."""

    name: str
    version: int
    reason: str

    def __str__(self) -> str:
        """How the monitor's page and ``litefleet status`` word it."""
        return f"refused {self.name} v{self.version} ({self.reason})"


def refused_json(refused: tuple[Refusal, ...]) -> dict[str, dict[str, Any]]:
    """A state's refusals as 6.1 writes them: name -> ``{"version", "reason"}``."""
    return {r.name: {"version": r.version, "reason": r.reason} for r in refused}


@dataclass(frozen=True)
class StateRecord:
    """A device's retained state (``docs/protocol.md`` 6.1)."""

    device_id: str
    online: bool
    status: str | None = None
    model: str | None = None
    version: str | None = None
    error: str | None = None
    agent_version: str | None = None
    boot: str | None = None
    ts: float | None = None
    inferences: int | None = None
    latency_ms_p50: float | None = None
    groups: tuple[str, ...] = ()
    site: str | None = None  # the site broker it uses (docs/sites.md); None: central's
    repo_version: int | None = None
    models: tuple[InstalledModel, ...] = ()
    refused: tuple[Refusal, ...] = ()
    raw_json: str = field(default="{}", compare=False)
    # the device's will (docs/protocol.md 6.1: offline, no ``models`` key): it says the
    # device is gone, not which model it ran; :func:`after_will` keeps what was known
    will: bool = False


@dataclass(frozen=True)
class StateCleared:
    """A zero-length retained state: the device was removed from the fleet."""

    device_id: str


Parsed = MetricsSample | EventRecord | StateRecord | StateCleared | Malformed


# -- field readers --------------------------------------------------------------------
def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _count(value: Any) -> int | None:
    """A non-negative integer (JSON may spell it 12.0)."""
    f = _num(value)
    if f is None or f < 0 or f != int(f):
        return None
    return int(f)


def _text(value: Any, limit: int = 512) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float | str):
        return str(value)[:limit]
    return None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _load(kind: str, device_id: str, payload: bytes) -> dict[str, Any] | Malformed:
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Malformed(kind, device_id, f"payload of {len(payload)} bytes is too large")
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return Malformed(kind, device_id, "not JSON")
    if not isinstance(doc, dict):
        return Malformed(kind, device_id, "not a JSON object")
    return doc


# -- metrics --------------------------------------------------------------------------
def _histogram(value: Any) -> tuple[tuple[float | None, int], ...]:
    out: list[tuple[float | None, int]] = []
    if not isinstance(value, list):
        return ()
    for item in value:
        if not isinstance(item, list | tuple) or len(item) != 2:
            return ()
        upper, n = item
        count = _count(n)
        bound = _num(upper)
        if count is None or (upper is not None and bound is None):
            return ()
        out.append((bound, count))
    return tuple(out)


def parse_model_entry(entry: Any) -> ModelSample | None:
    if not isinstance(entry, dict):
        return None
    name = _text(entry.get("name"), 64)
    version = _text(entry.get("version"), 32)
    if not name or version is None:
        return None
    interval = _dict(entry.get("interval"))
    latency = _dict(entry.get("latency_ms"))
    total = _dict(entry.get("latency_ms_total"))
    outputs, bad_outputs = parse_outputs(entry.get("outputs"))
    shadow, bad_shadow = parse_shadow(entry.get("shadow"))
    return ModelSample(
        name=name,
        version=version,
        active=entry.get("active") is not False,
        requests=_count(entry.get("requests")),
        ok=_count(entry.get("ok")),
        errors=_count(entry.get("errors")),
        bad_requests=_count(entry.get("bad_requests")),
        interval_requests=_count(interval.get("requests")),
        interval_errors=_count(interval.get("errors")),
        throughput_rps=_num(entry.get("throughput_rps")),
        p50_ms=_num(latency.get("p50")),
        p90_ms=_num(latency.get("p90")),
        p99_ms=_num(latency.get("p99")),
        mean_ms=_num(latency.get("mean")),
        mean_ms_total=_num(total.get("mean")),
        histogram_ms=_histogram(entry.get("histogram_ms")),
        outputs=outputs,
        shadow=shadow,
        junk=tuple(why for why in (bad_outputs, bad_shadow) if why is not None),
    )


def parse_metrics(device_id: str, payload: bytes) -> MetricsSample | Malformed:
    """A metrics message, or why it cannot be used (``seq`` and ``ts`` are required)."""
    doc = _load("metrics", device_id, payload)
    if isinstance(doc, Malformed):
        return doc
    named = doc.get("device_id")
    if named is not None and named != device_id:
        return Malformed("metrics", device_id, "device_id differs from the topic's")
    seq = _count(doc.get("seq"))
    ts = _num(doc.get("ts"))
    if seq is None or ts is None:
        return Malformed("metrics", device_id, "no valid seq and ts")
    models_raw = doc.get("models")
    models = (
        tuple(m for m in (parse_model_entry(e) for e in models_raw) if m is not None)
        if isinstance(models_raw, list)
        else ()
    )
    dev = _dict(doc.get("device"))
    load = dev.get("load_avg")
    load_avg = None
    if isinstance(load, list) and len(load) == 3 and all(_num(v) is not None for v in load):
        load_avg = (float(load[0]), float(load[1]), float(load[2]))
    thr = dev.get("throttled")
    throttled_raw: int | None = None
    flags: tuple[tuple[str, bool], ...] = ()
    if isinstance(thr, dict):
        raw = thr.get("raw")
        if isinstance(raw, str):
            try:
                throttled_raw = int(raw, 16)
            except ValueError:
                throttled_raw = None
        flags = tuple((k, bool(thr[k])) for k in THROTTLE_FLAGS if isinstance(thr.get(k), bool))
    api: list[tuple[str, str, int]] = []
    for channel, classes in sorted(_dict(doc.get("api")).items()):
        for cls, n in sorted(_dict(classes).items()):
            count = _count(n)
            if count is not None:
                api.append((str(channel)[:32], str(cls)[:8], count))
    queue = _dict(doc.get("queue"))
    uplink = _dict(doc.get("uplink"))
    rss = _count(dev.get("rss_bytes"))
    return MetricsSample(
        device_id=device_id,
        seq=seq,
        ts=ts,
        interval_s=_num(doc.get("interval_s")),
        agent_version=_text(doc.get("agent_version"), 64),
        models=models,
        boot=_text(doc.get("boot"), 64),
        cpu_percent_process=_num(dev.get("cpu_percent_process")),
        cpu_percent_system=_num(dev.get("cpu_percent_system")),
        rss_bytes=rss,
        load_avg=load_avg,
        temperature_c=_num(dev.get("temperature_c")),
        throttled_raw=throttled_raw,
        throttled=flags,
        disk_free_bytes=_count(dev.get("disk_free_bytes")),
        disk_total_bytes=_count(dev.get("disk_total_bytes")),
        uptime_s=_num(dev.get("uptime_s")),
        queue_pending=_count(queue.get("pending")),
        queue_dropped_total=_count(queue.get("dropped_total")),
        uplink_site=_text(uplink.get("site"), 32),
        uplink_outages=_count(uplink.get("outages")),
        uplink_events_dropped=_count(uplink.get("events_dropped")),
        api=tuple(api),
    )


# -- events and state -----------------------------------------------------------------
def parse_event(device_id: str, payload: bytes) -> EventRecord | Malformed:
    doc = _load("events", device_id, payload)
    if isinstance(doc, Malformed):
        return doc
    kind = _text(doc.get("event"), 32)
    ts = _num(doc.get("ts"))
    if not kind or ts is None:
        return Malformed("events", device_id, "no event name or ts")
    raw = json.dumps(doc, separators=(",", ":"), sort_keys=True)
    return EventRecord(
        device_id=device_id,
        boot=_text(doc.get("boot"), 64) or "",
        seq=_count(doc.get("seq")),
        ts=ts,
        event=kind,
        model=_text(doc.get("model"), 64),
        version=_text(doc.get("version"), 32),
        reason=_text(doc.get("reason"), 64),
        message=_text(doc.get("message"), 1024),
        raw_json=raw[:MAX_EVENT_JSON_CHARS],
    )


def parse_state(device_id: str, payload: bytes) -> StateRecord | StateCleared | Malformed:
    if not payload:
        return StateCleared(device_id)
    doc = _load("state", device_id, payload)
    if isinstance(doc, Malformed):
        return doc
    installed: list[InstalledModel] = []
    for name, info in sorted(_dict(doc.get("models")).items()):
        info = _dict(info)
        version = _text(info.get("version"), 32)
        if version is not None:
            installed.append(
                InstalledModel(
                    str(name)[:64], version, _text(info.get("sha256"), 64), info.get("trial") is True
                )
            )
    refused: list[Refusal] = []
    for name, info in sorted(_dict(doc.get("refused")).items())[:MAX_REFUSALS]:
        info = _dict(info)
        refused_version, reason = _count(info.get("version")), _text(info.get("reason"), 32)
        if refused_version is not None and reason is not None:
            refused.append(Refusal(str(name)[:64], refused_version, reason))
    groups = doc.get("groups")
    return StateRecord(
        device_id=device_id,
        online=doc.get("online") is True,
        status=_text(doc.get("status"), 32),
        model=_text(doc.get("model"), 64),
        version=_text(doc.get("version"), 32),
        error=_text(doc.get("error"), 1024),
        agent_version=_text(doc.get("agent_version"), 64),
        boot=_text(doc.get("boot"), 64),
        ts=_num(doc.get("ts")),
        inferences=_count(doc.get("inferences")),
        latency_ms_p50=_num(doc.get("latency_ms_p50")),
        groups=tuple(str(g)[:64] for g in groups if isinstance(g, str)) if isinstance(groups, list) else (),
        site=_text(doc.get("site"), 32) if isinstance(doc.get("site"), str) else None,
        repo_version=_count(doc.get("repo_version")),
        models=tuple(installed),
        refused=tuple(refused),
        raw_json=json.dumps(doc, separators=(",", ":"), sort_keys=True)[:MAX_EVENT_JSON_CHARS],
        will=doc.get("online") is not True and "models" not in doc,
    )


def parse_message(leaf: str, device_id: str, payload: bytes) -> Parsed:
    """Dispatch on the topic's last level (``state``, ``events``, ``metrics``)."""
    if leaf == "metrics":
        return parse_metrics(device_id, payload)
    if leaf == "events":
        return parse_event(device_id, payload)
    if leaf == "state":
        return parse_state(device_id, payload)
    return Malformed(leaf, device_id, "not a monitored topic")


# -- decisions --------------------------------------------------------------------------
def after_will(known: StateRecord | None, will: StateRecord) -> StateRecord:
    """The device's state once its will arrived: offline (the will's status, time and boot),
    with the model, versions, groups, site and figures ``known`` from its last full state, since
    the will does not say them (docs/protocol.md 6.1). ``known`` None, or a will itself:
    the will as it is. A state that is not a will replaces what was known."""
    if not will.will or known is None or known.device_id != will.device_id:
        return will
    return replace(
        known,
        online=False,
        status=will.status,
        boot=will.boot,
        ts=will.ts if will.ts is not None else known.ts,
        raw_json=will.raw_json,
        will=True,
    )


def shown_model(sample: MetricsSample | None, state_model: str | None) -> ModelSample | None:
    """The model whose figures stand for the device (``status``, the page, ``/api/devices``):
    the active one the state names (``state_model``), else the first active one; None
    without a sample or an active model."""
    active = [m for m in sample.models if m.active] if sample is not None else []
    return next((m for m in active if m.name == state_model), active[0] if active else None)


def is_newer(latest: tuple[int, float] | None, seq: int, ts: float) -> bool:
    """Whether a metrics message ``(seq, ts)`` supersedes the ``latest`` one seen.

    ``seq`` grows across agent restarts, so a higher one is newer; a duplicate
    or an older replayed message has a lower or equal ``seq`` and an older or
    equal ``ts``. A device whose queue file was lost starts again at seq 1 but
    with later timestamps: a later ``ts`` counts as newer too.
    """
    if latest is None:
        return True
    last_seq, last_ts = latest
    return seq > last_seq or ts > last_ts


def device_health(online: bool | None, last_seen: float | None, interval_s: float | None, now: float) -> str:
    """``online``, ``stale`` (says online but silent for ``STALE_INTERVALS``
    metrics intervals, at least 30 s: it may have lost power before the broker
    noticed), ``offline`` or ``unknown`` (no state seen)."""
    if online is None:
        return "unknown"
    if not online:
        return "offline"
    if last_seen is None:
        return "online"
    limit = max(30.0, STALE_INTERVALS * (interval_s or DEFAULT_INTERVAL_S))
    return "stale" if now - last_seen > limit else "online"
