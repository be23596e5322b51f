"""Fuzzing the serving side: every byte a client on the network can send to a device's models.

- ``.npy`` bodies (:func:`agent.serving.npy.parse_npy`): headers built from every
  field's edge cases (dtypes that unpickle, shapes that overflow, versions,
  header lengths that lie) and random bytes; valid arrays round-trip;
- MQTT inference (:func:`agent.serving.mqtt_requests.handle_infer`): JSON bodies shaped
  like requests and not, ``.npy`` bodies, content types and MQTT 5 user
  properties;
- the REST API over a real socket: raw requests with random methods, paths,
  HTTP versions, headers (lying ``Content-Length``, ``Transfer-Encoding``,
  ``Expect``) and bodies.

The property everywhere: only the declared outcome -- an answer, a
:class:`BadRequestError`, or an HTTP/MQTT error reply with a JSON
``{"error": ...}`` and a 4xx status (or 500 only for a runtime failure, which
the tiny test models never have) -- never an unexpected exception, a logged
traceback or a dead server; and memory bounded by a small multiple of the
input's size for large hostile inputs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import tracemalloc
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.errors import BadRequestError
from agent.mqtt.transport import Message
from agent.serving import npy
from agent.serving.inference import ModelRunner
from agent.serving.mqtt_requests import handle_infer
from agent.serving.registry import ActiveModel, ModelRegistry
from agent.serving.rest import RestServer
from tests.support.tiny_models import TinyModels, models_for

SOAK = os.environ.get("HYPOTHESIS_PROFILE") == "soak"
INTERNAL = "internal error"


def fuzz(examples: int) -> settings:
    checks = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
    if SOAK:
        return settings(deadline=None, suppress_health_check=checks)
    return settings(max_examples=examples, deadline=None, suppress_health_check=checks)


class ErrorLog(logging.Handler):
    """Collects ERROR records (a logged traceback means an unexpected exception)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def registry(request: pytest.FixtureRequest) -> ModelRegistry:
    models: TinyModels = models_for(request)
    reg = ModelRegistry()
    for name, path, version in (
        ("digits", models.int8, "3"),
        ("float", models.float, "1"),
        ("multi", models.multi, "1"),
        ("two", models.two_out, "2"),
    ):
        runner = ModelRunner.from_file(path, name=name, version=version)
        reg.activate(ActiveModel(name, version, "aa", runner))
    return reg


@pytest.fixture(scope="module")
def errors() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    root = logging.getLogger("agent")
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


# -- .npy ---------------------------------------------------------------------------------------------

descrs = (
    st.sampled_from(
        [
            "<f4",
            ">f4",
            "|u1",
            "|i1",
            "<i8",
            "<f2",
            "|b1",
            "=f4",
            "|f4",
            "<u8",
            ">i2",
            "|O",
            "<U5",
            "|V8",
            "|S3",
            "<c8",
            "<M8[s]",
            "f4",
            "<f16",
            "",
            "<i4x",
        ]
    )
    | st.text(max_size=6)
    | st.integers()
    | st.none()
    | st.just([("a", "<i4")])
)
shapes = st.lists(st.integers(-2, 9), max_size=5).map(tuple) | st.sampled_from(
    [(2**62, 2**62), (10**9,), (0, 10**12), (True,), (1.5,), "3", None, [2, 2], tuple(range(17)), (-1,)]
)


@st.composite
def npy_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["built", "built", "valid", "random"]))
    if kind == "random":
        return b"\x93NUMPY" + draw(st.binary(max_size=200))
    if kind == "valid":
        dtypes = st.sampled_from([np.float32, np.int8, np.uint8, np.float64, np.bool_, np.int64])
        arr = draw(hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=4, max_side=4)))
        data = npy.to_npy(arr)
        if draw(st.booleans()):  # damage one byte
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
        return data
    header: dict[Any, Any] = {
        "descr": draw(descrs),
        "fortran_order": draw(st.sampled_from([False, True, 0, "no"])),
        "shape": draw(shapes),
    }
    if draw(st.integers(0, 4)) == 0:
        header[draw(st.text(max_size=4))] = 1
    if draw(st.integers(0, 4)) == 0:
        del header[draw(st.sampled_from(sorted(header, key=str)))]
    text = draw(
        st.sampled_from(
            [
                repr(header),
                repr(header),
                repr(list(header.items())),
                "{" * 200,
                "(" * 5000 + ")" * 5000,
                "__import__('os')",
                "1e999",
                "",
            ]
        )
    )
    raw = text.encode("utf-8", "surrogatepass") if draw(st.booleans()) else text.encode("latin1", "replace")
    major = draw(st.sampled_from([1, 2, 3, 0, 4, 255]))
    hlen = len(raw) if draw(st.integers(0, 5)) else draw(st.integers(0, 70_000))
    size = min(hlen, 0xFFFF).to_bytes(2, "little") if major == 1 else hlen.to_bytes(4, "little")
    body = draw(st.binary(max_size=256))
    return b"\x93NUMPY" + bytes([major, 0]) + size + raw + body


