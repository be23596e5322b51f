"""Bad input on the delivery path, each against a real Mosquitto and a real agent process.

Every case starts from an agent serving ``digits`` v1 and ends with the same
checks: the refusal is reported with its reason (an ``events`` message and the
retained ``state``), v1 is still active (state topic and state file), nothing
of the refused candidate is left in the state folder, and the agent process is
still running.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from agent.files import file_sha256
from agent.protocol import Topics, consistent_target_file
from converter.repo.repository import Repository
from tests.support.harness import (
    AgentProcess,
    FleetWatcher,
    copy_model,
    must,
    publish_many,
    publish_raw,
    read_retained,
)
from tests.support.models import _never_returning_model

TOPICS = Topics()
DEV = "pi-1"


@dataclass
class Fleet:
    broker: object
    repo: Path
    agent: AgentProcess
    watch: FleetWatcher
    tmp: Path
    v1: object  # ConvertedModel

    @property
    def url(self) -> str:
        return self.broker.url  # type: ignore[attr-defined]

    @property
    def port(self) -> int:
        return self.broker.port  # type: ignore[attr-defined]

    def push(self, model: Path, *extra: str) -> str:
        return must(
            "push", str(model), "--repo", str(self.repo), "--name", "digits", "--broker", self.url, *extra
        )

    def retained(self, topic: str) -> bytes:
        data = read_retained(self.port, topic)
        assert data, f"nothing retained on {topic}"
        return data

    def expect_refused(self, reason: str, *, timeout_s: float = 30.0, kind: str = "rejected") -> dict:
        """The shared ending of every case."""
        ev = self.watch.wait_event(DEV, kind, timeout_s=timeout_s, reason=reason)
        self.watch.wait_for(
            lambda: reason in str((self.watch.states.get(DEV) or {}).get("error")),
            15,
            f"state error mentioning {reason}",
        )
        self.assert_serving_v1()
        return ev

    def assert_serving_v1(self) -> None:
        assert self.watch.active(DEV) == ("digits", "1")
        st = self.agent.state_file()["models"]["digits"]
        assert st["active"]["version"] == 1
        assert st["active"]["sha256"] == self.v1_sha
        assert self.agent.alive(), self.agent.log()[-3000:]
        # no staging folders, no other versions, no partial downloads
        installed = sorted(p.name for p in (self.agent.state_dir / "models" / "digits").iterdir())
        assert installed == ["1"], installed
        leftovers = [p.name for p in (self.agent.state_dir / "downloads").iterdir()]
        assert leftovers == [], leftovers

    @property
    def v1_sha(self) -> str:
        return file_sha256(Path(self.v1.tflite))  # type: ignore[attr-defined]


@pytest.fixture
def fleet(broker, tmp_path: Path, digits_int8) -> Fleet:
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    watch = FleetWatcher(broker.port)
    agent = AgentProcess(tmp_path, DEV, broker.url, repo / "root.json", check_timeout_s=10.0)
    f = Fleet(broker, repo, agent, watch, tmp_path, digits_int8)
    f.push(digits_int8.tflite)
    agent.start()
    try:
        watch.wait_active(DEV, "digits", 1, timeout_s=60)
        # the agent process checks signatures with libcrypto (agent.delivery.ed25519), as on a
        # device install without pyca/cryptography: every refusal below went through it
        assert agent.proc is not None
        maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        assert "libcrypto" in maps and "/cryptography/" not in maps
        yield f
    finally:
        agent.stop()
        watch.close()


# -- signed metadata attacks ------------------------------------------------------------------


def test_forged_signatures_are_refused(fleet: Fleet) -> None:
    """An attacker without the repository keys signs a whole new chain."""
    ts_topic = TOPICS.metadata("timestamp.json")
    genuine = Metadata.from_bytes(fleet.retained(ts_topic))
    forged = Metadata.from_bytes(genuine.to_bytes())
    forged.signed.version += 10
    forged.signatures.clear()
    forged.sign(CryptoSigner.generate_ed25519())
    publish_raw(fleet.port, ts_topic, forged.to_bytes(JSONSerializer()))
    fleet.expect_refused("bad_signature")
    # and metadata with no signature at all
    forged.signatures.clear()
    publish_raw(fleet.port, ts_topic, forged.to_bytes(JSONSerializer()))
    fleet.watch.wait_for(lambda: len(fleet.watch.events_of(DEV, "rejected")) >= 1, 10)
    fleet.assert_serving_v1()


def test_replayed_older_metadata_is_a_rollback(fleet: Fleet, digits_float32) -> None:
    ts_topic = TOPICS.metadata("timestamp.json")
    old_timestamp = fleet.retained(ts_topic)
    # v2 goes out and is activated ...
    fleet.push(copy_model(digits_float32, fleet.tmp / "v2"))
    fleet.watch.wait_active(DEV, "digits", 2)
    # ... then the attacker replays the validly signed older timestamp
    publish_raw(fleet.port, ts_topic, old_timestamp)
    ev = fleet.watch.wait_event(DEV, "rejected", reason="rollback")
    assert "version" in ev["message"].lower()
    assert fleet.watch.active(DEV) == ("digits", "2")
    assert fleet.agent.alive()


def test_expired_timestamp_freezes_nothing(fleet: Fleet, digits_float32) -> None:
    """A repository whose timestamp has expired (a freeze) is refused; v1 keeps serving."""
    fleet.agent.stop()
    repo = Repository.open(fleet.repo)
    repo.state = replace(repo.state, expiry_days=replace(repo.state.expiry_days, timestamp=-1))
    model = copy_model(digits_float32, fleet.tmp / "v2").read_bytes()
    repo.add_release("digits", model)
    assert repo.timestamp.signed.expires < datetime.now(UTC)
    must("repo", "publish", str(fleet.repo), "--broker", fleet.url)
    fleet.agent.start()
    fleet.expect_refused("expired")


def test_mix_and_match_is_refused(fleet: Fleet, digits_float32) -> None:
    """The current snapshot with a different (validly signed, older) targets file."""
    fleet.agent.stop()
    old_targets = (fleet.repo / "metadata" / "2.targets.json").read_bytes()
    fleet.push(copy_model(digits_float32, fleet.tmp / "v2"))
    publish_raw(fleet.port, TOPICS.metadata("3.targets.json"), old_targets)
    fleet.agent.start()
    fleet.expect_refused("mismatch")


def test_too_few_signatures_below_threshold(broker, tmp_path: Path, digits_int8, digits_float32) -> None:
    """Targets role with threshold 2: metadata signed with only one of its keys is refused."""
    repo_dir = tmp_path / "repo"
    must("repo", "init", str(repo_dir), "--keys", "2", "--threshold", "2")
    watch = FleetWatcher(broker.port)
    agent = AgentProcess(tmp_path, DEV, broker.url, repo_dir / "root.json")
    f = Fleet(broker, repo_dir, agent, watch, tmp_path, digits_int8)
    f.push(digits_int8.tflite)
    agent.start()
    try:
        watch.wait_active(DEV, "digits", 1, timeout_s=60)
        # the attacker stole one of the two targets keys (and every snapshot and timestamp key)
        stolen = tmp_path / "stolen"
        shutil.copytree(repo_dir, stolen)
        kept, lost = sorted((stolen / "keys" / "targets").iterdir())
        lost.unlink()
        repo = Repository.open(stolen)
        with pytest.raises(Exception, match="only 1 of the 2 targets keys"):
            repo.signers("targets")  # the tool itself refuses to sign below threshold
        key = repo.root.signed.keys[kept.stem]
        repo._signers["targets"] = [CryptoSigner.from_priv_key_uri(f"file2:{kept}", key)]
        repo.add_release("digits", copy_model(digits_float32, tmp_path / "v2").read_bytes())
        must("repo", "publish", str(stolen), "--broker", broker.url)
        f.expect_refused("bad_signature")
    finally:
        agent.stop()
        watch.close()


def test_oversized_metadata_is_refused(fleet: Fleet) -> None:
    publish_raw(fleet.port, TOPICS.metadata("timestamp.json"), b"{" + b" " * 100_000 + b"}")
    fleet.expect_refused("too_large")


# -- target (chunk) attacks ---------------------------------------------------------------------


def _v2_chunk_topic(fleet: Fleet, index: int = 0) -> str:
    repo = Repository.open(fleet.repo)
    path = "models/digits/2/model.tflite"
    sha = repo.targets.signed.targets[path].hashes["sha256"]
    return TOPICS.chunk(consistent_target_file(path, sha), index)


def test_flipped_byte_in_a_chunk(fleet: Fleet, digits_float32) -> None:
    fleet.agent.stop()
    fleet.push(copy_model(digits_float32, fleet.tmp / "v2"))
    topic = _v2_chunk_topic(fleet)
    data = bytearray(fleet.retained(topic))
    data[len(data) // 2] ^= 0x01
    publish_raw(fleet.port, topic, bytes(data))
    fleet.agent.start()
    fleet.expect_refused("chunk_hash")
    # the broker is repaired: the next push of the same version is picked up
    must("repo", "publish", str(fleet.repo), "--broker", fleet.url)
    fleet.agent.stop()
    fleet.agent.start()
    fleet.watch.wait_active(DEV, "digits", 2)


def test_chunk_longer_than_signed(fleet: Fleet, digits_float32) -> None:
    """Endless data: a chunk carrying more bytes than its signed length."""
    fleet.agent.stop()
    fleet.push(copy_model(digits_float32, fleet.tmp / "v2"))
    topic = _v2_chunk_topic(fleet)
    publish_raw(fleet.port, topic, fleet.retained(topic) + b"\0" * 1_000_000)
    fleet.agent.start()
    fleet.expect_refused("chunk_size")


def test_model_larger_than_allowed(broker, tmp_path: Path, digits_int8) -> None:
    repo_dir = tmp_path / "repo"
    must("repo", "init", str(repo_dir))
    watch = FleetWatcher(broker.port)
    agent = AgentProcess(tmp_path, DEV, broker.url, repo_dir / "root.json", max_model_bytes=200_000)
    f = Fleet(broker, repo_dir, agent, watch, tmp_path, digits_int8)
    f.push(digits_int8.tflite)
    agent.start()
    try:
        watch.wait_active(DEV, "digits", 1, timeout_s=60)
        big = tmp_path / "big.tflite"
        big.write_bytes(Path(digits_int8.tflite).read_bytes() + b"\0" * 300_000)
        f.push(big, "--no-check-data")
        f.expect_refused("too_large")
        # refused for good: the state file remembers it
        assert f.agent.state_file()["models"]["digits"]["rejected"][-1]["reason"] == "too_large"
    finally:
        agent.stop()
        watch.close()


# -- targeting ------------------------------------------------------------------------------------


def test_model_for_another_group_is_not_taken(fleet: Fleet, digits_float32) -> None:
    fleet.push(copy_model(digits_float32, fleet.tmp / "v2"), "--target", "group:elsewhere")
    ev = fleet.watch.wait_event(DEV, "skipped", reason="other_target", version=2)
    assert "group:elsewhere" in ev["message"]
    fleet.watch.wait_for(lambda: fleet.watch.states[DEV].get("repo_version") == 3, 10)
    fleet.assert_serving_v1()


# -- candidate checks -------------------------------------------------------------------------------


def test_model_failing_its_golden_vectors(fleet: Fleet, digits_float32) -> None:
    out = copy_model(digits_float32, fleet.tmp / "v2")
    golden = out.with_name("model.golden.npz")
    with np.load(golden) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["output_0"] = arrays["output_0"] + 0.5  # the device computes something else
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    golden.write_bytes(buf.getvalue())
    fleet.push(out)
    ev = fleet.expect_refused("golden")
    assert ev["version"] == 2


def test_model_that_never_returns_is_killed_and_refused(fleet: Fleet) -> None:
    bad = fleet.tmp / "hang" / "hang.tflite"
    bad.parent.mkdir()
    _never_returning_model(bad)
    fleet.push(bad, "--no-check-data")
    ev = fleet.expect_refused("crashed", timeout_s=60)
    assert "SIGXCPU" in ev["message"]


def test_a_model_that_fails_at_load(fleet: Fleet) -> None:
    """Signed and intact, but not a model the runtime can load."""
    bad = fleet.tmp / "bad.tflite"
    data = bytearray(Path(fleet.v1.tflite).read_bytes())  # type: ignore[attr-defined]
    data[8:] = bytes(len(data) - 8)  # keep the TFL3 identifier, zero the rest
    bad.write_bytes(bytes(data))
    fleet.push(bad, "--no-check-data")
    fleet.expect_refused("load")


# -- garbage ----------------------------------------------------------------------------------------


def test_garbage_on_every_topic_the_agent_listens_to(fleet: Fleet, digits_float32) -> None:
    rng = np.random.default_rng(0)
    junk = [
        b"",
        b"\x00",
        b"{",
        b"[]",
        b'{"signed": 1}',
        b"null",
        rng.bytes(5000),
        json.dumps({"signatures": [], "signed": {"_type": "timestamp"}}).encode(),
    ]
    topics = [
        TOPICS.metadata(n)
        for n in ("timestamp.json", "2.root.json", "9.snapshot.json", "9.targets.json", "x.json", "root.json")
    ]
    topics += [
        TOPICS.infer(DEV),
        TOPICS.metadata("no-json-suffix"),
        TOPICS.chunk("models/x/1/y", 0),
        f"{TOPICS.base}/repo/metadata/a/b",
    ]
    publish_many(fleet.port, [(t, j, t != TOPICS.infer(DEV)) for t in topics for j in junk])
    fleet.watch.wait_event(DEV, "rejected")
    fleet.assert_serving_v1()
    # the repository is still good: a real push afterwards works
    fleet.push(copy_model(digits_float32, fleet.tmp / "v2"))
    fleet.watch.wait_active(DEV, "digits", 2)
    assert fleet.agent.alive()


# -- the disk ---------------------------------------------------------------------------------------


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return proc.returncode == 0


def test_disk_filling_during_download(broker, tmp_path: Path, digits_int8) -> None:
    state_root = tmp_path / "small-disk"
    if not _mount_tmpfs(state_root, "3m"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    repo_dir = tmp_path / "repo"
    must("repo", "init", str(repo_dir))
    watch = FleetWatcher(broker.port)
    agent = AgentProcess(state_root, DEV, broker.url, repo_dir / "root.json")
    f = Fleet(broker, repo_dir, agent, watch, tmp_path, digits_int8)
    try:
        f.push(digits_int8.tflite)
        agent.start()
        watch.wait_active(DEV, "digits", 1, timeout_s=60)
        big = tmp_path / "big.tflite"
        big.write_bytes(Path(digits_int8.tflite).read_bytes() + bytes(5_000_000))
        f.push(big, "--no-check-data")
        f.expect_refused("storage")
        # not remembered as a bad model: space may come back
        assert all(r["reason"] != "storage" for r in agent.state_file()["models"]["digits"]["rejected"])
    finally:
        agent.stop()
        watch.close()
        subprocess.run(["umount", "-l", str(state_root)], capture_output=True)
