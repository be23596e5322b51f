"""Prometheus exposition of the fleet monitor's live view, through ``prometheus_client``.

:class:`FleetCollector` is a custom collector: on every scrape it takes one
snapshot of the live view (:class:`converter.monitor.live.FleetSnapshot`) and
yields one metric family per entry of :data:`FAMILIES`; ``prometheus_client``
writes the text format (escaping, number formatting). :func:`render` is what
``/metrics`` serves.

Guarantees:

- The output passes ``promtool check metrics`` (a test runs Debian's promtool
  on a live scrape): every family has one ``# HELP`` and one ``# TYPE`` and
  its samples together; the latency quantiles are a summary (``quantile``
  label), the per-version latency distribution a histogram (``le`` label).
- No label set appears twice within a family (a device sending the same model
  version twice in one message cannot make the scrape invalid).
- Every family is listed even when it has no samples yet, so the endpoint
  documents itself; ``docs/monitor.md`` has the same list (a test checks it).
- No explicit timestamps: Prometheus stamps a scrape itself; a metrics message
  replayed after an outage never becomes the "current" value
  (:class:`converter.monitor.live.FleetLive` keeps only the newest).
- Gauges that describe a device *now* (CPU, memory, load, temperature, throttling,
  disk, uptime, pending queue, throughput, the latency quantiles of the last
  interval, whether a model is active) are exported only while the device is online
  (:attr:`converter.monitor.live.DeviceView.current`): a stale or offline device's
  last report is not a current value, and its series go stale in Prometheus instead
  of repeating it. Counters (and the metrics timestamp) stay: they remain true.

Latency histograms are re-bucketed from the agent's fixed log buckets (8 per
power of two) onto one bucket per power of two of nanoseconds (1.024 µs to
137 s): an agent bucket lies wholly below its power-of-two bound, so the
cumulative counts are exact at every ``le`` and the same ``le`` set serves
every device, which ``histogram_quantile(sum by (le) (...))`` needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Sample

from converter.monitor.host_families import HOST_FAMILIES, fill_host_families
from converter.monitor.live import DeviceView, EventKey, FleetSnapshot
from converter.monitor.payloads import MetricsSample, ModelSample

# what generate_latest writes (prometheus_client's choose_encoder pairs the two)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# le bounds of the re-bucketed histogram: 2**10 .. 2**37 ns
HIST_MIN_EXP, HIST_MAX_EXP = 10, 37
LE_SECONDS = tuple((1 << n) / 1e9 for n in range(HIST_MIN_EXP, HIST_MAX_EXP + 1))
# their label values; repr() of these floats is Go's formatting too (1.024e-06 ... 137.438953472)
LE_LABELS = (*(repr(le) for le in LE_SECONDS), "+Inf")
QUANTILES = ("0.5", "0.9", "0.99")

Labels = tuple[tuple[str, str], ...]

_KINDS: dict[str, Callable[[str, str], Metric]] = {
    "gauge": GaugeMetricFamily,
    "counter": CounterMetricFamily,
    "summary": SummaryMetricFamily,
    "histogram": HistogramMetricFamily,
}


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
        "litefleet_device_uplink_outages_total",
        "counter",
        "Outages of its site's uplink the device saw since its agent started (metrics and events held).",
    ),
    (
        "litefleet_device_uplink_events_dropped_total",
        "counter",
        "Events the device dropped while its site's uplink was down (more than it holds in memory).",
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
    (
        "litefleet_model_refused",
        "gauge",
        "Always 1 per model whose newest release the device refused (rejected or rolled back) while"
        " it runs an older one or none (the retained state's refused); gone once it runs a newer one.",
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
        "summary",
        "Inference latency quantiles (0.5, 0.9, 0.99) over the last interval (absent without requests); "
        "_sum and _count since the version was loaded.",
    ),
    (
        "litefleet_model_inference_duration_seconds",
        "histogram",
        "Inference latency since the version was loaded, one bucket per power of two of nanoseconds.",
    ),
    (
        "litefleet_monitor_messages_total",
        "counter",
        "Messages this collector received by kind (device: state, events, metrics; host side: "
        "rollouts, metadata, sites).",
    ),
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
    (
        "litefleet_device_events_total",
        "counter",
        "Events stored by this collector per device, event and reason (empty without one); "
        "words outside docs/protocol.md 6.2/6.3 count as other.",
    ),
    ("litefleet_monitor_start_time_seconds", "gauge", "When this collector started (unix time)."),
    (
        "litefleet_monitor_broker_connected",
        "gauge",
        "1 while this collector is connected to the broker, else 0.",
    ),
    *HOST_FAMILIES,
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


class _Family:
    """One family being filled: samples in order, each label set once."""

    def __init__(self, name: str, kind: str, text: str) -> None:
        self.name = name
        self.metric = _KINDS[kind](name, text)
        self._seen: set[tuple[str, Labels]] = set()

    def add(self, labels: Labels, value: float | int | bool | None, suffix: str = "") -> None:
        """Add a sample; ``None`` (not reported) and repeated label sets are skipped."""
        if value is None or (suffix, labels) in self._seen:
            return
        self._seen.add((suffix, labels))
        self.metric.samples.append(Sample(self.name + suffix, dict(labels), float(value)))


def _latency(
    fam: dict[str, _Family], labels: Labels, m: ModelSample, histograms: bool, current: bool
) -> None:
    """The summary (quantiles of the last interval, only when ``current``) and, with
    ``histograms``, the histogram; both count since the version was loaded."""
    summary = fam["litefleet_model_latency_seconds"]
    for q, v in zip(QUANTILES, (m.p50_ms, m.p90_ms, m.p99_ms), strict=True):
        summary.add((*labels, ("quantile", q)), None if v is None or not current else v / 1000.0)
    if not m.histogram_ms:
        return
    cumulative = rebucket(m.histogram_ms)
    count = cumulative[-1]
    mean = m.mean_ms_total
    total_s = (mean * count / 1000.0) if mean is not None else (0.0 if count == 0 else math.nan)
    summary.add(labels, total_s, "_sum")
    summary.add(labels, count, "_count")
    if histograms:
        h = fam["litefleet_model_inference_duration_seconds"]
        for le, n in zip(LE_LABELS, cumulative, strict=True):
            h.add((*labels, ("le", le)), n, "_bucket")
        h.add(labels, total_s, "_sum")
        h.add(labels, count, "_count")


def _model_samples(
    fam: dict[str, _Family], dev: str, m: ModelSample, histograms: bool, current: bool
) -> None:
    labels: Labels = (("device", dev), ("model", m.name), ("version", m.version))
    if current:
        fam["litefleet_model_active"].add(labels, m.active)
        fam["litefleet_model_throughput_per_second"].add(labels, m.throughput_rps)
    fam["litefleet_model_requests_total"].add(labels, m.requests)
    fam["litefleet_model_inferences_total"].add(labels, m.ok)
    fam["litefleet_model_errors_total"].add(labels, m.errors)
    fam["litefleet_model_bad_requests_total"].add(labels, m.bad_requests)
    _latency(fam, labels, m, histograms, current)


def _device_samples(fam: dict[str, _Family], d: DeviceView, histograms: bool) -> None:
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
        for r in st.refused:
            refused = (*labels, ("model", r.name), ("version", str(r.version)), ("reason", r.reason))
            fam["litefleet_model_refused"].add(refused, 1)
    fam["litefleet_device_stale"].add(labels, d.health == "stale")
    fam["litefleet_device_last_seen_timestamp_seconds"].add(labels, d.last_seen)
    m: MetricsSample | None = d.metrics
    if m is None:
        return
    fam["litefleet_device_metrics_timestamp_seconds"].add(labels, m.ts)
    fam["litefleet_device_metrics_queue_dropped_total"].add(labels, m.queue_dropped_total)
    if m.uplink_site is not None:
        site = (*labels, ("site", m.uplink_site))
        fam["litefleet_device_uplink_outages_total"].add(site, m.uplink_outages)
        fam["litefleet_device_uplink_events_dropped_total"].add(site, m.uplink_events_dropped)
    for channel, cls, n in m.api:
        fam["litefleet_device_api_responses_total"].add((*labels, ("channel", channel), ("class", cls)), n)
    if d.current:
        _device_now(fam, labels, m)
    for model in m.models:
        _model_samples(fam, dev, model, histograms, d.current)


def _device_now(fam: dict[str, _Family], labels: Labels, m: MetricsSample) -> None:
    """The gauges that describe the device now (only for a device that is online)."""
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


def fleet_families(snap: FleetSnapshot, *, histograms: bool = True) -> list[Metric]:
    """Every family of :data:`FAMILIES`, in order, filled from ``snap``."""
    fam = {name: _Family(name, kind, text) for name, kind, text in FAMILIES}
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
    fam["litefleet_monitor_broker_connected"].add((), s.broker_connected)
    _events(fam["litefleet_device_events_total"], snap.events)
    fill_host_families(fam, snap)
    return [fam[name].metric for name, _, _ in FAMILIES]


def _events(family: _Family, events: Mapping[EventKey, int]) -> None:
    for (device, event, reason), n in sorted(events.items()):
        family.add((("device", device), ("event", event), ("reason", reason)), n)


class FleetCollector:
    """A ``prometheus_client`` collector over the monitor's live view: ``snapshot`` is
    called once per scrape (from the scraping thread; it must be safe to call there,
    as :meth:`converter.monitor.live.FleetLive.snapshot` is)."""

    def __init__(self, snapshot: Callable[[], FleetSnapshot], *, histograms: bool = True) -> None:
        self._snapshot = snapshot
        self._histograms = histograms

    def collect(self) -> Iterator[Metric]:
        yield from fleet_families(self._snapshot(), histograms=self._histograms)


def render(snap: FleetSnapshot, *, histograms: bool = True) -> str:
    """The whole ``/metrics`` body. Histograms are ~3 KB per device and model
    version (31 series: 29 ``_bucket``, ``_sum``, ``_count``); ``histograms=False`` leaves them
    out for large fleets."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(lambda: snap, histograms=histograms))
    return generate_latest(registry).decode()
