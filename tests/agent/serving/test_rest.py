"""The REST API against real models over real sockets: TF Serving shapes, the
.npy fast path, and every kind of bad request (the server keeps serving)."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.serving import npy
from agent.serving.inference import ModelRunner
from agent.serving.registry import ActiveModel, ModelRegistry
from agent.serving.rest import RestServer
from agent.serving.stats import ApiCounters
from tests.support.tiny_models import TinyModels, models_for


@pytest.fixture(scope="module")
def tiny_models(request: pytest.FixtureRequest) -> TinyModels:
    return models_for(request)


def runner(path: Any, name: str, version: str) -> ModelRunner:
    return ModelRunner.from_file(path, name=name, version=version)


@pytest.fixture(scope="module")
def served(tiny_models: TinyModels) -> Iterator[tuple[RestServer, ModelRegistry]]:
    registry = ModelRegistry()
    registry.activate(ActiveModel("digits", "1", "aa", runner(tiny_models.int8, "digits", "1")))
    registry.activate(ActiveModel("float", "3", "bb", runner(tiny_models.float, "float", "3")))
    registry.activate(ActiveModel("multi", "2", "cc", runner(tiny_models.multi, "multi", "2")))
    server = RestServer(registry, port=0, max_body_bytes=200_000, timeout_s=1.0, body_timeout_s=2.0)
    server.start()
    yield server, registry
    server.stop()


@pytest.fixture
def server(served: tuple[RestServer, ModelRegistry]) -> RestServer:
    return served[0]


def call(
    server: RestServer,
    method: str,
    path: str,
    body: bytes | str | None = None,
    ctype: str = "application/json",
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, bytes, str]:
    c = conn or http.client.HTTPConnection(*server.address, timeout=10)
    headers = {"Content-Type": ctype} if body is not None else {}
    c.request(method, path, body, headers)
    r = c.getresponse()
    data = r.read()
    if conn is None:
        c.close()
    return r.status, data, r.getheader("Content-Type") or ""


def post_json(server: RestServer, path: str, doc: Any) -> tuple[int, Any]:
    status, data, _ = call(server, "POST", path, json.dumps(doc))
    return status, json.loads(data)


def digits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 8, 8, 1), dtype=np.float32)


# -- TF Serving shapes ---------------------------------------------------------------
def test_status_and_metadata(server: RestServer) -> None:
    status, doc = json.loads(call(server, "GET", "/v1/models/digits")[1]), None
    assert status["model_version_status"][0] == {
        "version": "1",
        "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""},
    }
    code, data, _ = call(server, "GET", "/v1/models/digits/versions/1/metadata")
    doc = json.loads(data)
    sig = doc["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert code == 200 and doc["model_spec"]["version"] == "1"
    assert sig["inputs"]["image"]["dtype"] == "DT_FLOAT"
    assert sig["inputs"]["image"]["tflite_dtype"] == "int8"
    assert [d["size"] for d in sig["inputs"]["image"]["tensor_shape"]["dim"]] == ["-1", "8", "8", "1"]
    assert "quantization" in sig["outputs"]["output_0"]
    listing = json.loads(call(server, "GET", "/v1/models")[1])
    assert [m["name"] for m in listing["models"]] == ["digits", "float", "multi"]


def test_row_and_columnar_predictions_match_in_process(
    served: tuple[RestServer, ModelRegistry],
) -> None:
    server, registry = served
    x = digits(3)
    want = registry.get("digits").runner.predict(x)[0]
    status, doc = post_json(server, "/v1/models/digits:predict", {"instances": x.tolist()})
    assert status == 200
    np.testing.assert_allclose(np.array(doc["predictions"]), want, rtol=0, atol=1e-7)
    status, doc = post_json(
        server,
        "/v1/models/digits/versions/1:predict",
        {"inputs": {"image": x.tolist()}, "signature_name": "serving_default"},
    )
    assert status == 200
    np.testing.assert_allclose(np.array(doc["outputs"]), want, rtol=0, atol=1e-7)


def test_multi_input_multi_output_model(server: RestServer) -> None:
    rows: list[dict[str, list[float]]] = [{"a": [1, 2, 3, 4], "b": [0.5] * 3}, {"a": [0] * 4, "b": [1] * 3}]
    status, doc = post_json(server, "/v1/models/multi:predict", {"instances": rows})
    assert status == 200 and len(doc["predictions"]) == 2
    assert set(doc["predictions"][0]) == {"output_0", "output_1"}
    status, cols = post_json(
        server,
        "/v1/models/multi:predict",
        {"inputs": {"a": [r["a"] for r in rows], "b": [r["b"] for r in rows]}},
    )
    assert status == 200
    for key in ("output_0", "output_1"):
        np.testing.assert_allclose(cols["outputs"][key], [p[key] for p in doc["predictions"]])


def test_npy_fast_path(served: tuple[RestServer, ModelRegistry]) -> None:
    server, registry = served
    x = digits(2)
    status, data, ctype = call(server, "POST", "/v1/models/digits:predict", npy.to_npy(x), npy.CONTENT_TYPE)
    assert status == 200 and ctype == npy.CONTENT_TYPE
    out = npy.parse_npy(data)
    assert out.dtype == np.float32 and out.shape == (2, 10)
    np.testing.assert_array_equal(out, registry.get("digits").runner.predict(x)[0])
    codes = np.zeros((1, 8, 8, 1), np.int8)
    status, data, _ = call(server, "POST", "/v1/models/digits:predict", npy.to_npy(codes), npy.CONTENT_TYPE)
    assert status == 200 and npy.parse_npy(data).dtype == np.int8  # codes in, codes out
    status, data, _ = call(
        server, "POST", "/v1/models/digits:predict", npy.to_npy(codes), "application/octet-stream"
    )
    assert status == 200


def test_npz_answer_for_a_single_input_multi_output_model(tiny_models: TinyModels) -> None:
    registry = ModelRegistry()
    registry.activate(ActiveModel("two", "1", "aa", runner(tiny_models.two_out, "two", "1")))
    server = RestServer(registry, port=0)
    server.start()
    try:
        x = np.ones((2, 4), np.float32)
        code, data, ctype = call(server, "POST", "/v1/models/two:predict", npy.to_npy(x), npy.CONTENT_TYPE)
    finally:
        server.stop()
    assert code == 200 and ctype == "application/x-npz"
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        got = {k: npz[k] for k in npz.files}
    want = registry.get("two").runner.predict(x)
    assert sorted(got) == ["output_0", "output_1"]
    for key, arr in zip(registry.get("two").runner.output_keys, want, strict=True):
        np.testing.assert_array_equal(got[key], arr)


# -- bad requests: a clear 4xx each, and the server keeps serving ----------------------
BAD_JSON_CASES = [
    ("/v1/models/digits:predict", b"{not json", 400, "malformed JSON"),
    ("/v1/models/digits:predict", b'{"instances": [NaN]}', 400, "NaN"),
    ("/v1/models/digits:predict", b'{"instances": [[1e400]]}', 400, "NaN or infinity"),
    ("/v1/models/digits:predict", b"[1, 2]", 400, "JSON object"),
    ("/v1/models/digits:predict", b'{"instances": []}', 400, "non-empty"),
    ("/v1/models/digits:predict", b'{"instances": [1], "inputs": [1]}', 400, "exactly one"),
    ("/v1/models/digits:predict", b'{"instances": [[1, 2, 3]]}', 400, "does not fit"),
    ("/v1/models/digits:predict", b'{"instances": [[[["x"]]]]}', 400, "numbers"),
    ("/v1/models/digits:predict", b'{"instances": [[1], [1, 2]]}', 400, "rectangular"),
    ("/v1/models/digits:predict", b'{"inputs": {"nope": 1}}', 400, "unknown input"),
    ("/v1/models/digits:predict", b'{"instances": [1], "signature_name": "x"}', 400, "signature_name"),
    ("/v1/models/digits:predict", b'{"instances": [1], "extra": 1}', 400, "unknown field"),
    ("/v1/models/digits:predict", b"[" * 100_000, 400, "malformed JSON"),
    ("/v1/models/digits:predict", "\udcff".encode("utf-8", "surrogatepass"), 400, "malformed"),
    ("/v1/models/multi:predict", b'{"instances": [[1, 2, 3, 4]]}', 400, "object with the inputs"),
    ("/v1/models/nope:predict", b'{"instances": [1]}', 404, "no model named 'nope'"),
    ("/v1/models/digits/versions/9:predict", b'{"instances": [1]}', 404, "version 9 is not active"),
    ("/v1/models/digits:classify", b"{}", 404, "not supported"),
    ("/v2/whatever", b"{}", 404, "no such route"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_JSON_CASES)
def test_bad_json_requests(server: RestServer, path: str, body: bytes, status: int, message: str) -> None:
    code, data, ctype = call(server, "POST", path, body)
    assert code == status and ctype == "application/json"
    assert message in json.loads(data)["error"]


def npy_with_header(header: str, data: bytes = b"") -> bytes:
    text = header.encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x93NUMPY", "bad magic"),
        (
            npy_with_header("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }", b"\0" * 8),
            "not allowed",
        ),
        (
            npy_with_header("{'descr': '<U4', 'fortran_order': False, 'shape': (1,), }", b"\0" * 16),
            "not allowed",
        ),
        (
            npy_with_header("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }", b"\0" * 4),
            "plain numbers",
        ),
        (npy_with_header("__import__('os').system('true')"), "literal"),
        (
            npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 8, 8, 1), }", b"\0" * 3),
            "needs 256",
        ),
        (
            npy_with_header("{'descr': '<f4', 'fortran_order': 0, 'shape': (1,), }", b"\0" * 4),
            "fortran_order",
        ),
        (npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }"), "non-negative"),
        (npy_with_header("{'descr': '<f4', 'shape': (1,), }", b"\0" * 4), "exactly"),
        (b"\x93NUMPY\x01\x00\xff\xff" + b" " * 100, "more than"),
        (b"\x93NUMPY\x09\x00\x00\x00", "version 9"),
        (npy.to_npy(np.full((1, 8, 8, 1), np.nan, np.float32)), "NaN"),
        (npy.to_npy(np.zeros((1, 8, 8, 1), np.float16)), None),  # fine: floats of any width
        (npy.to_npy(np.zeros((2, 3), np.float32)), "does not fit"),
    ],
)
def test_bad_npy_requests(server: RestServer, body: bytes, message: str | None) -> None:
    code, data, _ = call(server, "POST", "/v1/models/digits:predict", body, npy.CONTENT_TYPE)
    if message is None:
        assert code == 200
    else:
        assert code == 400, data
        assert message in json.loads(data)["error"]


def test_npy_to_a_multi_input_model_is_refused(server: RestServer) -> None:
    code, data, _ = call(
        server, "POST", "/v1/models/multi:predict", npy.to_npy(np.zeros((1, 4))), npy.CONTENT_TYPE
    )
    assert code == 400 and "single-input" in json.loads(data)["error"]


def test_methods_types_and_sizes(server: RestServer) -> None:
    assert call(server, "GET", "/v1/models/digits:predict")[0] == 405
    assert call(server, "DELETE", "/v1/models/digits")[0] == 405
    assert call(server, "PATCH", "/v1/models/digits")[0] == 405
    assert call(server, "POST", "/healthz", b"{}")[0] == 405
    code, data, _ = call(server, "POST", "/v1/models/digits:predict", b"<xml/>", "application/xml")
    assert code == 415 and "application/x-npy" in json.loads(data)["error"]
    code, data, _ = call(server, "POST", "/v1/models/digits:predict", b"x" * 200_001)
    assert code == 413 and "200000" in json.loads(data)["error"]


ROUTE_ERRORS = [  # method, path, status, the whole error message
    ("GET", "/v1/models/digits:predict", 405, "use POST for :predict"),
    ("PUT", "/v1/models/digits/versions/1:predict", 405, "use POST for :predict"),
    ("DELETE", "/v1/models/digits", 405, "DELETE is not allowed on /v1/models/digits"),
    ("POST", "/v1/models/digits/metadata", 405, "POST is not allowed on /v1/models/digits/metadata"),
    ("PUT", "/healthz", 405, "PUT is not allowed on /healthz"),
    ("POST", "/v1/models/", 405, "POST is not allowed on /v1/models/"),
    ("HEAD", "/healthz", 405, "method 'HEAD' is not allowed"),
    ("OPTIONS", "/v1/models", 405, "method 'OPTIONS' is not allowed"),
    ("GET", "/v1/models/digits:regress", 404, "regress is not supported; use :predict"),
    ("DELETE", "/v1/models/digits:classify", 404, "classify is not supported; use :predict"),
    ("GET", "/v1/models/digits/versions/", 404, "no such route: /v1/models/digits/versions/"),
    ("GET", "/v1/models/digits/versions/9", 404, "model 'digits' version 9 is not active (active: 1)"),
    ("GET", "/healthz/", 404, "no such route: /healthz/"),
    ("PUT", "/nowhere?x=1", 404, "no such route: /nowhere"),
]


@pytest.mark.parametrize(("method", "path", "status", "message"), ROUTE_ERRORS)
def test_route_errors(server: RestServer, method: str, path: str, status: int, message: str) -> None:
    code, data, ctype = call(server, method, path)
    assert (code, ctype) == (status, "application/json")
    if method != "HEAD":
        assert json.loads(data) == {"error": message}


def test_the_listing_and_queries(server: RestServer) -> None:
    for path in ("/v1/models", "/v1/models/", "/v1/models?x=1"):
        code, data, _ = call(server, "GET", path)
        assert code == 200 and [m["name"] for m in json.loads(data)["models"]] == ["digits", "float", "multi"]
    code, data, _ = call(server, "GET", "/v1/models/digits/versions/1?debug=1")
    assert code == 200 and json.loads(data)["model_version_status"][0]["version"] == "1"


def raw_exchange(server: RestServer, data: bytes, *, wait_s: float = 5.0) -> bytes:
    with socket.create_connection(server.address, timeout=wait_s) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_missing_length_chunked_and_huge_declared_bodies(server: RestServer) -> None:
    reply = raw_exchange(server, b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\n\r\n{}")
    assert reply.startswith(b"HTTP/1.1 411") and b"Content-Length" in reply
    reply = raw_exchange(
        server,
        b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 411") and b"chunked" in reply
    # refused from the headers alone: the 10 GB never have to be sent
    reply = raw_exchange(
        server,
        b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 10000000000\r\nExpect: 100-continue\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 413") and b"Connection: close" in reply
    reply = raw_exchange(
        server, b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 413")
    reply = raw_exchange(server, b"GARBAGE\x00\xff\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400")
    reply = raw_exchange(server, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 414")


def test_slow_clients_are_cut_off(server: RestServer) -> None:
    # body promised but never sent: 408 after the per-read timeout (1 s here)
    t0 = time.monotonic()
    reply = raw_exchange(
        server, b'POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"instan'
    )
    assert reply.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - t0 < 4.5
    # a trickle that keeps each read under the timeout still meets the body deadline (2 s)
    with socket.create_connection(server.address, timeout=5) as s:
        s.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        got = b""
        for _ in range(40):
            try:
                s.sendall(b" ")
            except OSError:
                break
            s.settimeout(0.1)
            with contextlib.suppress(TimeoutError):
                got += s.recv(4096)
            if got:
                break
            time.sleep(0.2)
        assert got.startswith(b"HTTP/1.1 408")
    # a client that says nothing at all is closed quietly
    assert raw_exchange(server, b"") == b""


def test_keep_alive_survives_errors(server: RestServer) -> None:
    conn = http.client.HTTPConnection(*server.address, timeout=10)
    sock_ids = set()
    for body in (b"{bad", json.dumps({"instances": digits(1).tolist()}).encode(), b"{}"):
        code, _, _ = call(server, "POST", "/v1/models/digits:predict", body, conn=conn)
        assert code in (200, 400)
        assert conn.sock is not None
        sock_ids.add(id(conn.sock))
    assert len(sock_ids) == 1
    conn.close()


def test_health_and_readiness(tiny_models: TinyModels) -> None:
    registry = ModelRegistry()
    server = RestServer(registry, port=0)
    server.start()
    try:
        assert call(server, "GET", "/healthz")[0] == 200
        code, data, _ = call(server, "GET", "/readyz")
        assert code == 503 and json.loads(data) == {"ready": False, "models": []}
        registry.activate(ActiveModel("digits", "1", "aa", runner(tiny_models.int8, "digits", "1")))
        assert call(server, "GET", "/readyz")[0] == 200
    finally:
        server.stop()


def test_connection_limit_and_stop_closes_everything(tiny_models: TinyModels) -> None:
    counters = ApiCounters()
    server = RestServer(ModelRegistry(), port=0, max_connections=2, counters=counters)
    server.start()
    idle = [socket.create_connection(server.address, timeout=5) for _ in range(2)]
    time.sleep(0.2)
    reply = raw_exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 503")
    assert counters.snapshot()["rest"]["5xx"] == 1
    address = server.address
    server.stop()
    for s in idle:
        assert s.recv(10) == b""  # closed by stop()
        s.close()
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=1).close()
    # the port is free again
    again = RestServer(ModelRegistry(), host=address[0], port=address[1])
    again.start()
    again.stop()


def test_requests_while_the_model_switches(tiny_models: TinyModels) -> None:
    registry = ModelRegistry()
    v = {str(k): runner(tiny_models.int8 if k % 2 else tiny_models.float, "digits", str(k)) for k in (1, 2)}
    registry.activate(ActiveModel("digits", "1", "aa", v["1"]))
    server = RestServer(registry, port=0)
    server.start()
    statuses: list[int] = []
    stop = threading.Event()
    body = json.dumps({"instances": digits(1).tolist()})

    def client() -> None:
        conn = http.client.HTTPConnection(*server.address, timeout=10)
        while not stop.is_set():
            statuses.append(call(server, "POST", "/v1/models/digits:predict", body, conn=conn)[0])
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    for k in range(40):
        registry.activate(ActiveModel("digits", str(k % 2 + 1), "x", v[str(k % 2 + 1)]))
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    server.stop()
    assert statuses and set(statuses) == {200}
    assert v["1"].stats.snapshot().ok + v["2"].stats.snapshot().ok == len(statuses)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    doc=st.one_of(
        json_values,
        st.fixed_dictionaries({"instances": json_values}),
        st.fixed_dictionaries({"inputs": json_values}),
    ),
    model=st.sampled_from(["digits", "multi", "float"]),
)
def test_no_json_request_gets_a_5xx(server: RestServer, doc: Any, model: str) -> None:
    code, data, _ = call(server, "POST", f"/v1/models/{model}:predict", json.dumps(doc))
    assert code in (200, 400), data
    assert code == 200 or "error" in json.loads(data)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_no_npy_body_gets_a_5xx(server: RestServer, junk: bytes) -> None:
    for body in (junk, b"\x93NUMPY" + junk):
        code, _, _ = call(server, "POST", "/v1/models/digits:predict", body, npy.CONTENT_TYPE)
        assert code == 400


def test_counters_see_every_answer_but_probes() -> None:
    counters = ApiCounters()
    server = RestServer(ModelRegistry(), port=0, counters=counters)
    server.start()
    try:
        assert call(server, "GET", "/healthz")[0] == 200
        assert call(server, "GET", "/readyz")[0] == 503  # no model yet: not ready, and no API error
        assert call(server, "GET", "/v1/models")[0] == 200
        assert call(server, "GET", "/v1/models/x")[0] == 404
        assert call(server, "POST", "/readyz", b"{}")[0] == 405  # not a probe: a caller's mistake
        raw_exchange(server, b"BAD\r\n\r\n")
    finally:
        server.stop()
    assert counters.snapshot() == {"rest": {"2xx": 1, "4xx": 3}}


def test_parse_npy_roundtrip_and_byte_order() -> None:
    for arr in (
        np.arange(6, dtype=">f4").reshape(2, 3),
        np.asfortranarray(np.arange(6).reshape(2, 3)),
        np.array(True),
        np.zeros((0, 3), np.uint16),
    ):
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        back = npy.parse_npy(buf.getvalue())
        np.testing.assert_array_equal(back, arr)
        assert back.dtype.isnative and back.flags.c_contiguous
        np.testing.assert_array_equal(np.load(io.BytesIO(npy.to_npy(back))), arr)


def test_large_bodies_are_taken_one_at_a_time(tiny_models: TinyModels) -> None:
    registry = ModelRegistry()
    registry.activate(ActiveModel("digits", "1", "aa", runner(tiny_models.int8, "digits", "1")))
    server = RestServer(registry, port=0, large_body_bytes=1000, timeout_s=0.5, body_timeout_s=5.0)
    server.start()
    try:
        # a slow client holds the large-body slot while it trickles its body...
        slow = socket.create_connection(server.address, timeout=5)
        slow.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{")
        trickling = threading.Event()
        trickling.set()

        def trickle() -> None:
            while trickling.is_set():
                with contextlib.suppress(OSError):
                    slow.sendall(b" ")
                time.sleep(0.1)

        t = threading.Thread(target=trickle)
        t.start()
        time.sleep(0.2)
        big = json.dumps({"instances": digits(2).tolist()}).encode()
        assert len(big) > 1000
        code, data, _ = call(server, "POST", "/v1/models/digits:predict", big)
        assert code == 503 and "large" in json.loads(data)["error"]
        # ...small requests are not held up
        small = json.dumps({"instances": [[[[0]] * 8] * 8]}).encode()
        assert len(small) < 1000
        assert call(server, "POST", "/v1/models/digits:predict", small)[0] == 200
        trickling.clear()
        t.join()
        slow.close()
        time.sleep(0.7)  # the slow request ends and frees the slot
        assert call(server, "POST", "/v1/models/digits:predict", big)[0] == 200
    finally:
        server.stop()
