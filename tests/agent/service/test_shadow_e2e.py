"""The rollout's device side end to end: an agent process, a release signed with shadow_k,
REST and MQTT traffic, and the metrics message as a consumer reads it off the broker."""

from __future__ import annotations

import json
import queue
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import agent
import converter.cli.push as push_cli
from agent.protocol import Rollout
from converter.broker.mosquitto import free_port
from tests.support.harness import AgentProcess, FleetWatcher, http_json, must
from tests.support.tiny_models import TinyModels, models_for


@pytest.fixture(scope="session")
def tiny(request: pytest.FixtureRequest) -> TinyModels:
    return models_for(request)


class DeviceTopics:
    """A consumer of one device's metrics, and an MQTT inference client, on the real broker."""

    def __init__(self, port: int, device: str) -> None:
        self.metrics: list[dict[str, Any]] = []
        self.replies: queue.Queue[bytes] = queue.Queue()
        self._cond = threading.Condition()
        self.device = device
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"_app-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(
            [(f"litefleet/v1/devices/{device}/metrics", 1), (f"litefleet/v1/replies/app-1/{device}", 1)]
        )
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic.endswith("/metrics"):
            with self._cond:
                self.metrics.append(json.loads(msg.payload))
                self._cond.notify_all()
        else:
            self.replies.put(bytes(msg.payload))

    def entry(
        self, version: str, pred: Any, timeout_s: float = 60.0
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The first metrics message (and its entry for ``version``) that satisfies ``pred``."""
        found: list[tuple[dict[str, Any], dict[str, Any]]] = []

        def match() -> bool:
            for doc in self.metrics:
                for e in doc["models"]:
                    if e["version"] == version and e["active"] and pred(e):
                        found.append((doc, e))
                        return True
            return False

        with self._cond:
            assert self._cond.wait_for(match, timeout_s), f"no metrics for v{version} as expected: " + (
                json.dumps(self.metrics[-1]["models"])[:3000] if self.metrics else "none"
            )
        return found[0]

    def infer(self, x: np.ndarray) -> np.ndarray:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = f"litefleet/v1/replies/app-1/{self.device}"
        props.CorrelationData = uuid.uuid4().bytes
        body = json.dumps({"model": "digits", "instances": x.tolist()})
        self.client.publish(f"litefleet/v1/devices/{self.device}/infer", body, qos=1, properties=props)
        return np.array(json.loads(self.replies.get(timeout=15))["predictions"])

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_a_shadowed_release_reports_its_sketch_and_agreement_then_stops_shadowing(
    broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_int8, digits_data, tiny: TinyModels
) -> None:
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    v2 = tmp_path / "v2" / "digits.tflite"  # another model behind the same signature, no card
    v2.parent.mkdir()
    shutil.copy(tiny.float, v2)
    port = free_port()
    device = AgentProcess(
        tmp_path, "pi-sh", broker.url, repo / "root.json", http=f"127.0.0.1:{port}", metrics_interval_s=0.5
    )
    watch = FleetWatcher(broker.port)
    topics = DeviceTopics(broker.port, "pi-sh")
    try:
        must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits", "--broker", broker.url)
        device.start()
        watch.wait_active("pi-sh", "digits", 1, timeout_s=60)
        # v2 as the rollout controller signs a wave: shadow_k in the rule (k = 2 here)
        with monkeypatch.context() as m:
            m.setattr(push_cli, "Rollout", lambda target, pct: Rollout(target, pct, 2))
            must(
                "push",
                str(v2),
                "--repo",
                str(repo),
                "--name",
                "digits",
                "--no-check-data",
                "--broker",
                broker.url,
            )
        watch.wait_active("pi-sh", "digits", 2, timeout_s=60)
        topics.entry("2", lambda e: e.get("shadow", {}).get("against") == "1")

        # live traffic, one sample per call: 40 over REST, then 10 over MQTT
        xs = digits_data.x_test[:50]
        answers = []
        for xi in xs[:40]:
            status, doc = http_json(
                f"http://127.0.0.1:{port}/v1/models/digits:predict", {"instances": [xi.tolist()]}
            )
            assert status == 200
            answers.append(doc["predictions"][0])
        answers += [topics.infer(xi[None])[0] for xi in xs[40:]]
        served = np.array(answers).argmax(axis=1)

        doc, entry = topics.entry(
            "2", lambda e: e["outputs"]["n"] == 50 and e["shadow"]["compared"] + e["shadow"]["errors"] == 25
        )
        # the sketch counts what was served
        assert entry["outputs"]["kind"] == "classes"
        assert entry["outputs"]["classes"] == [[i, int(c)] for i, c in enumerate(np.bincount(served)) if c]
        assert sum(c for _, c in entry["outputs"]["confidence"]) == 50
        # the agreement is the two models' agreement on calls 2, 4, ..., 50
        v1_model, v2_model = agent.load_model(digits_int8.tflite), agent.load_model(v2)
        sampled = xs[1::2]
        want = [
            int(np.argmax(v1_model.predict(x[None], dequantize=True)))
            == int(np.argmax(v2_model.predict(x[None])))
            for x in sampled
        ]
        assert 0 < sum(want) < len(want)
        assert entry["shadow"] == {
            "against": "1",
            "k": 2,
            "sampled": 25,
            "compared": 25,
            "agreed": sum(want),
            "dropped": 0,
            "errors": 0,
        }
        boot = doc["boot"]
        assert isinstance(boot, str) and boot

        # the promotion re-targets v2 without shadow_k: the shadow stops
        must(
            "push",
            str(v2),
            "--repo",
            str(repo),
            "--name",
            "digits",
            "--version",
            "2",
            "--no-check-data",
            "--broker",
            broker.url,
        )
        topics.entry("2", lambda e: "shadow" not in e and e["outputs"]["n"] == 50)
        assert "shadow of digits by v1 stopped" in device.log()
        assert all(d["boot"] == boot for d in topics.metrics)
    finally:
        device.stop()
        topics.close()
        watch.close()
