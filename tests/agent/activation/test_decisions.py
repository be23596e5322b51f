"""Activation decisions: pure functions over the device state."""

from __future__ import annotations

from dataclasses import replace

from agent.activation import decisions as act
from agent.activation.decisions import (
    DeviceState,
    Installed,
    ModelState,
    Plan,
    Probation,
    StartAction,
    Verdict,
)
from agent.reasons import Reason

V1, V2, V3 = Installed(1, "a" * 64), Installed(2, "b" * 64), Installed(3, "c" * 64)


def test_plan_keeps_skips_or_installs() -> None:
    ms = ModelState(active=V1)
    assert act.plan_release(ms, 1, V1.sha256) is Plan.KEEP
    assert act.plan_release(ms, 2, V2.sha256) is Plan.INSTALL
    ms = act.reject(ms, V2, Reason.GOLDEN, "off by 3")
    assert act.plan_release(ms, 2, V2.sha256) is Plan.SKIP_REJECTED
    # the same version number with other content is a different candidate
    assert act.plan_release(ms, 2, "d" * 64) is Plan.INSTALL


def test_activation_keeps_the_previous_version() -> None:
    ms = act.activate(ModelState(), V1)
    assert ms.active == V1 and ms.previous is None and ms.trial_starts == 0
    ms = act.mark_good(ms)
    ms = act.activate(ms, V2)
    assert (ms.active, ms.previous, ms.trial_starts) == (V2, V1, 0)
    # re-activating the same version does not make it its own previous
    again = act.activate(ms, V2)
    assert again.previous == V1


def test_rollback_restores_previous_and_remembers_the_failure() -> None:
    ms = act.activate(act.mark_good(act.activate(ModelState(), V1)), V2)
    back = act.roll_back(ms, Reason.INFERENCE_ERRORS, "3 errors")
    assert back.active == V1 and back.previous is None and back.trial_starts is None
    assert back.is_rejected(2, V2.sha256).reason == "inference_errors"
    # with nothing to go back to, the name is left without a model
    alone = act.roll_back(act.activate(ModelState(), V1), Reason.LOAD, "x")
    assert alone.active is None


def test_crash_loop_counting_on_start() -> None:
    ms = act.activate(act.mark_good(act.activate(ModelState(), V1)), V2)
    for starts in (1, 2):
        ms, action = act.on_start(ms, max_crash_restarts=2)
        assert action is StartAction.NONE and ms.trial_starts == starts
    ms, action = act.on_start(ms, max_crash_restarts=2)
    assert action is StartAction.ROLLED_BACK
    assert ms.active == V1 and ms.rejected[-1].reason == "crash_loop"
    # a good model is never rolled back by restarts
    good = act.mark_good(ms)
    for _ in range(10):
        good, action = act.on_start(good, max_crash_restarts=2)
        assert action is StartAction.NONE and good.active == V1


def test_a_crash_during_an_in_process_check_rejects_the_candidate() -> None:
    ms = act.begin_check(ModelState(active=V1), V3)
    ms, action = act.on_start(ms, max_crash_restarts=2)
    assert action is StartAction.REJECTED_CHECK
    assert ms.active == V1 and ms.checking is None and ms.is_rejected(3, V3.sha256).reason == "crashed"


def test_trial_verdicts() -> None:
    judge = lambda ok, err, age: act.judge_trial(  # noqa: E731
        Probation(ok, err, age), good_after_inferences=20, good_after_s=60
    )
    assert judge(0, 0, 1) is Verdict.WAIT
    assert judge(20, 0, 1) is Verdict.GOOD
    assert judge(0, 0, 61) is Verdict.GOOD  # no traffic: good once the trial time is over
    assert judge(1, 3, 5) is Verdict.BAD
    assert judge(40, 3, 5) is Verdict.GOOD  # rare errors at a tolerable rate
    assert judge(5, 1, 61) is Verdict.BAD  # trial over, too many errors for its successes
    assert judge(2, 1, 10) is Verdict.WAIT


def test_state_round_trips_and_bounds_rejections() -> None:
    ms = ModelState(active=V2, previous=V1, trial_starts=1, checking=V3)
    for i in range(30):
        ms = act.reject(ms, Installed(100 + i, "e" * 64), Reason.GOLDEN, f"try {i}")
    state = DeviceState({"m": ms})
    again = DeviceState.from_dict(state.to_dict())
    assert again == state
    assert len(again.get("m").rejected) == act.MAX_REJECTIONS
    assert state.keep_versions() == {"m": {1, 2}}


def test_a_start_after_a_clean_stop_does_not_count_toward_a_crash_loop() -> None:
    ms = act.activate(act.mark_good(act.activate(ModelState(), V1)), V2)
    for _ in range(10):  # ten reboots during the trial, each after a clean stop
        ms, action = act.on_start(ms, max_crash_restarts=2, after_clean_stop=True)
        assert action is StartAction.NONE and ms.active == V2 and ms.trial_starts == 0
    ms, _ = act.on_start(ms, max_crash_restarts=2)  # a crash still counts
    assert ms.trial_starts == 1


def test_the_clean_stop_mark_round_trips_and_defaults_to_unclean() -> None:
    state = act.DeviceState.empty().with_model("m", act.activate(ModelState(), V1))
    assert act.DeviceState.from_dict(state.to_dict()).clean_stop is False
    marked = act.DeviceState.from_dict(replace(state, clean_stop=True).to_dict())
    assert marked.clean_stop is True and marked.get("m").active == V1
    # a state file written by an older agent has no mark: its start counts
    old = {"format": act.STATE_FORMAT, "models": state.to_dict()["models"]}
    assert act.DeviceState.from_dict(old).clean_stop is False
    assert marked.with_model("n", ModelState()).clean_stop is True
