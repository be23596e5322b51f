"""What the agent measures, and the JSON it publishes on ``<prefix>/v1/devices/<id>/metrics``.

Pieces, from pure to I/O:

- parsers for ``/proc`` and ``/sys`` text (:func:`parse_proc_stat`,
  :func:`parse_throttled`, ...) and :func:`build_metrics_payload`: pure;
- answers by channel and status class come from :class:`agent.serving.stats.ApiCounters`;
- :class:`DeviceProbe`: CPU % of this process and of the system, resident
  memory, load average, temperature (``/sys/class/thermal/thermal_zone*/temp``),
  Raspberry Pi throttling (``get_throttled`` of the firmware driver in sysfs,
  no ``vcgencmd``), free disk of the state folder. Whatever a machine does not
  expose is ``null``, never an error. The filesystem root is a parameter, so
  tests pass a fake ``/proc`` and ``/sys``;
- :class:`MetricsRecorder`: per model version counters and latency quantiles
  from :class:`agent.serving.stats.ModelStats`, including a version replaced
  since the last report (it is reported once more, then forgotten);
- :class:`MetricsReporter`: builds one payload per call and appends it to the
  on-disk :class:`agent.telemetry.metrics_queue.MetricsQueue`, which assigns ``seq`` and
  from which the sender publishes (QoS 1). The reporter never publishes
  itself: every metrics message goes through the queue.

The payload (``"v": 1``) is documented in ``docs/agent-api.md``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import StorageError
from agent.serving.stats import (
    N_BUCKETS,
    ApiCounters,
    ModelStats,
    StatsSnapshot,
    bucket_bounds_ns,
    mean_ns,
    quantile_ns,
    subtract,
)

logger = logging.getLogger(__name__)

PAYLOAD_VERSION = 1
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
# where Raspberry Pi kernels expose the firmware's throttling flags
THROTTLED_PATHS = (
    "sys/devices/platform/soc/soc:firmware/get_throttled",
    "sys/devices/platform/soc/soc:firmware/raspberrypi-hwmon/get_throttled",
)
# bit -> name of the firmware's get_throttled word (low bits: now; bits 16+: since boot)
THROTTLE_BITS = {
    0: "under_voltage",
    1: "freq_capped",
    2: "throttled",
    3: "soft_temp_limit",
    16: "under_voltage_occurred",
    17: "freq_capped_occurred",
    18: "throttled_occurred",
    19: "soft_temp_limit_occurred",
}


# -- pure parsers ---------------------------------------------------------------------
def parse_proc_stat(text: str) -> tuple[int, int] | None:
    """``(busy, total)`` jiffies of all CPUs from ``/proc/stat``."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            try:
                values = [int(v) for v in line.split()[1:]]
            except ValueError:
                return None
            if len(values) < 4:
                return None
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            total = sum(values[:8])  # guest time is already inside user/nice
            return total - idle, total
    return None


def cpu_percent(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """System CPU % (0-100, all cores) between two :func:`parse_proc_stat` readings."""
    if before is None or after is None:
        return None
    total = after[1] - before[1]
    if total <= 0:
        return None
    return round(max(0.0, min(100.0, 100.0 * (after[0] - before[0]) / total)), 1)


def parse_statm_rss(text: str, page_size: int) -> int | None:
    """Resident bytes from ``/proc/<pid>/statm`` (second field, in pages)."""
    parts = text.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1]) * page_size


def parse_throttled(text: str) -> dict[str, Any] | None:
    """The firmware's throttling word (``0x50005``) as named flags."""
    raw = text.strip()
    try:
        word = int(raw, 16)
    except ValueError:
        return None
    flags: dict[str, Any] = {"raw": hex(word)}
    for bit, name in THROTTLE_BITS.items():
        flags[name] = bool(word >> bit & 1)
    return flags


def parse_millidegrees(text: str) -> float | None:
    try:
        return round(int(text.strip()) / 1000.0, 1)
    except ValueError:
        return None


# -- small readers ---------------------------------------------------------------------
def _read(path: Path, limit: int = 65536) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(limit)
    except OSError:
        return None


def read_rss_bytes(pid: int | None = None, *, proc: Path = Path("/proc")) -> int | None:
    """Resident memory of ``pid`` (default: this process) in bytes; None when unknown.

    Used by the metrics and by the benchmarks (agent idle memory)."""
    text = _read(proc / (str(pid) if pid is not None else "self") / "statm")
    if text is not None:
        return parse_statm_rss(text, os.sysconf("SC_PAGE_SIZE"))
    if pid is None:
        try:
            import resource

            # peak, not current: the best a machine without /proc offers
            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        except (ImportError, OSError):
            return None
    return None


@dataclass
class _CpuMark:
    wall: float
    process: float
    system: tuple[int, int] | None


