"""End to end against a real Mosquitto: repository, push, agents pulling, targeting, canary."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.protocol import canary_bucket
from tests.harness import AgentProcess, must, watching


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    must("repo", "init", str(tmp_path / "repo"))
    return tmp_path / "repo"


def test_push_all_then_group_only(broker, repo: Path, tmp_path: Path, digits_int8, digits_float32) -> None:
    url = broker.url
    a = AgentProcess(tmp_path, "pi-a", url, repo / "root.json")
    b = AgentProcess(tmp_path, "pi-b", url, repo / "root.json", groups=["kitchen"])
    with watching(broker.port) as fleet:
        a.start()
        b.start()
        try:
            out = must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits",
                       "--broker", url)
            assert "digits v1 -> all" in out
            fleet.wait_active("pi-a", "digits", 1)
            fleet.wait_active("pi-b", "digits", 1)
            for dev in ("pi-a", "pi-b"):
                kinds = [e["event"] for e in fleet.events_of(dev)]
                assert kinds.index("verified") < kinds.index("activated"), kinds
            # v2 to the group only
            must("push", str(digits_float32.tflite), "--repo", str(repo), "--name", "digits",
                 "--broker", url, "--target", "group:kitchen")
            fleet.wait_active("pi-b", "digits", 2)
            fleet.wait_for(lambda: fleet.states["pi-a"].get("repo_version") == 3, 20,
                           "pi-a to verify the new repository version")
            assert fleet.active("pi-a") == ("digits", "1")
            assert not [e for e in fleet.events_of("pi-a", "activated") if e["version"] == 2]
            # the state file says the same, and v1 is kept as previous on pi-b
            sb = b.state_file()["models"]["digits"]
            assert sb["active"]["version"] == 2 and sb["previous"]["version"] == 1
            assert (b.state_dir / "models" / "digits" / "1" / "model.tflite").exists()
            assert a.alive() and b.alive()
        finally:
            a.stop()
            b.stop()
        # a clean stop leaves the retained state offline
        fleet.wait_for(lambda: fleet.states["pi-a"]["online"] is False, 10, "pi-a offline")


def test_canary_reaches_a_stable_documented_subset(broker, repo: Path, tmp_path: Path,
                                                    digits_int8) -> None:
    """10 agents, canary 50 %: exactly the devices whose bucket is below 50 take it."""
    url = broker.url
    ids = [f"node-{i:02d}" for i in range(10)]
    expected = {d for d in ids if canary_bucket(d, "digits") < 50}
    assert 0 < len(expected) < 10  # the ids were chosen so the split is not trivial
    agents = [AgentProcess(tmp_path, d, url, repo / "root.json") for d in ids]
    with watching(broker.port) as fleet:
        must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits",
             "--broker", url, "--canary", "50")
        for ag in agents:
            ag.start()
        try:
            for d in sorted(expected):
                fleet.wait_active(d, "digits", 1, timeout_s=90)
            fleet.wait_for(lambda: all((fleet.states.get(d) or {}).get("repo_version") == 2 for d in ids),
                           60, "every agent to verify the repository")
            time.sleep(0.5)
            got = {d for d in ids if fleet.active(d)[1] == "1"}
            assert got == expected
        finally:
            for ag in agents:
                ag.stop()
