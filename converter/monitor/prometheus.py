"""Prometheus text exposition (format 0.0.4) of a fleet snapshot (pure).

Guarantees:

- Output follows the text format 0.0.4: every family has one ``# HELP`` and
  one ``# TYPE`` line followed by all its samples, contiguous; label values
  escape backslash, double quote and line feed; HELP text escapes backslash
  and line feed; values are Go-parsable floats (``NaN``, ``+Inf``, ``-Inf``).
- No label set appears twice within a family (a device sending the same model
  version twice in one message cannot make the scrape invalid).
- Every family is listed even when it has no samples yet, so the endpoint
  documents itself; ``docs/monitor.md`` has the same list.
- No explicit timestamps: Prometheus stamps a scrape itself; a metrics message
  replayed after an outage never becomes the "current" value
  (:class:`converter.monitor.live.FleetLive` keeps only the newest).

Latency histograms are re-bucketed from the agent's fixed log buckets (8 per
power of two) onto one bucket per power of two of nanoseconds (1.024 µs to
137 s): an agent bucket lies wholly below its power-of-two bound, so the
cumulative counts are exact at every ``le`` and the same ``le`` set serves
every device, which ``histogram_quantile(sum by (le) (...))`` needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from converter.monitor.live import DeviceView, FleetSnapshot
from converter.monitor.payloads import MetricsSample, ModelSample

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# le bounds of the re-bucketed histogram: 2**10 .. 2**37 ns
HIST_MIN_EXP, HIST_MAX_EXP = 10, 37
LE_SECONDS = tuple((1 << n) / 1e9 for n in range(HIST_MIN_EXP, HIST_MAX_EXP + 1))

Labels = tuple[tuple[str, str], ...]


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float | int | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def format_sample(name: str, labels: Labels, value: float | int | bool) -> str:
    if labels:
        inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels)
        return f"{name}{{{inner}}} {format_value(value)}"
    return f"{name} {format_value(value)}"


@dataclass
class Family:
    """One metric family: HELP, TYPE and its samples (``suffix`` for histograms)."""

    name: str
    type: str
    help: str
    samples: list[tuple[str, Labels, float | int | bool]] = field(default_factory=list)
    _seen: set[tuple[str, Labels]] = field(default_factory=set, repr=False)

    def add(self, labels: Labels, value: float | int | bool | None, suffix: str = "") -> None:
        """Add a sample; ``None`` (not reported) and repeated label sets are skipped."""
        if value is None or (suffix, labels) in self._seen:
            return
        self._seen.add((suffix, labels))
        self.samples.append((suffix, labels, value))

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.type}"]
        lines += [format_sample(self.name + suffix, labels, value) for suffix, labels, value in self.samples]
        return lines


def render_families(families: Iterable[Family]) -> str:
    out: list[str] = []
    for fam in families:
        out += fam.render()
    return "\n".join(out) + "\n"


# -- the families ---------------------------------------------------------------------
# (name, type, help); order is the order of the scrape
FAMILIES: tuple[tuple[str, str, str], ...] = (
    (
        "litefleet_devices",
        "gauge",
        "Devices known to this collector by health (online, stale, offline, unknown).",
    ),
    ("litefleet_device_online", "gauge", "1 if the device's retained state says online, else 0."),
    (
        "litefleet_device_stale",
        "gauge",
        "1 if the device says online but sent nothing for 3 metrics intervals (at least 30 s).",
    ),
    ("litefleet_device_info", "gauge", "Always 1; the device's status and agent version as labels."),
    (
        "litefleet_device_last_seen_timestamp_seconds",
        "gauge",
        "When the collector last received a message from the device (unix time).",
    ),
    (
        "litefleet_device_metrics_timestamp_seconds",
        "gauge",
        "The device's own timestamp of its newest metrics message (unix time).",
    ),
    (
        "litefleet_device_cpu_percent",
        "gauge",
        "CPU over the last interval: scope=process in % of one core, scope=system in % of all cores.",
    ),
    ("litefleet_device_resident_memory_bytes", "gauge", "Resident memory of the agent process."),
    ("litefleet_device_load_average", "gauge", "System load average over window 1m, 5m, 15m."),
    ("litefleet_device_temperature_celsius", "gauge", "Hottest thermal zone of the device."),
    (
        "litefleet_device_throttled",
        "gauge",
        "Raspberry Pi firmware throttling flags (1 set, 0 clear); *_occurred flags are since boot.",
    ),
    (
        "litefleet_device_disk_free_bytes",
        "gauge",
        "Free bytes on the file system of the agent's state folder.",
    ),
    ("litefleet_device_disk_total_bytes", "gauge", "Size of the file system of the agent's state folder."),
    ("litefleet_device_uptime_seconds", "gauge", "Seconds since the device booted."),
    (
        "litefleet_device_metrics_queue_pending",
        "gauge",
        "Metrics messages waiting in the device's offline queue when its newest message was built.",
    ),
    (
        "litefleet_device_metrics_queue_dropped_total",
        "counter",
        "Metrics messages the device dropped because its offline queue was full.",
    ),
    (
        "litefleet_device_api_responses_total",
        "counter",
        "Inference API answers of the agent by channel (rest, mqtt) and status class.",
    ),
    (
        "litefleet_model_info",
        "gauge",
        "Always 1 per installed model version (from the retained state); sha256 and trial as labels.",
    ),
    ("litefleet_model_active", "gauge", "1 if the model version serves, 0 if it was just replaced."),
    (
        "litefleet_model_requests_total",
        "counter",
        "Requests to the model version since it was loaded (inferences + errors + bad requests).",
    ),
    (
        "litefleet_model_inferences_total",
        "counter",
        "Successful inferences of the model version since loaded.",
    ),
    ("litefleet_model_errors_total", "counter", "Runtime failures of the model version since loaded."),
    (
        "litefleet_model_bad_requests_total",
        "counter",
        "Requests refused before reaching the runtime (wrong shape, dtype, ...) since loaded.",
    ),
    (
        "litefleet_model_throughput_per_second",
        "gauge",
        "Successful inferences per second over the last interval.",
    ),
    (
        "litefleet_model_latency_seconds",
        "gauge",
        "Inference latency quantile (0.5, 0.9, 0.99) over the last interval; absent without requests.",
    ),
    (
        "litefleet_model_inference_duration_seconds",
        "histogram",
        "Inference latency since the version was loaded, one bucket per power of two of nanoseconds.",
    ),
    ("litefleet_monitor_messages_total", "counter", "Messages this collector received by kind."),
    (
        "litefleet_monitor_duplicates_total",
        "counter",
        "Metrics and events received again (QoS 1 redelivery, replay) and stored only once.",
    ),
    ("litefleet_monitor_malformed_total", "counter", "Messages that were not valid litefleet payloads."),
    ("litefleet_monitor_samples_stored_total", "counter", "Metrics messages written to the history."),
    ("litefleet_monitor_events_stored_total", "counter", "Events written to the history."),
    ("litefleet_monitor_too_old_total", "counter", "Messages older than the retention, not stored."),
    (
        "litefleet_monitor_dropped_total",
        "counter",
        "Messages dropped because the collector's queue stayed full (the database is too slow).",
    ),
    ("litefleet_monitor_write_errors_total", "counter", "Batches the database refused."),
    ("litefleet_monitor_queue_depth", "gauge", "Messages received but not yet written."),
    ("litefleet_monitor_start_time_seconds", "gauge", "When this collector started (unix time)."),
)


def metric_names() -> list[str]:
    return [name for name, _, _ in FAMILIES]


def rebucket(histogram_ms: Iterable[tuple[float | None, int]]) -> list[int]:
    """Cumulative counts at each bound of :data:`LE_SECONDS`, then +Inf (last)."""
    per_le = [0] * (len(LE_SECONDS) + 1)
    for upper_ms, n in histogram_ms:
        if upper_ms is None:
            per_le[-1] += n
            continue
        ns = upper_ms * 1e6
        exp = math.ceil(math.log2(ns) - 1e-9) if ns > 0 else HIST_MIN_EXP
        idx = min(max(exp, HIST_MIN_EXP), HIST_MAX_EXP + 1) - HIST_MIN_EXP
        per_le[idx] += n
    out, total = [], 0
    for n in per_le:
        total += n
        out.append(total)
    return out


def _model_samples(fam: dict[str, Family], dev: str, m: ModelSample, histograms: bool) -> None:
    labels: Labels = (("device", dev), ("model", m.name), ("version", m.version))
    fam["litefleet_model_active"].add(labels, m.active)
    fam["litefleet_model_requests_total"].add(labels, m.requests)
    fam["litefleet_model_inferences_total"].add(labels, m.ok)
    fam["litefleet_model_errors_total"].add(labels, m.errors)
    fam["litefleet_model_bad_requests_total"].add(labels, m.bad_requests)
    fam["litefleet_model_throughput_per_second"].add(labels, m.throughput_rps)
    for q, v in (("0.5", m.p50_ms), ("0.9", m.p90_ms), ("0.99", m.p99_ms)):
        fam["litefleet_model_latency_seconds"].add(
            (*labels, ("quantile", q)), None if v is None else v / 1000.0
        )
    if histograms and m.histogram_ms:
        h = fam["litefleet_model_inference_duration_seconds"]
        cumulative = rebucket(m.histogram_ms)
        for le, n in zip((*LE_SECONDS, math.inf), cumulative, strict=True):
            h.add((*labels, ("le", format_value(le))), n, "_bucket")
        count = cumulative[-1]
        mean = m.mean_ms_total
        h.add(
            labels, (mean * count / 1000.0) if mean is not None else (0.0 if count == 0 else math.nan), "_sum"
        )
        h.add(labels, count, "_count")


def _device_samples(fam: dict[str, Family], d: DeviceView, histograms: bool) -> None:
    dev = d.device_id
    labels: Labels = (("device", dev),)
    st = d.state
    if st is not None:
        fam["litefleet_device_online"].add(labels, st.online)
        fam["litefleet_device_info"].add(
            (*labels, ("status", st.status or ""), ("agent_version", st.agent_version or "")), 1
        )
        for im in st.models:
            fam["litefleet_model_info"].add(
                (
                    *labels,
                    ("model", im.name),
                    ("version", im.version),
                    ("sha256", im.sha256 or ""),
                    ("trial", "true" if im.trial else "false"),
                ),
                1,
            )
    fam["litefleet_device_stale"].add(labels, d.health == "stale")
    fam["litefleet_device_last_seen_timestamp_seconds"].add(labels, d.last_seen)
    m: MetricsSample | None = d.metrics
    if m is None:
        return
    fam["litefleet_device_metrics_timestamp_seconds"].add(labels, m.ts)
    fam["litefleet_device_cpu_percent"].add((*labels, ("scope", "process")), m.cpu_percent_process)
    fam["litefleet_device_cpu_percent"].add((*labels, ("scope", "system")), m.cpu_percent_system)
    fam["litefleet_device_resident_memory_bytes"].add(labels, m.rss_bytes)
    if m.load_avg is not None:
        for window, v in zip(("1m", "5m", "15m"), m.load_avg, strict=True):
            fam["litefleet_device_load_average"].add((*labels, ("window", window)), v)
    fam["litefleet_device_temperature_celsius"].add(labels, m.temperature_c)
    for flag, on in m.throttled:
        fam["litefleet_device_throttled"].add((*labels, ("flag", flag)), on)
    fam["litefleet_device_disk_free_bytes"].add(labels, m.disk_free_bytes)
    fam["litefleet_device_disk_total_bytes"].add(labels, m.disk_total_bytes)
    fam["litefleet_device_uptime_seconds"].add(labels, m.uptime_s)
    fam["litefleet_device_metrics_queue_pending"].add(labels, m.queue_pending)
    fam["litefleet_device_metrics_queue_dropped_total"].add(labels, m.queue_dropped_total)
    for channel, cls, n in m.api:
        fam["litefleet_device_api_responses_total"].add((*labels, ("channel", channel), ("class", cls)), n)
    for model in m.models:
        _model_samples(fam, dev, model, histograms)


def fleet_families(snap: FleetSnapshot, *, histograms: bool = True) -> list[Family]:
    fam = {name: Family(name, kind, text) for name, kind, text in FAMILIES}
    health: dict[str, int] = {"online": 0, "stale": 0, "offline": 0, "unknown": 0}
    for d in snap.devices:
        health[d.health] = health.get(d.health, 0) + 1
        _device_samples(fam, d, histograms)
    for h, n in health.items():
        fam["litefleet_devices"].add((("health", h),), n)
    s = snap.stats
    for kind in sorted(set(s.received) | {"state", "events", "metrics"}):
        fam["litefleet_monitor_messages_total"].add((("kind", kind),), s.received.get(kind, 0))
    for kind in ("metrics", "events"):
        fam["litefleet_monitor_duplicates_total"].add((("kind", kind),), s.duplicates.get(kind, 0))
    for kind in sorted(set(s.malformed) | {"state", "events", "metrics"}):
        fam["litefleet_monitor_malformed_total"].add((("kind", kind),), s.malformed.get(kind, 0))
    fam["litefleet_monitor_samples_stored_total"].add((), s.stored_samples)
    fam["litefleet_monitor_events_stored_total"].add((), s.stored_events)
    fam["litefleet_monitor_too_old_total"].add((), s.too_old)
    fam["litefleet_monitor_dropped_total"].add((), s.dropped)
    fam["litefleet_monitor_write_errors_total"].add((), s.write_errors)
    fam["litefleet_monitor_queue_depth"].add((), s.queue_depth)
    fam["litefleet_monitor_start_time_seconds"].add((), s.started)
    return [fam[name] for name, _, _ in FAMILIES]


def render(snap: FleetSnapshot, *, histograms: bool = True) -> str:
    """The whole ``/metrics`` body. Histograms are ~3 KB per device and model
    version (31 series: 29 ``_bucket``, ``_sum``, ``_count``); ``histograms=False`` leaves them
    out for large fleets."""
    return render_families(fleet_families(snap, histograms=histograms))
