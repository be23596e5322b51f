"""MQTT inference: payload handling (pure, on real models), the worker with a
recording publisher, and a round trip through a real Mosquitto."""

from __future__ import annotations

import io
import json
import queue
import threading
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import TransportError
from agent.mqtt.transport import Message
from agent.serving import npy
from agent.serving.inference import ModelRunner
from agent.serving.mqtt_requests import InferWorker, handle_infer
from agent.serving.registry import ActiveModel, ModelRegistry
from agent.serving.stats import ApiCounters
from tests.support.tiny_models import TinyModels, models_for

TOPIC = "litefleet/v1/devices/pi-1/infer"


@pytest.fixture(scope="module")
def registry(request: pytest.FixtureRequest) -> ModelRegistry:
    models: TinyModels = models_for(request)
    reg = ModelRegistry()
    for name, path, version in (
        ("digits", models.int8, "3"),
        ("multi", models.multi, "1"),
        ("two", models.two_out, "1"),
    ):
        runner = ModelRunner.from_file(path, name=name, version=version)
        reg.activate(ActiveModel(name, version, "aa", runner))
    return reg


def msg(
    payload: bytes | dict[str, Any],
    *,
    ctype: str | None = None,
    props: tuple[tuple[str, str], ...] = (),
    response: str | None = "replies/1",
) -> Message:
    data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    return Message(
        topic=TOPIC,
        payload=data,
        response_topic=response,
        correlation_data=b"c-1",
        content_type=ctype,
        user_properties=props,
    )


def digits(n: int) -> np.ndarray:
    return np.random.default_rng(0).random((n, 8, 8, 1), dtype=np.float32)


def test_json_request_answers_with_model_and_version(registry: ModelRegistry) -> None:
    x = digits(2)
    reply = handle_infer(msg({"model": "digits", "instances": x.tolist()}), registry)
    doc = json.loads(reply.payload)
    assert reply.content_type == "application/json" and reply.status == 200
    assert doc["model"] == "digits" and doc["version"] == "3"
    np.testing.assert_allclose(doc["predictions"], registry.get("digits").runner.predict(x)[0], atol=1e-7)
    reply = handle_infer(msg({"model": "digits", "version": 3, "inputs": x.tolist()}), registry)
    assert "outputs" in json.loads(reply.payload)


def test_npy_request_names_its_model_in_a_user_property(registry: ModelRegistry) -> None:
    x = digits(1)
    reply = handle_infer(msg(npy.to_npy(x), props=(("model", "digits"),)), registry)
    assert reply.content_type == npy.CONTENT_TYPE
    np.testing.assert_array_equal(npy.parse_npy(reply.payload), registry.get("digits").runner.predict(x)[0])
    reply = handle_infer(msg(npy.to_npy(np.ones((1, 4), np.float32)), props=(("model", "two"),)), registry)
    assert reply.content_type == "application/x-npz"
    with np.load(io.BytesIO(reply.payload), allow_pickle=False) as npz:
        assert sorted(npz.files) == ["output_0", "output_1"]


@pytest.mark.parametrize(
    ("message", "status", "text"),
    [
        (msg(b"{broken"), 400, "malformed JSON"),
        (msg({"instances": [1]}), 400, '"model"'),
        (msg({"model": 5, "instances": [1]}), 400, '"model"'),
        (msg({"model": "digits", "version": [1], "instances": [1]}), 400, '"version"'),
        (msg({"model": "nope", "instances": [1]}), 404, "no model named"),
        (msg({"model": "digits", "version": "2", "instances": [1]}), 404, "not active"),
        (msg({"model": "digits", "instances": [[1, 2]]}), 400, "does not fit"),
        (msg(npy.to_npy(digits(1))), 400, 'user property "model"'),
        (msg(npy.to_npy(digits(1)), props=(("model", "multi"),)), 400, "single-input"),
        (msg(b"\x93NUMPY\x01\x00garbage", props=(("model", "digits"),)), 400, ".npy"),
        (msg(b"<x/>", ctype="application/xml"), 415, "unsupported"),
        (msg(b"x" * 2000), 413, "larger"),
    ],
)
def test_errors_are_json_replies(registry: ModelRegistry, message: Message, status: int, text: str) -> None:
    reply = handle_infer(message, registry, max_payload_bytes=1000)
    doc = json.loads(reply.payload)
    assert reply.content_type == "application/json" and reply.status == status
    assert doc["status"] == status and text in doc["error"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payload=st.binary(max_size=200) | st.builds(lambda b: b"\x93NUMPY" + b, st.binary(max_size=200)),
    ctype=st.sampled_from([None, "application/json", "application/x-npy", "text/plain", "x/y"]),
    props=st.lists(
        st.tuples(st.sampled_from(["model", "version", "x"]), st.sampled_from(["digits", "3", "", "nope"])),
        max_size=3,
    ),
)
def test_handler_never_raises(
    registry: ModelRegistry, payload: bytes, ctype: str | None, props: list[tuple[str, str]]
) -> None:
    reply = handle_infer(msg(payload, ctype=ctype, props=tuple(props)), registry)
    assert reply.status in (200, 400, 404, 413, 415)


