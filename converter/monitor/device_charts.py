"""The page's history charts per device: latency, throughput, CPU, memory (pure).

One row per device: a latency chart per model (p50 and p99), then throughput (one
line per model), CPU (the agent's, % of one core, and the system's, % of all cores)
and the agent's memory (RSS).

Guarantees:

- Charts of one kind share one y axis over every device drawn (:func:`shared_axes`):
  latency on a log axis spanning every p50 and p99 shown, throughput, CPU and memory
  linear from 0 to a nice ceiling of the largest value shown. Two devices' charts
  can be compared by eye; their tick labels are the same.
- A device that is not online gets a grey span from its last metrics to now on each
  of its charts ("offline", "stale"), and its legends carry no figures: nothing about
  it reads as current.
- A version change is a dashed vertical line on its model's charts.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from converter.monitor.charts import (
    Axis,
    Chart,
    Point,
    Series,
    downsample,
    format_ms,
    gap_seconds,
    linear_axis,
    log_axis,
    render_chart,
)
from converter.monitor.history import DevicePoint, LatencyPoint
from converter.monitor.live import DeviceView
from converter.monitor.page import age

P50_COLOR = "#1f77b4"
P99_COLOR = "#d62728"
MODEL_COLORS = ("#2ca02c", "#ff7f0e", "#17becf", "#9467bd", "#8c564b", "#e377c2")
CPU_COLORS = ("#9467bd", "#8c564b")
RSS_COLOR = "#2ca02c"
MAX_POINTS = 160  # per line: a 318 px chart has 256 px of plot


@dataclass(frozen=True)
class DeviceHistory:
    """What the history holds for one device in the window."""

    device_id: str
    view: DeviceView | None  # None: no longer in the fleet (its state was cleared)
    models: tuple[tuple[str, tuple[LatencyPoint, ...]], ...]
    points: tuple[DevicePoint, ...]


@dataclass(frozen=True)
class Axes:
    latency: Axis
    throughput: Axis
    cpu: Axis
    memory: Axis


def _binned(h: DeviceHistory, since: float, until: float) -> dict[str, list[Point]]:
    """Every line of a device, downsampled, by key (``<model>/p50``, ``cpu_process``, ...)."""
    out: dict[str, list[Point]] = {}
    for model, pts in h.models:
        out[f"{model}/p50"] = downsample([(p.ts, p.p50_ms) for p in pts], since, until, MAX_POINTS)
        out[f"{model}/p99"] = downsample([(p.ts, p.p99_ms) for p in pts], since, until, MAX_POINTS, "max")
        out[f"{model}/rps"] = downsample([(p.ts, p.throughput_rps) for p in pts], since, until, MAX_POINTS)
    d = h.points
    out["cpu_process"] = downsample([(p.ts, p.cpu_percent_process) for p in d], since, until, MAX_POINTS)
    out["cpu_system"] = downsample([(p.ts, p.cpu_percent_system) for p in d], since, until, MAX_POINTS)
    rss = [(p.ts, None if p.rss_bytes is None else p.rss_bytes / 2**20) for p in d]
    out["rss"] = downsample(rss, since, until, MAX_POINTS, "max")
    return out


def _values(lines: Sequence[dict[str, list[Point]]], suffixes: tuple[str, ...]) -> list[float]:
    return [v for b in lines for k, pts in b.items() if k.endswith(suffixes) for _, v in pts if v is not None]


def shared_axes(lines: Sequence[dict[str, list[Point]]]) -> Axes:
    """One axis per kind of chart over every device's lines."""
    return Axes(
        latency=log_axis(_values(lines, ("/p50", "/p99"))),
        throughput=linear_axis(_values(lines, ("/rps",)), _rps),
        cpu=linear_axis(_values(lines, ("cpu_process", "cpu_system")), _pct, floor=5.0),
        memory=linear_axis(_values(lines, ("rss",)), _mib, floor=1.0),
    )


def _version_marks(pts: Sequence[LatencyPoint]) -> tuple[tuple[float, str], ...]:
    out, previous = [], None
    for p in pts:
        if previous is not None and p.version != previous:
            out.append((p.ts, f"v{p.version}"))
        previous = p.version
    return tuple(out)


def _last_ts(h: DeviceHistory) -> float | None:
    stamps = [p.ts for p in h.points] + [p.ts for _, pts in h.models for p in pts]
    return max(stamps) if stamps else None


