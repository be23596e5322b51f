"""The fleet observer: windows over cumulative counters, roles, junk, health events (pure)."""

from __future__ import annotations

import json
import random

from agent.protocol import Rollout, canary_bucket
from converter.monitor.payloads import EventRecord, MetricsSample, parse_metrics, parse_state
from converter.monitor.sketches import parse_outputs, parse_shadow
from converter.rollout.gates import GateName, Verdict, evaluate
from converter.rollout.observe import FleetObserver
from converter.rollout.spec import gate_settings
from tests.support.fake_fleet import Behaviour, FakeDevice

MODEL = "digits"


def ids_by_bucket(n: int) -> list[str]:
    return sorted((f"dev-{i:02d}" for i in range(n)), key=lambda d: canary_bucket(d, MODEL))


def metrics(dev: FakeDevice) -> MetricsSample:
    sample = parse_metrics(dev.device_id, dev.metrics_payload())
    assert isinstance(sample, MetricsSample)
    return sample


def feed_state(obs: FleetObserver, dev: FakeDevice) -> None:
    state = parse_state(dev.device_id, dev.state_payload())
    obs.on_state(state)  # type: ignore[arg-type]


def test_window_counts_only_what_happened_since_it_started() -> None:
    rng = random.Random(1)
    dev = FakeDevice("dev-a", MODEL, "3")
    obs = FleetObserver(MODEL, 4, 3, "all")
    feed_state(obs, dev)
    dev.counters("3").serve(500, Behaviour(), rng, 0, None)
    obs.on_metrics(metrics(dev))  # first message: its history predates the window
    obs.start_window()
    obs.start_latency_window()
    dev.counters("3").serve(40, Behaviour(), rng, 0, None)
    obs.on_metrics(metrics(dev))
    rule = Rollout("all", 1)  # selects nobody: dev-a is a control
    assert canary_bucket("dev-a", MODEL) >= 1
    ev, devices = obs.evidence(rule, None)
    assert devices["control"] == 1 and ev.control.ok == 40 and sum(ev.control.latency) == 40
    assert ev.control.outputs_n == 40


def test_a_message_sent_again_after_newer_ones_counts_for_nothing() -> None:
    """A site's device sends again, after an outage, what its site broker acknowledged in the
    minute before (agent/telemetry/uplink.py): older cumulative counters arrive after newer
    ones. They are repeats (seq not above the last one seen), not a counter reset."""
    rng = random.Random(3)
    dev = FakeDevice("dev-a", MODEL, "3")
    obs = FleetObserver(MODEL, 4, 3, "all")
    feed_state(obs, dev)
    dev.counters("3").serve(100, Behaviour(), rng, 0, None)
    obs.on_metrics(metrics(dev))
    obs.start_window()
    sent = []
    for _ in range(3):
        dev.counters("3").serve(40, Behaviour(), rng, 0, None)
        sent.append(metrics(dev))
    for m in [*sent[:2], *sent[:2], sent[2]]:  # 2, 3, then 2 and 3 again, then 4
        obs.on_metrics(m)
    ev, devices = obs.evidence(Rollout("all", 1), None)
    assert devices["control"] == 1 and ev.control.ok == 120, ev.control.ok


def test_a_version_loaded_after_the_last_message_counts_from_zero() -> None:
    rng = random.Random(2)
    dev = FakeDevice("dev-a", MODEL, "3")
    obs = FleetObserver(MODEL, 4, 3, "all")
    dev.counters("3").serve(300, Behaviour(latency_ms=1.0), rng, 0, None)
    obs.on_metrics(metrics(dev))
    obs.start_window()
    dev.switch("4", 2)
    feed_state(obs, dev)
    dev.counters("4").serve(100, Behaviour(latency_ms=3.0, agreement=0.5), rng, 2, "3")
    obs.on_metrics(metrics(dev))
    ev, devices = obs.evidence(Rollout("all", 100), None)
    assert devices["canary"] == 1 and ev.canary.ok == 100  # nothing of v4 lost
    assert sum(ev.canary.latency) == 0  # latency is not counted until the wave settles
    obs.start_latency_window()
    obs.start_latency_window()  # once per window
    dev.counters("4").serve(100, Behaviour(latency_ms=3.0, agreement=0.5), rng, 2, "3")
    obs.on_metrics(metrics(dev))
    ev, _ = obs.evidence(Rollout("all", 100), None)
    assert ev.canary.ok == 200 and sum(ev.canary.latency) == 100
    assert 50 < ev.canary.compared < 150 and ev.canary.agreed <= ev.canary.compared
    # the previous version's p99 on this device, from before the switch
    p99_before, n_before = obs.self_before["dev-a"]
    assert n_before == 300 and 0.9 < p99_before < 1.4
    r = {g.name: g for g in evaluate(ev, gate_settings([]), 20)}
    assert r[GateName.LATENCY_P99_SELF].verdict is Verdict.FAIL
    assert 2.0 < (r[GateName.LATENCY_P99_SELF].value or 0) < 3.6