# -- the worker, with a recording publisher ------------------------------------------------
class RecordingPublisher:
    def __init__(self) -> None:
        self.connected = True
        self.sent: queue.Queue[dict[str, Any]] = queue.Queue()

    def publish(self, topic: str, payload: bytes, **kw: Any) -> Any:
        if not self.connected:
            raise TransportError("not connected")
        self.sent.put({"topic": topic, "payload": payload, **kw})
        return None


def test_worker_answers_on_the_response_topic_with_the_correlation_data(registry: ModelRegistry) -> None:
    pub = RecordingPublisher()
    counters = ApiCounters()
    worker = InferWorker(registry, pub, counters=counters)
    worker.start()
    try:
        worker.submit(msg({"model": "digits", "instances": digits(1).tolist()}))
        worker.submit(msg({"model": "nope", "instances": [1]}))
        worker.submit(msg({"model": "digits", "instances": [1]}, response=None))  # nobody to answer
        first, second = pub.sent.get(timeout=10), pub.sent.get(timeout=10)
    finally:
        worker.stop()
    assert first["topic"] == "replies/1" and first["correlation_data"] == b"c-1"
    assert first["content_type"] == "application/json" and first["qos"] == 1
    assert "predictions" in json.loads(first["payload"])
    assert json.loads(second["payload"])["status"] == 404
    assert pub.sent.empty()
    assert counters.snapshot() == {"mqtt": {"2xx": 1, "4xx": 1}}


def test_worker_refuses_when_its_queue_is_full_and_survives_a_lost_connection(
    registry: ModelRegistry,
) -> None:
    pub = RecordingPublisher()
    worker = InferWorker(registry, pub, max_pending=1)  # not started: nothing drains the queue
    worker.submit(msg({"model": "digits", "instances": [1]}))
    worker.submit(msg({"model": "digits", "instances": [1]}))
    busy = pub.sent.get(timeout=1)
    assert json.loads(busy["payload"])["status"] == 503
    pub.connected = False
    worker.start()  # the queued request is answered into a dead connection: logged, no crash
    worker.stop()


# -- end to end: a real Mosquitto and the agent's MQTT client ------------------------------
def test_round_trip_through_a_real_broker(broker: Any, registry: ModelRegistry) -> None:
    from agent.mqtt.client import ConnectionSettings, MqttClient

    device = MqttClient(ConnectionSettings(host="127.0.0.1", port=broker.port, client_id="pi-1"))
    app = MqttClient(ConnectionSettings(host="127.0.0.1", port=broker.port, client_id="app"))
    replies: queue.Queue[Message] = queue.Queue()
    worker = InferWorker(registry, device)
    device.subscribe(TOPIC, worker.submit, qos=1)
    app.subscribe("app/replies", replies.put, qos=1)
    device.connect(10)
    app.connect(10)
    worker.start()
    try:
        assert device.wait_synced(10) and app.wait_synced(10)
        x = digits(1)
        app.publish(
            TOPIC,
            json.dumps({"model": "digits", "instances": x.tolist()}).encode(),
            qos=1,
            response_topic="app/replies",
            correlation_data=b"req-7",
            content_type="application/json",
        ).wait(5)
        app.publish(
            TOPIC,
            npy.to_npy(x),
            qos=1,
            response_topic="app/replies",
            correlation_data=b"req-8",
            content_type=npy.CONTENT_TYPE,
            user_properties=[("model", "digits")],
        ).wait(5)
        got: dict[bytes | None, Message] = {}
        deadline = time.monotonic() + 15
        while len(got) < 2 and time.monotonic() < deadline:
            m = replies.get(timeout=15)
            got[m.correlation_data] = m
    finally:
        worker.stop()
        device.stop()
        app.stop()
    want = registry.get("digits").runner.predict(x)[0]
    assert got[b"req-7"].content_type == "application/json"
    np.testing.assert_allclose(json.loads(got[b"req-7"].payload)["predictions"], want, atol=1e-7)
    assert got[b"req-8"].content_type == npy.CONTENT_TYPE
    np.testing.assert_array_equal(npy.parse_npy(got[b"req-8"].payload), want)


def test_worker_runs_off_the_callers_thread(registry: ModelRegistry) -> None:
    pub = RecordingPublisher()
    worker = InferWorker(registry, pub)
    worker.start()
    caller = threading.get_ident()
    seen: list[int] = []
    original = pub.publish

    def spy(topic: str, payload: bytes, **kw: Any) -> Any:
        seen.append(threading.get_ident())
        return original(topic, payload, **kw)

    pub.publish = spy  # type: ignore[method-assign]
    worker.submit(msg({"model": "digits", "instances": digits(1).tolist()}))
    pub.sent.get(timeout=10)
    worker.stop()
    assert seen and seen[0] != caller
