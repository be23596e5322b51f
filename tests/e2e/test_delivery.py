"""End to end against a real Mosquitto: repository, push, agents pulling, targeting, canary."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from agent.protocol import canary_bucket
from tests.support.harness import AgentProcess, must, watching


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
            out = must(
                "push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits", "--broker", url
            )
            assert "digits v1 -> all" in out
            fleet.wait_active("pi-a", "digits", 1)
            fleet.wait_active("pi-b", "digits", 1)
            for dev in ("pi-a", "pi-b"):
                kinds = [e["event"] for e in fleet.events_of(dev)]
                assert kinds.index("verified") < kinds.index("activated"), kinds
            # v2 to the group only
            must(
                "push",
                str(digits_float32.tflite),
                "--repo",
                str(repo),
                "--name",
                "digits",
                "--broker",
                url,
                "--target",
                "group:kitchen",
            )
            fleet.wait_active("pi-b", "digits", 2)
            fleet.wait_for(
                lambda: fleet.states["pi-a"].get("repo_version") == 3,
                20,
                "pi-a to verify the new repository version",
            )
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


def test_canary_reaches_a_stable_documented_subset(broker, repo: Path, tmp_path: Path, digits_int8) -> None:
    """10 agents, canary 50 %: exactly the devices whose bucket is below 50 take it."""
    url = broker.url
    ids = [f"node-{i:02d}" for i in range(10)]
    expected = {d for d in ids if canary_bucket(d, "digits") < 50}
    assert 0 < len(expected) < 10  # the ids were chosen so the split is not trivial
    agents = [AgentProcess(tmp_path, d, url, repo / "root.json") for d in ids]
    with watching(broker.port) as fleet:
        must(
            "push",
            str(digits_int8.tflite),
            "--repo",
            str(repo),
            "--name",
            "digits",
            "--broker",
            url,
            "--canary",
            "50",
        )
        for ag in agents:
            ag.start()
        try:
            for d in sorted(expected):
                fleet.wait_active(d, "digits", 1, timeout_s=90)
            fleet.wait_for(
                lambda: all((fleet.states.get(d) or {}).get("repo_version") == 2 for d in ids),
                60,
                "every agent to verify the repository",
            )
            time.sleep(0.5)
            got = {d for d in ids if fleet.active(d)[1] == "1"}
            assert got == expected
        finally:
            for ag in agents:
                ag.stop()


def test_a_device_before_the_first_push_is_ready_and_the_push_wakes_it(
    broker, repo: Path, tmp_path: Path, digits_int8
) -> None:
    """No repository on the broker is no failure: the agent says it is ready (no rejection,
    no error) and waits; the first push's metadata wakes it long before its next regular
    refresh (an hour here)."""
    url = broker.url
    agent = AgentProcess(tmp_path, "pi-n", url, repo / "root.json", refresh_interval_s=3600.0)
    with watching(broker.port) as fleet:
        agent.start()
        try:
            fleet.wait_for(
                lambda: re.search(r"ready [0-9.]+ s after start", agent.log()) is not None,
                60,
                "the agent to say it is ready without a repository",
            )
            fleet.wait_for(lambda: fleet.states.get("pi-n", {}).get("status") == "idle", 30, "idle")
            assert fleet.states["pi-n"]["error"] is None and fleet.events_of("pi-n", "rejected") == []
            must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits", "--broker", url)
            fleet.wait_active("pi-n", "digits", 1, timeout_s=120)
        finally:
            agent.stop()


def test_key_rotation_reaches_devices_and_retires_old_keys(
    broker, repo: Path, tmp_path: Path, digits_int8, digits_float32
) -> None:
    """Rotate the root and targets keys: devices follow the root chain; the old key is dead."""
    import shutil

    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import Metadata, MetaFile

    from converter.repo.repository import Repository
    from tests.support.harness import publish_raw

    url = broker.url
    agent = AgentProcess(tmp_path, "pi-r", url, repo / "root.json")
    with watching(broker.port) as fleet:
        must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits", "--broker", url)
        agent.start()
        try:
            fleet.wait_active("pi-r", "digits", 1, timeout_s=60)
            before = tmp_path / "before-rotation"
            shutil.copytree(repo, before)
            out = must("repo", "rotate", str(repo), "targets", "--broker", url)
            assert "rotated the targets keys: root v2" in out
            must("repo", "rotate", str(repo), "root", "--broker", url)
            must("push", str(digits_float32.tflite), "--repo", str(repo), "--name", "digits", "--broker", url)
            fleet.wait_active("pi-r", "digits", 2)
            assert (agent.state_dir / "tuf" / "root_history" / "3.root.json").exists()
            # someone still holding the old targets key (and the current snapshot and
            # timestamp keys) signs new targets metadata: refused
            current = Repository.open(repo)
            targets = Metadata.from_bytes(current.targets.to_bytes())
            targets.signed.version += 1
            targets.signatures.clear()
            old_key = next((before / "keys" / "targets").glob("*.pem"))
            old_public = Repository.open(before).root.signed.keys[old_key.stem]
            targets.sign(CryptoSigner.from_priv_key_uri(f"file2:{old_key}", old_public))
            t_bytes = targets.to_bytes()
            snapshot = Metadata.from_bytes(current.snapshot.to_bytes())
            snapshot.signed.version += 1
            snapshot.signed.meta["targets.json"] = MetaFile.from_data(
                targets.signed.version, t_bytes, ["sha256"]
            )
            snapshot.signatures.clear()
            for signer in current.signers("snapshot"):
                snapshot.sign(signer, append=True)
            s_bytes = snapshot.to_bytes()
            timestamp = Metadata.from_bytes(current.timestamp.to_bytes())
            timestamp.signed.version += 1
            timestamp.signed.snapshot_meta = MetaFile.from_data(snapshot.signed.version, s_bytes, ["sha256"])
            timestamp.signatures.clear()
            for signer in current.signers("timestamp"):
                timestamp.sign(signer, append=True)
            files = [
                (f"{targets.signed.version}.targets.json", t_bytes),
                (f"{snapshot.signed.version}.snapshot.json", s_bytes),
                ("timestamp.json", timestamp.to_bytes()),
            ]
            for name, data in files:
                publish_raw(broker.port, f"litefleet/v1/repo/metadata/{name}", data)
            fleet.wait_event("pi-r", "rejected", reason="bad_signature")
            assert fleet.active("pi-r") == ("digits", "2")
        finally:
            agent.stop()


def test_status_lists_every_device(broker, repo: Path, tmp_path: Path, digits_int8) -> None:
    import json

    from tests.support.harness import litefleet

    url = broker.url
    agents = [AgentProcess(tmp_path, f"st-{i}", url, repo / "root.json") for i in range(2)]
    with watching(broker.port) as fleet:
        must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits", "--broker", url)
        for a in agents:
            a.start()
        try:
            for a in agents:
                fleet.wait_active(a.device_id, "digits", 1, timeout_s=60)
            agents[1].stop()
            fleet.wait_for(lambda: fleet.states["st-1"]["online"] is False, 10)
            rows = json.loads(must("status", "--broker", url, "--json"))
            by_id = {r["device_id"]: r for r in rows}
            assert set(by_id) == {"st-0", "st-1"}
            assert by_id["st-0"]["online"] is True and by_id["st-0"]["model"] == "digits"
            assert by_id["st-0"]["version"] == "1" and by_id["st-0"]["status"] == "serving"
            assert by_id["st-1"]["online"] is False
            for key in ("error", "latency_ms_p50", "inferences"):
                assert key in by_id["st-0"]
            table = must("status", "--broker", url)
            assert "st-0" in table and "serving" in table and "DEVICE_ID" in table
            code, _, err = litefleet("status", "--broker", "mqtt://127.0.0.1:1", "--timeout", "1")
            assert code == 1 and err.count("\n") == 1 and "could not connect" in err
        finally:
            for a in agents:
                a.stop()
