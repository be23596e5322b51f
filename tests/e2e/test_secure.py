"""The agent and the host over the secure broker, end to end, and the attacks it changes.

One secure Mosquitto (TLS, per-device ACLs, the host on its own listener) and
two real agent processes set up exactly as ``litefleet device add`` tells an
operator to: one with a client certificate, one with a username and password,
their files handed over under systemd credential names through
``$CREDENTIALS_DIRECTORY`` (``LoadCredential=litefleet:/etc/litefleet/credentials``).
The host runs ``push``, ``status`` and ``repo publish`` with ``--secure-dir`` only.

Then the delivery attacks again, where the broker's ACL changes the picture:

- a device identity (a stolen or compromised device) publishing forged
  repository metadata, chunks, another device's state or inference requests is
  refused by the broker (PUBACK 0x87) and no agent ever sees it;
- the same forged metadata published with the host identity (a stolen broker
  password: the broker lets it through) reaches the agents, and TUF refuses it
  (bad signature, rollback), which is what shows the first refusal was the
  broker's doing;
- after every attack the fleet still serves the model it had, and the next
  real push over TLS is activated everywhere.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from agent.protocol import Topics, consistent_target_file
from converter.broker.mosquitto import free_port
from converter.repo.repository import Repository
from tests.support.harness import AgentProcess, FleetWatcher, copy_model, http_json, must
from tests.support.secure import Client, Secure, start_secure

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
    reason="mosquitto is not installed",
)

TOPICS = Topics()
EVIL = "pi-stolen"
NOT_AUTHORIZED = 0x87
# after a refused publish: how long to watch for anything reaching the agents
GRACE_S = 3.0


@dataclass
class Device:
    agent: AgentProcess
    creds: Path  # stands in for $CREDENTIALS_DIRECTORY
    toml: dict[str, str]
    http_port: int | None = None


@dataclass
class SecureFleet:
    secure: Secure
    repo: Path
    tmp: Path
    watch: FleetWatcher
    devices: dict[str, Device]

    @property
    def dir(self) -> Path:
        return self.secure.dir.root

    def push(self, model: Path, *extra: str) -> str:
        return must(
            "push",
            str(model),
            "--repo",
            str(self.repo),
            "--name",
            "digits",
            "--secure-dir",
            str(self.dir),
            *extra,
        )

    def host_client(self) -> Client:
        c = self.secure.host()
        assert c.connected.is_set(), c.connack
        return c

    def serving(self, version: int) -> None:
        for dev, d in self.devices.items():
            self.watch.wait_active(dev, "digits", version, timeout_s=60)
            st = d.agent.state_file()["models"]["digits"]
            assert st["active"]["version"] == version
            assert d.agent.alive(), d.agent.log()[-3000:]

    def rejected(self, device_id: str) -> list[dict[str, Any]]:
        return self.watch.events_of(device_id, "rejected")


def add_device(tmp: Path, secure_dir: Path, device_id: str, *, password: bool) -> tuple[Path, dict[str, str]]:
    """``litefleet device add``, then do what it says: copy the files to the device's
    credentials folder under systemd's names (file F -> litefleet_F) and take its agent.toml lines."""
    out = must("device", "add", device_id, "--secure", str(secure_dir), *(["--password"] if password else []))
    creds = tmp / f"creds-{device_id}"
    creds.mkdir()
    copies = re.findall(r"^\s+(\S+)\s+->\s+/etc/litefleet/credentials/(\S+)$", out, re.M)
    assert copies, out
    for src, name in copies:
        shutil.copy(src, creds / f"litefleet_{name}")
    block = re.search(r"agent\.toml.*?:\n((?:   \w+ = .*\n)+)", out)
    assert block, out
    toml: dict[str, str] = {}
    for line in block.group(1).splitlines():
        key, _, value = line.strip().partition(" = ")
        toml[key] = json.loads(value)
    assert toml["device_id"] == device_id and toml["broker"].startswith("mqtts://")
    assert "Running broker reloaded" in out  # the new identity works without a restart
    return creds, toml


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureFleet]:
    tmp = tmp_path_factory.mktemp("secure-e2e")
    secure = start_secure(tmp, {})
    repo = tmp / "repo"
    must("repo", "init", str(repo))
    devices: dict[str, Device] = {}
    watch = FleetWatcher(secure_dir=secure.dir.root)
    try:
        must("device", "add", EVIL, "--secure", str(secure.dir.root))
        for device_id, password in (("pi-cert", False), ("pi-pass", True)):
            creds, toml = add_device(tmp, secure.dir.root, device_id, password=password)
            http_port = free_port() if not password else None
            keys = {k: v for k, v in toml.items() if k not in ("device_id", "broker")}
            agent = AgentProcess(
                tmp,
                device_id,
                toml["broker"],
                repo / "root.json",
                http=f"127.0.0.1:{http_port}" if http_port else "",
                **keys,
            )
            agent.start(env={"CREDENTIALS_DIRECTORY": str(creds)})
            devices[device_id] = Device(agent, creds, toml, http_port)
        yield SecureFleet(secure, repo, tmp, watch, devices)
    finally:
        for d in devices.values():
            d.agent.stop()
        watch.close()
        secure.broker.kill()


