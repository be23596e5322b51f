"""What the fleet did with one model during a wave: devices, events and windowed counters.

:class:`FleetObserver` is fed the parsed device messages (state, events, metrics) of the
broker, in arrival order, and answers :meth:`FleetObserver.evidence`: the canary and
control sides of the current window, ready for :func:`converter.rollout.gates.evaluate`.
It touches no socket, file or clock (``now`` comes in with each call); one thread (the
controller's) owns it.

Windows: the counters of a metrics message are cumulative since the version was loaded,
so each (device, boot, version) is differenced against a baseline: its last message
before the window started, zero when the same agent process reported earlier without
this version (it was loaded since), else its first message in the window (what came
before is unknown and not counted). A counter that goes down is a restart (no ``boot``
in the message) and the counts earned so far are kept; with a ``boot``, it is junk.

Guarantees:

* a message that is malformed, whose sketch or shadow counts are unusable, whose latency
  buckets are not the agent's, or whose counters go backwards or jump by more than
  :data:`ABSURD_STEP`, is ignored for the verdict (its usable parts aside: a junk sketch
  does not spoil the latency of the same message) and counted per device in
  :attr:`FleetObserver.ignored`; nothing a device sends can raise here;
* canary devices are those the wave's rule selects that report the new version active
  in their retained state; control devices are those of the rollout's target the rule
  does not select that report the previous version active;
* only refusals for a reason :data:`agent.reasons.PERMANENT` counts (the release itself
  is bad) and rollbacks of the new version count for ``health``; a download that failed
  for a transient reason is retried by the device and does not count.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from agent.protocol import Rollout
from agent.reasons import PERMANENT, parse_reason
from agent.serving.stats import N_BUCKETS, bucket_bounds_ns
from converter.monitor.payloads import (
    EventRecord,
    Malformed,
    MetricsSample,
    ModelSample,
    Parsed,
    StateCleared,
    StateRecord,
)
from converter.monitor.sketches import OutputSketch, ShadowCounts, SketchKind
from converter.rollout.gates import Evidence, SelfLatency, SideStats, p99_ms, sketch_counts

# a single message adding more than this to a counter is not a real device's traffic
ABSURD_STEP = 10**9
# the agent's latency buckets by their upper bound in ms (None: the open last bucket)
_BUCKET_OF: dict[float | None, int] = {
    (None if bucket_bounds_ns(i)[1] == float("inf") else bucket_bounds_ns(i)[1] / 1e6): i
    for i in range(N_BUCKETS)
}
MAX_EVENTS_KEPT = 64


class JunkError(ValueError):
    """A message part that cannot be used for the verdict."""


@dataclass(frozen=True)
class Counters:
    """Cumulative (or windowed) counters of one version on one device."""

    ok: int = 0
    errors: int = 0
    latency: tuple[tuple[int, int], ...] = ()  # (bucket index, count), sparse
    kind: SketchKind | None = None
    outputs: tuple[tuple[Any, int], ...] = ()
    compared: int = 0
    agreed: int = 0

    def minus(self, base: Counters) -> Counters:
        """``self - base``; JunkError if any counter went down (a reset or junk)."""
        kind = self.kind or base.kind
        if self.kind is not None and base.kind is not None and self.kind is not base.kind:
            raise JunkError("the sketch changed kind")
        out = Counters(
            ok=self.ok - base.ok,
            errors=self.errors - base.errors,
            latency=_sub(self.latency, base.latency),
            kind=kind,
            outputs=_sub(self.outputs, base.outputs),
            compared=self.compared - base.compared,
            agreed=self.agreed - base.agreed,
        )
        if min(out.ok, out.errors, out.compared, out.agreed) < 0:
            raise JunkError("a counter went down")
        return out

    def plus(self, other: Counters) -> Counters:
        return Counters(
            ok=self.ok + other.ok,
            errors=self.errors + other.errors,
            latency=_add(self.latency, other.latency),
            kind=self.kind or other.kind,
            outputs=_add(self.outputs, other.outputs),
            compared=self.compared + other.compared,
            agreed=self.agreed + other.agreed,
        )

    def largest(self) -> int:
        return max(
            [
                self.ok,
                self.errors,
                self.compared,
                *(c for _, c in self.latency),
                *(c for _, c in self.outputs),
            ]
        )


ZERO = Counters()


def _sub(a: tuple[tuple[Any, int], ...], b: tuple[tuple[Any, int], ...]) -> tuple[tuple[Any, int], ...]:
    left = dict(a)
    for key, n in b:
        left[key] = left.get(key, 0) - n
    if any(v < 0 for v in left.values()):
        raise JunkError("a histogram bucket went down")
    return tuple(sorted(((k, v) for k, v in left.items() if v), key=_order))


def _add(a: tuple[tuple[Any, int], ...], b: tuple[tuple[Any, int], ...]) -> tuple[tuple[Any, int], ...]:
    total: Counter[Any] = Counter(dict(a))
    total.update(dict(b))
    return tuple(sorted(((k, v) for k, v in total.items() if v), key=_order))


def _order(item: tuple[Any, int]) -> tuple[int, float]:
    key = item[0]
    return (1, 0.0) if key is None else (0, float(key))


def counters_of(entry: ModelSample, fallback: Counters | None) -> Counters:
    """The cumulative counters of a model entry. A missing or unusable sketch or shadow
    keeps ``fallback``'s (the last good ones); unknown latency buckets raise JunkError."""
    latency: list[tuple[int, int]] = []
    for upper, n in entry.histogram_ms:
        index = _BUCKET_OF.get(upper)
        if index is None:
            raise JunkError("latency buckets are not the agent's")
        latency.append((index, n))
    base = fallback or ZERO
    out: OutputSketch | None = entry.outputs
    shadow: ShadowCounts | None = (
        entry.shadow if entry.shadow is not None and entry.shadow.off is None else None
    )
    return Counters(
        ok=entry.ok or 0,
        errors=entry.errors or 0,
        latency=tuple(sorted(latency)),
        kind=out.kind if out is not None else base.kind,
        outputs=tuple(sorted(sketch_counts(out).items(), key=_order)) if out is not None else base.outputs,
        compared=shadow.compared if shadow is not None else base.compared,
        agreed=shadow.agreed if shadow is not None else base.agreed,
    )


