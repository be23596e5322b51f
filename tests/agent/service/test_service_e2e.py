"""The whole agent as a process: pull a model, then serve it over REST and MQTT and report metrics.

Also the contract's promise that the device side never imports TensorFlow,
Keras or converter, checked on a running agent (not only on imports).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.serving.runtime import load_interpreter
from converter.broker.mosquitto import free_port
from tests.support.harness import AgentProcess, FleetWatcher, PersistentSubscriber, http_json, must


def host_outputs(model: Path, x: np.ndarray) -> np.ndarray:
    """What the host's own LiteRT gives for float inputs (quantized like the agent does)."""
    it = load_interpreter(model)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    scale, zp = inp["quantization"]
    rows = []
    for xi in x:
        q = np.clip(np.round(xi[None] / scale) + zp, -128, 127).astype(inp["dtype"])
        it.set_tensor(inp["index"], q)
        it.invoke()
        o = it.get_tensor(out["index"]).astype(np.float32)
        oscale, ozp = out["quantization"]
        rows.append((o - ozp) * oscale)
    return np.concatenate(rows)


def test_pull_then_serve_rest_mqtt_and_metrics(broker, tmp_path: Path, digits_int8, digits_data) -> None:
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    port = free_port()
    agent = AgentProcess(
        tmp_path, "pi-s", broker.url, repo / "root.json", http=f"127.0.0.1:{port}", metrics_interval_s=0.5
    )
    watch = FleetWatcher(broker.port)
    got_metrics: list[dict] = []
    replies: dict[bytes, tuple[bytes, str | None]] = {}
    done = threading.Event()
    c = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"_app-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
    )

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic.endswith("/metrics"):
            got_metrics.append(json.loads(msg.payload))
        else:
            props = msg.properties
            replies[props.CorrelationData] = (bytes(msg.payload), getattr(props, "ContentType", None))
            done.set()

    c.on_message = on_message
    c.connect("127.0.0.1", broker.port)
    c.subscribe([("litefleet/v1/devices/pi-s/metrics", 1), ("litefleet/v1/replies/app-1/#", 1)])
    c.loop_start()
    try:
        must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits", "--broker", broker.url)
        agent.start()
        watch.wait_active("pi-s", "digits", 1, timeout_s=60)
        _, _, x_test, _ = digits_data
        x = x_test[:5]
        want = host_outputs(digits_int8.tflite, x)

        # REST, TensorFlow Serving's shapes
        status, doc = http_json(f"http://127.0.0.1:{port}/v1/models/digits")
        assert status == 200 and doc["model_version_status"][0]["state"] == "AVAILABLE"
        assert doc["model_version_status"][0]["version"] == "1"
        status, doc = http_json(
            f"http://127.0.0.1:{port}/v1/models/digits:predict", {"instances": x.tolist()}
        )
        assert status == 200
        np.testing.assert_allclose(np.array(doc["predictions"]), want, atol=1e-6)
        status, doc = http_json(f"http://127.0.0.1:{port}/v1/models/nope:predict", {"instances": [1]})
        assert status == 404 and "error" in doc

        # MQTT request / response with correlation data, right after the activation: the
        # agent no longer reconnects then (its will holds nothing an activation changes)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "litefleet/v1/replies/app-1/pi-s"
        props.CorrelationData = b"req-1"
        c.publish(
            "litefleet/v1/devices/pi-s/infer",
            json.dumps({"model": "digits", "instances": x[:2].tolist()}),
            qos=1,
            properties=props,
        )
        assert done.wait(10), "no MQTT reply"
        assert agent.log().count("agent.mqtt.client: connected to") == 1  # no reconnect
        payload, _ctype = replies[b"req-1"]
        np.testing.assert_allclose(np.array(json.loads(payload)["predictions"]), want[:2], atol=1e-6)
        # a response topic the device may not answer on is ignored
        props.ResponseTopic = "litefleet/v1/devices/other/state"
        props.CorrelationData = b"req-2"
        c.publish(
            "litefleet/v1/devices/pi-s/infer",
            json.dumps({"model": "digits", "instances": x[:1].tolist()}),
            qos=1,
            properties=props,
        )

        # metrics: the requests above are counted
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if got_metrics and any(m.get("name") == "digits" for doc in got_metrics for m in doc["models"]):
                break
            time.sleep(0.2)
        assert got_metrics, "no metrics"
        last = got_metrics[-1]
        assert last["device_id"] == "pi-s" and last["device"]["rss_bytes"] > 0
        seqs = [m["seq"] for m in got_metrics]
        assert seqs == sorted(seqs)
        assert b"req-2" not in replies
        # the retained state shows the inferences too
        # two answered requests (REST with 5 rows, MQTT with 2): the retained state counts them
        watch.wait_for(lambda: (watch.states["pi-s"].get("inferences") or 0) >= 2, 15)
    finally:
        agent.stop()
        c.loop_stop()
        c.disconnect()
        watch.close()