@fuzz(400)
@given(data=npy_bodies())
def test_parse_npy_only_refuses_with_bad_request(data: bytes) -> None:
    try:
        arr = npy.parse_npy(data)
    except BadRequestError as exc:
        assert exc.status == 400
        return
    assert arr.dtype.kind in "biuf" and arr.dtype.isnative
    assert arr.flags.c_contiguous and arr.ndim <= npy.MAX_DIMS


@fuzz(200)
@given(
    arr=hnp.arrays(
        st.sampled_from(["<f4", ">f4", "<i8", ">u2", "|b1", "|i1", "<f2", ">f8"]),
        hnp.array_shapes(min_dims=0, max_dims=5, max_side=5),
    ),
    fortran=st.booleans(),
)
def test_npy_round_trip(arr: np.ndarray, fortran: bool) -> None:
    if fortran:
        arr = np.asfortranarray(arr)
    back = npy.parse_npy(npy.to_npy(arr))
    np.testing.assert_array_equal(back, arr)
    assert back.shape == arr.shape


def test_hostile_npy_headers_allocate_nothing_big() -> None:
    """Shapes that claim terabytes, 10 kB literal headers, deep nesting: refused before
    anything the size of the claim is allocated."""
    hostile = [
        npy.to_npy(np.zeros(4, np.float32)).replace(b"(4,)", b"(10000000000000,)"),
        b"\x93NUMPY\x01\x00" + (10_000).to_bytes(2, "little") + b"[" * 10_000,
        b"\x93NUMPY\x02\x00" + (9_999).to_bytes(4, "little") + b"(" * 4_999 + b")" * 5_000,
        b"\x93NUMPY\x01\x00"
        + (60).to_bytes(2, "little")
        + b"{'descr': '<f8', 'fortran_order': False, 'shape': (99999, 99999, 99999)}",
    ]
    tracemalloc.start()
    try:
        for data in hostile:
            with pytest.raises(BadRequestError):
                npy.parse_npy(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, peak


# -- MQTT inference -----------------------------------------------------------------------------------

json_scalars = (
    st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=False) | st.text(max_size=5)
)
json_values = st.recursive(
    json_scalars,
    lambda k: st.lists(k, max_size=4) | st.dictionaries(st.text(max_size=5), k, max_size=3),
    max_leaves=25,
)
model_names = st.sampled_from(["digits", "float", "multi", "two", "nope", "", "DIGITS"]) | st.text(max_size=8)


@st.composite
def tensors(draw: st.DrawFn) -> Any:
    """Inputs that are right, nearly right or wrong for the tiny models."""
    shape = draw(
        st.sampled_from(
            [(1, 8, 8, 1), (8, 8, 1), (2, 8, 8, 1), (1, 4), (4,), (1, 3), (3, 1), (0, 4), (1, 8, 8)]
        )
    )
    dtype = draw(st.sampled_from([np.float32, np.int8, np.float64, np.int64]))
    arr = draw(
        hnp.arrays(
            dtype,
            shape,
            elements={"min_value": -200, "max_value": 200} if np.dtype(dtype).kind == "f" else None,
        )
    )
    return arr


