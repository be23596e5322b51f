"""The monitor's HTML page: fleet table, latency charts as inline SVG, recent events (pure).

Guarantees:

- Output is one self-contained HTML document: inline CSS and SVG (each chart
  styled by its own attributes, so it renders the same saved on its own), no
  JavaScript, nothing fetched from elsewhere (works on an air-gapped site).
  It reloads itself every ``refresh_s`` seconds with a ``<meta>`` refresh.
- Everything that came from a device (ids, model names, error and event
  messages) is HTML-escaped; device text can never become markup.
- Charts are computed here from plain points: at most ``max_points`` drawn
  per line (time bins: mean of p50, max of p99, so a spike survives
  downsampling), the line breaks where a device sent nothing for three of its
  metrics intervals (an outage is a gap, not a straight line), and a dashed
  vertical line marks each version change.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import quote

from converter.monitor.live import DeviceView
from converter.monitor.payloads import DEFAULT_INTERVAL_S, STALE_INTERVALS, shown_model
from converter.monitor.store import LatencyPoint, StoredEvent

P50_COLOR = "#1f77b4"
P99_COLOR = "#d62728"
FONT = 'font-family="sans-serif" font-size="11"'


@dataclass(frozen=True)
class Binned:
    ts: float
    p50_ms: float | None
    p99_ms: float | None


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


def downsample(points: Sequence[LatencyPoint], since: float, until: float, max_points: int) -> list[Binned]:
    """At most ``max_points`` bins over ``[since, until]``: mean p50, max p99, last ts."""
    if len(points) <= max_points or until <= since:
        return [Binned(p.ts, p.p50_ms, p.p99_ms) for p in points]
    width = (until - since) / max_points
    bins: dict[int, list[LatencyPoint]] = {}
    for p in points:
        idx = min(max_points - 1, max(0, int((p.ts - since) / width)))
        bins.setdefault(idx, []).append(p)
    out = []
    for idx in sorted(bins):
        group = bins[idx]
        p50s = [p.p50_ms for p in group if p.p50_ms is not None]
        p99s = [p.p99_ms for p in group if p.p99_ms is not None]
        out.append(Binned(group[-1].ts, sum(p50s) / len(p50s) if p50s else None, max(p99s) if p99s else None))
    return out


def gap_seconds(points: Sequence[LatencyPoint], bin_s: float) -> float:
    """How long a silence breaks the line: ``STALE_INTERVALS`` metrics intervals, at least 2 bins."""
    intervals = sorted(p.interval_s for p in points if p.interval_s)
    interval = intervals[len(intervals) // 2] if intervals else DEFAULT_INTERVAL_S
    return max(STALE_INTERVALS * interval, 2.0 * bin_s)


def svg_path(
    points: Sequence[tuple[float, float | None]],
    x_of: Callable[[float], float],
    y_of: Callable[[float], float],
    gap_s: float,
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


class ScaleFn:
    """Linear map from a data range to a pixel range."""

    def __init__(self, lo: float, hi: float, px_lo: float, px_hi: float) -> None:
        self.lo, self.hi, self.px_lo, self.px_hi = lo, hi, px_lo, px_hi

    def __call__(self, v: float) -> float:
        if self.hi == self.lo:
            return self.px_lo
        return self.px_lo + (v - self.lo) / (self.hi - self.lo) * (self.px_hi - self.px_lo)


def _clock(ts: float) -> str:
    return time.strftime("%H:%M", time.gmtime(ts))


def latency_chart_svg(
    points: Sequence[LatencyPoint],
    *,
    since: float,
    until: float,
    title: str,
    width: int = 640,
    height: int = 180,
    max_points: int = 320,
) -> str:
    """One chart: p50 and p99 (ms) against time (UTC), version changes marked."""
    left, right, top, bottom = 56, 12, 22, 24
    plot_w, plot_h = width - left - right, height - top - bottom
    x_of = ScaleFn(since, until, left, left + plot_w)
    binned = downsample(points, since, until, max_points)
    values = [v for b in binned for v in (b.p50_ms, b.p99_ms) if v is not None]
    y_max = nice_ceiling(max(values)) if values else 1.0
    y_of = ScaleFn(0.0, y_max, top + plot_h, top)
    gap = gap_seconds(points, (until - since) / max(1, max_points))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
        f'<text x="{left}" y="14" {FONT} font-weight="600" fill="#222">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>',
    ]
    for frac in (0.0, 0.5, 1.0):
        y = y_of(y_max * frac)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#eee"/>')
        label = "0" if frac == 0 else format_ms(y_max * frac)
        out.append(
            f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" {FONT} fill="#555">'
            f"{html.escape(label)}</text>"
        )
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        ts = since + (until - since) * frac
        anchor = "start" if frac == 0 else "end" if frac == 1 else "middle"
        out.append(
            f'<text x="{x_of(ts):.1f}" y="{height - 6}" text-anchor="{anchor}" {FONT} fill="#555">'
            f"{_clock(ts)}</text>"
        )
    previous: str | None = None
    for p in points:
        if previous is not None and p.version != previous:
            x = x_of(p.ts)
            out.append(
                f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="#888" '
                'stroke-dasharray="4 3" class="version"/>'
            )
            out.append(
                f'<text x="{x + 3:.1f}" y="{top + 11}" {FONT} fill="#666">v{html.escape(p.version)}</text>'
            )
        previous = p.version
    if not values:
        out.append(
            f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2:.1f}" text-anchor="middle" '
            f'{FONT} fill="#999">no requests in this window</text>'
        )
    for key, color, label in (("p50_ms", P50_COLOR, "p50"), ("p99_ms", P99_COLOR, "p99")):
        d = svg_path([(b.ts, getattr(b, key)) for b in binned], x_of, y_of, gap)
        if d:
            out.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="1.5" class="{label}"/>')
    last = points[-1] if points else None
    legend = [
        f'<tspan fill="{color}">{label}'
        f"{' ' + html.escape(format_ms(getattr(last, key))) if last else ''}</tspan>"
        for key, color, label in (("p50_ms", P50_COLOR, "p50"), ("p99_ms", P99_COLOR, "p99"))
    ]
    out.append(
        f'<text x="{left + plot_w}" y="14" text-anchor="end" {FONT} font-weight="600">'
        + " \u2003".join(legend)
        + "</text>"
    )
    out.append("</svg>")
    return "\n".join(out)


# -- the page -------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.05em;margin:1.4em 0 .4em}
.sub{color:#666;font-size:.9em}
table{border-collapse:collapse;font-size:.86em;background:#fff}
th,td{border-bottom:1px solid #ddd;padding:.25em .6em;text-align:left;white-space:nowrap}
th{background:#eee} td.num{text-align:right;font-variant-numeric:tabular-nums}
.online{color:#1a7f37;font-weight:600} .stale{color:#b58100;font-weight:600}
.offline{color:#c0392b;font-weight:600} .unknown{color:#888}
td.err{white-space:normal;max-width:28em;color:#c0392b}
.charts{display:flex;flex-wrap:wrap;gap:10px}
svg.chart{border:1px solid #ddd}
"""


