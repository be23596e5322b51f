"""The device's will (docs/protocol.md 6.1) with a real agent, the monitor and ``status``.

- activations do not touch the will: the agent never reconnects after one, no will
  appears on the state topic while it runs, and no event arrives twice;
- an agent killed without a goodbye leaves the minimal will (no ``models``): the
  monitor shows the device offline with its last known model, also after a restart
  (from its database); ``status`` shows the model as unknown and says why.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from agent.mqtt.client import wait_until
from tests.support.harness import AgentProcess, must, watching
from tests.support.monitor import running_monitor

WILL_KEYS = {"device_id", "online", "status", "boot", "ts", "model", "version"}


def test_a_killed_agent_leaves_its_will_and_consumers_keep_its_last_model(
    broker, tmp_path: Path, digits_int8
) -> None:
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    push = ("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits", "--broker", broker.url)
    must(*push)
    agent = AgentProcess(tmp_path, "pi-w", broker.url, repo / "root.json")
    db = tmp_path / "monitor.db"
    with watching(broker.port) as watch, running_monitor(broker.port, db) as mon:
        try:
            agent.start()
            watch.wait_active("pi-w", "digits", 1, timeout_s=60)
            must(*push, "--version", "2")
            watch.wait_active("pi-w", "digits", 2, timeout_s=60)
            watch.wait_event("pi-w", "marked_good", version=2, timeout_s=30)
            # two activations and their trials: one connection, no will, no event twice
            assert agent.log().count("agent.mqtt.client: connected to") == 1, agent.log()[-3000:]
            states = [json.loads(p) for t, p in watch.raw if t.endswith("/state") and p]
            assert states and all("models" in s and s["online"] for s in states)
            seen = Counter((e["boot"], e["seq"]) for e in watch.events_of("pi-w"))
            assert seen and max(seen.values()) == 1, seen

            def monitor_has(version: str) -> bool:
                dev = mon.collector.snapshot().device("pi-w")
                return bool(dev and dev.state and dev.state.version == version)

            assert wait_until(lambda: monitor_has("2"), 10)

            agent.kill()  # no goodbye: the broker publishes the will
            watch.wait_for(lambda: watch.states["pi-w"].get("online") is False, 30, "the will")
            will = watch.states["pi-w"]
            assert set(will) == WILL_KEYS and will["model"] is None and will["status"] == "offline"
            assert will["boot"] == states[-1]["boot"]

            def offline_with_last_model() -> bool:
                dev = mon.collector.snapshot().device("pi-w")
                return bool(dev and dev.state and not dev.state.online and dev.state.will)

            assert wait_until(offline_with_last_model, 10)
            dev = mon.collector.snapshot().device("pi-w")
            assert dev is not None and dev.state is not None
            assert (dev.state.model, dev.state.version, dev.state.status) == ("digits", "2", "offline")
            assert [m.version for m in dev.state.models] == ["2"]
            api = json.loads(mon.get("/api/devices"))[0]
            assert api["model"] == "digits" and api["online"] is False and api["last_will"] is True
        finally:
            agent.kill()
    # a restarted monitor gets the retained will first: the last model comes from its database
    with running_monitor(broker.port, db) as mon:
        assert wait_until(lambda: mon.collector.snapshot().device("pi-w") is not None, 10)
        assert mon.collector.wait_idle(10)
        dev = mon.collector.snapshot().device("pi-w")
        assert dev is not None and dev.state is not None and dev.state.will
        assert (dev.state.model, dev.state.version, dev.state.online) == ("digits", "2", False)
        with mon.collector.store.reader() as r:
            assert [(d["model"], d["version"], d["online"]) for d in r.devices()] == [("digits", "2", 0)]
    # status is a one-shot read of the broker: it cannot know the model, and says so
    row = json.loads(must("status", "--broker", broker.url, "--json"))[0]
    assert (row["online"], row["status"], row["model"], row["version"]) == (False, "offline", None, None)
    assert row["last_will"] is True
    table = must("status", "--broker", broker.url)
    assert table.splitlines()[1].split()[:5] == ["pi-w", "no", "-", "unknown", "unknown"]  # no groups
    assert "last will" in table
