"""The page as one request builds it: the live snapshot and the history, read once, rendered.

This is the I/O shell around the pure renderers (:mod:`converter.monitor.page`,
:mod:`converter.monitor.device_charts`, :mod:`converter.monitor.rollout_section`).

Guarantees:

- One snapshot of the live view and one read-only history connection per page; the
  collector is never held up.
- At most :data:`MAX_DEVICES_CHARTED` devices get chart rows (the page says how many
  more there are; ``?device=ID`` shows one); ``?hours=`` is clamped to
  ``[0.05, MAX_WINDOW_H]``, anything unparsable is the default hour.
"""

from __future__ import annotations

from typing import Protocol

from converter.monitor.device_charts import DeviceHistory, device_rows
from converter.monitor.history import StoreReader
from converter.monitor.live import FleetSnapshot
from converter.monitor.page import render_page
from converter.monitor.rollout_section import SHOWN_EVENTS, RolloutPanel, rollouts_section
from converter.monitor.rollouts import devices_per_version
from converter.monitor.store import MonitorStore

MAX_DEVICES_CHARTED = 30
MAX_WINDOW_H = 24 * 31
RECENT_EVENTS = 50


class MonitorSource(Protocol):
    """What the page reads: the live view and the history file."""

    store: MonitorStore

    def snapshot(self) -> FleetSnapshot: ...


def window_hours(query: dict[str, list[str]]) -> float:
    try:
        hours = float(query.get("hours", ["1"])[0])
    except ValueError:
        return 1.0
    return min(max(hours, 0.05), MAX_WINDOW_H) if hours == hours else 1.0


def rollout_panels(snap: FleetSnapshot, r: StoreReader) -> list[RolloutPanel]:
    states = [d.state for d in snap.devices if d.state is not None]
    online = frozenset(d.device_id for d in snap.devices if d.health == "online")
    return [
        RolloutPanel(
            record=rec,
            per_version=devices_per_version(states, rec.name),
            online=online,
            gate_history=r.gate_series(rec.name, rec.version),
            steps=r.rollout_steps(rec.name, rec.version),
            event_devices=r.version_event_devices(rec.name, rec.version),
            events=r.version_events(rec.name, rec.version, SHOWN_EVENTS),
        )
        for rec in snap.rollouts
    ]


def _histories(
    snap: FleetSnapshot, r: StoreReader, since: float, only: str | None, among: set[str] | None = None
) -> tuple[list[DeviceHistory], int]:
    pairs = r.charted_models(since, 1_000_000, device_id=only)
    by_device: dict[str, list[str]] = {}
    for device_id, model in pairs:
        if among is None or device_id in among:
            by_device.setdefault(device_id, []).append(model)
    ids = sorted(by_device)
    out = [
        DeviceHistory(
            device_id=device_id,
            view=snap.device(device_id),
            models=tuple((m, tuple(r.latency_series(device_id, m, since))) for m in by_device[device_id]),
            points=tuple(r.device_series(device_id, since)),
        )
        for device_id in ids[:MAX_DEVICES_CHARTED]
    ]
    return out, max(0, len(ids) - MAX_DEVICES_CHARTED)


def build_page(source: MonitorSource, query: dict[str, list[str]], now: float) -> str:
    hours = window_hours(query)
    only = query.get("device", [None])[0]
    site = None if only else query.get("site", [None])[0] or None  # one device wins over one site
    since = now - hours * 3600
    snap = source.snapshot()
    devices = [d for d in snap.devices if only is None or d.device_id == only]
    among = None
    if site is not None:
        devices = [d for d in devices if d.site == site]
        among = {d.device_id for d in devices}
    with source.store.reader() as r:
        histories, omitted = _histories(snap, r, since, only, among)
        panels = rollout_panels(snap, r) if only is None and site is None else []
        events = r.recent_events(RECENT_EVENTS, device_id=only, device_ids=among)
    return render_page(
        devices=devices,
        charts=device_rows(histories, since, now, now),
        events=events,
        now=now,
        window_s=hours * 3600,
        charts_omitted=omitted,
        only_device=only,
        only_site=site,
        rollouts=rollouts_section(panels, now),
        sites=snap.sites,
        repo_expiry=snap.repo_expiry,
        broker_connected=snap.stats.broker_connected,
    )