def test_counters_that_restart_keep_the_window_and_absurd_jumps_are_junk() -> None:
    rng = random.Random(3)
    obs = FleetObserver(MODEL, 4, 3, "all")
    dev = FakeDevice("dev-a", MODEL, "4", boot="")
    feed_state(obs, dev)
    dev.counters("4").serve(50, Behaviour(), rng, 0, None)
    obs.on_metrics(metrics(dev))
    obs.start_window()
    dev.counters("4").serve(30, Behaviour(), rng, 0, None)
    obs.on_metrics(metrics(dev))
    # the agent restarts (no boot id): its counters start again from zero
    dev.versions.clear()
    dev.counters("4").serve(10, Behaviour(), rng, 0, None)
    obs.on_metrics(metrics(dev))
    ev, _ = obs.evidence(Rollout("all", 100), None)
    assert ev.canary.ok == 40 and not obs.ignored

    # with a boot id, counters that go down mean the version was loaded again in the same
    # process (rolled back and returned to): counted from zero, not junk
    obs2 = FleetObserver(MODEL, 4, 3, "all")
    dev2 = FakeDevice("dev-b", MODEL, "4", boot="b1")
    feed_state(obs2, dev2)
    dev2.counters("4").serve(50, Behaviour(), rng, 0, None)
    obs2.on_metrics(metrics(dev2))
    obs2.start_window()
    dev2.counters("4").serve(20, Behaviour(), rng, 0, None)
    obs2.on_metrics(metrics(dev2))
    dev2.versions.clear()
    dev2.counters("4").serve(5, Behaviour(), rng, 0, None)
    obs2.on_metrics(metrics(dev2))
    ev2, _ = obs2.evidence(Rollout("all", 100), None)
    assert ev2.canary.ok == 25 and not obs2.ignored
    # a jump of more than 10**9 requests in one message is junk: ignored, counted, and the
    # next message counts from there
    dev2.counters("4").errors += 2 * 10**9
    obs2.on_metrics(metrics(dev2))
    dev2.counters("4").serve(5, Behaviour(), rng, 0, None)
    obs2.on_metrics(metrics(dev2))
    ev2, _ = obs2.evidence(Rollout("all", 100), None)
    assert ev2.canary.ok == 30 and obs2.ignored["dev-b"] == 1


def test_junk_sketch_spoils_neither_latency_nor_the_window() -> None:
    obs = FleetObserver(MODEL, 4, 3, "all")
    dev = FakeDevice("dev-a", MODEL, "4")
    feed_state(obs, dev)
    rng = random.Random(4)
    dev.counters("4").serve(50, Behaviour(), rng, 0, None)
    obs.on_metrics(metrics(dev))
    obs.start_window()
    obs.start_latency_window()
    dev.counters("4").serve(50, Behaviour(), rng, 0, None)
    doc = json.loads(dev.metrics_payload())
    doc["models"][0]["outputs"]["n"] = 10**20  # absurd
    doc["models"][0]["shadow"] = {"sampled": 1, "compared": 5, "agreed": 9}  # impossible
    sample = parse_metrics("dev-a", json.dumps(doc).encode())
    assert isinstance(sample, MetricsSample) and len(sample.models[0].junk) == 2
    obs.on_metrics(sample)
    assert obs.ignored["dev-a"] == 1
    dev.counters("4").serve(50, Behaviour(), rng, 0, None)
    obs.on_metrics(metrics(dev))
    ev, _ = obs.evidence(Rollout("all", 100), None)
    assert ev.canary.ok == 100 and ev.canary.outputs_n == 100 and sum(ev.canary.latency) == 100
    # unknown latency buckets: the whole entry is junk
    doc = json.loads(dev.metrics_payload())
    doc["models"][0]["histogram_ms"] = [[0.123456, 5]]
    obs.on_metrics(parse_metrics("dev-a", json.dumps(doc).encode()))  # type: ignore[arg-type]
    assert obs.ignored["dev-a"] == 2


