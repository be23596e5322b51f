"""Fuzzing what the rollout controller reads from devices: nothing a device sends can crash it.

Hypothesis builds metrics, state and event payloads from the rollout schema (design
section 4) with every field free to be junk: wrong types, negative and huge counts,
histograms with unknown bounds, sketches whose counts do not add up, shadow counts that
contradict each other, counters that go backwards, and raw bytes. The property: parsing
never raises, the observer folds any sequence of them in without raising, every window
count it reports is a non-negative integer, and the gates evaluate to finite values or
``wait``/``skip``.

CI runs a modest number of examples; ``HYPOTHESIS_PROFILE=soak`` runs thousands.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.protocol import Rollout
from converter.monitor.payloads import parse_message
from converter.rollout.gates import Verdict, evaluate
from converter.rollout.observe import FleetObserver
from converter.rollout.spec import gate_settings

MODEL = "digits"
DEVICES = ("d0", "d1", "d2")

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
)
count = st.one_of(st.integers(min_value=0, max_value=5000), junk)
bound = st.one_of(
    st.sampled_from([0.001024, 0.002048, 0.05, 0.1, 0.95, 1.0, None]),
    st.floats(allow_nan=True, allow_infinity=True),
    junk,
)
pairs = st.lists(
    st.one_of(st.tuples(st.integers(-3, 12), count).map(list), st.tuples(bound, count).map(list), junk),
    max_size=6,
)
outputs = st.one_of(
    junk,
    st.fixed_dictionaries(
        {"kind": st.sampled_from(["classes", "values", "other"])},
        optional={
            "n": count,
            "classes": st.one_of(pairs, junk),
            "confidence": st.one_of(pairs, junk),
            "histogram": st.one_of(pairs, junk),
        },
    ),
)
shadow = st.one_of(
    junk,
    st.fixed_dictionaries(
        {},
        optional={
            "against": junk,
            "k": count,
            "sampled": count,
            "compared": count,
            "agreed": count,
            "dropped": count,
            "errors": count,
            "off": junk,
        },
    ),
)
entry = st.fixed_dictionaries(
    {"name": st.sampled_from([MODEL, "other", 3]), "version": st.sampled_from(["1", "2", 2, None])},
    optional={
        "active": junk,
        "ok": count,
        "errors": count,
        "histogram_ms": st.one_of(pairs, junk),
        "outputs": outputs,
        "shadow": shadow,
    },
)
metrics = st.fixed_dictionaries(
    {"seq": count, "ts": st.one_of(st.floats(0, 2e9), junk)},
    optional={
        "boot": st.one_of(st.sampled_from(["b1", "b2", ""]), junk),
        "models": st.one_of(st.lists(entry, max_size=3), junk),
    },
)
state = st.fixed_dictionaries(
    {"online": st.booleans()},
    optional={
        "models": st.one_of(
            st.fixed_dictionaries(
                {MODEL: st.fixed_dictionaries({"version": st.sampled_from([1, 2, "2", None])})}
            ),
            junk,
        ),
        "groups": st.one_of(st.lists(st.sampled_from(["g", 3]), max_size=2), junk),
    },
)
event = st.fixed_dictionaries(
    {
        "event": st.sampled_from(["rejected", "rolled_back", "activated", 5]),
        "ts": st.one_of(st.floats(0, 2e9), junk),
    },
    optional={
        "model": st.sampled_from([MODEL, None]),
        "version": st.sampled_from([2, "2", 1, None]),
        "reason": st.sampled_from(["golden", "chunk_hash", "crash_loop", None, 7]),
        "seq": count,
        "boot": junk,
    },
)


def as_bytes(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True, default=str).encode()


# CI draws 300 examples; HYPOTHESIS_PROFILE=soak the profile's (much larger) count
_CHECKS = [HealthCheck.too_slow, HealthCheck.data_too_large]
FUZZ = (
    settings(deadline=None, suppress_health_check=_CHECKS)
    if os.environ.get("HYPOTHESIS_PROFILE") == "soak"
    else settings(max_examples=300, deadline=None, suppress_health_check=_CHECKS)
)

message = st.one_of(
    st.tuples(st.just("metrics"), st.sampled_from(DEVICES), metrics.map(as_bytes)),
    st.tuples(st.just("state"), st.sampled_from(DEVICES), state.map(as_bytes)),
    st.tuples(st.just("events"), st.sampled_from(DEVICES), event.map(as_bytes)),
    st.tuples(
        st.sampled_from(["metrics", "state", "events"]), st.sampled_from(DEVICES), st.binary(max_size=64)
    ),
)


@FUZZ
@given(st.lists(message, max_size=25), st.booleans())
def test_no_device_message_crashes_the_observer_or_the_gates(
    msgs: list[tuple[str, str, bytes]], restart: bool
) -> None:
    obs = FleetObserver(MODEL, 2, 1, "all")
    for i, (leaf, device, payload) in enumerate(msgs):
        obs.on_message(parse_message(leaf, device, payload))
        if restart and i == len(msgs) // 2:
            obs.start_window()
    for pct in (1, 50, 100):
        ev, devices = obs.evidence(Rollout("all", pct), None)
        for side in (ev.canary, ev.control):
            for n in (
                side.ok,
                side.errors,
                side.compared,
                side.agreed,
                *side.latency,
                *side.outputs.values(),
            ):
                assert isinstance(n, int) and n >= 0
        for result in evaluate(ev, gate_settings([]), 1):
            assert result.verdict in Verdict
            if result.value is not None:
                assert math.isfinite(result.value)
        assert devices["canary"] + devices["control"] <= len(DEVICES)
    assert all(n >= 0 for n in obs.ignored.values())