class DeviceProbe:
    """Reads the device's health. ``root`` is ``/`` except in tests."""

    def __init__(
        self,
        state_dir: Path,
        *,
        root: Path = Path("/"),
        clock: Callable[[], float] = time.monotonic,
        process_cpu_s: Callable[[], float] = time.process_time,
        loadavg: Callable[[], tuple[float, float, float]] | None = os.getloadavg,
    ) -> None:
        self.state_dir = state_dir
        self.root = root
        self._clock = clock
        self._process_cpu_s = process_cpu_s
        self._loadavg = loadavg
        self._mark = self._cpu_mark()
        self._started = clock()

    def _cpu_mark(self) -> _CpuMark:
        stat = _read(self.root / "proc/stat", 4096)
        return _CpuMark(self._clock(), self._process_cpu_s(), parse_proc_stat(stat) if stat else None)

    def sample(self) -> dict[str, Any]:
        """One reading; CPU figures cover the time since the previous reading."""
        mark = self._cpu_mark()
        wall = mark.wall - self._mark.wall
        process_pct = round(100.0 * (mark.process - self._mark.process) / wall, 1) if wall > 0 else None
        system_pct = cpu_percent(self._mark.system, mark.system)
        self._mark = mark
        zones = self._thermal_zones()
        return {
            # % of one core, like top: may exceed 100 on several cores
            "cpu_percent_process": process_pct,
            # % of all cores together (0-100), from /proc/stat
            "cpu_percent_system": system_pct,
            "rss_bytes": read_rss_bytes(proc=self.root / "proc"),
            "load_avg": self._load(),
            "temperature_c": max(zones.values()) if zones else None,
            "thermal_zones": zones or None,
            "throttled": self._throttled(),
            **self._disk(),
            "uptime_s": round(self._clock() - self._started, 1),
        }

    def _load(self) -> list[float] | None:
        if self._loadavg is None:
            return None
        try:
            return [round(v, 2) for v in self._loadavg()]
        except OSError:
            return None

    def _thermal_zones(self) -> dict[str, float]:
        zones: dict[str, float] = {}
        base = self.root / "sys/class/thermal"
        try:
            entries = sorted(p for p in base.iterdir() if re.fullmatch(r"thermal_zone\d+", p.name))
        except OSError:
            return zones
        for zone in entries[:32]:
            temp = _read(zone / "temp", 64)
            value = parse_millidegrees(temp) if temp is not None else None
            if value is None:
                continue
            kind = (_read(zone / "type", 64) or zone.name).strip() or zone.name
            zones[kind if kind not in zones else zone.name] = value
        return zones

    def _throttled(self) -> dict[str, Any] | None:
        for rel in THROTTLED_PATHS:
            text = _read(self.root / rel, 64)
            if text is not None:
                return parse_throttled(text)
        return None

    def _disk(self) -> dict[str, int | None]:
        try:
            st = os.statvfs(self.state_dir)
        except OSError:
            return {"disk_free_bytes": None, "disk_total_bytes": None}
        return {"disk_free_bytes": st.f_bavail * st.f_frsize, "disk_total_bytes": st.f_blocks * st.f_frsize}