def _age(now: float, ts: float | None) -> str:
    if ts is None:
        return "-"
    s = max(0.0, now - ts)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    if s < 172800:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.0f} d ago"


def _fmt(value: float | int | None, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value}{unit}"
    return f"{value:.{digits}f}{unit}"


def fleet_rows(devices: Sequence[DeviceView], now: float) -> list[list[tuple[str, str]]]:
    """Table cells ``(css class, text)`` per device (text not yet escaped)."""
    rows = []
    for d in devices:
        st, m = d.state, d.metrics
        first = shown_model(m, st.model if st else None)
        rows.append(
            [
                ("", d.device_id),
                (d.health, d.health),
                ("", (st.status if st else None) or "-"),
                ("", f"{st.model} v{st.version}" if st and st.model else "-"),
                ("num", format_ms(first.p50_ms) if first else "-"),
                ("num", format_ms(first.p99_ms) if first else "-"),
                ("num", _fmt(first.throughput_rps, "/s") if first else "-"),
                ("num", _fmt(first.requests) if first else "-"),
                ("num", _fmt(m.cpu_percent_system, " %") if m else "-"),
                ("num", _fmt(m.temperature_c, " °C") if m else "-"),
                ("num", _fmt(round(m.rss_bytes / 2**20, 1) if m and m.rss_bytes else None, " MiB")),
                (
                    "",
                    "yes" if m and dict(m.throttled).get("throttled") else "no" if m and m.throttled else "-",
                ),
                ("", _age(now, d.last_seen)),
                ("err", (st.error if st else None) or ""),
            ]
        )
    return rows