def test_roles_follow_the_rule_and_the_reported_version() -> None:
    ids = ids_by_bucket(10)
    obs = FleetObserver(MODEL, 4, 3, "group:g")
    pct = int(canary_bucket(ids[2], MODEL)) + 1  # selects the first three by bucket
    rule = Rollout("group:g", pct)
    for i, d in enumerate(ids):
        dev = FakeDevice(d, MODEL, "4" if i < 2 else "3", groups=("g",) if i < 8 else ("other",))
        feed_state(obs, dev)
    canary, control = obs.roles(rule)
    assert canary == sorted(ids[:2])  # the third is selected but still on v3
    assert control == sorted(ids[3:8])  # in the group, not selected, on v3
    assert obs.selected(rule) == sorted(ids[:3])


def event(device: str, kind: str, version: str, reason: str | None, seq: int) -> EventRecord:
    return EventRecord(device, "b0", seq, 100.0 + seq, kind, MODEL, version, reason)


def test_health_counts_permanent_refusals_and_rollbacks_of_the_new_version_once() -> None:
    obs = FleetObserver(MODEL, 4, 3, "all")
    obs.on_event(event("a", "rejected", "4", "chunk_hash", 1))  # transient: retried by the device
    obs.on_event(event("a", "rejected", "5", "golden", 2))  # another version
    obs.on_event(event("a", "activated", "4", None, 3))
    assert obs.bad_events == []
    obs.on_event(event("a", "rejected", "4", "golden", 4))
    obs.on_event(event("a", "rejected", "4", "golden", 4))  # a QoS 1 duplicate
    obs.on_event(event("b", "rolled_back", "4", "crash_loop", 1))
    assert obs.bad_events == ["a: rejected (golden)", "b: rolled_back (crash_loop)"]


def test_sketch_parser_cases() -> None:
    ok, why = parse_outputs(
        {"kind": "classes", "n": 3, "classes": [[1, 2], [7, 1]], "confidence": [[0.95, 3]]}
    )
    assert why is None and ok is not None and ok.classes == ((1, 2), (7, 1))
    assert parse_outputs(None) == (None, None)
    for bad in (
        [],
        {"kind": "pixels", "n": 1},
        {"kind": "classes", "n": 3, "classes": [[1, 2]]},  # does not add up
        {"kind": "classes", "n": 1, "classes": [[-1, 1]]},
        {"kind": "classes", "n": 1, "classes": [[1.5, 1]]},
        {"kind": "classes", "n": 2, "classes": [[1, 1], [1, 1]]},
        {"kind": "classes", "n": 1, "classes": [[1, 1]], "confidence": [[0.33, 1]]},
        {"kind": "classes", "n": True, "classes": []},
        {"kind": "values", "n": 1, "histogram": [["x", 1]]},
        {"kind": "values", "n": 1, "histogram": [[1e400, 1]]},
    ):
        sketch, why = parse_outputs(bad)
        assert sketch is None and why, bad
    values, why = parse_outputs({"kind": "values", "n": 3, "histogram": [[-1.0, 1], [None, 2]]})
    assert why is None and values is not None and values.histogram == ((-1.0, 1), (None, 2))
    shadow, why = parse_shadow({"against": "3", "k": 10, "sampled": 5, "compared": 4, "agreed": 4})
    assert why is None and shadow is not None and shadow.agreed == 4
    off, why = parse_shadow({"off": "memory_bound"})
    assert off is not None and off.off == "memory_bound"
    assert parse_shadow({"sampled": 1, "compared": 2, "agreed": 0})[0] is None
