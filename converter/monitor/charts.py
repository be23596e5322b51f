"""Time charts as inline SVG for the monitor's page (pure: plain points in, markup out).

Guarantees:

- A chart is one self-contained ``<svg>``: styled by its own attributes (it renders the
  same saved on its own), no script, nothing fetched. Every text from a device or a
  record is HTML-escaped.
- The y axis is given, not guessed per chart: the page computes one :class:`Axis` per
  kind of chart (:func:`linear_axis`, :func:`log_axis`) over every series it draws, so
  charts meant to be compared share one scale, and their tick labels say so.
- Latency uses a logarithmic axis (:func:`log_axis`): p50 and p99 apart by a factor
  of 10 are both readable, and equal ratios look equal on every device.
- At most ``max_points`` points per line (:func:`downsample`: time bins, ``mean`` or
  ``max`` per bin, so a p99 spike survives). A line breaks where a device sent
  nothing for three of its metrics intervals (an outage is a gap, not a slope).
- Markers (dashed vertical lines: a version change, a wave) and shaded spans (a device
  offline since its last report) are drawn where the caller says.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from converter.monitor.payloads import DEFAULT_INTERVAL_S, STALE_INTERVALS

FONT = 'font-family="sans-serif" font-size="11"'
Point = tuple[float, float | None]


# -- numbers for people ---------------------------------------------------------------------------
def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= ``value`` (> 0)."""
    if not value > 0 or not math.isfinite(value):
        return 1.0
    exp = math.floor(math.log10(value))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        candidate = m * 10.0**exp
        if candidate >= value * (1 - 1e-12):
            return candidate
    return 10.0 ** (exp + 1)


def format_ms(value: float | None) -> str:
    """A latency for people: µs below 1 ms, ms below 10 s, then s."""
    if value is None:
        return "-"
    if value < 1.0:
        return f"{value * 1000:.3g} µs"
    if value < 10_000:
        return f"{value:.3g} ms"
    return f"{value / 1000:.3g} s"


def format_number(value: float) -> str:
    """An axis label: ``0``, ``2.5``, ``40``, ``1.2k``."""
    if value == 0:
        return "0"
    if abs(value) >= 10_000:
        return f"{value / 1000:.3g}k"
    return f"{value:.3g}"


# -- axes -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Axis:
    """A y axis: its range, whether it is logarithmic, and its labelled ticks."""

    lo: float
    hi: float
    log: bool
    ticks: tuple[tuple[float, str], ...]
    minor: tuple[float, ...] = ()  # grid lines without a label

    def scale(self, px_bottom: float, px_top: float) -> Callable[[float], float]:
        if self.log:
            llo, lhi = math.log10(self.lo), math.log10(self.hi)

            def to_px(v: float) -> float:
                lv = math.log10(min(max(v, self.lo), self.hi))
                return px_bottom + (lv - llo) / (lhi - llo) * (px_top - px_bottom)

            return to_px

        def to_px_linear(v: float) -> float:
            v = min(max(v, self.lo), self.hi)
            return px_bottom + (v - self.lo) / (self.hi - self.lo) * (px_top - px_bottom)

        return to_px_linear

    @property
    def description(self) -> str:
        """``log 10 µs..10 ms`` / ``linear 0..50``: what the page and its tests compare."""
        return f"{'log' if self.log else 'linear'} {self.ticks[0][1]}..{self.ticks[-1][1]}"


def linear_axis(
    values: Sequence[float], fmt: Callable[[float], str] = format_number, floor: float = 0.0
) -> Axis:
    """0 to a nice ceiling of the largest value (at least ``floor``), ticks at 0, 1/2, 1."""
    top = max([v for v in values if math.isfinite(v)] + [floor])
    hi = nice_ceiling(top) if top > 0 else 1.0
    return Axis(0.0, hi, False, tuple((hi * f, fmt(hi * f)) for f in (0.0, 0.5, 1.0)))