@dataclass
class _Device:
    groups: tuple[str, ...] = ()
    online: bool = False
    active: str | None = None  # the version of this model its state reports


@dataclass
class _Series:
    """One (device, boot, version): last cumulative counters and the window's share."""

    last: Counters
    base: Counters
    banked: Counters = field(default_factory=Counters)
    # latency counts from here (None: the latency window has not started)
    lat_base: tuple[tuple[int, int], ...] | None = None

    def window(self) -> Counters:
        """The window's counts; latency only from the latency window's start."""
        try:
            counts = self.banked.plus(self.last.minus(self.base))
        except JunkError:
            counts = self.banked
        latency: tuple[tuple[int, int], ...] = ()
        if self.lat_base is not None:
            try:
                latency = _sub(self.last.latency, self.lat_base)
            except JunkError:
                latency = ()
        return replace(counts, latency=latency)


class FleetObserver:
    """Follows one model's rollout. Owned by the controller's thread."""

    def __init__(self, model: str, version: int, previous: int, target: str) -> None:
        self.model = model
        self.version = str(version)
        self.previous = str(previous)
        self.target = Rollout(target, 100)
        self.devices: dict[str, _Device] = {}
        self._series: dict[tuple[str, str, str], _Series] = {}
        # device -> its series keys (boot, version), in the order first seen
        self._keys: dict[str, list[tuple[str, str]]] = {}
        self._boots: set[tuple[str, str]] = set()
        self._seen_events: set[tuple[str, str, int | None, float]] = set()
        self.bad_events: list[str] = []
        self.ignored: Counter[str] = Counter()
        self.self_before: dict[str, tuple[float, int]] = {}
        self._latency_started = False

    # -- feeding ---------------------------------------------------------------------------
    def on_message(self, msg: Parsed) -> None:
        """Fold in any parsed device message (a malformed metrics message counts as junk)."""
        if isinstance(msg, StateRecord | StateCleared):
            self.on_state(msg)
        elif isinstance(msg, EventRecord):
            self.on_event(msg)
        elif isinstance(msg, MetricsSample):
            self.on_metrics(msg)
        elif isinstance(msg, Malformed) and msg.kind == "metrics":
            self.ignore(msg.device_id)

    def on_state(self, msg: StateRecord | StateCleared) -> None:
        if isinstance(msg, StateCleared):
            self.devices.pop(msg.device_id, None)
            return
        mine = next((m for m in msg.models if m.name == self.model), None)
        self.devices[msg.device_id] = _Device(msg.groups, msg.online, mine.version if mine else None)

    def on_event(self, ev: EventRecord) -> None:
        if ev.model != self.model or ev.version != self.version:
            return
        key = (ev.device_id, ev.boot, ev.seq, ev.ts)
        if key in self._seen_events:
            return  # a QoS 1 duplicate
        self._seen_events.add(key)
        bad = ev.event == "rolled_back" or (ev.event == "rejected" and parse_reason(ev.reason) in PERMANENT)
        if bad and len(self.bad_events) < MAX_EVENTS_KEPT:
            self.bad_events.append(f"{ev.device_id}: {ev.event} ({ev.reason or 'no reason'})")

    def ignore(self, device_id: str) -> None:
        self.ignored[device_id] += 1

    def on_metrics(self, sample: MetricsSample) -> None:
        boot = sample.boot or ""
        mine = [m for m in sample.models if m.name == self.model]
        junk = False
        for entry in mine:
            junk |= bool(entry.junk)
            junk |= not self._take(sample.device_id, boot, entry)
        self._boots.add((sample.device_id, boot))
        self._note_before(sample.device_id)
        if junk:
            self.ignore(sample.device_id)

    def _take(self, device_id: str, boot: str, entry: ModelSample) -> bool:
        """Fold one entry in; False when (part of) it was junk."""
        key = (device_id, boot, entry.version)
        series = self._series.get(key)
        try:
            now = counters_of(entry, series.last if series else None)
            if now.largest() > ABSURD_STEP * 1000:
                raise JunkError("absurd counts")
        except JunkError:
            return False
        if series is None:
            known = (device_id, boot) in self._boots
            # once latency is measured, a new series' first report is not: it holds the
            # first requests after a load (slower, and on a shared host, neighbours loading)
            lat_base = now.latency if self._latency_started else None
            self._series[key] = _Series(last=now, base=ZERO if known else now, lat_base=lat_base)
            self._keys.setdefault(device_id, []).append((boot, entry.version))
            return True
        try:
            step = now.minus(series.last)
        except JunkError:
            if boot:  # the same agent process cannot count backwards
                return False
            # no boot id: an agent restart; keep what this window earned so far
            series.banked, series.base, series.last = series.window(), ZERO, now
            if series.lat_base is not None:
                series.lat_base = now.latency
            return True
        if step.largest() > ABSURD_STEP:
            return False
        series.last = now
        return True

    def _note_before(self, device_id: str) -> None:
        """When a device first shows the new version, remember the previous version's p99 there."""
        if device_id in self.self_before:
            return
        keys = self._keys.get(device_id, [])
        if not any(v == self.version for _, v in keys):
            return
        old = [self._series[(device_id, b, v)].last for b, v in keys if v == self.previous]
        if old:
            counts = _dense(old[-1].latency)
            p99 = p99_ms(counts)
            if p99 is not None:
                self.self_before[device_id] = (p99, sum(counts))

    def reported(self, device_id: str, version: str) -> bool:
        """Whether ``device_id`` has sent metrics of ``version`` of this model."""
        return any(v == version for _, v in self._keys.get(device_id, []))

    # -- windows ---------------------------------------------------------------------------
    def start_window(self) -> None:
        """A new wave (or a resumed one): count from here on; latency not yet."""
        self._latency_started = False
        for series in self._series.values():
            series.base, series.banked, series.lat_base = series.last, ZERO, None

    def start_latency_window(self) -> None:
        """Count latency from here on (the controller calls it once the wave has settled)."""
        if self._latency_started:
            return
        self._latency_started = True
        for series in self._series.values():
            series.lat_base = series.last.latency

    def selected(self, rule: Rollout) -> list[str]:
        """Known devices the rule selects, by id."""
        return sorted(d for d, info in self.devices.items() if rule.selects(d, info.groups, self.model))

    def roles(self, rule: Rollout) -> tuple[list[str], list[str]]:
        """(canary, control) device ids under the wave's ``rule``."""
        canary, control = [], []
        for d, info in sorted(self.devices.items()):
            if rule.selects(d, info.groups, self.model):
                if info.active == self.version:
                    canary.append(d)
            elif self.target.selects(d, info.groups, self.model) and info.active == self.previous:
                control.append(d)
        return canary, control

    def _side(self, devices: list[str], version: str) -> SideStats:
        total = ZERO
        for d in devices:
            for boot, v in self._keys.get(d, []):
                if v == version:
                    total = total.plus(self._series[(d, boot, v)].window())
        return SideStats(
            devices=tuple(devices),
            ok=total.ok,
            errors=total.errors,
            latency=tuple(_dense(total.latency)),
            kind=total.kind,
            outputs=dict(total.outputs),
            compared=total.compared,
            agreed=total.agreed,
        )

    def evidence(self, rule: Rollout, baseline: OutputSketch | None) -> tuple[Evidence, dict[str, Any]]:
        """The window's evidence under the wave's ``rule``, and the device counts to show."""
        canary, control = self.roles(rule)
        canary_side = self._side(canary, self.version)
        selves = []
        for d in canary:
            before = self.self_before.get(d)
            if before is not None:
                after = self._side([d], self.version).latency
                selves.append(SelfLatency(d, before[0], before[1], after))
        ev = Evidence(
            canary=canary_side,
            control=self._side(control, self.previous),
            self_latency=tuple(selves),
            bad_events=tuple(self.bad_events),
            baseline=baseline,
        )
        selected = self.selected(rule)
        devices = {
            "canary": len(canary),
            "control": len(control),
            "selected": selected,
            "known": len(self.devices),
        }
        return ev, devices

    def seed(self, self_before: dict[str, tuple[float, int]], ignored: dict[str, int]) -> None:
        """Carry over what a previous controller of this rollout had recorded."""
        self.self_before.update(self_before)
        self.ignored.update(ignored)


def _dense(sparse: tuple[tuple[int, int], ...]) -> list[int]:
    counts = [0] * N_BUCKETS
    for index, n in sparse:
        counts[index] += n
    return counts
