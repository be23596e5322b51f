"""The rollout gates: their names, defaults and verdicts over the evidence of a window (pure).

Each gate turns the :class:`Evidence` of the current wave's window into a
:class:`GateResult`: a value, the threshold it is held to, and a :class:`Verdict`:
``pass``, ``fail``, ``wait`` (fewer samples than ``--min-samples``: neither pass nor
fail), ``off`` (disabled with ``--gate NAME=off``) or ``skip`` (the gate cannot apply:
a card without an output baseline). ``docs/rollouts.md`` gives every formula and default.

This module owns the gate vocabulary (:class:`GateName`, :class:`Op`, :class:`Verdict`).

Guarantees:

* every function here is pure and total: empty evidence gives ``wait`` (or ``pass`` for
  ``health``, which needs no traffic), never an exception or a NaN;
* a value is computed only from counts at or above the sample bound, and a verdict is
  ``fail`` only when the value breaks the threshold with enough samples;
* :func:`js_divergence` is the Jensen-Shannon divergence in bits: symmetric, in [0, 1],
  0 for equal distributions and 1 for disjoint ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from agent.serving.stats import quantile_ns
from converter.monitor.sketches import OutputSketch, SketchKind

# a device's own before/after latency is compared only once it answered this many
# requests on the new version (a p99 of fewer is its maximum)
MIN_DEVICE_SAMPLES = 20
# the canary/control p99 ratio needs this many requests on each side, --min-samples or
# not: then the 5 slowest decide a p99, not one or two. Measured with 20 agents on 2
# cores: two equal models, 4 canaries against 16 controls, read a ratio of 4.8 with 152
# canary requests (p99 5.5 ms vs 1.15 ms: the two slowest of 152 were scheduling stalls)
P99_MIN_SAMPLES = 500


class GateName(StrEnum):
    HEALTH = "health"
    ERROR_RATE = "error_rate"
    LATENCY_P99_RATIO = "latency_p99_ratio"
    LATENCY_P99_SELF = "latency_p99_self"
    AGREEMENT = "agreement"
    DRIFT_JS = "drift_js"
    DRIFT_BASELINE_JS = "drift_baseline_js"


class Op(StrEnum):
    LE = "<="
    GE = ">="
    LT = "<"
    GT = ">"

    def holds(self, value: float, threshold: float) -> bool:
        if self is Op.LE:
            return value <= threshold
        if self is Op.GE:
            return value >= threshold
        if self is Op.LT:
            return value < threshold
        return value > threshold


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    WAIT = "wait"
    OFF = "off"
    SKIP = "skip"

    @property
    def blocks_promotion(self) -> bool:
        return self in (Verdict.FAIL, Verdict.WAIT)


@dataclass(frozen=True)
class GateSetting:
    name: GateName
    op: Op
    threshold: float
    enabled: bool = True

    def to_json(self) -> dict[str, Any]:
        if not self.enabled:
            return {"off": True}
        return {"op": self.op.value, "threshold": self.threshold}

    def describe(self) -> str:
        return f"{self.name}=off" if not self.enabled else f"{self.name} {self.op} {self.threshold:g}"


# health: the count of rejected/rolled-back events of the new version must stay 0
DEFAULT_GATES: Mapping[GateName, GateSetting] = {
    GateName.HEALTH: GateSetting(GateName.HEALTH, Op.LE, 0.0),
    GateName.ERROR_RATE: GateSetting(GateName.ERROR_RATE, Op.LE, 0.01),
    GateName.LATENCY_P99_RATIO: GateSetting(GateName.LATENCY_P99_RATIO, Op.LE, 1.5),
    GateName.LATENCY_P99_SELF: GateSetting(GateName.LATENCY_P99_SELF, Op.LE, 1.5),
    GateName.AGREEMENT: GateSetting(GateName.AGREEMENT, Op.GE, 0.9),
    GateName.DRIFT_JS: GateSetting(GateName.DRIFT_JS, Op.LE, 0.1),
    GateName.DRIFT_BASELINE_JS: GateSetting(GateName.DRIFT_BASELINE_JS, Op.LE, 0.25),
}


@dataclass(frozen=True)
class GateResult:
    name: GateName
    verdict: Verdict
    value: float | None = None
    threshold: float | None = None
    op: Op | None = None
    samples: int = 0
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "value": None if self.value is None else round(self.value, 6),
            "threshold": self.threshold,
            "op": self.op.value if self.op else None,
            "verdict": self.verdict.value,
            "samples": self.samples,
        }
        if self.detail:
            out["detail"] = self.detail
        return out

    def describe(self) -> str:
        """``agreement 0.12 (>= 0.9 fails, 640 samples)``: the one line an abort prints."""
        if self.verdict in (Verdict.OFF, Verdict.SKIP):
            return f"{self.name} {self.verdict}" + (f" ({self.detail})" if self.detail else "")
        value = "-" if self.value is None else f"{self.value:.4g}"
        rule = f"{self.op} {self.threshold:g}" if self.op is not None and self.threshold is not None else ""
        extra = f"; {self.detail}" if self.detail else ""
        return f"{self.name} {value} ({rule} {self.verdict}s, {self.samples} samples{extra})"


# -- the evidence --------------------------------------------------------------------------


@dataclass(frozen=True)
class SideStats:
    """What one side (canary or control devices) did in the window, summed over devices."""

    devices: tuple[str, ...] = ()
    ok: int = 0
    errors: int = 0
    latency: tuple[int, ...] = ()  # dense histogram in agent.serving.stats's buckets
    kind: SketchKind | None = None
    outputs: Mapping[Any, int] = field(default_factory=dict)  # class index or value bound -> count
    compared: int = 0
    agreed: int = 0

    @property
    def outputs_n(self) -> int:
        return sum(self.outputs.values())


@dataclass(frozen=True)
class SelfLatency:
    """One canary device: p99 of the previous version before the switch, and the new
    version's latency histogram in the window."""

    device_id: str
    before_p99_ms: float
    before_n: int
    after: tuple[int, ...]


