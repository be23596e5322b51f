"""Inference over MQTT: requests on ``<prefix>/v1/devices/<id>/infer``.

The requester publishes with MQTT 5 properties **Response Topic** (where the
answer goes) and usually **Correlation Data** (echoed back unchanged). Two
payload kinds:

JSON (``Content-Type`` ``application/json`` or absent)::

    {"model": "digits", "version": "3",        # version optional: the active one
     "instances": [[...], ...]}                # or "inputs": ..., as in the REST API
    -> {"model": "digits", "version": "3", "predictions": [...]}   (or "outputs")

``.npy`` (recognised by its magic bytes; ``Content-Type: application/x-npy``):
the body is one array for a single-input model, and the model is named in
the MQTT 5 **user property** ``model`` (optional ``version``). The answer is
``.npy`` bytes (content type ``application/x-npy``), or ``.npz``
(``application/x-npz``) for a model with several outputs. Float arrays sent
to an integer model are quantized, and the answer dequantized.

Errors (bad payload, unknown model, wrong shape, runtime failure) are
answered as JSON ``{"error": "...", "status": 400|404|413|500}`` with content
type ``application/json``: :func:`handle_infer` never raises.

:func:`handle_infer` is pure apart from running the model. :class:`InferWorker`
is the thread that runs requests off paho's network thread and publishes the
answers through an :class:`agent.mqtt.transport.Publisher`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from typing import NamedTuple

from agent.errors import BadRequestError, InferenceError, TransportError
from agent.mqtt.transport import Message, Publisher
from agent.serving import npy
from agent.serving.formats import (
    JSON_CONTENT_TYPE,
    dump_json,
    load_json,
    npy_predict,
    parse_predict,
    predict_json,
)
from agent.serving.registry import ModelRegistry
from agent.serving.stats import ApiCounters

logger = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD_BYTES = 32 * 1024 * 1024


class InferReply(NamedTuple):
    payload: bytes
    content_type: str
    status: int = 200


def error_reply(status: int, message: str, *, model: str | None = None) -> InferReply:
    doc: dict[str, object] = {"error": message, "status": status}
    if model is not None:
        doc["model"] = model
    return InferReply(dump_json(doc), JSON_CONTENT_TYPE, status)


def _user_property(message: Message, key: str) -> str | None:
    for k, v in message.user_properties:
        if k == key:
            return v
    return None


def handle_infer(
    message: Message,
    registry: ModelRegistry,
    *,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    counters: ApiCounters | None = None,
) -> InferReply:
    """Answer one request (see the module's doc). Never raises."""
    reply = _handle(message, registry, max_payload_bytes)
    if counters is not None:
        counters.record("mqtt", reply.status)
    return reply


def _handle(message: Message, registry: ModelRegistry, max_payload_bytes: int) -> InferReply:
    model: str | None = None
    try:
        if len(message.payload) > max_payload_bytes:
            return error_reply(
                413,
                f"a payload of {len(message.payload)} bytes is larger than the {max_payload_bytes} allowed",
            )
        ctype = (message.content_type or "").split(";", 1)[0].strip().lower()
        if npy.is_npy(message.payload) or ctype == npy.CONTENT_TYPE:
            model = _user_property(message, "model")
            if not model:
                raise BadRequestError('a .npy request names its model in the user property "model"')
            active = registry.get(model, _user_property(message, "version"))
            payload, out_type = npy_predict(active.runner, message.payload)
            return InferReply(payload, out_type)
        if ctype not in ("", JSON_CONTENT_TYPE, "text/json", "text/plain"):
            return error_reply(
                415,
                f"unsupported content type {ctype[:60]!r}: send {JSON_CONTENT_TYPE} or {npy.CONTENT_TYPE}",
            )
        req = parse_predict(load_json(message.payload), with_model=True)
        model = req.model
        assert model is not None  # parse_predict(with_model=True) guarantees it
        active = registry.get(model, req.version)
        doc = {"model": active.name, "version": active.version, **predict_json(req, active.runner)}
        return InferReply(dump_json(doc), JSON_CONTENT_TYPE)
    except BadRequestError as exc:
        return error_reply(exc.status, str(exc), model=model)
    except InferenceError as exc:
        return error_reply(500, str(exc), model=model)
    except Exception:  # a bug: answer, log, keep serving
        logger.exception("MQTT inference request on %s failed", message.topic)
        return error_reply(500, "internal error (see the agent's log)", model=model)


class InferWorker:
    """Runs inference requests on its own thread and publishes the answers.

    :meth:`submit` is safe to call on paho's network thread: it only queues
    (a full queue answers 503 at once rather than block paho). Requests
    without a response topic have nobody to answer and are dropped.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        publisher: Publisher,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        counters: ApiCounters | None = None,
        max_pending: int = 64,
        reply_qos: int = 1,
    ) -> None:
        self.registry = registry
        self.publisher = publisher
        self.max_payload_bytes = max_payload_bytes
        self.counters = counters
        self.reply_qos = reply_qos
        self._queue: queue.Queue[Message | None] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mqtt-infer", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        self._thread.join(timeout_s)
        self._thread = None

    def submit(self, message: Message) -> None:
        """Queue a request (any thread; never blocks)."""
        if not message.response_topic:
            logger.debug("inference request on %s without a response topic: dropped", message.topic)
            return
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self._answer(message, error_reply(503, "the agent is busy; try again"))

    def _run(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                return
            reply = handle_infer(
                message, self.registry, max_payload_bytes=self.max_payload_bytes, counters=self.counters
            )
            self._answer(message, reply)

    def _answer(self, message: Message, reply: InferReply) -> None:
        assert message.response_topic is not None
        try:
            self.publisher.publish(
                message.response_topic,
                reply.payload,
                qos=self.reply_qos,
                correlation_data=message.correlation_data,
                content_type=reply.content_type,
            )
        except TransportError as exc:
            logger.info("inference answer to %s not sent: %s", message.response_topic, exc)