def log_axis(values: Sequence[float], fmt: Callable[[float], str] = format_ms, max_decades: int = 6) -> Axis:
    """Whole decades around every positive value (at most ``max_decades``, the top kept);
    labels at each decade, and at 2 and 5 as well when the range is two decades or less."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if not positive:
        return Axis(0.1, 10.0, True, ((0.1, fmt(0.1)), (1.0, fmt(1.0)), (10.0, fmt(10.0))))
    top = math.ceil(math.log10(max(positive)) - 1e-9)
    bottom = math.floor(math.log10(min(positive)) + 1e-9)
    if top <= bottom:
        top = bottom + 1
    bottom = max(bottom, top - max_decades)
    decades = [10.0**e for e in range(bottom, top + 1)]
    between = [d * m for d in decades[:-1] for m in (2.0, 5.0)]
    if top - bottom <= 2:
        ticks = sorted(decades + between)
        return Axis(decades[0], decades[-1], True, tuple((v, fmt(v)) for v in ticks))
    return Axis(decades[0], decades[-1], True, tuple((v, fmt(v)) for v in decades), tuple(between))


# -- series -----------------------------------------------------------------------------------------
def downsample(
    points: Sequence[Point], since: float, until: float, max_points: int, how: str = "mean"
) -> list[Point]:
    """At most ``max_points`` time bins over ``[since, until]``: the ``mean`` or ``max``
    of each bin's values, at the bin's last timestamp (None when it has none)."""
    if len(points) <= max_points or until <= since:
        return list(points)
    per_s = max_points / (until - since)
    last = max_points - 1
    bins: dict[int, list[Point]] = {}
    for p in points:
        idx = int((p[0] - since) * per_s)
        idx = 0 if idx < 0 else last if idx > last else idx
        bins.setdefault(idx, []).append(p)
    out: list[Point] = []
    for idx in sorted(bins):
        group = bins[idx]
        vals = [v for _, v in group if v is not None]
        value = None if not vals else max(vals) if how == "max" else sum(vals) / len(vals)
        out.append((group[-1][0], value))
    return out


def gap_seconds(intervals: Sequence[float | None], bin_s: float) -> float:
    """How long a silence breaks a line: ``STALE_INTERVALS`` metrics intervals (their
    median), at least 2 bins."""
    known = sorted(i for i in intervals if i)
    interval = known[len(known) // 2] if known else DEFAULT_INTERVAL_S
    return max(STALE_INTERVALS * interval, 2.0 * bin_s)


def svg_path(
    points: Sequence[Point], x_of: Callable[[float], float], y_of: Callable[[float], float], gap_s: float
) -> str:
    """An SVG path ``d``: ``M`` starts a segment after a gap or a missing value."""
    parts: list[str] = []
    last_ts: float | None = None
    pen_down = False
    for ts, v in points:
        if v is None:
            pen_down = False
            continue
        if not pen_down or last_ts is None or ts - last_ts > gap_s:
            parts.append(f"M{x_of(ts):.1f},{y_of(v):.1f}")
        else:
            parts.append(f"L{x_of(ts):.1f},{y_of(v):.1f}")
        pen_down = True
        last_ts = ts
    return " ".join(parts)


@dataclass(frozen=True)
class Series:
    label: str
    color: str
    points: tuple[Point, ...]
    latest: str = ""  # the legend's figure, e.g. "412 µs"
    css_class: str = ""
    dashed: bool = False


@dataclass(frozen=True)
class Chart:
    """Everything one chart shows."""

    kind: str  # latency, throughput, cpu, memory, gate: the page compares charts of a kind
    title: str
    since: float
    until: float
    axis: Axis
    series: tuple[Series, ...]
    gap_s: float = 3 * DEFAULT_INTERVAL_S
    markers: tuple[tuple[float, str], ...] = ()  # (ts, label): dashed vertical lines
    shaded: tuple[tuple[float, float, str], ...] = ()  # (from, to, label)
    hlines: tuple[tuple[float, str], ...] = ()  # (value, label): a threshold
    empty_text: str = "no data in this window"
    width: int = 318
    height: int = 176
    extra: dict[str, str] = field(default_factory=dict)  # more data-* attributes


def _clock(ts: float, span_s: float) -> str:
    return time.strftime("%H:%M" if span_s <= 2 * 86400 else "%m-%d", time.gmtime(ts))


def _frame(
    c: Chart, left: int, top: int, plot_w: int, plot_h: int, y_of: Callable[[float], float]
) -> list[str]:
    e = html.escape
    attrs = "".join(f' data-{e(k)}="{e(v)}"' for k, v in sorted(c.extra.items()))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{c.width}" height="{c.height}" '
        f'viewBox="0 0 {c.width} {c.height}" role="img" aria-label="{e(c.title)}" '
        f'data-kind="{e(c.kind)}" data-scale="{e(c.axis.description)}"{attrs}>',
        f'<rect width="{c.width}" height="{c.height}" fill="#fff"/>',
        f'<text x="6" y="14" {FONT} font-weight="600" fill="#222">{e(c.title)}</text>',
    ]
    for v in c.axis.minor:
        y = y_of(v)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#f3f3f3"/>')
    out.append('<g class="y-axis">')
    for v, label in c.axis.ticks:
        y = y_of(v)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        out.append(
            f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" {FONT} fill="#555">{e(label)}</text>'
        )
    out.append("</g>")
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#bbb"/>')
    return out


def _time_axis(c: Chart, x_of: Callable[[float], float]) -> list[str]:
    out = ['<g class="x-axis">']
    span = c.until - c.since
    for frac in (0.0, 0.5, 1.0):
        ts = c.since + span * frac
        anchor = "start" if frac == 0 else "end" if frac == 1 else "middle"
        out.append(
            f'<text x="{x_of(ts):.1f}" y="{c.height - 5}" text-anchor="{anchor}" {FONT} fill="#555">'
            f"{_clock(ts, span)}</text>"
        )
    out.append("</g>")
    return out


def render_chart(c: Chart) -> str:
    """The chart as one ``<svg>`` element."""
    e = html.escape
    left, right, top, bottom = 54, 8, 34, 20
    plot_w, plot_h = c.width - left - right, c.height - top - bottom
    span = max(c.until - c.since, 1e-9)

    def x_of(ts: float) -> float:
        return left + min(max((ts - c.since) / span, 0.0), 1.0) * plot_w

    y_of = c.axis.scale(top + plot_h, top)
    out = _frame(c, left, top, plot_w, plot_h, y_of)
    for start, end, label in c.shaded:
        x0, x1 = x_of(max(start, c.since)), x_of(min(end, c.until))
        if x1 - x0 >= 1:
            out.append(
                f'<rect x="{x0:.1f}" y="{top}" width="{x1 - x0:.1f}" height="{plot_h}" fill="#f2f2f2" '
                'class="shaded"/>'
            )
            out.append(
                f'<text x="{(x0 + x1) / 2:.1f}" y="{top + plot_h / 2:.1f}" text-anchor="middle" {FONT} '
                f'fill="#999">{e(label)}</text>'
            )
    for ts, label in c.markers:
        if c.since <= ts <= c.until:
            x = x_of(ts)
            out.append(
                f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="#888" '
                'stroke-dasharray="4 3" class="marker"/>'
            )
            out.append(f'<text x="{x + 3:.1f}" y="{top + 11}" {FONT} fill="#666">{e(label)}</text>')
    for value, label in c.hlines:
        y = y_of(value)
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#c0392b" '
            'stroke-dasharray="6 3" class="threshold"/>'
        )
        out.append(
            f'<text x="{left + plot_w - 3}" y="{y - 3:.1f}" text-anchor="end" {FONT} fill="#c0392b">'
            f"{e(label)}</text>"
        )
    out += _time_axis(c, x_of)
    drawn = False
    for s in c.series:
        d = svg_path(s.points, x_of, y_of, c.gap_s)
        if d:
            drawn = True
            dash = ' stroke-dasharray="5 3"' if s.dashed else ""
            out.append(
                f'<path d="{d}" fill="none" stroke="{s.color}" stroke-width="1.5"{dash} '
                f'class="{e(s.css_class)}"/>'
            )
    if not drawn:
        out.append(
            f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2 + 14:.1f}" text-anchor="middle" '
            f'{FONT} fill="#999">{e(c.empty_text)}</text>'
        )
    legend = " \u2003".join(
        f'<tspan fill="{s.color}" font-weight="600">{e(s.label)}</tspan>'
        + (f'<tspan fill="#333"> {e(s.latest)}</tspan>' if s.latest else "")
        for s in c.series
    )
    out.append(f'<text x="6" y="28" {FONT} class="legend">{legend}</text>')
    out.append("</svg>")
    return "\n".join(out)
