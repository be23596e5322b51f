"""What the fleet did with one model during a wave: devices, events and windowed counters.

:class:`FleetObserver` is fed the parsed device messages (state, events, metrics) of the
broker, in arrival order, and answers :meth:`FleetObserver.evidence`: the canary and
control sides of the current window, ready for :func:`converter.rollout.gates.evaluate`.
It touches no socket, file or clock (``now`` comes in with each call); one thread (the
controller's) owns it.

Windows: the counters of a metrics message are cumulative since the version was loaded,
so each (device, boot, version) is differenced message to message and the steps since the
window started are summed. A series first seen counts from zero when the same agent
process (``boot``) reported before without this version (it was loaded since), else from
its first message (what came before is unknown and not counted). A group of counters that
goes down (requests, the shadow's, a histogram) was reset: the version was loaded again
in the same process (a rollback and a return), the shadow started again, or an agent
without a ``boot`` restarted; the step is then the new value. A message whose ``seq`` is
not above the last one of its (device, boot) is a repeat (a QoS 1 redelivery, or what a
site's device sends again after an outage, older than what arrived before it) and is
dropped: differenced, it would look like a reset and count its whole history again.

Guarantees:

* a message that is malformed, whose sketch or shadow counts are unusable, whose latency
  buckets are not the agent's, or whose counters jump by more than :data:`ABSURD_STEP`
  at once, is ignored for the verdict (its usable parts aside: a junk sketch
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

    def step_from(self, last: Counters) -> Counters:
        """What happened between the cumulative ``last`` and ``self``. A group of counters
        that went down was reset (the version was loaded again in the same process, or the
        shadow started again): its step is its new value. JunkError if the kind changed."""
        if self.kind is not None and last.kind is not None and self.kind is not last.kind:
            raise JunkError("the sketch changed kind")
        requests_reset = self.ok < last.ok or self.errors < last.errors
        shadow_reset = self.compared < last.compared or self.agreed < last.agreed
        ok, errors = (
            (self.ok, self.errors) if requests_reset else (self.ok - last.ok, self.errors - last.errors)
        )
        compared, agreed = (
            (self.compared, self.agreed)
            if shadow_reset
            else (self.compared - last.compared, self.agreed - last.agreed)
        )
        return Counters(
            ok=ok,
            errors=errors,
            latency=_step(self.latency, last.latency),
            kind=self.kind or last.kind,
            outputs=_step(self.outputs, last.outputs),
            compared=compared,
            agreed=min(agreed, compared),
        )

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


def _step(now: tuple[tuple[Any, int], ...], last: tuple[tuple[Any, int], ...]) -> tuple[tuple[Any, int], ...]:
    """Histogram ``now - last``; ``now`` itself when any bucket went down (a reset)."""
    left = dict(now)
    for key, n in last:
        left[key] = left.get(key, 0) - n
    if any(v < 0 for v in left.values()):
        return now
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
    """One (device, boot, version): its last cumulative counters and what the window saw."""

    last: Counters
    seen: Counters = field(default_factory=Counters)  # steps since the window started
    # latency steps since the latency window started (None: it has not)
    latency: tuple[tuple[int, int], ...] | None = None

    def add(self, step: Counters) -> None:
        self.seen = self.seen.plus(step)
        if self.latency is not None:
            self.latency = _add(self.latency, step.latency)

    def window(self) -> Counters:
        """The window's counts; latency only from the latency window's start."""
        return replace(self.seen, latency=self.latency or ())


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
        self._last_seq: dict[tuple[str, str], int] = {}  # (device, boot) -> newest seq folded in
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
        if sample.seq <= self._last_seq.get((sample.device_id, boot), -1):
            return  # a repeat (docs/protocol.md 6.4)
        self._last_seq[(sample.device_id, boot)] = sample.seq
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
            step = now.step_from(series.last) if series is not None else None
        except JunkError:
            return False
        if series is None:
            series = _Series(last=now, latency=() if self._latency_started else None)
            self._series[key] = series
            self._keys.setdefault(device_id, []).append((boot, entry.version))
            if (device_id, boot) in self._boots:
                # the same agent process reported before without this version: it was loaded
                # since, so all of its counts are new. Not its latency: its first report holds
                # the first requests after a load (slower; on a shared host, neighbours loading)
                series.seen = replace(now, latency=())
            return True
        assert step is not None
        if step.largest() > ABSURD_STEP:
            series.last = now  # a new footing, but this step counts for nothing
            return False
        series.last = now
        series.add(step)
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
            series.seen, series.latency = ZERO, None

    def start_latency_window(self) -> None:
        """Count latency from here on (the controller calls it once the wave has settled)."""
        if self._latency_started:
            return
        self._latency_started = True
        for series in self._series.values():
            series.latency = ()

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