@dataclass(frozen=True)
class Evidence:
    canary: SideStats = SideStats()
    control: SideStats = SideStats()
    self_latency: tuple[SelfLatency, ...] = ()
    bad_events: tuple[str, ...] = ()  # "pi-3: rolled_back (crash_loop)"
    baseline: OutputSketch | None = None


# -- helpers ---------------------------------------------------------------------------------


def p99_ms(counts: Sequence[int]) -> float | None:
    ns = quantile_ns(list(counts), 0.99) if counts and sum(counts) else None
    return None if ns is None else ns / 1e6


def js_divergence(p: Mapping[Any, int], q: Mapping[Any, int]) -> float:
    """Jensen-Shannon divergence (base 2) between two count distributions; 0 if either is empty."""
    n_p, n_q = sum(p.values()), sum(q.values())
    if n_p <= 0 or n_q <= 0:
        return 0.0
    total = 0.0
    for key in set(p) | set(q):
        a, b = p.get(key, 0) / n_p, q.get(key, 0) / n_q
        m = (a + b) / 2
        if a > 0:
            total += 0.5 * a * math.log2(a / m)
        if b > 0:
            total += 0.5 * b * math.log2(b / m)
    return min(1.0, max(0.0, total))


def sketch_counts(sketch: OutputSketch) -> dict[Any, int]:
    """The distribution a drift gate compares: top-1 classes, or the value histogram."""
    if sketch.kind is SketchKind.CLASSES:
        return dict(sketch.classes)
    return dict(sketch.histogram)


def _judge(
    setting: GateSetting, value: float | None, samples: int, min_samples: int, detail: str = ""
) -> GateResult:
    if value is None or samples < min_samples or not math.isfinite(value):
        return GateResult(setting.name, Verdict.WAIT, value, setting.threshold, setting.op, samples, detail)
    verdict = Verdict.PASS if setting.op.holds(value, setting.threshold) else Verdict.FAIL
    return GateResult(setting.name, verdict, value, setting.threshold, setting.op, samples, detail)


# -- the gates --------------------------------------------------------------------------------


