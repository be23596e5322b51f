"""What an operator asks of a rollout: waves, bake time, sample bound, gates (pure parsing).

``litefleet rollout start``'s flags become one :class:`RolloutSpec`; every parser here
raises :class:`~converter.errors.BadInputError` with one line that names the flag and
what it wants, so a bad rollout is refused before anything is signed.

Guarantees:

* :func:`parse_duration` takes ``30s``, ``10m``, ``2h`` (and a bare number of seconds)
  and refuses zero, negatives, NaN and anything over a week;
* :func:`parse_waves` gives strictly increasing whole percentages in [1, 100] ending at
  100; :func:`parse_gate` takes ``NAME OP NUMBER`` (``<=``, ``>=``, ``<``, ``>``) or
  ``NAME=off`` for a name of :class:`~converter.rollout.gates.GateName`;
* a :class:`RolloutSpec` round-trips through :meth:`RolloutSpec.to_json` /
  :func:`spec_from_json` (it is part of the crash-safe rollout record).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.protocol import MAX_SHADOW_K, ProtocolError, Rollout
from converter.errors import BadInputError
from converter.rollout.gates import DEFAULT_GATES, GateName, GateSetting, Op

DEFAULT_WAVES = (5, 25, 100)
DEFAULT_BAKE_S = 600.0
DEFAULT_MIN_SAMPLES = 100
DEFAULT_SHADOW_K = 10
# a wave that cannot judge for this many bakes holds ("not enough traffic")
DEFAULT_MAX_WAIT_BAKES = 3.0
MAX_DURATION_S = 7 * 24 * 3600.0
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_GATE_RE = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*([^\s<>=]+)\s*$")


def parse_duration(text: str, flag: str = "duration") -> float:
    """Seconds in ``30s``, ``10m``, ``2h`` or ``90``; BadInputError for anything else."""
    raw = text.strip().lower()
    scale = _UNITS.get(raw[-1:])
    number = raw[:-1] if scale is not None else raw
    try:
        value = float(number) * (scale or 1.0)
    except ValueError:
        value = math.nan
    if not (0 < value <= MAX_DURATION_S):  # False for NaN
        raise BadInputError(
            f"{flag} {text!r}: expected a duration above zero such as 30s, 10m or 2h (at most 7 days)"
        )
    return value


def parse_waves(text: str) -> tuple[int, ...]:
    """``5,25,100`` -> (5, 25, 100): strictly increasing percentages ending at 100."""
    try:
        waves = tuple(int(part) for part in text.split(","))
    except ValueError:
        waves = ()
    if not waves or any(not 1 <= w <= 100 for w in waves):
        raise BadInputError(
            f"--waves {text!r}: expected whole percentages 1-100 separated by commas, e.g. 5,25,100"
        )
    if any(b <= a for a, b in itertools.pairwise(waves)):
        raise BadInputError(f"--waves {text!r}: each wave must be larger than the one before")
    if waves[-1] != 100:
        raise BadInputError(f"--waves {text!r}: the last wave must be 100 (the whole target)")
    return waves


def _gate_name(word: str, expr: str) -> GateName:
    try:
        return GateName(word)
    except ValueError as exc:
        names = ", ".join(g.value for g in GateName)
        raise BadInputError(f"--gate {expr!r}: unknown gate {word!r}; gates are {names}") from exc


def parse_gate(expr: str) -> GateSetting:
    """``agreement>=0.95``, ``latency_p99_ratio <= 2`` or ``drift_js=off``."""
    name, sep, rest = expr.partition("=")
    if sep and rest.strip() == "off" and name.strip() and not name.strip().endswith(("<", ">")):
        gate = _gate_name(name.strip(), expr)
        return GateSetting(gate, DEFAULT_GATES[gate].op, DEFAULT_GATES[gate].threshold, enabled=False)
    match = _GATE_RE.match(expr)
    if match is None:
        raise BadInputError(f"--gate {expr!r}: expected NAME OP NUMBER (OP one of <=, >=, <, >) or NAME=off")
    gate = _gate_name(match.group(1), expr)
    try:
        threshold = float(match.group(3))
    except ValueError:
        threshold = math.nan
    if not math.isfinite(threshold) or threshold < 0:
        raise BadInputError(f"--gate {expr!r}: the threshold must be a finite number >= 0")
    return GateSetting(gate, Op(match.group(2)), threshold)


def gate_settings(exprs: Iterable[str]) -> dict[GateName, GateSetting]:
    """The defaults with each ``--gate`` applied (a later one for the same gate wins)."""
    settings = dict(DEFAULT_GATES)
    for expr in exprs:
        s = parse_gate(expr)
        settings[s.name] = s
    return settings


@dataclass(frozen=True)
class RolloutSpec:
    """What to roll out and how to judge it."""

    name: str
    target: str = "all"
    waves: tuple[int, ...] = DEFAULT_WAVES
    bake_s: float = DEFAULT_BAKE_S
    max_wait_s: float = DEFAULT_BAKE_S * DEFAULT_MAX_WAIT_BAKES
    min_samples: int = DEFAULT_MIN_SAMPLES
    shadow_k: int = DEFAULT_SHADOW_K
    gates: Mapping[GateName, GateSetting] = field(default_factory=lambda: dict(DEFAULT_GATES))

    def __post_init__(self) -> None:
        try:
            Rollout(self.target, 100, self.shadow_k)
        except ProtocolError as exc:
            raise BadInputError(str(exc)) from exc
        if self.min_samples < 1:
            raise BadInputError("--min-samples must be at least 1")
        if self.max_wait_s < self.bake_s:
            raise BadInputError("--max-wait must be at least the bake time")

    def rule(self, wave: int) -> Rollout:
        """The signed rollout rule of wave ``wave`` (0-based): shadowed below 100 %."""
        pct = self.waves[wave]
        return Rollout(self.target, pct, self.shadow_k if pct < 100 else 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "target": self.target,
            "waves": list(self.waves),
            "bake_s": self.bake_s,
            "max_wait_s": self.max_wait_s,
            "min_samples": self.min_samples,
            "shadow_k": self.shadow_k,
            "gates": {name.value: s.to_json() for name, s in self.gates.items()},
        }


def _setting_from_json(name: GateName, doc: Any) -> GateSetting:
    default = DEFAULT_GATES[name]
    if not isinstance(doc, Mapping) or doc.get("off"):
        return GateSetting(name, default.op, default.threshold, enabled=False)
    return GateSetting(name, Op(doc["op"]), float(doc["threshold"]))


def spec_from_json(doc: Mapping[str, Any]) -> RolloutSpec:
    """The spec in a rollout record; ValueError (or KeyError/TypeError) when damaged."""
    gates = dict(DEFAULT_GATES)
    for key, value in (doc.get("gates") or {}).items():
        gates[GateName(key)] = _setting_from_json(GateName(key), value)
    waves = tuple(int(w) for w in doc["waves"])
    if not waves or waves[-1] != 100:
        raise ValueError("waves must end at 100")
    shadow_k = int(doc.get("shadow_k", DEFAULT_SHADOW_K))
    if not (shadow_k == 0 or 2 <= shadow_k <= MAX_SHADOW_K):
        raise ValueError("bad shadow_k")
    return RolloutSpec(
        name=str(doc["name"]),
        target=str(doc["target"]),
        waves=waves,
        bake_s=float(doc["bake_s"]),
        max_wait_s=float(doc["max_wait_s"]),
        min_samples=int(doc["min_samples"]),
        shadow_k=shadow_k,
        gates=gates,
    )