# -- per model version ------------------------------------------------------------------
def _quantiles(counts: tuple[int, ...] | list[int]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, q in QUANTILES:
        ns = quantile_ns(counts, q)
        out[key] = None if ns is None else round(ns / 1e6, 4)
    out["mean"] = round(mean_ns(counts) / 1e6, 4) if sum(counts) else None
    return out


def histogram_ms(counts: tuple[int, ...]) -> list[list[float | int | None]]:
    """Sparse ``[[upper_ms, count], ...]`` of the non-empty buckets (upper None: open)."""
    out: list[list[float | int | None]] = []
    for index, n in enumerate(counts):
        if n:
            high = bucket_bounds_ns(index)[1]
            out.append([None if high == float("inf") else high / 1e6, n])
    return out


def model_report(
    now: StatsSnapshot, before: StatsSnapshot | None, interval_s: float, *, active: bool
) -> dict[str, Any]:
    """One model version's entry in the payload (pure)."""
    prev_counts = before.counts if before is not None else (0,) * N_BUCKETS
    interval_counts = subtract(now.counts, prev_counts)
    d_ok = sum(interval_counts)
    d_err = now.errors - (before.errors if before else 0)
    d_bad = now.bad_requests - (before.bad_requests if before else 0)
    entry: dict[str, Any] = {
        "name": now.name,
        "version": now.version,
        "active": active,
        "requests": now.requests,
        "ok": now.ok,
        "errors": now.errors,
        "bad_requests": now.bad_requests,
        "interval": {"requests": d_ok + d_err + d_bad, "ok": d_ok, "errors": d_err, "bad_requests": d_bad},
        "throughput_rps": round(d_ok / interval_s, 3) if interval_s > 0 else None,
        "latency_ms": _quantiles(interval_counts),
        "latency_ms_total": _quantiles(now.counts),
        "histogram_ms": histogram_ms(now.counts),
    }
    if now.outputs is not None:
        entry["outputs"] = now.outputs.sketch().to_json()
    if now.shadow is not None:
        entry["shadow"] = now.shadow
    return entry


class MetricsRecorder:
    """Follows the registry and reports every model version it has seen serve."""

    def __init__(
        self,
        registry: Any,
        *,
        counters: ApiCounters | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counters = counters or ApiCounters()
        self._clock = clock
        self._lock = threading.Lock()
        self._current: dict[str, ModelStats] = {
            name: m.runner.stats for name, m in registry.snapshot().items()
        }
        self._retired: list[ModelStats] = []
        # last reported snapshot of each active version (keyed by the live object)
        self._previous: dict[ModelStats, StatsSnapshot] = {}
        self._last_report = clock()
        registry.add_listener(self._on_change)

    def _on_change(self, name: str, model: Any) -> None:
        with self._lock:
            old = self._current.pop(name, None)
            if model is not None:
                self._current[name] = model.runner.stats
            if old is not None and (model is None or old is not model.runner.stats):
                self._retired.append(old)

    def reports(self) -> tuple[list[dict[str, Any]], float]:
        """Entries for every active version and each one replaced since the last
        call, plus the interval they cover in seconds."""
        now = self._clock()
        with self._lock:
            current = list(self._current.values())
            retired, self._retired = self._retired, []
            interval = now - self._last_report
            self._last_report = now
        entries: list[dict[str, Any]] = []
        previous: dict[ModelStats, StatsSnapshot] = {}
        for stats, active in [(s, True) for s in current] + [(s, False) for s in retired]:
            snap = stats.snapshot()
            entries.append(model_report(snap, self._previous.get(stats), interval, active=active))
            if active:
                previous[stats] = snap
        self._previous = previous  # retired versions are forgotten after this report
        return entries, interval


def build_metrics_payload(
    *,
    device_id: str,
    seq: int,
    ts: float,
    interval_s: float,
    models: list[dict[str, Any]],
    device: dict[str, Any],
    api: dict[str, Any],
    queue: dict[str, int],
    agent_version: str = "",
    boot: str = "",
    uplink: dict[str, Any] | None = None,
) -> bytes:
    """The JSON published on ``.../metrics`` (pure); ``uplink`` only for a device of a site."""
    doc = {
        "v": PAYLOAD_VERSION,
        "device_id": device_id,
        "boot": boot,
        "seq": seq,
        "ts": round(ts, 3),
        "interval_s": round(interval_s, 3),
        "agent_version": agent_version,
        "models": models,
        "device": device,
        "api": api,
        "queue": queue,
    }
    if uplink is not None:
        doc["uplink"] = uplink
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


class MetricsReporter:
    """Builds one metrics message per :meth:`report_once` into the on-disk queue."""

    def __init__(
        self,
        *,
        device_id: str,
        topic: str,
        recorder: MetricsRecorder,
        probe: DeviceProbe,
        queue: Any,  # agent.telemetry.metrics_queue.MetricsQueue
        wall_clock: Callable[[], float] = time.time,
        agent_version: str = "",
        boot: str = "",
        on_queued: Callable[[], None] | None = None,
        uplink: Callable[[], dict[str, Any] | None] = lambda: None,
    ) -> None:
        self.device_id = device_id
        self.boot = boot
        self.topic = topic
        self.recorder = recorder
        self.probe = probe
        self.queue = queue
        self._wall = wall_clock
        self.agent_version = agent_version
        self._on_queued = on_queued
        self._uplink = uplink

    def report_once(self) -> int | None:
        """Queue one message; its ``seq``, or None when the queue could not be written
        (logged; the agent goes on)."""
        ts = self._wall()
        models, interval = self.recorder.reports()
        device = self.probe.sample()
        api = self.recorder.counters.snapshot()
        uplink = self._uplink()

        def build(seq: int, pending: int, dropped_total: int) -> bytes:
            return build_metrics_payload(
                device_id=self.device_id,
                seq=seq,
                ts=ts,
                interval_s=interval,
                models=models,
                device=device,
                api=api,
                queue={"pending": pending, "dropped_total": dropped_total},
                agent_version=self.agent_version,
                boot=self.boot,
                uplink=uplink,
            )

        try:
            seq: int = self.queue.append(self.topic, build, ts=ts)
        except StorageError as exc:
            logger.warning("metrics not queued: %s", exc)
            return None
        if self._on_queued is not None:
            self._on_queued()
        return seq
