"""Fast, fixed regression tests for bugs the fuzzers found (one per fix).

The fuzzers in ``test_fuzz_*.py`` found these with random input; the cases here pin
each one down so it stays fixed whatever the fuzzers draw next time.
"""

from __future__ import annotations

import pytest

from agent.protocol import ProtocolError, parse_chunk_info, parse_release

MODEL = "models/m/1/model.tflite"


@pytest.mark.parametrize("custom", [[1], "litefleet", 7, {"litefleet": [1]}])
def test_signed_custom_field_of_another_shape_is_not_a_release(custom: object) -> None:
    """A signed target whose ``custom`` is not an object was an AttributeError that
    ended the agent's work loop (a crash on every refresh); it is no model release."""
    assert parse_release(MODEL, custom) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("fields", [
    {"rollout": [1]},  # AttributeError: 'list' object has no attribute 'get'
    {"rollout": "all"},
    {"version": float("inf")},  # OverflowError: int(1e999)
])
def test_malformed_signed_release_fields_are_a_protocol_error(fields: dict) -> None:
    lf = {"kind": "model", "name": "m", "version": 1, **fields}
    with pytest.raises(ProtocolError):
        parse_release(MODEL, {"litefleet": lf})


def test_infinite_chunk_size_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        parse_chunk_info({"litefleet": {"chunk_size": float("inf"), "chunks": []}}, 4)