def predict(port: int, x: np.ndarray) -> tuple[int, Any]:
    return http_json(f"http://127.0.0.1:{port}/v1/models/digits:predict", {"instances": x.tolist()})


def test_push_and_status_over_tls_reach_a_certificate_and_a_password_agent(
    fleet: SecureFleet, digits_int8
) -> None:
    out = fleet.push(digits_int8.tflite)
    assert "digits v1 -> all" in out
    fleet.serving(1)
    for dev in fleet.devices:
        kinds = [e["event"] for e in fleet.watch.events_of(dev)]
        assert kinds.index("verified") < kinds.index("activated"), kinds
    # the agents really use what systemd would hand them, and TLS
    for d in fleet.devices.values():
        log = d.agent.log()
        assert f"connected to localhost:{d.toml['broker'].rsplit(':', 1)[1]}" in log, log[-2000:]
    rows = {r["device_id"]: r for r in json.loads(must("status", "--secure-dir", str(fleet.dir), "--json"))}
    assert set(rows) == set(fleet.devices)
    for r in rows.values():
        assert (r["online"], r["model"], r["version"], r["error"]) == (True, "digits", "1", None), r
    # inference answers on the device
    port = fleet.devices["pi-cert"].http_port
    assert port is not None
    code, doc = predict(port, np.zeros((2, 8, 8, 1), np.float32))
    assert code == 200 and len(doc["predictions"]) == 2


def test_a_device_identity_cannot_touch_the_repository_or_other_devices(fleet: SecureFleet) -> None:
    """A stolen device's credentials: forged metadata, a forged chunk, another device's
    state, an inference request -- each refused by the broker with 0x87 (MQTT 5), nothing
    reaches an agent, and every retained message is still the genuine one."""
    fleet.serving(1)
    ts_topic = TOPICS.metadata("timestamp.json")
    host = fleet.host_client()
    evil = fleet.secure.device(EVIL)  # a device of the fleet, stolen (no agent runs for it)
    assert evil.connected.is_set(), evil.connack
    try:
        host.subscribe(ts_topic)
        genuine_ts = host.wait_for(ts_topic)
        assert genuine_ts is not None
        forged = forged_timestamp(genuine_ts.payload)
        repo = Repository.open(fleet.repo)
        path = "models/digits/1/model.tflite"
        sha = repo.targets.signed.targets[path].hashes["sha256"]
        chunk0 = TOPICS.chunk(consistent_target_file(path, sha), 0)
        before = {d: len(fleet.rejected(d)) for d in fleet.devices}
        attacks = [
            (ts_topic, forged, True),
            (TOPICS.metadata("2.root.json"), forged, True),
            (chunk0, b"\0" * 100, True),
            (
                TOPICS.state("pi-cert"),
                json.dumps(
                    {"device_id": "pi-cert", "online": False, "status": "serving", "model": "evil"}
                ).encode(),
                True,
            ),
            (TOPICS.infer("pi-cert"), b'{"model": "digits", "instances": [[0]]}', False),
        ]
        for topic, payload, retain in attacks:
            rc = evil.publish(topic, payload, retain=retain)
            assert rc.value == NOT_AUTHORIZED, (topic, rc)
        time.sleep(GRACE_S)
        # nothing reached the agents: no refusal, nothing changed
        assert {d: len(fleet.rejected(d)) for d in fleet.devices} == before
        assert fleet.watch.states["pi-cert"]["model"] == "digits"
        for d in fleet.devices.values():
            assert "repository metadata refused" not in d.agent.log()
        # the broker still holds the genuine files
        fresh = fleet.host_client()
        try:
            fresh.subscribe(ts_topic)
            fresh.subscribe(chunk0)
            assert fresh.wait_for(ts_topic, genuine_ts.payload) is not None
            got = fresh.wait_for(chunk0)
            assert got is not None and got.payload != b"\0" * 100
            fresh.subscribe(TOPICS.metadata("2.root.json"))
            time.sleep(0.3)
            assert TOPICS.metadata("2.root.json") not in fresh.topics()
        finally:
            fresh.close()
        fleet.serving(1)
    finally:
        host.close()
        evil.close()


