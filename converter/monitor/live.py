"""The fleet as the monitor sees it right now: the latest state and metrics per device.

Guarantees:

- :class:`FleetLive` is updated by the collector's writer thread only
  (:meth:`FleetLive.apply`) and read from any thread through
  :meth:`FleetLive.snapshot`, which returns immutable data; one lock guards
  the swap, nothing slow happens under it.
- A device's metrics are replaced only by a newer message
  (:func:`converter.monitor.payloads.is_newer`): a duplicate or a replayed
  message from before an outage goes to the history, never back into "now".
- ``last_seen`` is the collector's clock when the device's last live message
  arrived; a retained state delivered at subscribe time counts with its own
  ``ts`` (the device's clock) instead, so a device that went away a week ago
  does not look freshly seen when the monitor starts.
- A device's figures of the last interval (latency, throughput, CPU, ...) are
  *current* only while its health is ``online`` (:attr:`DeviceView.current`); for
  a stale or offline device they are its last report, shown with their age or
  not at all, never as "now".
- Besides devices it holds what the host side publishes: the newest rollout record
  per model (:mod:`converter.monitor.rollouts`), each site's status
  (:mod:`converter.monitor.sites`), the expiry of the retained repository metadata
  (:mod:`converter.monitor.repo_expiry`), and counts of the events stored, by
  device, event and reason (an event received again is not counted again).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from agent.reasons import Reason, SkipReason
from converter.monitor.payloads import (
    EVENT_KINDS,
    EventRecord,
    Malformed,
    MetricsSample,
    StateCleared,
    StateRecord,
    device_health,
    is_newer,
)
from converter.monitor.repo_expiry import RepoExpiry
from converter.monitor.rollouts import RolloutCleared, RolloutView
from converter.monitor.sites import SiteView, apply_site_message
from converter.monitor.store import Received, WriteResult

# (device, event, reason) of an event: the key of litefleet_device_events_total
EventKey = tuple[str, str, str]


@dataclass(frozen=True)
class DeviceView:
    device_id: str
    state: StateRecord | None
    metrics: MetricsSample | None
    last_seen: float | None
    health: str

    @property
    def current(self) -> bool:
        """Whether the figures of its newest metrics message describe the device now."""
        return self.health == "online"

    @property
    def site(self) -> str | None:
        """Its site as its state says, else as its newest metrics do (a device whose
        state has not crossed yet); None: central's, or not known."""
        if self.state is not None and self.state.site:
            return self.state.site
        return self.metrics.uplink_site if self.metrics is not None else None


@dataclass(frozen=True)
class CollectorStats:
    """The collector's own counters (exported as ``litefleet_monitor_*``)."""

    received: Mapping[str, int] = field(default_factory=dict)  # by kind: state/events/metrics
    stored_samples: int = 0
    stored_events: int = 0
    duplicates: Mapping[str, int] = field(default_factory=dict)  # by kind
    malformed: Mapping[str, int] = field(default_factory=dict)  # by kind
    too_old: int = 0
    dropped: int = 0
    write_errors: int = 0
    queue_depth: int = 0
    started: float = 0.0
    broker_connected: bool = False


@dataclass(frozen=True)
class FleetSnapshot:
    devices: tuple[DeviceView, ...]
    stats: CollectorStats
    rollouts: tuple[RolloutView, ...] = ()
    sites: tuple[SiteView, ...] = ()
    # role -> unix time its newest retained metadata expires
    repo_expiry: Mapping[str, float] = field(default_factory=dict)
    events: Mapping[EventKey, int] = field(default_factory=dict)

    def device(self, device_id: str) -> DeviceView | None:
        for d in self.devices:
            if d.device_id == device_id:
                return d
        return None

    @property
    def online_count(self) -> int:
        return sum(1 for d in self.devices if d.health == "online")


@dataclass
class _Device:
    state: StateRecord | None = None
    metrics: MetricsSample | None = None
    last_seen: float | None = None


