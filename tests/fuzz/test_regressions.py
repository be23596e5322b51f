"""Fast, fixed regression tests for bugs the fuzzers found (one per fix).

The fuzzers in ``test_fuzz_*.py`` found these with random input; the cases here pin
each one down so it stays fixed whatever the fuzzers draw next time.
"""

from __future__ import annotations

import pytest

from agent.protocol import ProtocolError, parse_chunk_info, parse_release
from agent.reasons import Reason

MODEL = "models/m/1/model.tflite"


@pytest.mark.parametrize("custom", [[1], "litefleet", 7, {"litefleet": [1]}])
def test_signed_custom_field_of_another_shape_is_not_a_release(custom: object) -> None:
    """A signed target whose ``custom`` is not an object was an AttributeError that
    ended the agent's work loop (a crash on every refresh); it is no model release."""
    assert parse_release(MODEL, custom) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields",
    [
        {"rollout": [1]},  # AttributeError: 'list' object has no attribute 'get'
        {"rollout": "all"},
        {"version": float("inf")},  # OverflowError: int(1e999)
    ],
)
def test_malformed_signed_release_fields_are_a_protocol_error(fields: dict) -> None:
    lf = {"kind": "model", "name": "m", "version": 1, **fields}
    with pytest.raises(ProtocolError):
        parse_release(MODEL, {"litefleet": lf})


def test_infinite_chunk_size_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        parse_chunk_info({"litefleet": {"chunk_size": float("inf"), "chunks": []}}, 4)


@pytest.mark.parametrize(
    "hashes", [{"sha512": "ab" * 64}, {"sha256": ""}, {"sha256": "../../escaped"}, {"sha256": "A" * 64}]
)
def test_target_without_a_valid_sha256_is_an_invalid_target(tmp_path, hashes: dict) -> None:
    """The signed SHA-256 names the download file: a missing one was a KeyError that ended
    the work loop, ``""`` an IsADirectoryError, and ``../..`` wrote outside downloads/."""
    import hashlib

    from tuf.api.metadata import TargetFile, Targets

    from agent.activation.decisions import DeviceState
    from agent.activation.store import ModelStore
    from agent.delivery.metadata import RetainedMetadata
    from agent.delivery.updater import ModelUpdater
    from agent.mqtt.transport import Message
    from agent.protocol import Topics

    class Broker:
        connected = True

        def subscribe_many(self, filters, handler, qos=1):  # type: ignore[no-untyped-def]
            for f in filters:
                handler(Message(topic=f, payload=b"TFL3", retain=True))

        def unsubscribe(self, *filters: str) -> None:
            pass

    class NoCache:
        def find_cached_target(self, info, path):  # type: ignore[no-untyped-def]
            return None

    tfl = hashlib.sha256(b"TFL3").hexdigest()
    lf = {"kind": "model", "name": "m", "version": 1, "chunk_size": 4, "chunks": [tfl]}
    targets = Targets(version=2)
    targets.targets[MODEL] = TargetFile(4, hashes, MODEL, unrecognized_fields={"custom": {"litefleet": lf}})
    state = tmp_path / "deep" / "state"
    updater = ModelUpdater(
        device_id="pi-1",
        groups=(),
        trusted_root=b"{}",
        client=Broker(),
        topics=Topics(),
        store=ModelStore(state),
        cache=RetainedMetadata(Topics()),
    )
    updater.verified_targets = lambda: (NoCache(), targets)  # type: ignore[method-assign,assignment,return-value]
    result = updater.refresh(DeviceState.empty())
    assert result.candidates == [] and result.failures["m"].reason is Reason.INVALID_TARGET
    assert [p for p in tmp_path.rglob("*") if p.is_file() and state not in p.parents] == []


def test_retained_metadata_holds_a_bounded_total() -> None:
    """256 junk metadata files of 4 MB each (under the per-file and per-packet limits)
    were all kept: 1 GB on a device. Now at most MAX_TOTAL_BYTES are held."""
    import logging

    from agent.delivery.metadata import MAX_TOTAL_BYTES, RetainedMetadata
    from agent.mqtt.transport import Message
    from agent.protocol import Topics

    topics = Topics()
    cache = RetainedMetadata(topics)
    log = logging.getLogger("agent.delivery.metadata")
    was, log.disabled = log.disabled, True
    try:
        junk = b"j" * 4_000_000
        for i in range(256):
            cache.handle(Message(topic=topics.metadata(f"{i}.junk.json"), payload=junk, retain=True))
    finally:
        log.disabled = was
    assert sum(len(cache.get(n) or b"") for n in cache.names()) <= MAX_TOTAL_BYTES
    for n in cache.names():  # the host's push clears junk; then real files fit again
        cache.handle(Message(topic=topics.metadata(n), payload=b"", retain=True))
    cache.handle(Message(topic=topics.metadata("timestamp.json"), payload=b"{}", retain=True))
    assert cache.names() == ["timestamp.json"]


def test_npy_round_trip_keeps_a_zero_dimensional_array() -> None:
    """to_npy wrote a 0-d array as shape (1,) (np.ascontiguousarray adds a dimension)."""
    import numpy as np

    from agent.serving.npy import parse_npy, to_npy

    back = parse_npy(to_npy(np.array(2.5, np.float32)))
    assert back.shape == () and back == np.float32(2.5)
    f = np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3))
    np.testing.assert_array_equal(parse_npy(to_npy(f)), f)


@pytest.mark.parametrize(
    "change",
    [
        {"tflite": 3},
        {"inputs": [None]},
        {"outputs": [{"name": "o", "shape": [1], "dtype": "int8", "quantization": [0.5]}]},
        {"inputs": [{"name": "i", "shape": [1e999], "dtype": "float32"}]},
    ],
)
def test_malformed_card_is_refused_as_card(change: dict) -> None:
    """Cards with an object of the wrong kind in a field raised AttributeError or
    OverflowError; the candidate check reported them as ``crashed``, push showed a traceback."""
    import json

    from agent.errors import ModelRejectedError
    from agent.model_card import CARD_FORMAT, parse_card

    doc = {"format": CARD_FORMAT, "mode": "none", "inputs": [], "outputs": [], **change}
    with pytest.raises(ModelRejectedError) as exc:
        parse_card(json.dumps(doc).encode())
    assert exc.value.reason == "card"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (b"\x80\xff", "not valid TOML"),  # UnicodeDecodeError
        (b"x = " + b"[" * 5000 + b"]" * 5000, "not valid TOML"),  # RecursionError
        (b'"bad\\nkey" = 1\n', "unknown key(s) 'bad\\nkey'"),  # was two lines on stderr
        (b'state_dir = "~nosuchuser-litefleet/x"\n', "state_dir"),  # RuntimeError from expanduser
        (b'password_file = "a\\u0000b"\n', "NUL"),  # ValueError: embedded null byte, later
    ],
)
def test_config_file_errors_are_one_config_error(tmp_path, text: bytes, where: str) -> None:
    """Each was a traceback instead of ``litefleet-agent: error: ...`` and exit code 2."""
    from agent.errors import ConfigError
    from agent.service.config import load_config

    path = tmp_path / "agent.toml"
    base = [b'device_id = "pi-1"', b'broker = "mqtt://h"', b'state_dir = "/tmp/s"', b'trusted_root = "/r"']
    key = text.split(b" = ", 1)[0]
    lines = [ln for ln in base if not ln.startswith(key + b" ")]
    whole = b"[" * 10 in text or text.startswith(b"\x80")
    path.write_bytes(text if whole else b"\n".join(lines) + b"\n" + text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert where in str(exc.value) and "\n" not in str(exc.value)