def test_the_host_identity_passes_the_broker_but_not_tuf(
    fleet: SecureFleet, digits_int8, digits_float32
) -> None:
    """Control for the test above: the same kind of forgery with the host's broker
    password (the broker accepts it) reaches the agents, and TUF refuses it: a forged
    signature, then a validly signed older timestamp (rollback). The fleet keeps its
    model, and the next real push is activated over TLS."""
    fleet.serving(1)
    ts_topic = TOPICS.metadata("timestamp.json")
    old_ts = (fleet.repo / "metadata" / "timestamp.json").read_bytes()
    fleet.push(copy_model(digits_float32, fleet.tmp / "v2", "digits"))
    fleet.serving(2)
    host = fleet.host_client()
    try:
        genuine = host_read(host, ts_topic)
        assert not host.publish(ts_topic, forged_timestamp(genuine), retain=True).is_failure
        for dev in fleet.devices:
            fleet.watch.wait_event(dev, "rejected", reason="bad_signature")
        assert not host.publish(ts_topic, old_ts, retain=True).is_failure
        for dev in fleet.devices:
            fleet.watch.wait_event(dev, "rejected", reason="rollback")
        fleet.serving(2)
    finally:
        host.close()
    # the operator republishes the genuine repository; the fleet takes the next version
    must("repo", "publish", str(fleet.repo), "--secure-dir", str(fleet.dir))
    fleet.push(copy_model(digits_int8, fleet.tmp / "v3", "digits"))
    fleet.serving(3)
    rows = json.loads(must("status", "--secure-dir", str(fleet.dir), "--json"))
    assert {(r["device_id"], r["version"], r["error"]) for r in rows} == {
        ("pi-cert", "3", None),
        ("pi-pass", "3", None),
    }


def forged_timestamp(genuine: bytes) -> bytes:
    """The genuine timestamp, one version up, signed by a key nobody trusts."""
    md = Metadata.from_bytes(genuine)
    md.signed.version += 10
    md.signatures.clear()
    md.sign(CryptoSigner.generate_ed25519())
    return md.to_bytes(JSONSerializer())


def host_read(host: Client, topic: str) -> bytes:
    host.subscribe(topic)
    got = host.wait_for(topic)
    assert got is not None, f"nothing retained on {topic}"
    return got.payload


def test_a_secure_dir_made_with_another_prefix_needs_no_prefix_flag(tmp_path: Path, digits_int8) -> None:
    """A broker folder made with ``--prefix acme`` grants the host nothing under
    ``litefleet/``: push --secure-dir was refused by the ACL and status --secure-dir
    showed an empty fleet, unless the operator repeated --prefix. The folder says it."""
    from converter.broker.mosquitto import BrokerProcess
    from converter.broker.secure import ListenerPorts, SecureDir

    sd = SecureDir(tmp_path / "secure")
    sd.ensure(prefix="acme", ports=ListenerPorts(free_port(), free_port(), free_port()))
    broker = BrokerProcess(sd.broker_config())
    broker.start()
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    creds, toml = add_device(tmp_path, sd.root, "pi-acme", password=False)
    assert toml["topic_prefix"] == "acme"
    keys = {k: v for k, v in toml.items() if k not in ("device_id", "broker")}
    agent = AgentProcess(tmp_path, "pi-acme", toml["broker"], repo / "root.json", **keys)
    watch = FleetWatcher(secure_dir=sd.root, prefix="acme")
    try:
        agent.start(env={"CREDENTIALS_DIRECTORY": str(creds)})
        must(
            "push",
            str(digits_int8.tflite),
            "--repo",
            str(repo),
            "--name",
            "digits",
            "--secure-dir",
            str(sd.root),
        )
        watch.wait_active("pi-acme", "digits", 1, timeout_s=60)
        rows = json.loads(must("status", "--secure-dir", str(sd.root), "--json"))
        assert [(r["device_id"], r["version"]) for r in rows] == [("pi-acme", "1")]
    finally:
        agent.stop()
        watch.close()
        broker.kill()
