"""Keep-alive against the real REST server's idle timeout: the server closes an idle connection,
and the tests' client (tests/support/http_client.py) sends its next request again on a fresh
connection, as real clients do, where a bare http.client connection fails."""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from agent.serving.inference import ModelRunner
from agent.serving.registry import ActiveModel, ModelRegistry
from agent.serving.rest import RestServer
from tests.support.http_client import STALE, KeepAliveClient
from tests.support.tiny_models import TinyModels, models_for

IDLE_S = 0.5  # the server's idle timeout here (10 s by default)


@pytest.fixture(scope="module")
def tiny_models(request: pytest.FixtureRequest) -> TinyModels:
    return models_for(request)


@pytest.fixture
def server(tiny_models: TinyModels) -> Iterator[RestServer]:
    registry = ModelRegistry()
    runner = ModelRunner.from_file(tiny_models.float, name="digits", version="1")
    registry.activate(ActiveModel("digits", "1", "aa", runner))
    srv = RestServer(registry, port=0, timeout_s=IDLE_S)
    srv.start()
    yield srv
    srv.stop()


def wait_closed_by_server(sock: socket.socket | None, timeout_s: float = 30.0) -> None:
    """Until the server's FIN has arrived on ``sock`` (an event, not a sleep)."""
    assert sock is not None
    readable, _, _ = select.select([sock], [], [], timeout_s)
    assert readable, "the server kept the idle connection open"
    assert sock.recv(1, socket.MSG_PEEK) == b""


def predict_body() -> bytes:
    x = np.random.default_rng(0).random((1, 8, 8, 1), dtype=np.float32)
    return json.dumps({"instances": x.tolist()}).encode()


def test_a_bare_connection_fails_after_the_idle_timeout(server: RestServer) -> None:
    """What the tests met under load (BrokenPipeError in tests/pi/test_agent_emulated.py)."""
    conn = http.client.HTTPConnection(*server.address, timeout=10)
    conn.request("GET", "/healthz")
    assert conn.getresponse().read() == b'{"status":"ok"}'
    wait_closed_by_server(conn.sock)
    with pytest.raises(STALE):
        conn.request(
            "POST", "/v1/models/digits:predict", predict_body(), {"Content-Type": "application/json"}
        )
        conn.getresponse()
    conn.close()


def test_the_client_sends_again_on_a_fresh_connection(server: RestServer) -> None:
    client = KeepAliveClient(*server.address, timeout_s=10)
    try:
        first = client.request("GET", "/v1/models/digits")
        assert first.status == 200 and client.connections == 1
        wait_closed_by_server(client.conn.sock if client.conn else None)
        answer = client.request(
            "POST", "/v1/models/digits:predict", predict_body(), {"Content-Type": "application/json"}
        )
        assert answer.status == 200 and len(json.loads(answer.body)["predictions"][0]) == 10
        assert (client.connections, client.resent) == (2, 1)
    finally:
        client.close()


def test_a_fresh_connection_is_not_retried() -> None:
    """A server that closes without answering a new connection's request is an error, not
    a stale connection: the client says so instead of asking again."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = KeepAliveClient("127.0.0.1", port, timeout_s=10)

    def close_without_answer() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()

    t = threading.Thread(target=close_without_answer, daemon=True)
    t.start()
    try:
        with pytest.raises(STALE):
            client.request("GET", "/healthz")
        assert (client.connections, client.resent) == (1, 0)
    finally:
        client.close()
        listener.close()
        t.join(10)