def _latest(pts: Sequence[Point], fmt: Callable[[float], str], current: bool) -> str:
    """The legend's figure: the newest value, only for a device that is online."""
    if current:
        for _, v in reversed(pts):
            if v is not None:
                return fmt(v)
    return ""


def _rps(v: float) -> str:
    return f"{v:.3g}/s"


def _pct(v: float) -> str:
    return f"{v:.3g} %"


def _mib(v: float) -> str:
    return f"{v:.3g} MiB"


@dataclass(frozen=True)
class _Frame:
    """What every chart of one device shares."""

    since: float
    until: float
    gap_s: float
    shaded: tuple[tuple[float, float, str], ...]
    device_id: str
    current: bool
    lines: dict[str, list[Point]]

    def series(self, key: str, label: str, color: str, fmt: Callable[[float], str], css: str) -> Series:
        pts = self.lines[key]
        return Series(label, color, tuple(pts), _latest(pts, fmt, self.current), css)

    def chart(self, kind: str, title: str, axis: Axis, series: tuple[Series, ...], **kw: Any) -> Chart:
        extra = {"device": self.device_id, **kw.pop("extra", {})}
        return Chart(
            kind=kind,
            title=title,
            since=self.since,
            until=self.until,
            axis=axis,
            series=series,
            gap_s=self.gap_s,
            shaded=self.shaded,
            extra=extra,
            **kw,
        )


def device_charts(
    h: DeviceHistory, axes: Axes, since: float, until: float, lines: dict[str, list[Point]] | None = None
) -> list[str]:
    """The charts of one device, as SVG strings (``lines``: its :func:`_binned` lines, when
    the caller has them already)."""
    current = h.view is not None and h.view.current
    last = _last_ts(h)
    health = h.view.health if h.view is not None else "removed"
    intervals = [p.interval_s for p in h.points] + [p.interval_s for _, pts in h.models for p in pts]
    f = _Frame(
        since=since,
        until=until,
        gap_s=gap_seconds(intervals, (until - since) / MAX_POINTS),
        shaded=() if current or last is None else ((last, until, health),),
        device_id=h.device_id,
        current=current,
        lines=lines if lines is not None else _binned(h, since, until),
    )
    charts = [
        f.chart(
            "latency",
            f"latency · {model}",
            axes.latency,
            (
                f.series(f"{model}/p50", "p50", P50_COLOR, format_ms, "p50"),
                f.series(f"{model}/p99", "p99", P99_COLOR, format_ms, "p99"),
            ),
            markers=_version_marks(pts),
            empty_text="no requests in this window",
            extra={"model": model},
        )
        for model, pts in h.models
    ]
    rps = tuple(
        f.series(f"{model}/rps", model, MODEL_COLORS[i % len(MODEL_COLORS)], _rps, "rps")
        for i, (model, _) in enumerate(h.models)
    )
    cpu = (
        f.series("cpu_process", "agent (of 1 core)", CPU_COLORS[0], _pct, "cpu-process"),
        f.series("cpu_system", "system", CPU_COLORS[1], _pct, "cpu-system"),
    )
    charts += [
        f.chart("throughput", "throughput (inferences/s)", axes.throughput, rps),
        f.chart("cpu", "CPU", axes.cpu, cpu),
        f.chart("memory", "memory", axes.memory, (f.series("rss", "agent RSS", RSS_COLOR, _mib, "rss"),)),
    ]
    return [render_chart(c) for c in charts]


def device_rows(histories: Sequence[DeviceHistory], since: float, until: float, now: float) -> list[str]:
    """One ``<div>`` per device: a heading that says its health, then its charts."""
    binned = [_binned(h, since, until) for h in histories]
    axes = shared_axes(binned)
    out = []
    e = html.escape
    for h, lines in zip(histories, binned, strict=True):
        v = h.view
        health = v.health if v is not None else "removed"
        model = f" · {v.state.model} v{v.state.version}" if v and v.state and v.state.model else ""
        if v is not None and v.current:
            note = ""
        else:
            last = v.metrics.ts if v is not None and v.metrics is not None else _last_ts(h)
            note = f" · last metrics {age(now, last)}; nothing after them is known"
        out.append(
            f'<div class="devrow" data-device="{e(h.device_id)}" data-health="{e(health)}">'
            f'<h3><a href="?device={quote(h.device_id, safe="")}">{e(h.device_id)}</a> '
            f'<span class="{e(health)}">{e(health)}</span>{e(model)}<span class="sub">{e(note)}</span></h3>'
            '<div class="charts">' + "\n".join(device_charts(h, axes, since, until, lines)) + "</div></div>"
        )
    return out