class FleetLive:
    """Latest view of every device plus the collector's counters."""

    def __init__(self, started: float) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, _Device] = {}
        self._received: dict[str, int] = {}
        self._duplicates: dict[str, int] = {}
        self._malformed: dict[str, int] = {}
        self._stored_samples = 0
        self._stored_events = 0
        self._too_old = 0
        self._write_errors = 0
        self._started = started
        self._rollouts: dict[str, RolloutView] = {}
        self._sites: dict[str, SiteView] = {}
        self._expiry = RepoExpiry()
        self._events: dict[EventKey, int] = {}

    # -- writer thread --------------------------------------------------------------
    def apply(self, batch: Iterable[tuple[Received, bool]]) -> None:
        """Take a batch of ``(message, retained)`` (writer thread)."""
        with self._lock:
            for item, retained in batch:
                self._apply_one(item, retained)

    def _apply_one(self, item: Received, retained: bool) -> None:
        p = item.parsed
        kind = _kind(p)
        self._received[kind] = self._received.get(kind, 0) + 1
        if isinstance(p, Malformed):
            self._malformed[p.kind] = self._malformed.get(p.kind, 0) + 1
            return
        if isinstance(p, StateCleared):
            self._devices.pop(p.device_id, None)
            return
        if isinstance(p, RolloutView):  # the collector hands these to apply_rollouts
            return
        dev = self._devices.setdefault(p.device_id, _Device())
        seen: float | None = item.received
        if isinstance(p, StateRecord):
            dev.state = p
            if retained:
                seen = p.ts
        elif isinstance(p, MetricsSample):
            latest = (dev.metrics.seq, dev.metrics.ts) if dev.metrics is not None else None
            if is_newer(latest, p.seq, p.ts):
                dev.metrics = p
        if seen is not None and (dev.last_seen is None or seen > dev.last_seen):
            dev.last_seen = seen

    def apply_rollouts(self, records: Iterable[RolloutView | RolloutCleared | Malformed]) -> None:
        """Take parsed rollout records (writer thread); a record only replaces an older one."""
        with self._lock:
            for r in records:
                self._received["rollouts"] = self._received.get("rollouts", 0) + 1
                if isinstance(r, Malformed):
                    self._malformed["rollouts"] = self._malformed.get("rollouts", 0) + 1
                elif isinstance(r, RolloutCleared):
                    self._rollouts.pop(r.name, None)
                elif _newer_record(self._rollouts.get(r.name), r):
                    self._rollouts[r.name] = r

    def apply_site(self, name: str, leaf: str, payload: bytes) -> None:
        """Take one retained ``sites/<name>/<leaf>`` message (writer thread)."""
        with self._lock:
            self._received["sites"] = self._received.get("sites", 0) + 1
            got = apply_site_message(self._sites.get(name), name, leaf, payload)
            if got is None:
                self._sites.pop(name, None)
            elif isinstance(got, Malformed):
                self._malformed["sites"] = self._malformed.get("sites", 0) + 1
            else:
                self._sites[name] = got

    def apply_metadata(self, filename: str, payload: bytes) -> None:
        """Take one retained repository metadata message (writer thread)."""
        with self._lock:
            self._received["metadata"] = self._received.get("metadata", 0) + 1
            self._expiry.apply(filename, payload)

    def count_events(self, events: Iterable[EventRecord]) -> None:
        """Count events as stored (writer thread): the store says which ones were new."""
        with self._lock:
            for ev in events:
                key = event_key(ev)
                self._events[key] = self._events.get(key, 0) + 1

    def count_written(self, result: WriteResult) -> None:
        with self._lock:
            self._stored_samples += result.samples
            self._stored_events += result.events
            self._too_old += result.too_old
            # only metrics and events can be duplicates (a state simply replaces the last)
            for kind, n in (("metrics", result.duplicate_samples), ("events", result.duplicate_events)):
                if n:
                    self._duplicates[kind] = self._duplicates.get(kind, 0) + n

    def count_write_error(self) -> None:
        with self._lock:
            self._write_errors += 1

    def state_of(self, device_id: str) -> StateRecord | None:
        """The device's current state (the collector merges a will with it)."""
        with self._lock:
            dev = self._devices.get(device_id)
            return dev.state if dev is not None else None

    # -- any thread -------------------------------------------------------------------
    def snapshot(
        self, now: float, *, queue_depth: int = 0, dropped: int = 0, broker_connected: bool = False
    ) -> FleetSnapshot:
        with self._lock:
            devices = tuple(
                DeviceView(
                    device_id=k,
                    state=d.state,
                    metrics=d.metrics,
                    last_seen=d.last_seen,
                    health=device_health(
                        d.state.online if d.state else None,
                        d.last_seen,
                        d.metrics.interval_s if d.metrics else None,
                        now,
                    ),
                )
                for k, d in sorted(self._devices.items())
            )
            stats = CollectorStats(
                received=MappingProxyType(dict(self._received)),
                stored_samples=self._stored_samples,
                stored_events=self._stored_events,
                duplicates=MappingProxyType(dict(self._duplicates)),
                malformed=MappingProxyType(dict(self._malformed)),
                too_old=self._too_old,
                dropped=dropped,
                write_errors=self._write_errors,
                queue_depth=queue_depth,
                started=self._started,
                broker_connected=broker_connected,
            )
            return FleetSnapshot(
                devices=devices,
                stats=stats,
                rollouts=tuple(v for _, v in sorted(self._rollouts.items())),
                sites=tuple(v for _, v in sorted(self._sites.items())),
                repo_expiry=MappingProxyType(dict(self._expiry.by_role())),
                events=MappingProxyType(dict(self._events)),
            )


def event_key(ev: EventRecord) -> EventKey:
    """``(device, event, reason)`` with the words bounded to the protocol's vocabularies
    (docs/protocol.md 6.2, 6.3): anything else is ``other``, so a device cannot make
    the label sets grow without bound."""
    kind = ev.event if ev.event in EVENT_KINDS else "other"
    reason = "" if not ev.reason else ev.reason if ev.reason in REASON_WORDS else "other"
    return ev.device_id, kind, reason


def _newer_record(old: RolloutView | None, new: RolloutView) -> bool:
    """A rollout record replaces the shown one unless it is older (the same version
    updated earlier: a redelivery after a newer one)."""
    if old is None or old.version != new.version:
        return True
    return (new.updated or 0.0) >= (old.updated or 0.0)


def _kind(p: object) -> str:
    if isinstance(p, MetricsSample):
        return "metrics"
    if isinstance(p, EventRecord):
        return "events"
    if isinstance(p, StateRecord | StateCleared):
        return "state"
    if isinstance(p, Malformed):
        return p.kind
    return "other"


REASON_WORDS = frozenset({*(r.value for r in Reason), *(r.value for r in SkipReason)})
