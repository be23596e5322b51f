"""How a rollout moves: the pure decision and every transition of the record.

:func:`decide` looks at a baking wave's gate results and the clock and says what to do;
the ``with_*``/``after_*`` functions make the next :class:`RolloutRecord`. Nothing here
touches a file, a socket or a clock: the controller passes ``now`` in and writes the
record before it acts on it.

The rules (``docs/rollouts.md``):

* ``health`` failing aborts at once;
* any other gate failing aborts once half the bake has passed (before that a failing
  value is shown but may still be noise: a new version's first requests are slower while
  caches warm up);
* the wave promotes when the bake has passed and no gate fails or waits;
* a wave still waiting for samples after ``max_wait_s`` holds ("not enough traffic"):
  it stays as signed, watched, until ``rollout resume`` (a fresh window) or ``abort``;
* promoting to the last wave (100 %) ends the rollout: there is no control group left
  to compare with, and the device's own trial still guards its first inferences.

Guarantees:

* a record with an ``intent`` never gets another one: the step under way is carried out
  (:func:`after_step`) before any other decision or operator request is applied;
* :func:`after_step` is the only way from ``promoting``/``aborting``/``planned`` to the
  next state, and it appends exactly one :class:`SignedStep`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from converter.rollout.gates import GateName, GateResult, Verdict
from converter.rollout.record import (
    Intent,
    RolloutRecord,
    RolloutState,
    SignedStep,
    StepKind,
    WaveRecord,
)
from converter.rollout.spec import RolloutSpec

OPERATOR_ABORT = "aborted by the operator"
NOT_ENOUGH_TRAFFIC = "not enough traffic"


class ActionKind(StrEnum):
    OBSERVE = "observe"  # nothing to do yet
    PROMOTE = "promote"
    ABORT = "abort"
    HOLD = "hold"


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    reason: str | None = None


class Request(StrEnum):
    """What an operator asks of a running rollout (``rollout pause|resume|abort``)."""

    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"


def new_record(
    spec: RolloutSpec,
    *,
    version: int,
    previous: int,
    model_sha256: str,
    now: float,
    detached: bool = False,
    baseline: Mapping[str, Any] | None = None,
) -> RolloutRecord:
    """A rollout about to sign its first wave."""
    return RolloutRecord(
        spec=spec,
        version=version,
        previous=previous,
        model_sha256=model_sha256,
        state=RolloutState.PLANNED,
        started=now,
        updated=now,
        detached=detached,
        intent=Intent(StepKind.SIGN_WAVE, 0),
        baseline=baseline,
    )


def decide(record: RolloutRecord, results: Sequence[GateResult], now: float) -> Action:
    """What a baking wave should do now, given its gates."""
    if record.state is not RolloutState.BAKING or record.intent is not None or record.wave_started is None:
        return Action(ActionKind.OBSERVE)
    elapsed = now - record.wave_started
    spec = record.spec
    for r in results:
        if r.name is GateName.HEALTH and r.verdict is Verdict.FAIL:
            return Action(ActionKind.ABORT, r.describe())
    failing = [r for r in results if r.verdict is Verdict.FAIL]
    if failing and elapsed >= spec.bake_s / 2:
        return Action(ActionKind.ABORT, failing[0].describe())
    if elapsed >= spec.bake_s and not any(r.verdict.blocks_promotion for r in results):
        return Action(ActionKind.PROMOTE)
    waiting = [r for r in results if r.verdict is Verdict.WAIT]
    if waiting and elapsed >= spec.max_wait_s:
        detail = ", ".join(f"{r.name} {r.samples}/{spec.min_samples} samples" for r in waiting)
        return Action(ActionKind.HOLD, f"{NOT_ENOUGH_TRAFFIC} ({detail})")
    return Action(ActionKind.OBSERVE)


def _end_wave(record: RolloutRecord, outcome: str, now: float) -> tuple[WaveRecord, ...]:
    if not record.waves or record.waves[-1].ended is not None:
        return record.waves
    return (*record.waves[:-1], replace(record.waves[-1], ended=now, outcome=outcome))


def with_action(record: RolloutRecord, action: Action, now: float) -> RolloutRecord:
    """The record after :func:`decide`'s action (an intent for promote and abort)."""
    if action.kind is ActionKind.PROMOTE:
        return replace(
            record,
            state=RolloutState.PROMOTING,
            intent=Intent(StepKind.SIGN_WAVE, record.wave + 1),
            waves=_end_wave(record, "passed", now),
            updated=now,
        )
    if action.kind is ActionKind.ABORT:
        return with_abort(record, action.reason or "aborted", now)
    if action.kind is ActionKind.HOLD:
        return replace(record, state=RolloutState.HOLDING, reason=action.reason, updated=now)
    return record


