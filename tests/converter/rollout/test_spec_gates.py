"""The rollout's flags and gates: parsing, defaults and every gate's formula (pure)."""

from __future__ import annotations

import math

import pytest

from agent.serving.stats import N_BUCKETS, bucket_index
from converter.errors import BadInputError
from converter.monitor.sketches import OutputSketch, SketchKind
from converter.rollout.gates import (
    DEFAULT_GATES,
    Evidence,
    GateName,
    Op,
    SelfLatency,
    SideStats,
    Verdict,
    evaluate,
    js_divergence,
)
from converter.rollout.spec import (
    RolloutSpec,
    gate_settings,
    parse_duration,
    parse_gate,
    parse_waves,
    spec_from_json,
)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("10m", 600), ("2h", 7200), ("90", 90), ("1.5m", 90)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "0s", "-5m", "nan", "inf", "ten", "", "m", "8d", "700000"])
def test_bad_durations_are_one_line(text: str) -> None:
    with pytest.raises(BadInputError) as err:
        parse_duration(text, "--bake")
    assert "--bake" in str(err.value) and "\n" not in str(err.value)


def test_waves() -> None:
    assert parse_waves("5,25,100") == (5, 25, 100)
    assert parse_waves("100") == (100,)
    for bad, word in [
        ("25,5,100", "larger"),
        ("5,5,100", "larger"),
        ("5,25", "last wave must be 100"),
        ("5,25,50", "last wave must be 100"),
        ("0,100", "1-100"),
        ("5,x,100", "1-100"),
        ("", "1-100"),
        ("5,150", "1-100"),
    ]:
        with pytest.raises(BadInputError, match=word):
            parse_waves(bad)


def test_gate_expressions() -> None:
    assert parse_gate("agreement>=0.95").threshold == 0.95
    g = parse_gate(" latency_p99_ratio <= 2 ")
    assert (g.name, g.op, g.threshold, g.enabled) == (GateName.LATENCY_P99_RATIO, Op.LE, 2.0, True)
    off = parse_gate("drift_js=off")
    assert off.name is GateName.DRIFT_JS and not off.enabled
    settings = gate_settings(["agreement>=0.8", "health=off", "agreement>=0.85"])
    assert settings[GateName.AGREEMENT].threshold == 0.85  # the later one wins
    assert not settings[GateName.HEALTH].enabled
    assert settings[GateName.ERROR_RATE] == DEFAULT_GATES[GateName.ERROR_RATE]


@pytest.mark.parametrize(
    ("expr", "says"),
    [
        ("agreemnt>=0.9", "unknown gate 'agreemnt'"),
        ("agreement=0.9", "expected NAME OP NUMBER"),
        ("agreement == 0.9", "expected NAME OP NUMBER"),
        ("agreement>=", "expected NAME OP NUMBER"),
        ("agreement>=lots", "finite number"),
        ("agreement>=nan", "finite number"),
        ("agreement>=-1", "finite number"),
        ("foo=off", "unknown gate 'foo'"),
        ("", "expected NAME OP NUMBER"),
    ],
)
def test_bad_gate_expressions(expr: str, says: str) -> None:
    with pytest.raises(BadInputError, match=says) as err:
        parse_gate(expr)
    assert "\n" not in str(err.value)


def test_spec_round_trips_and_signs_shadow_below_100() -> None:
    spec = RolloutSpec(
        "digits", "group:kitchen", (10, 50, 100), 30.0, 90.0, 40, 5, gate_settings(["drift_js=off"])
    )
    again = spec_from_json(spec.to_json())
    assert again == spec
    assert [spec.rule(i).to_dict() for i in range(3)] == [
        {"target": "group:kitchen", "canary_pct": 10, "shadow_k": 5},
        {"target": "group:kitchen", "canary_pct": 50, "shadow_k": 5},
        {"target": "group:kitchen", "canary_pct": 100},
    ]
    with pytest.raises(BadInputError):
        RolloutSpec("digits", min_samples=0)
    with pytest.raises(BadInputError):
        RolloutSpec("digits", shadow_k=1)
    with pytest.raises(BadInputError):
        RolloutSpec("digits", bake_s=60, max_wait_s=30)


# -- gates ---------------------------------------------------------------------------------------


def hist(ms: float, n: int) -> tuple[int, ...]:
    counts = [0] * N_BUCKETS
    counts[bucket_index(int(ms * 1e6))] = n
    return tuple(counts)


def results(ev: Evidence, min_samples: int = 10, **overrides: str) -> dict[GateName, object]:
    settings = gate_settings(list(overrides.values()))
    return {r.name: r for r in evaluate(ev, settings, min_samples)}


def test_js_divergence() -> None:
    assert js_divergence({0: 5, 1: 5}, {0: 50, 1: 50}) == 0.0
    assert js_divergence({0: 10}, {1: 10}) == pytest.approx(1.0)
    a, b = {0: 30, 1: 10, 2: 5}, {0: 10, 1: 30}
    assert js_divergence(a, b) == pytest.approx(js_divergence(b, a))
    assert 0 < js_divergence(a, b) < 1
    assert js_divergence({}, {0: 1}) == 0.0


