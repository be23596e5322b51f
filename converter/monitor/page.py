"""The monitor's HTML page: fleet table, rollouts, sites, charts, recent events (pure).

Guarantees:

- Output is one self-contained HTML document: inline CSS and SVG, no JavaScript,
  nothing fetched from elsewhere, not even a favicon (works on an air-gapped site).
  It reloads itself every ``refresh_s`` seconds with a ``<meta>`` refresh.
- Everything that came from a device or a record (ids, model names, error and event
  messages) is HTML-escaped; device text can never become markup.
- A device's figures of the last interval are shown as *now* only while it is online
  (:attr:`converter.monitor.live.DeviceView.current`). For a stale, offline or unknown
  device the table says so and shows its last metrics in one grey cell, with their
  age ("last metrics 14 min ago: p50 ..."; "last seen" is its last message of any
  kind), never in the columns of current figures.
- The charts (:mod:`converter.monitor.device_charts`,
  :mod:`converter.monitor.rollout_section`) come in as finished markup.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote

from converter.monitor.charts import format_ms
from converter.monitor.history import StoredEvent
from converter.monitor.live import DeviceView
from converter.monitor.payloads import MetricsSample, StateRecord, shown_model
from converter.monitor.sites import SiteView

# the timestamp role is re-signed most often; below this, say so (status warns the same)
EXPIRY_WARN_S = 3 * 86400.0

CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.5em 0 .4em}
h3{font-size:.95em;margin:.9em 0 .3em;font-weight:600}
.sub{color:#666;font-size:.9em}
table{border-collapse:collapse;font-size:.86em;background:#fff}
th,td{border-bottom:1px solid #ddd;padding:.25em .6em;text-align:left;white-space:nowrap}
th{background:#eee} td.num{text-align:right;font-variant-numeric:tabular-nums}
.online{color:#1a7f37;font-weight:600} .stale{color:#b58100;font-weight:600}
.offline{color:#c0392b;font-weight:600} .unknown{color:#888;font-weight:600}
td.was{color:#777;font-style:italic;white-space:normal;max-width:44em}
td.err{white-space:normal;max-width:28em;color:#c0392b}
.banner{background:#fdecea;border:1px solid #e6b0aa;color:#922;padding:.5em .8em;margin:.6em 0}
.warn{color:#b58100;font-weight:600} .bad{color:#c0392b;font-weight:600} .good{color:#1a7f37;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:8px}
.devrow{margin-bottom:.6em}
svg.chart{border:1px solid #ddd;background:#fff}
.rollout{background:#fff;border:1px solid #ddd;padding:.6em .9em;margin:.6em 0}
.waves span{display:inline-block;padding:.1em .5em;margin-right:.3em;border:1px solid #ccc;border-radius:3px}
.waves .done{background:#e6f4ea;border-color:#9ccfa9}
.waves .current{background:#e8f0fe;border-color:#7aa7f0;font-weight:600}
.waves .aborted{background:#fdecea;border-color:#e6b0aa;font-weight:600} .waves .todo{color:#888}
.verdict-pass{color:#1a7f37;font-weight:600} .verdict-fail{color:#c0392b;font-weight:600}
.verdict-wait{color:#b58100;font-weight:600} .verdict-off,.verdict-skip{color:#888}
"""


@dataclass(frozen=True)
class Cell:
    text: str
    cls: str = ""
    span: int = 1


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
# the columns of figures that describe the device now (FLEET_HEADERS[4:12])
NOW_COLUMNS = 8
# inserted after "device" when any device shown is at a site (docs/sites.md)
SITE_HEADER = "site"


def age(now: float, ts: float | None) -> str:
    """``5 s ago``, ``14 min ago``, ``2.5 h ago``, ``3 d ago``."""
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


def _mib(m: MetricsSample | None) -> str:
    return _fmt(round(m.rss_bytes / 2**20, 1) if m and m.rss_bytes else None, " MiB")


HEALTH_WORDS = {
    "stale": "stale: says online but silent",
    "offline": "offline",
    "unknown": "no state received",
}


def last_report(d: DeviceView, now: float) -> str:
    """The grey cell of a device that is not online: what it is, and its last figures
    with their age (by the report's own timestamp)."""
    st, m = d.state, d.metrics
    head = HEALTH_WORDS.get(d.health, d.health)
    if m is None:
        return f"{head} · no metrics received"
    first = shown_model(m, st.model if st else None)
    parts = []
    if first is not None:
        parts += [
            f"p50 {format_ms(first.p50_ms)}",
            f"p99 {format_ms(first.p99_ms)}",
            f"{_fmt(first.throughput_rps, '/s')}",
            f"{_fmt(first.requests)} requests",
        ]
    parts += [f"CPU {_fmt(m.cpu_percent_system, ' %')}", _mib(m)]
    return f"{head} · last metrics {age(now, m.ts)}: " + ", ".join(parts)


def with_site_column(devices: Sequence[DeviceView]) -> bool:
    return any(d.site for d in devices)


