"""The page's rollout view: one panel per model with a rollout record (pure).

Each panel shows what the controller's newest record says (state, version and
previous version, waves with the current one marked, device counts, every gate of the
current wave with its value, rule and verdict, the reason of a hold or an abort), what
the devices say (how many run each version, from their retained state), the gates'
values over the rollout as charts with their threshold, and the events devices sent
about the new version (a ``rejected`` or ``rolled_back`` is in red).

Guarantees:

- Every text from a record or an event is HTML-escaped.
- Gate charts run from the rollout's start to now (to its last record once it ended);
  each wave change is a dashed vertical line, each threshold a dashed red line.
  Each gate has its own axis: gates measure different things and are not compared.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from converter.monitor.charts import Chart, Series, linear_axis, render_chart
from converter.monitor.history import GatePoint, RolloutStep, StoredEvent
from converter.monitor.page import age, events_table
from converter.monitor.rollouts import GateReading, RolloutView

STATE_CLASS = {
    "promoted": "good",
    "aborted": "bad",
    "aborting": "bad",
    "holding": "warn",
    "paused": "warn",
}
BAD_EVENTS = ("rejected", "rolled_back")
SHOWN_EVENTS = 12
# a running rollout's record older than this gets a warning (a bake is minutes long and the
# controller rewrites the record while gates move; a quiet wave may still be waiting)
CONTROLLER_SILENT_S = 300.0
GATE_COLOR = "#1f77b4"


@dataclass(frozen=True)
class RolloutPanel:
    """Everything one model's panel shows."""

    record: RolloutView
    per_version: Mapping[str, Sequence[str]]  # version -> devices that run it (retained state)
    online: frozenset[str] = frozenset()
    gate_history: Sequence[GatePoint] = ()
    steps: Sequence[RolloutStep] = ()
    event_devices: Mapping[str, int] = field(default_factory=dict)  # event -> devices, new version
    events: Sequence[StoredEvent] = ()