@st.composite
def infer_payloads(
    draw: st.DrawFn, with_model: bool = True
) -> tuple[bytes, str | None, tuple[tuple[str, str], ...]]:
    kind = draw(st.sampled_from(["json", "json", "npy", "junk"]))
    props = tuple(
        draw(
            st.lists(
                st.tuples(
                    st.sampled_from(["model", "version", "x", "Model"]),
                    model_names | st.sampled_from(["1", "2", "3"]),
                ),
                max_size=3,
            )
        )
    )
    ctype = draw(
        st.sampled_from(
            [
                None,
                "application/json",
                "application/x-npy",
                "text/plain",
                "application/json; charset=utf-8",
                "image/png",
                "APPLICATION/JSON",
            ]
        )
        | st.text(max_size=10)
    )
    if kind == "npy":
        arr = draw(tensors())
        return (npy.to_npy(arr) if draw(st.integers(0, 3)) else draw(npy_bodies())), ctype, props
    if kind == "junk":
        return draw(st.binary(max_size=300)), ctype, props
    doc: dict[str, Any] = {}
    if draw(st.integers(0, 5 if with_model else 0)) if with_model else draw(st.integers(0, 9)) == 0:
        doc["model"] = draw(model_names | json_values)
    if draw(st.booleans()) if with_model else draw(st.integers(0, 9)) == 0:
        doc["version"] = draw(st.sampled_from(["1", "3", 3, 2, None, True, [3]]) | json_values)
    which = draw(st.sampled_from(["instances", "inputs", "both", "none"]))
    for key in ["instances", "inputs"] if which == "both" else [which] if which != "none" else []:
        value: Any = draw(tensors()).tolist() if draw(st.booleans()) else draw(json_values)
        if key == "inputs" and draw(st.integers(0, 3)) == 0:
            value = {
                draw(st.sampled_from(["a", "b", "input_0", "x"])): draw(tensors()).tolist()
                for _ in range(draw(st.integers(1, 3)))
            }
        doc[key] = value
    if draw(st.integers(0, 4)) == 0:
        doc[draw(st.sampled_from(["signature_name", "extra"]))] = draw(json_values)
    text = json.dumps(doc)
    if draw(st.integers(0, 9)) == 0:
        text = text.replace("0.5", "NaN", 1) if "0.5" in text else text[: len(text) // 2]
    return text.encode(), ctype, props


@fuzz(300)
@given(payload=infer_payloads())
def test_mqtt_inference_answers_every_payload(
    registry: ModelRegistry, errors: ErrorLog, payload: tuple[bytes, str | None, tuple[tuple[str, str], ...]]
) -> None:
    body, ctype, props = payload
    before = len(errors.records)
    reply = handle_infer(
        Message(
            topic="litefleet/v1/devices/pi-1/infer",
            payload=body,
            response_topic="litefleet/v1/replies/app/pi-1",
            correlation_data=b"c",
            content_type=ctype,
            user_properties=props,
        ),
        registry,
        max_payload_bytes=100_000,
    )
    assert len(errors.records) == before, errors.records[before:]
    if reply.status == 200:
        if reply.content_type == "application/json":
            doc = json.loads(reply.payload)
            assert ("predictions" in doc) != ("outputs" in doc), doc
        elif reply.content_type == npy.CONTENT_TYPE:
            npy.parse_npy(reply.payload)
        else:
            assert reply.content_type == "application/x-npz"
        return
    assert reply.status in (400, 404, 413, 415), reply
    doc = json.loads(reply.payload)
    assert doc["status"] == reply.status and INTERNAL not in doc["error"]


def _peak(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("what", ["zeros", "deep", "wide_npy", "floats", "ragged"])
def test_mqtt_inference_memory_is_a_bounded_multiple_of_the_payload(
    registry: ModelRegistry, what: str
) -> None:
    """The largest payloads of the shapes that cost most to decode: memory stays within
    a fixed multiple of the payload (JSON is decoded into Python objects, ~10x; the
    REST server takes such bodies one at a time for the same reason)."""
    n = 2_000_000
    if what == "zeros":  # 1M samples' worth of "0," for a model taking 64 values each
        body = (
            b'{"model":"digits","instances":['
            + b",".join([b"[" + b",".join([b"0"] * 64) + b"]"] * (n // 130))
            + b"]}"
        )
    elif what == "deep":
        body = b'{"model":"digits","instances":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    elif what == "wide_npy":
        body = npy.to_npy(np.zeros((n // 64, 8, 8, 1), np.int8))
    elif what == "floats":
        x = np.random.default_rng(0).random((n // 1400, 8, 8, 1))
        body = json.dumps({"model": "float", "inputs": x.tolist()}).encode()
    else:
        body = b'{"model":"digits","instances":[' + b",".join([b"[1,2]", b"[1]"] * (n // 8)) + b"]}"
    msg = Message(topic="t", payload=body, response_topic="r", correlation_data=b"c")
    replies: list[Any] = []
    peak = _peak(lambda: replies.append(handle_infer(msg, registry, max_payload_bytes=4 * n)))
    assert replies[0].status in (200, 400), replies[0][:200]
    assert peak < 24 * len(body) + 8_000_000, (peak, len(body))


# -- REST over a real socket ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rest(registry: ModelRegistry) -> Iterator[RestServer]:
    server = RestServer(
        registry, port=0, max_body_bytes=64_000, timeout_s=1.0, body_timeout_s=2.0, large_body_bytes=16_000
    )
    server.start()
    yield server
    server.stop()


methods = st.sampled_from(
    ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "get", "CONNECT", "TRACE", "BREW"]
) | st.text(alphabet="ABCXYZ-_", min_size=1, max_size=8)
paths = st.sampled_from(
    [
        "/v1/models/digits:predict",
        "/v1/models/digits/versions/3:predict",
        "/v1/models/digits/versions/9:predict",
        "/v1/models/multi:predict",
        "/v1/models/two:predict",
        "/v1/models/digits",
        "/v1/models/digits/metadata",
        "/v1/models/digits:classify",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/",
        "/v1/models/../../etc/passwd",
        "/v1/models/digits:predict?x=1",
        "/v1/models/%64igits:predict",
        "*",
        "http://x/v1/models/digits",
        "/" + "a" * 3000,
        "/v1/models/digits/versions/:predict",
        "/v1/models/" + "d" * 200 + ":predict",
    ]
) | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40).map(lambda s: "/" + s)
versions = st.sampled_from(
    ["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1", "HTTPS/1.1", "", "HTTP/1.1 x"]
)
ctypes = st.sampled_from(
    [
        "application/json",
        "application/x-npy",
        "application/octet-stream",
        "text/plain",
        "application/json; charset=utf-8",
        "multipart/form-data",
        "",
    ]
) | st.text(max_size=12)


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    body: bytes = draw(
        st.sampled_from(["json", "npy", "junk", "none"]).flatmap(
            lambda k: (
                infer_payloads(with_model=False).map(lambda p: p[0])
                if k == "json"
                else npy_bodies()
                if k == "npy"
                else st.binary(max_size=400)
                if k == "junk"
                else st.just(b"")
            )
        )
    )
    headers: list[tuple[str, str]] = []
    if draw(st.integers(0, 3)):
        headers.append(("Content-Type", draw(ctypes)))
    cl = draw(
        st.sampled_from(["exact", "exact", "exact", "none", "short", "long", "junk", "neg", "huge", "twice"])
    )
    if cl == "exact":
        headers.append(("Content-Length", str(len(body))))
    elif cl == "short":
        headers.append(("Content-Length", str(max(0, len(body) - 3))))
    elif cl == "long":
        headers.append(("Content-Length", str(len(body) + 50)))
    elif cl == "junk":
        headers.append(("Content-Length", draw(st.sampled_from(["abc", "1e3", " 5", "0x10", "", "５"]))))
    elif cl == "neg":
        headers.append(("Content-Length", "-1"))
    elif cl == "huge":
        headers.append(("Content-Length", draw(st.sampled_from([str(10**30), "65000", "99999999"]))))
    elif cl == "twice":
        headers += [("Content-Length", str(len(body))), ("Content-Length", "3")]
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        headers.append(
            draw(
                st.sampled_from(
                    [
                        ("Transfer-Encoding", "chunked"),
                        ("Expect", "100-continue"),
                        ("Connection", "close"),
                        ("Connection", "keep-alive"),
                        ("Host", "x"),
                        ("X-" + "a" * 70_000, "1"),
                    ]
                )
                | st.tuples(st.text(alphabet="abcXYZ-:", min_size=0, max_size=10), st.text(max_size=20))
            )
        )
    method = draw(
        st.sampled_from(["POST", "POST", "POST", "POST", "GET"]) if draw(st.integers(0, 3)) else methods
    )
    path = draw(
        st.sampled_from(
            [
                "/v1/models/digits:predict",
                "/v1/models/float:predict",
                "/v1/models/multi:predict",
                "/v1/models/two/versions/2:predict",
            ]
        )
        if draw(st.integers(0, 2))
        else paths
    )
    version = "HTTP/1.1" if draw(st.integers(0, 4)) else draw(versions)
    line = f"{method} {path} {version}".rstrip()
    head = line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("utf-8", "replace") + body


def exchange(server: RestServer, raw: bytes, timeout_s: float = 8.0) -> bytes:
    with socket.create_connection(server.address, timeout=timeout_s) as s:
        try:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close early (413 before the body): read what it said
        out = bytearray()
        while True:
            try:
                block = s.recv(65536)
            except ConnectionResetError:
                break
            if not block:
                break
            out += block
    return bytes(out)


STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n")


def responses(data: bytes) -> Iterator[tuple[int, dict[str, str], bytes]]:
    while data:
        m = STATUS.match(data)
        assert m, f"not an HTTP response: {data[:200]!r}"
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data[:300]
        fields = dict(line.split(": ", 1) for line in head.decode("latin1").split("\r\n")[1:])
        n = int(fields.get("Content-Length", "0"))
        yield int(m.group(1)), fields, rest[:n]
        data = rest[n:]


@fuzz(250)
@given(raw=http_requests())
def test_rest_answers_every_request_with_json_errors(rest: RestServer, errors: ErrorLog, raw: bytes) -> None:
    before = len(errors.records)
    data = exchange(rest, raw)
    first_line = raw.split(b"\r\n", 1)[0]
    if not data:
        # the only silence allowed: nothing that reads as a request line at all
        assert not first_line.strip() or len(first_line) > 65536, raw[:200]
    for status, fields, body in responses(data):
        event(f"HTTP {status}")
        if status == 100:
            continue
        assert status != 500, body
        if status >= 400:
            assert fields.get("Content-Type") == "application/json"
            assert "error" in json.loads(body)
    assert len(errors.records) == before, [r.getMessage() for r in errors.records[before:]]
    # and the server still serves
    assert responses(exchange(rest, b"GET /healthz HTTP/1.1\r\n\r\n")).__next__()[0] == 200