def site_cell(d: DeviceView, sites: Mapping[str, SiteView]) -> Cell:
    """The device's site; when that site's uplink to this broker is down, said so: what
    the row shows is then the last the bridge carried before the cut."""
    site = d.site
    if not site:
        return Cell("-")
    view = sites.get(site)
    if view is not None and view.link_up is False:
        return Cell(f"{site} · uplink down", "offline")
    return Cell(site)


def problem_text(st: StateRecord | None) -> str:
    """The error cell: the state's error, else the newer releases the device refused (its
    error clears at its next good refresh; ``refused`` says why it still runs an older one)."""
    if st is None:
        return ""
    if st.error:
        return st.error
    return "; ".join(map(str, st.refused))


def fleet_rows(
    devices: Sequence[DeviceView], now: float, sites: Mapping[str, SiteView] | None = None
) -> list[list[Cell]]:
    """The table's cells per device (text not yet escaped); a device that is not online
    gets one grey cell over the columns of current figures. A site column after the
    device's id when any device is at a site (``sites``: name -> view, for their links)."""
    rows = []
    site_column = with_site_column(devices)
    for d in devices:
        st, m = d.state, d.metrics
        head = [
            Cell(d.device_id),
            *([site_cell(d, sites or {})] if site_column else []),
            Cell(d.health, d.health),
            Cell((st.status if st else None) or "-"),
            Cell(f"{st.model} v{st.version}" if st and st.model else "-"),
        ]
        tail = [Cell(age(now, d.last_seen)), Cell(problem_text(st), "err")]
        if not d.current:
            rows.append([*head, Cell(last_report(d, now), "was", NOW_COLUMNS), *tail])
            continue
        first = shown_model(m, st.model if st else None)
        throttled = "yes" if m and dict(m.throttled).get("throttled") else "no" if m and m.throttled else "-"
        rows.append(
            [
                *head,
                Cell(format_ms(first.p50_ms) if first else "-", "num"),
                Cell(format_ms(first.p99_ms) if first else "-", "num"),
                Cell(_fmt(first.throughput_rps, "/s") if first else "-", "num"),
                Cell(_fmt(first.requests) if first else "-", "num"),
                Cell(_fmt(m.cpu_percent_system, " %") if m else "-", "num"),
                Cell(_fmt(m.temperature_c, " °C") if m else "-", "num"),
                Cell(_mib(m), "num"),
                Cell(throttled),
                *tail,
            ]
        )
    return rows


def _cell(c: Cell) -> str:
    e = html.escape
    attrs = (f' class="{e(c.cls)}"' if c.cls else "") + (f' colspan="{c.span}"' if c.span > 1 else "")
    return f"<td{attrs}>{e(c.text)}</td>"


