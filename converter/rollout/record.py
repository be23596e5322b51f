"""The rollout record: everything a controller needs to continue a rollout after a crash (pure).

One :class:`RolloutRecord` per model name is the controller's source of truth; the
store (:mod:`converter.rollout.store`) writes it atomically beside the repository, and
:mod:`converter.rollout.decide` makes every new record from the previous one.

Crash safety lives in two fields: ``intent`` (the signing step decided and written down
*before* anything is signed: sign wave N, or abort) and ``steps`` (every signing step
carried out, with the targets metadata version it produced). A controller that finds an
intent on start finishes it first, checking the repository's signed state, so a step is
signed at most once and never lost.

Guarantees:

* :func:`parse_record` and :meth:`RolloutRecord.to_json` round-trip; ``parse_record``
  raises :class:`ValueError` with one line for a damaged record, never returns half of one;
* :meth:`RolloutRecord.to_wire` is the retained ``rollouts/<name>`` message of
  ``docs/protocol.md`` (design section 6), :meth:`RolloutRecord.summary` the final record
  ``rollout start --json`` prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from converter.rollout.spec import RolloutSpec, spec_from_json

RECORD_FORMAT = 1


class RolloutState(StrEnum):
    PLANNED = "planned"  # recorded; wave 0 not signed yet
    BAKING = "baking"  # a wave is signed and watched
    PROMOTING = "promoting"  # the next wave is decided, its signing under way
    PAUSED = "paused"  # an operator paused it: watched, never promoted
    HOLDING = "holding"  # not enough traffic to judge within --max-wait
    ABORTING = "aborting"  # the abort is decided, its signing under way
    ABORTED = "aborted"
    PROMOTED = "promoted"

    @property
    def terminal(self) -> bool:
        return self in (RolloutState.ABORTED, RolloutState.PROMOTED)


class StepKind(StrEnum):
    SIGN_WAVE = "sign_wave"  # sign the version with wave N's rule (wave 0 adds its files)
    ABORT = "abort"  # take the version out of the signed targets


@dataclass(frozen=True)
class Intent:
    kind: StepKind
    wave: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "wave": self.wave}


@dataclass(frozen=True)
class SignedStep:
    """A signing step carried out: the targets metadata version it left the repository at."""

    kind: StepKind
    wave: int | None
    targets_version: int
    ts: float
    # found done in the repository on resume (signed before a crash, recorded after it)
    recovered: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "wave": self.wave,
            "targets_version": self.targets_version,
            "ts": self.ts,
            "recovered": self.recovered,
        }


@dataclass(frozen=True)
class WaveRecord:
    """One wave as it went: when, what the gates said last, how many devices."""

    canary_pct: int
    started: float
    ended: float | None = None
    outcome: str | None = None  # "passed", "aborted", "promoted" (the last wave), None: current
    gates: Mapping[str, Any] = field(default_factory=dict)
    devices: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "canary_pct": self.canary_pct,
            "started": self.started,
            "ended": self.ended,
            "outcome": self.outcome,
            "gates": dict(self.gates),
            "devices": dict(self.devices),
        }


@dataclass(frozen=True)
class RolloutRecord:
    spec: RolloutSpec
    version: int
    previous: int
    model_sha256: str
    state: RolloutState
    started: float
    updated: float
    wave: int = 0
    wave_started: float | None = None
    detached: bool = False
    intent: Intent | None = None
    paused_from: RolloutState | None = None
    reason: str | None = None
    steps: tuple[SignedStep, ...] = ()
    waves: tuple[WaveRecord, ...] = ()
    # canary device -> (p99 ms of the previous version before it switched, its sample count)
    self_before: Mapping[str, tuple[float, int]] = field(default_factory=dict)
    # device -> messages whose sketch or counts were ignored as junk
    ignored: Mapping[str, int] = field(default_factory=dict)
    baseline: Mapping[str, Any] | None = None  # the card's output_baseline, as it came

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def canary_pct(self) -> int:
        return self.spec.waves[self.wave]

    @property
    def current(self) -> WaveRecord | None:
        return self.waves[-1] if self.waves else None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "spec": self.spec.to_json(),
            "version": self.version,
            "previous": self.previous,
            "model_sha256": self.model_sha256,
            "state": self.state.value,
            "started": self.started,
            "updated": self.updated,
            "wave": self.wave,
            "wave_started": self.wave_started,
            "detached": self.detached,
            "intent": self.intent.to_json() if self.intent else None,
            "paused_from": self.paused_from.value if self.paused_from else None,
            "reason": self.reason,
            "steps": [s.to_json() for s in self.steps],
            "waves": [w.to_json() for w in self.waves],
            "self_before": {d: list(v) for d, v in sorted(self.self_before.items())},
            "ignored": dict(sorted(self.ignored.items())),
            "baseline": dict(self.baseline) if self.baseline is not None else None,
        }

    def to_wire(self) -> dict[str, Any]:
        """The retained ``<prefix>/v1/rollouts/<name>`` message (docs/protocol.md)."""
        cur = self.current
        devices = dict(cur.devices) if cur else {"canary": 0, "control": 0, "selected": []}
        return {
            "name": self.name,
            "version": self.version,
            "previous": self.previous,
            "state": self.state.value,
            "wave": self.wave,
            "waves": list(self.spec.waves),
            "canary_pct": self.canary_pct,
            "target": self.spec.target,
            "started": self.started,
            "updated": self.updated,
            "wave_started": self.wave_started,
            "bake_s": self.spec.bake_s,
            "devices": devices,
            "gates": dict(cur.gates) if cur else {},
            "ignored": dict(self.ignored),
            "reason": self.reason,
        }

    def summary(self) -> dict[str, Any]:
        """The final record ``rollout start --json`` prints."""
        return {
            "name": self.name,
            "state": self.state.value,
            "version": self.version,
            "previous": self.previous,
            "target": self.spec.target,
            "waves": [w.to_json() for w in self.waves],
            "reason": self.reason,
            "targets_versions": [s.targets_version for s in self.steps],
            "ignored": dict(self.ignored),
        }


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _intent(doc: Any) -> Intent | None:
    if doc is None:
        return None
    wave = doc.get("wave")
    return Intent(StepKind(doc["kind"]), None if wave is None else int(wave))


def _step(doc: Mapping[str, Any]) -> SignedStep:
    wave = doc.get("wave")
    return SignedStep(
        StepKind(doc["kind"]),
        None if wave is None else int(wave),
        int(doc["targets_version"]),
        float(doc["ts"]),
        bool(doc.get("recovered", False)),
    )


def _wave(doc: Mapping[str, Any]) -> WaveRecord:
    return WaveRecord(
        canary_pct=int(doc["canary_pct"]),
        started=float(doc["started"]),
        ended=_opt_float(doc.get("ended")),
        outcome=doc.get("outcome"),
        gates=dict(doc.get("gates") or {}),
        devices=dict(doc.get("devices") or {}),
    )


def parse_record(doc: Any) -> RolloutRecord:
    """The record in a parsed JSON document; ValueError with one line if it is not one."""
    if not isinstance(doc, Mapping) or doc.get("format") != RECORD_FORMAT:
        raise ValueError("not a rollout record of format 1")
    try:
        paused = doc.get("paused_from")
        record = RolloutRecord(
            spec=spec_from_json(doc["spec"]),
            version=int(doc["version"]),
            previous=int(doc["previous"]),
            model_sha256=str(doc["model_sha256"]),
            state=RolloutState(doc["state"]),
            started=float(doc["started"]),
            updated=float(doc["updated"]),
            wave=int(doc["wave"]),
            wave_started=_opt_float(doc.get("wave_started")),
            detached=bool(doc.get("detached", False)),
            intent=_intent(doc.get("intent")),
            paused_from=RolloutState(paused) if paused else None,
            reason=doc.get("reason"),
            steps=tuple(_step(s) for s in doc.get("steps") or ()),
            waves=tuple(_wave(w) for w in doc.get("waves") or ()),
            self_before={str(d): (float(v[0]), int(v[1])) for d, v in (doc.get("self_before") or {}).items()},
            ignored={str(d): int(n) for d, n in (doc.get("ignored") or {}).items()},
            baseline=doc.get("baseline"),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValueError(f"damaged rollout record: {exc!r}") from exc
    if not 0 <= record.wave < len(record.spec.waves):
        raise ValueError(f"damaged rollout record: wave {record.wave} of {len(record.spec.waves)}")
    return record
