"""How a rollout moves: decide(), the transitions of the record, its JSON (pure)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from converter.rollout.decide import (
    OPERATOR_ABORT,
    Action,
    ActionKind,
    Request,
    after_step,
    decide,
    new_record,
    with_action,
    with_observation,
    with_request,
)
from converter.rollout.gates import GateName, GateResult, Op, Verdict
from converter.rollout.record import Intent, RolloutState, StepKind, parse_record
from converter.rollout.spec import RolloutSpec

SPEC = RolloutSpec("digits", waves=(10, 50, 100), bake_s=100.0, max_wait_s=300.0, min_samples=10)


def baking(now: float = 1000.0):  # type: ignore[no-untyped-def]
    record = new_record(SPEC, version=4, previous=3, model_sha256="ab" * 32, now=now)
    assert record.state is RolloutState.PLANNED and record.intent == Intent(StepKind.SIGN_WAVE, 0)
    return after_step(record, targets_version=7, now=now)


def gate(name: GateName, verdict: Verdict) -> GateResult:
    return GateResult(name, verdict, 1.0, 1.5, Op.LE, 50)


PASSING = tuple(gate(n, Verdict.PASS) for n in GateName)


def test_first_step_starts_the_first_wave() -> None:
    r = baking()
    assert (r.state, r.wave, r.wave_started, r.intent) == (RolloutState.BAKING, 0, 1000.0, None)
    assert [(s.kind, s.wave, s.targets_version) for s in r.steps] == [(StepKind.SIGN_WAVE, 0, 7)]
    assert r.waves[0].canary_pct == 10


def test_promote_only_after_the_bake_with_every_gate_passing() -> None:
    r = baking()
    assert decide(r, PASSING, 1099.0).kind is ActionKind.OBSERVE
    assert decide(r, PASSING, 1100.0).kind is ActionKind.PROMOTE
    waiting = (*PASSING[:-1], gate(GateName.DRIFT_BASELINE_JS, Verdict.WAIT))
    assert decide(r, waiting, 1200.0).kind is ActionKind.OBSERVE
    skipped = (*PASSING[:-1], GateResult(GateName.DRIFT_BASELINE_JS, Verdict.SKIP))
    assert decide(r, skipped, 1100.0).kind is ActionKind.PROMOTE


def test_health_aborts_at_once_others_after_half_the_bake() -> None:
    r = baking()
    sick = (gate(GateName.HEALTH, Verdict.FAIL), *PASSING[1:])
    assert decide(r, sick, 1000.5).kind is ActionKind.ABORT
    slow = (*PASSING[:2], gate(GateName.LATENCY_P99_RATIO, Verdict.FAIL), *PASSING[3:])
    assert decide(r, slow, 1049.0).kind is ActionKind.OBSERVE
    action = decide(r, slow, 1050.0)
    assert action.kind is ActionKind.ABORT and action.reason and action.reason.startswith("latency_p99_ratio")


def test_hold_after_max_wait_without_samples() -> None:
    r = baking()
    waiting = (gate(GateName.HEALTH, Verdict.PASS), GateResult(GateName.AGREEMENT, Verdict.WAIT, samples=3))
    assert decide(r, waiting, 1299.0).kind is ActionKind.OBSERVE
    action = decide(r, waiting, 1300.0)
    assert action.kind is ActionKind.HOLD and "not enough traffic" in (action.reason or "")
    held = with_action(r, action, 1300.0)
    assert held.state is RolloutState.HOLDING
    assert decide(held, PASSING, 1400.0).kind is ActionKind.OBSERVE  # held: no decisions
    resumed = with_request(held, Request.RESUME, 1500.0)
    assert (resumed.state, resumed.wave_started, resumed.reason) == (RolloutState.BAKING, 1500.0, None)


def test_promotion_is_an_intent_then_one_step() -> None:
    r = with_action(baking(), Action(ActionKind.PROMOTE), 1100.0)
    assert (r.state, r.intent) == (RolloutState.PROMOTING, Intent(StepKind.SIGN_WAVE, 1))
    assert r.waves[0].outcome == "passed" and r.waves[0].ended == 1100.0
    # no decision and no request while a step is under way
    assert decide(r, PASSING, 5000.0).kind is ActionKind.OBSERVE
    assert with_request(r, Request.ABORT, 1101.0) is r
    r = after_step(r, 8, 1102.0)
    assert (r.state, r.wave, r.wave_started) == (RolloutState.BAKING, 1, 1102.0)
    r = after_step(with_action(r, Action(ActionKind.PROMOTE), 1300.0), 9, 1301.0)
    assert r.state is RolloutState.PROMOTED and r.wave == 2
    assert [s.targets_version for s in r.steps] == [7, 8, 9]
    assert [w.outcome for w in r.waves] == ["passed", "passed", "promoted"]
    with pytest.raises(ValueError):
        after_step(r, 10, 1302.0)


def test_operator_requests() -> None:
    r = baking()
    paused = with_request(r, Request.PAUSE, 1010.0)
    assert paused.state is RolloutState.PAUSED and paused.paused_from is RolloutState.BAKING
    assert decide(paused, PASSING, 5000.0).kind is ActionKind.OBSERVE
    assert with_request(paused, Request.PAUSE, 1011.0) is paused
    aborting = with_request(paused, Request.ABORT, 1020.0)
    assert (aborting.state, aborting.intent, aborting.reason) == (
        RolloutState.ABORTING,
        Intent(StepKind.ABORT),
        OPERATOR_ABORT,
    )
    done = after_step(aborting, 8, 1021.0)
    assert done.state is RolloutState.ABORTED and done.state.terminal
    assert with_request(done, Request.RESUME, 1022.0) is done
    assert with_request(r, Request.RESUME, 1010.0) is r  # a baking rollout has nothing to resume


def test_record_round_trips_through_json() -> None:
    r = baking()
    results = (
        gate(GateName.HEALTH, Verdict.PASS),
        GateResult(GateName.AGREEMENT, Verdict.WAIT, 0.5, 0.9, Op.GE, 3),
    )
    r = with_observation(
        r,
        results,
        {"canary": 2, "control": 18, "selected": ["a", "b"]},
        1010.0,
        self_before={"a": (0.4, 100)},
        ignored={"z": 3},
    )
    r = replace(r, baseline={"kind": "classes", "n": 2, "classes": [[0, 2]]})
    again = parse_record(json.loads(json.dumps(r.to_json())))
    assert again == r
    wire = r.to_wire()
    assert wire["state"] == "baking" and wire["waves"] == [10, 50, 100] and wire["canary_pct"] == 10
    assert wire["devices"]["selected"] == ["a", "b"] and wire["gates"]["agreement"]["verdict"] == "wait"
    for damaged in ({}, {"format": 1}, {**r.to_json(), "state": "dancing"}, {**r.to_json(), "wave": 7}):
        with pytest.raises(ValueError):
            parse_record(damaged)