FLEET_HEADERS = (
    "device",
    "health",
    "status",
    "model",
    "p50",
    "p99",
    "throughput",
    "requests",
    "CPU",
    "temp",
    "RSS",
    "throttled",
    "last seen",
    "error",
)


def render_page(
    *,
    devices: Sequence[DeviceView],
    charts: Sequence[str],
    events: Sequence[StoredEvent],
    now: float,
    window_s: float,
    refresh_s: int = 15,
    charts_omitted: int = 0,
    only_device: str | None = None,
) -> str:
    """The page; ``only_device`` when it shows one device (links keep it)."""
    online = sum(1 for d in devices if d.health == "online")
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{int(refresh_s)}">',
        "<title>litefleet monitor</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>litefleet fleet</h1>",
        f'<div class="sub">{online} of {len(devices)} devices online · '
        f"{e(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(now)))}"
        f" · refreshes every {int(refresh_s)} s</div>",
        "<h2>Devices</h2>",
    ]
    if devices:
        out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in FLEET_HEADERS) + "</tr>")
        for row in fleet_rows(devices, now):
            (_, device_id), rest = row[0], row[1:]
            first = f'<td><a href="?device={quote(device_id, safe="")}">{e(device_id)}</a></td>'
            out.append(
                "<tr>"
                + first
                + "".join(
                    f'<td class="{e(cls)}">{e(text)}</td>' if cls else f"<td>{e(text)}</td>"
                    for cls, text in rest
                )
                + "</tr>"
            )
        out.append("</table>")
    else:
        out.append("<p>No device has reported yet.</p>")
    hours = window_s / 3600
    keep = f"&amp;device={quote(only_device, safe='')}" if only_device else ""
    links = " · ".join(f'<a href="?hours={h}{keep}">{h} h</a>' for h in (1, 6, 24))
    if only_device:
        links += ' · <a href="?">whole fleet</a>'
    out.append(f"<h2>Latency, last {hours:g} h (UTC; {links})</h2>")
    if charts:
        out.append('<div class="charts">' + "\n".join(charts) + "</div>")
        if charts_omitted:
            out.append(
                f'<p class="sub">{charts_omitted} more charts not shown; '
                "pick one with <code>?device=ID</code>.</p>"
            )
    else:
        out.append("<p>No metrics in this window.</p>")
    out.append("<h2>Recent events</h2>")
    if events:
        out.append(
            "<table><tr><th>time (UTC)</th><th>device</th><th>event</th><th>model</th>"
            "<th>reason</th><th>message</th></tr>"
        )
        for ev in events:
            model = f"{ev.model} v{ev.version}" if ev.model and ev.version else ev.model or ""
            cls = ' class="err"' if ev.event in ("rejected", "rolled_back") else ""
            out.append(
                f"<tr><td>{e(time.strftime('%m-%d %H:%M:%S', time.gmtime(ev.ts)))}</td>"
                f"<td>{e(ev.device_id)}</td><td>{e(ev.event)}</td><td>{e(model)}</td>"
                f"<td>{e(ev.reason or '')}</td><td{cls}>{e((ev.message or '')[:300])}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append("<p>No events yet.</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