def test_empty_evidence_waits_and_health_passes() -> None:
    r = results(Evidence())
    assert r[GateName.HEALTH].verdict is Verdict.PASS  # type: ignore[attr-defined]
    for name in GateName:
        if name not in (GateName.HEALTH, GateName.DRIFT_BASELINE_JS):
            assert r[name].verdict is Verdict.WAIT, name  # type: ignore[attr-defined]
    assert r[GateName.DRIFT_BASELINE_JS].verdict is Verdict.SKIP  # type: ignore[attr-defined]


def test_each_gate_passes_and_fails_on_its_formula() -> None:
    good = Evidence(
        canary=SideStats(
            ("a",),
            ok=1000,
            errors=2,
            latency=hist(1.0, 600),
            kind=SketchKind.CLASSES,
            outputs={0: 50, 1: 50},
            compared=200,
            agreed=190,
        ),
        control=SideStats(
            ("b",), ok=5000, latency=hist(0.9, 800), kind=SketchKind.CLASSES, outputs={0: 48, 1: 52}
        ),
        self_latency=(SelfLatency("a", 0.95, 300, hist(1.0, 100)),),
        baseline=OutputSketch(SketchKind.CLASSES, 100, classes=((0, 50), (1, 50))),
    )
    r = results(good)
    for name in GateName:
        assert r[name].verdict is Verdict.PASS, (name, r[name])  # type: ignore[attr-defined]
    assert r[GateName.ERROR_RATE].value == pytest.approx(2 / 1002)  # type: ignore[attr-defined]
    assert r[GateName.AGREEMENT].value == pytest.approx(0.95)  # type: ignore[attr-defined]
    assert r[GateName.AGREEMENT].samples == 200  # type: ignore[attr-defined]

    bad = Evidence(
        canary=SideStats(
            ("a",),
            ok=900,
            errors=100,
            latency=hist(40.0, 600),
            kind=SketchKind.CLASSES,
            outputs={0: 100},
            compared=200,
            agreed=20,
        ),
        control=SideStats(("b",), ok=5000, latency=hist(1.0, 800), kind=SketchKind.CLASSES, outputs={1: 100}),
        self_latency=(SelfLatency("a", 1.0, 300, hist(40.0, 100)),),
        bad_events=("a: rolled_back (inference_errors)",),
        baseline=OutputSketch(SketchKind.CLASSES, 100, classes=((1, 100),)),
    )
    r = results(bad)
    for name in GateName:
        assert r[name].verdict is Verdict.FAIL, (name, r[name])  # type: ignore[attr-defined]
    ratio = r[GateName.LATENCY_P99_RATIO]
    assert 30 < ratio.value < 50 and "p99" in ratio.describe()  # type: ignore[attr-defined,operator]
    assert "a: rolled_back" in r[GateName.HEALTH].describe()  # type: ignore[attr-defined]


def test_the_p99_ratio_waits_for_500_requests_a_side_whatever_min_samples_says() -> None:
    ev = Evidence(
        canary=SideStats(("a",), ok=499, latency=hist(9.0, 499)),
        control=SideStats(("b",), ok=900, latency=hist(1.0, 900)),
    )
    r = results(ev, min_samples=10)[GateName.LATENCY_P99_RATIO]
    assert r.verdict is Verdict.WAIT and r.samples == 499  # type: ignore[attr-defined]
    ev = Evidence(canary=SideStats(("a",), ok=500, latency=hist(9.0, 500)), control=ev.control)
    assert results(ev, min_samples=10)[GateName.LATENCY_P99_RATIO].verdict is Verdict.FAIL  # type: ignore[attr-defined]


def test_too_few_samples_waits_and_off_is_off() -> None:
    ev = Evidence(canary=SideStats(("a",), ok=4, errors=5, compared=3, agreed=0))
    r = results(ev, min_samples=10, g="agreement=off")
    assert r[GateName.ERROR_RATE].verdict is Verdict.WAIT  # type: ignore[attr-defined]
    assert r[GateName.AGREEMENT].verdict is Verdict.OFF  # type: ignore[attr-defined]
    r = results(ev, min_samples=10)
    assert r[GateName.AGREEMENT].verdict is Verdict.WAIT  # type: ignore[attr-defined]
    assert math.isclose(r[GateName.AGREEMENT].value, 0.0)  # type: ignore[attr-defined]


def test_self_latency_takes_the_worst_device_with_enough_samples() -> None:
    ev = Evidence(
        self_latency=(
            SelfLatency("fast", 1.0, 500, hist(1.1, 200)),
            SelfLatency("slow", 1.0, 500, hist(3.0, 200)),
            SelfLatency("few", 1.0, 500, hist(50.0, 3)),  # too few to judge on its own
        )
    )
    r = results(ev, min_samples=100)[GateName.LATENCY_P99_SELF]
    assert r.verdict is Verdict.FAIL and "slow" in r.detail  # type: ignore[attr-defined]
    assert 2.5 < r.value < 3.5  # type: ignore[attr-defined,operator]