def test_running_agent_never_imports_host_packages(broker, tmp_path: Path, digits_int8) -> None:
    """Run a real Agent (pull, check, activate, serve) in a fresh interpreter; then look at sys.modules."""
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits", "--broker", broker.url)
    script = f"""
import sys, threading, time
from agent.service.config import load_config
from agent.service.daemon import Agent
cfg = load_config(None, {{"device_id": "pi-x", "broker": "{broker.url}", "state_dir": "{tmp_path / "st"}",
                         "trusted_root": "{repo / "root.json"}", "http": "127.0.0.1:0"}})
a = Agent(cfg)
a.start()
t = threading.Thread(target=a.run); t.start()
deadline = time.time() + 60
while not a.registry.names() and time.time() < deadline:
    time.sleep(0.1)
a.registry.get("digits").runner.predict(__import__("numpy").zeros((1, 8, 8, 1), "float32"))
a.stop(); t.join(); a.shutdown()
host_only = ("tensorflow", "keras", "converter", "jax", "torch", "prometheus_client")
bad = sorted(m for m in sys.modules if m.split(".")[0] in host_only)
print("ACTIVE", a.registry.names(), "HOST_MODULES", bad)
"""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert "ACTIVE ['digits'] HOST_MODULES []" in out.stdout, out.stdout + out.stderr[-3000:]


@pytest.mark.slow
def test_agent_metrics_survive_a_three_minute_broker_outage(
    broker, tmp_path: Path, digits_int8, digits_data
) -> None:
    """The issue's scenario on the real agent process: a metric a second, the broker gone for
    three minutes while local apps keep calling REST. After reconnection every metric made
    during the outage arrives, in order, with its original timestamp, and the requests served
    offline are counted in them."""
    outage_s = 180.0
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    port = free_port()
    agent = AgentProcess(
        tmp_path, "pi-o", broker.url, repo / "root.json", http=f"127.0.0.1:{port}", metrics_interval_s=1.0
    )
    subscriber = PersistentSubscriber(broker.port, "litefleet/v1/devices/pi-o/metrics")
    assert subscriber.subscribed.wait(10)
    watch = FleetWatcher(broker.port)
    got: list[tuple[float, dict[str, Any]]] = []
    _, _, x_test, _ = digits_data
    body = {"instances": x_test[:1].tolist()}
    try:
        must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits", "--broker", broker.url)
        agent.start()
        watch.wait_active("pi-o", "digits", 1, timeout_s=60)
        watch.close()
        subscriber.collect(lambda docs: len(docs) >= 3, 15, got)
        assert got, "no metrics before the outage"

        broker.stop()
        down_at = time.time()
        served_offline = 0
        while time.time() - down_at < outage_s:  # local apps are served all along
            status, _ = http_json(f"http://127.0.0.1:{port}/v1/models/digits:predict", body)
            assert status == 200
            served_offline += 1
            time.sleep(2.0)
        up_at = time.time()
        broker.start()
        # the agent reconnects (paho backs off up to 15 s) and replays its queue
        subscriber.collect(lambda docs: any(d["ts"] > up_at + 2 for d in docs), 120, got)
        subscriber.collect(lambda docs: False, 2.0, got)  # stragglers, duplicates
        assert agent.alive()
    finally:
        agent.stop()
        subscriber.stop()

    first: dict[int, tuple[float, dict[str, Any]]] = {}
    order: list[int] = []
    for arrived, doc in got:
        if doc["seq"] not in first:
            first[doc["seq"]] = (arrived, doc)
            order.append(doc["seq"])
    assert order == sorted(order), "replayed out of order"
    assert order == list(range(order[0], order[-1] + 1)), (
        f"lost: {sorted(set(range(order[0], order[-1] + 1)) - set(order))}"
    )
    during = [first[s] for s in order if down_at <= first[s][1]["ts"] < up_at]
    assert len(during) >= outage_s * 0.8, len(during)  # a metric a second went on being made
    assert all(arrived >= up_at for arrived, _ in during)  # ... and arrived after reconnection
    ts = [doc["ts"] for _, doc in during]
    assert ts == sorted(ts) and ts[-1] - ts[0] >= outage_s * 0.9  # original times, not replay times
    counted = sum(m["interval"]["ok"] for _, doc in during for m in doc["models"] if m["name"] == "digits")
    assert counted >= served_offline - 1, (counted, served_offline)  # (one may straddle the edges)