def with_abort(record: RolloutRecord, reason: str, now: float) -> RolloutRecord:
    if record.state.terminal or record.state is RolloutState.ABORTING:
        return record
    return replace(
        record,
        state=RolloutState.ABORTING,
        intent=Intent(StepKind.ABORT),
        reason=reason,
        waves=_end_wave(record, "aborted", now),
        updated=now,
    )


def with_request(record: RolloutRecord, request: Request, now: float) -> RolloutRecord:
    """The record after an operator's request; unchanged when it does not apply."""
    if record.intent is not None or record.state.terminal:
        return record  # the step under way goes first; the caller keeps the request
    if request is Request.ABORT:
        return with_abort(record, OPERATOR_ABORT, now)
    if request is Request.PAUSE and record.state in (RolloutState.BAKING, RolloutState.HOLDING):
        return replace(record, state=RolloutState.PAUSED, paused_from=record.state, updated=now)
    if request is Request.RESUME and record.state in (RolloutState.PAUSED, RolloutState.HOLDING):
        # a fresh bake: what was seen before the pause or hold no longer counts
        return replace(
            record,
            state=RolloutState.BAKING,
            paused_from=None,
            reason=None,
            wave_started=now,
            waves=(*record.waves[:-1], replace(record.waves[-1], started=now)) if record.waves else (),
            updated=now,
        )
    return record


def after_step(
    record: RolloutRecord, targets_version: int, now: float, *, recovered: bool = False
) -> RolloutRecord:
    """The record once the intent's signing is done and published."""
    intent = record.intent
    if intent is None:
        raise ValueError("no step under way")
    step = SignedStep(intent.kind, intent.wave, targets_version, now, recovered)
    base = replace(record, intent=None, steps=(*record.steps, step), updated=now)
    if intent.kind is StepKind.ABORT:
        return replace(base, state=RolloutState.ABORTED)
    wave = intent.wave or 0
    pct = record.spec.waves[wave]
    last = wave == len(record.spec.waves) - 1
    started = WaveRecord(pct, now, ended=now if last else None, outcome="promoted" if last else None)
    return replace(
        base,
        state=RolloutState.PROMOTED if last else RolloutState.BAKING,
        wave=wave,
        wave_started=now,
        waves=(*record.waves, started),
        reason=None,
    )


def with_observation(
    record: RolloutRecord,
    results: Sequence[GateResult],
    devices: Mapping[str, Any],
    now: float,
    *,
    self_before: Mapping[str, tuple[float, int]] | None = None,
    ignored: Mapping[str, int] | None = None,
) -> RolloutRecord:
    """The current wave's latest gate values and device counts."""
    waves = record.waves
    if waves and waves[-1].ended is None:
        gates = {r.name.value: r.to_json() for r in results}
        waves = (*waves[:-1], replace(waves[-1], gates=gates, devices=dict(devices)))
    return replace(
        record,
        waves=waves,
        self_before=dict(self_before) if self_before is not None else record.self_before,
        ignored=dict(ignored) if ignored is not None else record.ignored,
        updated=now,
    )
