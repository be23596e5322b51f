"""Fuzzing the agent's two strict readers of files: ``agent.toml`` and model cards.

- :func:`agent.service.config.load_config` with random TOML documents (every known key
  with values of every type and edge, unknown keys, nested tables), flag
  overrides, and files that are not TOML or not UTF-8. Only
  :class:`ConfigError` (one clear line) or a config whose derived values
  (broker address, HTTP address, password file) also come out without any
  other exception.
- :func:`agent.model_card.parse_card` (a model card arrives signed, beside the
  model, and is read before activation): random bytes, random JSON and
  mutations of a real card. Only :class:`ModelRejectedError` with reason
  ``card``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError, ModelRejectedError
from agent.model_card import ModelCard, TensorSpec, parse_card
from agent.service.config import AgentConfig, load_config

SOAK = os.environ.get("HYPOTHESIS_PROFILE") == "soak"


def fuzz(examples: int) -> settings:
    checks = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
    if SOAK:
        return settings(deadline=None, suppress_health_check=checks)
    return settings(max_examples=examples, deadline=None, suppress_health_check=checks)


# -- a tiny TOML writer (tomllib only reads) -------------------------------------------------------


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # TOML basic strings accept JSON's escapes
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def toml_doc(doc: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in doc.items())


KEYS = [f.name for f in AgentConfig.__dataclass_fields__.values()]
strings = st.sampled_from(
    [
        "",
        "pi-1",
        "mqtt://127.0.0.1:1883",
        "mqtts://h:8883",
        "mqtt://u:p@h",
        "mqtt://[::1]:1",
        "mqtt://h:99999",
        "mqtt://h:x",
        "mqtt:///x",
        "http://h",
        "mqtt://h/path",
        "mqtt://h?q=1",
        "127.0.0.1:8501",
        "[::1]:80",
        ":80",
        "h:",
        "h:65536",
        "~",
        "~nosuchuser/state",
        "~root",
        "/tmp/x",
        "a\0b",
        "a,b,,c",
        "auto",
        "litert",
        "debug",
        "INFO",
        "x" * 300,
        "ä-ü",
        "../../etc",
        "/",
        "-1",
        "1e999",
        "nan",
        "0x10",
        " 7 ",
        "a\u0000b",
        "mqtts://h:8883\n",
    ]
) | st.text(max_size=12)
scalars = (
    strings
    | st.integers(-(2**63), 2**63 - 1)
    | st.booleans()
    | st.floats(allow_nan=True, allow_infinity=True)
)
values = st.recursive(
    scalars,
    lambda k: st.lists(k, max_size=3) | st.dictionaries(st.text(max_size=4), k, max_size=2),
    max_leaves=6,
)


@st.composite
def config_docs(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    base = {
        "device_id": "pi-1",
        "broker": "mqtt://127.0.0.1:1883",
        "state_dir": "/tmp/st",
        "trusted_root": "/tmp/root.json",
    }
    if draw(st.booleans()):
        doc.update(base)
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=8)):
        doc[key] = draw(strings if draw(st.integers(0, 2)) else values)
    if draw(st.integers(0, 5)) == 0:
        doc[draw(st.text(min_size=1, max_size=8))] = draw(values)
    return doc


def check_loaded(cfg: AgentConfig) -> None:
    """What the agent derives from a config at start must not fail in other ways."""
    addr = cfg.broker_address
    assert addr.host and 0 <= addr.port <= 65535
    if cfg.http:
        _, port = cfg.http_address or ("", -1)
        assert 0 <= port <= 65535
    with contextlib.suppress(ConfigError):
        cfg.password()
    from agent.service.connection import connection_settings

    with contextlib.suppress(ConfigError):  # TLS file names go through $CREDENTIALS_DIRECTORY
        connection_settings(cfg, b"")


@fuzz(400)
@given(
    doc=config_docs(),
    overrides=st.dictionaries(
        st.sampled_from(["device_id", "broker", "state_dir", "trusted_root", "groups", "http", "log_level"]),
        st.none() | strings,
        max_size=3,
    ),
)
def test_load_config_only_raises_config_error(
    tmp_path_factory: pytest.TempPathFactory, doc: dict[str, Any], overrides: dict[str, Any]
) -> None:
    path = tmp_path_factory.mktemp("cfg") / "agent.toml"
    try:
        path.write_text(toml_doc(doc), encoding="utf-8", errors="surrogatepass")
    except (TypeError, UnicodeEncodeError):
        return
    try:
        cfg = load_config(path, overrides)
    except ConfigError as exc:
        assert "\n" not in str(exc).strip() or "TOML" in str(exc)
        return
    check_loaded(cfg)


@fuzz(200)
@given(
    raw=st.binary(max_size=300)
    | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))
    | st.sampled_from(
        [
            b"\xff\xfe",
            b'device_id = "\xff"\n',
            b"[a\n",
            b"a = 1\na = 2\n",
            b'device_id = """',
            b"\x00",
            b"x = " + b"[" * 5000,
        ]
    )
)
def test_config_files_that_are_not_toml(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "agent.toml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError):
        load_config(path)


# -- model cards -----------------------------------------------------------------------------------------

REAL_CARD = ModelCard(
    mode="int8",
    inputs=(TensorSpec("image", (1, 8, 8, 1), "int8", (0.5,), (-3,), (-1, 8, 8, 1)),),
    outputs=(TensorSpec("output_0", (1, 10), "int8", (0.0039,), (-128,), (-1, 10)),),
    tflite_sha256="ab" * 32,
    tflite_size_bytes=1234,
    metrics={"accuracy": 0.9},
).to_json()

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=6),
    lambda k: st.lists(k, max_size=4) | st.dictionaries(st.text(max_size=6), k, max_size=4),
    max_leaves=20,
)


def mutate(doc: Any, data: st.DataObject, depth: int = 0) -> Any:
    if isinstance(doc, dict) and doc and depth < 6 and data.draw(st.integers(0, 3)):
        key = data.draw(st.sampled_from(sorted(doc)))
        out = dict(doc)
        what = data.draw(st.sampled_from(["descend", "descend", "drop", "replace"]))
        if what == "descend":
            out[key] = mutate(doc[key], data, depth + 1)
        elif what == "drop":
            del out[key]
        else:
            out[key] = data.draw(json_values)
        return out
    if isinstance(doc, list) and doc and depth < 6 and data.draw(st.integers(0, 3)):
        out_l = list(doc)
        i = data.draw(st.integers(0, len(doc) - 1))
        out_l[i] = mutate(doc[i], data, depth + 1)
        return out_l
    return data.draw(json_values)


@fuzz(500)
@given(data=st.data())
def test_parse_card_only_refuses_with_reason_card(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["mutated", "mutated", "mutated", "json", "bytes"]))
    if kind == "bytes":
        raw = data.draw(st.binary(max_size=300))
    else:
        doc = mutate(json.loads(REAL_CARD), data) if kind == "mutated" else data.draw(json_values)
        raw = json.dumps(doc).encode()
    try:
        card = parse_card(raw)
    except ModelRejectedError as exc:
        assert exc.reason == "card"
        return
    assert all(isinstance(t, TensorSpec) for t in card.inputs + card.outputs)
    card.to_json()  # what parse_card accepts can be written again


def test_real_card_parses() -> None:
    card = parse_card(REAL_CARD.encode())
    assert card.inputs[0].shape == (1, 8, 8, 1) and card.inputs[0].quantized
