"""The state message's pure core: which model stands for the device, and whose figures it gives."""

from __future__ import annotations

import json

from agent.serving.stats import ModelStats, StatsSnapshot
from agent.state_message import DeviceStatus, served, standing_model, state_document


def snapshot(name: str, *latencies_ns: int) -> StatsSnapshot:
    stats = ModelStats(name, "1")
    for ns in latencies_ns:
        stats.record_ok(ns)
    return stats.snapshot()


def test_the_first_active_model_by_name_stands_for_the_device() -> None:
    assert standing_model({"zeta": {}, "alpha": {}, "mid": {}}) == "alpha"
    assert standing_model({}) is None


def test_figures_never_borrow_another_models_latency() -> None:
    snaps = {"b": snapshot("b", 40_000_000, 40_000_000), "a": snapshot("a", 1_000_000)}
    figures = served("a", snaps)
    assert figures.inferences == 3
    assert figures.latency_ms_p50 is not None and 0.93 < figures.latency_ms_p50 < 1.07
    # the standing model is not being served right now (being replaced): no p50, not b's
    assert served("c", snaps).latency_ms_p50 is None
    assert served(None, {}).latency_ms_p50 is None


def test_the_document_and_its_wire_words() -> None:
    doc = state_document(
        device_id="pi-1",
        online=True,
        status=DeviceStatus.SERVING,
        error=None,
        models={
            "b": {"version": 7, "sha256": "x", "trial": False},
            "a": {"version": 3, "sha256": "y", "trial": True},
        },
        snapshots={"b": snapshot("b", 40_000_000)},
        groups=("kitchen",),
        repo_version=12,
        agent_version="0.1.0",
        boot="abc",
        ts=1.23456,
    )
    wire = json.loads(json.dumps(doc))
    assert (wire["model"], wire["version"], wire["status"]) == ("a", "3", "serving")
    assert wire["latency_ms_p50"] is None and wire["inferences"] == 1 and wire["ts"] == 1.235
    assert wire["site"] is None  # a device of the central broker
    assert wire["refused"] == {}
    refused = {"a": {"version": 4, "reason": "crash_loop"}}
    assert json.loads(json.dumps(state_document(**_args(doc), refused=refused)))["refused"] == refused
    assert json.loads(json.dumps(state_document(**_args(doc), site="b")))["site"] == "b"
    offline = json.loads(json.dumps(state_document(**{**_args(doc), "online": False})))
    assert offline["status"] == "offline" and offline["online"] is False
    assert [s.value for s in DeviceStatus] == [
        "starting",
        "idle",
        "downloading",
        "checking",
        "serving",
        "offline",
    ]


def _args(doc: dict) -> dict:
    return {
        "device_id": doc["device_id"],
        "online": doc["online"],
        "status": DeviceStatus.SERVING,
        "error": doc["error"],
        "models": doc["models"],
        "snapshots": {},
        "groups": doc["groups"],
        "repo_version": doc["repo_version"],
        "agent_version": doc["agent_version"],
        "boot": doc["boot"],
        "ts": doc["ts"],
    }


def test_the_will_holds_nothing_an_activation_changes() -> None:
    """The will is set once per connection and never renewed: it must not name a model,
    and its models key is absent, which is how consumers tell it from a full state."""
    from agent.state_message import will_document

    doc = will_document(device_id="pi-1", boot="b1", ts=1_800_000_000.12345)
    assert doc == {
        "device_id": "pi-1",
        "online": False,
        "status": "offline",
        "boot": "b1",
        "ts": 1_800_000_000.123,
        "model": None,
        "version": None,
    }
    assert json.loads(json.dumps(doc))["status"] == DeviceStatus.OFFLINE