def fleet_table(
    devices: Sequence[DeviceView], now: float, sites: Sequence[SiteView] = (), only_site: str | None = None
) -> str:
    if not devices:
        if only_site:
            return f"<p>No device of site {html.escape(only_site)} has reported yet.</p>"
        return "<p>No device has reported yet.</p>"
    headers = list(FLEET_HEADERS)
    if with_site_column(devices):
        headers.insert(1, SITE_HEADER)
    out = ['<table class="fleet"><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"]
    by_name = {s.name: s for s in sites}
    for d, row in zip(devices, fleet_rows(devices, now, by_name), strict=True):
        link = f'<td><a href="?device={quote(d.device_id, safe="")}">{html.escape(d.device_id)}</a></td>'
        out.append(f'<tr data-device="{html.escape(d.device_id)}" data-health="{html.escape(d.health)}">')
        out.append(link + "".join(_cell(c) for c in row[1:]) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _days(seconds: float) -> str:
    return f"{seconds / 86400:.1f} d" if abs(seconds) < 10 * 86400 else f"{seconds / 86400:.0f} d"


def expiry_line(expiry: Mapping[str, float], now: float) -> str:
    """The repository's expiry dates, the timestamp first; a warning when near or past."""
    if not expiry:
        return ""
    parts = []
    for role in sorted(expiry, key=lambda r: (r != "timestamp", r)):
        left = expiry[role] - now
        cls = "bad" if left < 0 else "warn" if role == "timestamp" and left < EXPIRY_WARN_S else ""
        text = f"{role} EXPIRED {_days(-left)} ago" if left < 0 else f"{role} expires in {_days(left)}"
        parts.append(f'<span class="{cls}">{html.escape(text)}</span>' if cls else html.escape(text))
    return '<div class="sub expiry">repository: ' + " · ".join(parts) + "</div>"


def sites_table(sites: Sequence[SiteView], now: float) -> str:
    if not sites:
        return ""
    e = html.escape
    out = [
        "<h2>Sites</h2>",
        "<table><tr><th>site</th><th>link</th><th>upstream</th><th>status</th><th>MB down / up</th>"
        "<th>sessions</th><th>failures</th><th>broker restarts</th><th>last error</th></tr>",
    ]
    for s in sites:
        up = s.link_up
        link = ("online", "up") if up else ("offline", "down") if up is False else ("unknown", "?")
        mb = (
            f"{(s.bytes_down or 0) / 1e6:.1f} / {(s.bytes_up or 0) / 1e6:.1f}"
            if s.bytes_down is not None or s.bytes_up is not None
            else "-"
        )
        out.append(
            f'<tr data-site="{e(s.name)}"><td><a href="?site={quote(s.name, safe="")}">{e(s.name)}</a></td>'
            f'<td class="{link[0]}">{link[1]}</td>'
            f'<td>{e(s.upstream or "-")}</td><td>{e(age(now, s.ts))}</td><td class="num">{mb}</td>'
            f'<td class="num">{_fmt(s.sessions)}</td><td class="num">{_fmt(s.failures)}</td>'
            f'<td class="num">{_fmt(s.broker_restarts)}</td><td class="err">{e(s.last_error or "")}</td></tr>'
        )
    out.append("</table>")
    return "\n".join(out)


def events_table(events: Sequence[StoredEvent]) -> str:
    if not events:
        return "<p>No events yet.</p>"
    e = html.escape
    out = [
        "<table><tr><th>time (UTC)</th><th>device</th><th>event</th><th>model</th>"
        "<th>reason</th><th>message</th></tr>"
    ]
    for ev in events:
        model = f"{ev.model} v{ev.version}" if ev.model and ev.version else ev.model or ""
        cls = ' class="err"' if ev.event in ("rejected", "rolled_back") else ""
        out.append(
            f"<tr><td>{e(time.strftime('%m-%d %H:%M:%S', time.gmtime(ev.ts)))}</td>"
            f"<td>{e(ev.device_id)}</td><td{cls}>{e(ev.event)}</td><td>{e(model)}</td>"
            f"<td>{e(ev.reason or '')}</td><td{cls}>{e((ev.message or '')[:300])}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def _summary(devices: Sequence[DeviceView]) -> str:
    counts: dict[str, int] = {}
    for d in devices:
        counts[d.health] = counts.get(d.health, 0) + 1
    text = f"{counts.get('online', 0)} of {len(devices)} devices online"
    for health in ("stale", "offline", "unknown"):
        if counts.get(health):
            word = "without state" if health == "unknown" else health
            text += f' · <span class="{health}">{counts[health]} {word}</span>'
    return text


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
    only_site: str | None = None,
    rollouts: str = "",
    sites: Sequence[SiteView] = (),
    repo_expiry: Mapping[str, float] | None = None,
    broker_connected: bool | None = None,
) -> str:
    """The page; ``only_device`` when it shows one device, ``only_site`` one site's devices
    (links keep either; ``sites``: every site, for the devices' links). ``charts`` are
    the device rows (:func:`converter.monitor.device_charts.device_rows`), ``rollouts``
    the rollout section (:func:`converter.monitor.rollout_section.rollouts_section`)."""
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{int(refresh_s)}">',
        '<link rel="icon" href="data:,">',  # no favicon request either
        "<title>litefleet monitor</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>litefleet fleet</h1>",
        f'<div class="sub">{_summary(devices)} · '
        f"{e(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(now)))}"
        f" · refreshes every {int(refresh_s)} s</div>",
        expiry_line(repo_expiry or {}, now),
    ]
    if broker_connected is False:
        out.append(
            '<div class="banner">This monitor is not connected to the broker: '
            "nothing new arrives, and devices shown online may not be.</div>"
        )
    out.append(rollouts)
    shown = [s for s in sites if only_site in (None, s.name)]
    out += [
        f"<h2>Devices of site {e(only_site)}</h2>" if only_site else "<h2>Devices</h2>",
        fleet_table(devices, now, sites, only_site),
        "" if only_device else sites_table(shown, now),
    ]
    hours = window_s / 3600
    keep = f"&amp;device={quote(only_device, safe='')}" if only_device else ""
    keep += f"&amp;site={quote(only_site, safe='')}" if only_site else ""
    links = " · ".join(f'<a href="?hours={h}{keep}">{h} h</a>' for h in (1, 6, 24))
    if only_device or only_site:
        links += ' · <a href="?">whole fleet</a>'
    out.append(f"<h2>History, last {hours:g} h (UTC; {links})</h2>")
    if charts:
        out.append(
            '<p class="sub">Charts in one column share one scale: latency on a log axis, '
            "throughput, CPU and memory from 0. Grey: the device is not online since its last metrics.</p>"
        )
        out += charts
        if charts_omitted:
            out.append(
                f'<p class="sub">{charts_omitted} more devices not charted; '
                "pick one with <code>?device=ID</code>.</p>"
            )
    else:
        out.append("<p>No metrics in this window.</p>")
    out += ["<h2>Recent events</h2>", events_table(events), "</body></html>"]
    return "\n".join(x for x in out if x) + "\n"