def fmt_value(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _waves(r: RolloutView) -> str:
    spans = []
    for i, pct in enumerate(r.waves):
        if r.state == "promoted" or i < r.wave:
            cls = "done"
        elif i == r.wave:
            cls = "aborted" if r.state in ("aborted", "aborting") else "current"
        else:
            cls = "todo"
        spans.append(f'<span class="{cls}">{pct} %</span>')
    return '<div class="waves">waves: ' + "→ ".join(spans) + "</div>"


def _devices_word(n: int) -> str:
    return f"{n} device" if n == 1 else f"{n} devices"


def _devices(p: RolloutPanel) -> str:
    r, e = p.record, html.escape
    counts = [
        f"{n} {word}"
        for n, word in (
            (r.canary_devices, "canary"),
            (r.control_devices, "control"),
            (len(r.selected), "selected by the wave"),
            (r.known_devices, "known"),
        )
        if n is not None
    ]
    out = [f"<div>rollout record: {e(' · '.join(counts))}</div>"]
    parts = []
    for version, ids in p.per_version.items():
        role = " (new)" if version == r.version else " (previous)" if version == r.previous else ""
        online = sum(1 for d in ids if d in p.online)
        shown = ", ".join(ids[:8]) + (f", … {len(ids) - 8} more" if len(ids) > 8 else "")
        parts.append(
            f'<li data-version="{e(version)}"><b>v{e(version)}{e(role)}</b>: {_devices_word(len(ids))} '
            f"({online} online): {e(shown)}</li>"
        )
    out.append(
        '<div>devices by the version they run (their retained state):</div><ul class="versions">'
        + ("".join(parts) or "<li>none reported yet</li>")
        + "</ul>"
    )
    return "\n".join(out)


def _gate_row(g: GateReading) -> str:
    e = html.escape
    rule = f"{g.op} {g.threshold:g}" if g.op and g.threshold is not None else "-"
    return (
        f'<tr data-gate="{e(g.name)}"><td>{e(g.name)}</td><td class="num value">{e(fmt_value(g.value))}</td>'
        f'<td class="rule">{e(rule)}</td><td class="verdict-{e(g.verdict)}">{e(g.verdict)}</td>'
        f'<td class="num">{"-" if g.samples is None else g.samples}</td><td>{e(g.detail or "")}</td></tr>'
    )


def _gate_table(r: RolloutView) -> str:
    if not r.gates:
        return "<p>No gate values yet.</p>"
    return (
        '<table class="gates"><tr><th>gate</th><th>value</th><th>rule</th><th>verdict</th>'
        "<th>samples</th><th>detail</th></tr>" + "".join(_gate_row(g) for g in r.gates) + "</table>"
    )


def _wave_marks(steps: Sequence[RolloutStep]) -> tuple[tuple[float, str], ...]:
    out, previous = [], None
    for s in steps:
        if previous is not None and s.wave != previous:
            pct = s.waves[s.wave] if s.wave < len(s.waves) else s.canary_pct
            out.append((s.ts, f"{pct} %"))
        previous = s.wave
    return tuple(out)


def gate_charts(p: RolloutPanel, now: float) -> list[str]:
    r = p.record
    since = r.started or min((g.ts for g in p.gate_history), default=now - 600)
    until = (r.updated or now) if r.terminal else now
    until = max(until, since + 60)
    marks = _wave_marks(p.steps)
    charts = []
    for g in r.gates:
        pts = [(x.ts, x.value) for x in p.gate_history if x.gate == g.name]
        if not any(v is not None for _, v in pts):
            continue
        values = [v for _, v in pts if v is not None] + ([g.threshold] if g.threshold is not None else [])
        rule = f"{g.op} {g.threshold:g}" if g.op and g.threshold is not None else ""
        chart = Chart(
            kind="gate",
            title=g.name,
            since=since,
            until=until,
            axis=linear_axis(values, lambda v: f"{v:.3g}"),
            series=(Series("value", GATE_COLOR, tuple(pts), f"{fmt_value(g.value)} ({g.verdict})", "gate"),),
            gap_s=max(until - since, 1.0),  # a gate's line has no outages: the controller reports it
            markers=marks,
            hlines=((g.threshold, rule),) if g.threshold is not None else (),
            extra={"model": r.name, "gate": g.name},
        )
        charts.append(render_chart(chart))
    return charts


def _events(p: RolloutPanel) -> str:
    r, e = p.record, html.escape
    counts = ", ".join(
        f'<span class="{"bad" if k in BAD_EVENTS else ""}">{e(k)} on {_devices_word(n)}</span>'
        for k, n in sorted(p.event_devices.items())
    )
    head = f"<h3>Events about v{e(r.version)}</h3><div>{counts or 'none yet'}</div>"
    return head + (events_table(p.events) if p.events else "")


def _bake(r: RolloutView, now: float) -> str:
    """`` · this wave for 4 min of a 10 min bake`` while a wave bakes."""
    if r.terminal or r.wave_started is None or r.bake_s is None:
        return ""
    return f" · this wave for {_minutes(now - r.wave_started)} of a {_minutes(r.bake_s)} bake"


def _silent(r: RolloutView, now: float) -> str:
    """A warning when a running rollout's record has not moved for a while: the controller
    writes it at least on every change and every few seconds while gates move."""
    if r.terminal or r.updated is None or now - r.updated < CONTROLLER_SILENT_S:
        return ""
    return ' <span class="warn">(nothing new from the controller: is it running?)</span>'


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def rollout_panel(p: RolloutPanel, now: float) -> str:
    r, e = p.record, html.escape
    state_cls = STATE_CLASS.get(r.state, "")
    prev = f"v{e(r.previous)} → " if r.previous else ""
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(r.started)) if r.started else "-"
    out = [
        f'<div class="rollout" data-model="{e(r.name)}" data-state="{e(r.state)}">',
        f'<h3>{e(r.name)}: {prev}v{e(r.version)} · <span class="state {state_cls}">{e(r.state)}</span>'
        f" · wave {r.wave + 1} of {len(r.waves)}"
        + (f" ({r.canary_pct} %)" if r.canary_pct is not None else "")
        + (f" · target {e(r.target)}" if r.target else "")
        + "</h3>",
        f'<div class="sub">started {e(started)}{e(_bake(r, now))} · '
        f"record updated {e(age(now, r.updated))}{_silent(r, now)}</div>",
        _waves(r),
    ]
    if r.reason:
        cls = "bad" if r.state in ("aborted", "aborting") else "warn"
        out.append(f'<div class="{cls} reason">{e(r.reason)}</div>')
    out += [_devices(p), _gate_table(r)]
    charts = gate_charts(p, now)
    if charts:
        out.append('<div class="charts">' + "\n".join(charts) + "</div>")
    out += [_events(p), "</div>"]
    return "\n".join(out)


def rollouts_section(panels: Sequence[RolloutPanel], now: float) -> str:
    """The ``Rollouts`` section, active rollouts first; empty without records."""
    if not panels:
        return ""
    ordered = sorted(panels, key=lambda p: (p.record.terminal, p.record.name))
    return "<h2>Rollouts</h2>\n" + "\n".join(rollout_panel(p, now) for p in ordered)