def _health(s: GateSetting, ev: Evidence, min_samples: int) -> GateResult:
    bad = len(ev.bad_events)
    verdict = Verdict.PASS if s.op.holds(bad, s.threshold) else Verdict.FAIL
    detail = "; ".join(ev.bad_events[:3]) + (f"; +{bad - 3} more" if bad > 3 else "")
    return GateResult(s.name, verdict, float(bad), s.threshold, s.op, len(ev.canary.devices), detail)


def _error_rate(s: GateSetting, ev: Evidence, min_samples: int) -> GateResult:
    n = ev.canary.ok + ev.canary.errors
    return _judge(s, ev.canary.errors / n if n else None, n, min_samples)


def _latency_ratio(s: GateSetting, ev: Evidence, min_samples: int) -> GateResult:
    new, old = p99_ms(ev.canary.latency), p99_ms(ev.control.latency)
    samples = min(sum(ev.canary.latency), sum(ev.control.latency))
    value = new / old if new is not None and old else None
    detail = f"p99 {new:.3g} ms vs {old:.3g} ms" if new is not None and old is not None else ""
    return _judge(s, value, samples, max(min_samples, P99_MIN_SAMPLES), detail)


def _latency_self(s: GateSetting, ev: Evidence, min_samples: int) -> GateResult:
    if not ev.self_latency and sum(ev.canary.latency) >= min_samples:
        # canaries that answered enough on the new version, none of which the controller saw
        # on the previous one (they switched before it watched): nothing to compare with
        return GateResult(
            s.name, Verdict.SKIP, detail="no canary reported the previous version before it switched"
        )
    samples = sum(min(sum(d.after), d.before_n) for d in ev.self_latency)
    worst: tuple[float, str] | None = None
    for d in ev.self_latency:
        after = p99_ms(d.after)
        if after is None or sum(d.after) < MIN_DEVICE_SAMPLES or d.before_p99_ms <= 0:
            continue
        ratio = after / d.before_p99_ms
        if worst is None or ratio > worst[0]:
            worst = (ratio, f"{d.device_id}: p99 {after:.3g} ms vs {d.before_p99_ms:.3g} ms before")
    return _judge(s, worst[0] if worst else None, samples, min_samples, worst[1] if worst else "")


def _agreement(s: GateSetting, ev: Evidence, min_samples: int) -> GateResult:
    n = ev.canary.compared
    return _judge(s, ev.canary.agreed / n if n else None, n, min_samples)


def _drift(s: GateSetting, ev: Evidence, min_samples: int) -> GateResult:
    c, k = ev.canary, ev.control
    if c.kind is not None and k.kind is not None and c.kind is not k.kind:
        return GateResult(s.name, Verdict.SKIP, detail="canary and control outputs are of different kinds")
    samples = min(c.outputs_n, k.outputs_n)
    return _judge(s, js_divergence(c.outputs, k.outputs) if samples else None, samples, min_samples)


def _drift_baseline(s: GateSetting, ev: Evidence, min_samples: int) -> GateResult:
    base = ev.baseline
    if base is None:
        return GateResult(s.name, Verdict.SKIP, detail="the model card has no output_baseline")
    if ev.canary.kind is not None and ev.canary.kind is not base.kind:
        return GateResult(s.name, Verdict.SKIP, detail="the card's baseline is of another kind")
    n = ev.canary.outputs_n
    return _judge(s, js_divergence(ev.canary.outputs, sketch_counts(base)) if n else None, n, min_samples)


_GATES = {
    GateName.HEALTH: _health,
    GateName.ERROR_RATE: _error_rate,
    GateName.LATENCY_P99_RATIO: _latency_ratio,
    GateName.LATENCY_P99_SELF: _latency_self,
    GateName.AGREEMENT: _agreement,
    GateName.DRIFT_JS: _drift,
    GateName.DRIFT_BASELINE_JS: _drift_baseline,
}


def evaluate(
    evidence: Evidence, settings: Mapping[GateName, GateSetting], min_samples: int
) -> tuple[GateResult, ...]:
    """Every gate, in :class:`GateName` order."""
    out = []
    for name in GateName:
        setting = settings.get(name, DEFAULT_GATES[name])
        if not setting.enabled:
            out.append(GateResult(name, Verdict.OFF))
            continue
        out.append(_GATES[name](setting, evidence, min_samples))
    return tuple(out)
