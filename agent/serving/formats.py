"""TensorFlow Serving's REST payloads, shared by the REST API and MQTT inference.

Pure functions over bytes, dicts and arrays: no sockets, no clocks.

Requests (``:predict``)::

    {"instances": [x0, x1, ...]}              row format: one entry per sample;
                                              for a multi-input model each entry
                                              is {"<input>": value, ...}
    {"inputs": X}  or  {"inputs": {"<input>": X, ...}}
                                              columnar format: whole batches
    optional: "signature_name": "serving_default"

Answers: ``{"predictions": [...]}`` for rows (one value per sample, or
``{"<output>": value}`` per sample for a multi-output model) and
``{"outputs": X}`` / ``{"outputs": {"<output>": X}}`` for columns. Input and
output names are the model's signature keys (``image``, ``output_0``); the
tensor names work too.

JSON numbers are values, not quantized codes: sent to a quantized input they
are quantized for the caller and the outputs come back dequantized. (Use a
``.npy`` body of the exact integer dtype to send raw codes.) ``NaN`` and
``Infinity`` literals, deep nesting, ragged lists and non-numbers are
refused with :class:`agent.errors.BadRequestError` (400).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import BadRequestError
from agent.model_card import TensorSpec
from agent.serving import npy
from agent.serving.inference import ModelRunner
from agent.serving.registry import ActiveModel

JSON_CONTENT_TYPE = "application/json"
NPZ_CONTENT_TYPE = "application/x-npz"
SIGNATURE = "serving_default"


@dataclass(frozen=True)
class PredictRequest:
    """A decoded JSON predict request (inputs still as JSON values)."""

    row_format: bool
    values: Any  # the "instances" list or the "inputs" value
    model: str | None = None  # MQTT requests name their model in the body
    version: str | None = None


def _no_constants(name: str) -> Any:
    raise BadRequestError(f"JSON must not contain {name}")


def load_json(body: bytes | bytearray) -> Any:
    """Parse a JSON body, refusing NaN/Infinity literals. Absurd nesting ends in
    RecursionError inside the C decoder, which is caught like any other error."""
    try:
        return json.loads(body, parse_constant=_no_constants)
    except BadRequestError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise BadRequestError(f"malformed JSON: {exc}") from exc


def parse_predict(doc: Any, *, with_model: bool = False) -> PredictRequest:
    """Check the shape of a decoded predict request."""
    if not isinstance(doc, dict):
        raise BadRequestError('the request must be a JSON object with "instances" or "inputs"')
    allowed = {"instances", "inputs", "signature_name"} | ({"model", "version"} if with_model else set())
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise BadRequestError(f"unknown field(s) {unknown}")
    sig = doc.get("signature_name", SIGNATURE)
    if sig != SIGNATURE:
        raise BadRequestError(f"unknown signature_name {sig!r}; this model has {SIGNATURE!r}")
    if ("instances" in doc) == ("inputs" in doc):
        raise BadRequestError('give exactly one of "instances" (rows) or "inputs" (columns)')
    model = version = None
    if with_model:
        model = doc.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequestError('the request must name its "model"')
        v = doc.get("version")
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, str | int):
                raise BadRequestError('"version" must be a string or an integer')
            version = str(v)
    if "instances" in doc:
        rows = doc["instances"]
        if not isinstance(rows, list) or not rows:
            raise BadRequestError('"instances" must be a non-empty list')
        return PredictRequest(True, rows, model, version)
    return PredictRequest(False, doc["inputs"], model, version)


def _array(value: Any, spec: TensorSpec, key: str) -> np.ndarray:
    """A JSON value for one input as an array; numbers are real values."""
    want = np.dtype(spec.dtype)
    as_float = spec.quantized or want.kind == "f"
    try:
        arr = np.asarray(value, dtype=np.float64 if as_float else None)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequestError(f"input {key!r}: not a rectangular array of numbers") from exc
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise BadRequestError(f"input {key!r}: expected numbers, got {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise BadRequestError(f"input {key!r}: contains NaN or infinity")
    if want.kind in "iu" and not spec.quantized and arr.dtype.kind == "f":
        raise BadRequestError(f"input {key!r}: the model takes integers ({want})")
    return arr


def request_inputs(req: PredictRequest, runner: ModelRunner) -> list[np.ndarray]:
    """The request's inputs as arrays, in the runner's input order."""
    keys = runner.input_keys
    names = [s.name for s in runner.inputs]

    def pick(mapping: dict[str, Any], k: int) -> Any:
        for name in (keys[k], names[k]):
            if name in mapping:
                return mapping[name]
        raise BadRequestError(f"missing input {keys[k]!r}; model has {list(keys)}")

    def check_names(mapping: dict[str, Any]) -> None:
        unknown = [n for n in mapping if n not in keys and n not in names]
        if unknown:
            raise BadRequestError(f"unknown input(s) {sorted(unknown)}; model has {list(keys)}")

    single = len(keys) == 1
    if req.row_format:
        rows = req.values
        if single:
            if all(isinstance(r, dict) for r in rows):
                for r in rows:
                    check_names(r)
                rows = [pick(r, 0) for r in rows]
            return [_array(rows, runner.inputs[0], keys[0])]
        if not all(isinstance(r, dict) for r in rows):
            raise BadRequestError(f"each instance must be an object with the inputs {list(keys)}")
        for r in rows:
            check_names(r)
        return [_array([pick(r, k) for r in rows], spec, keys[k]) for k, spec in enumerate(runner.inputs)]
    cols = req.values
    if isinstance(cols, dict):
        check_names(cols)
        return [_array(pick(cols, k), spec, keys[k]) for k, spec in enumerate(runner.inputs)]
    if not single:
        raise BadRequestError(f'"inputs" must be an object with the inputs {list(keys)}')
    return [_array(cols, runner.inputs[0], keys[0])]


def predict_json(req: PredictRequest, runner: ModelRunner) -> dict[str, Any]:
    """Run a decoded request; the TF Serving answer as a dict."""
    arrays = request_inputs(req, runner)
    # JSON numbers are values: integer outputs of a quantized model come back as floats
    outs = runner.predict(arrays[0] if len(arrays) == 1 else arrays, dequantize_outputs=True)
    return format_outputs(outs, runner.output_keys, row_format=req.row_format)


def npy_predict(runner: ModelRunner, body: bytes | bytearray) -> tuple[bytes, str]:
    """Run a ``.npy`` body on a single-input model; ``(payload, content_type)``."""
    if len(runner.inputs) != 1:
        raise BadRequestError(
            f"a .npy body feeds single-input models; this one takes {list(runner.input_keys)} (use JSON)"
        )
    x = npy.parse_npy(body)
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise BadRequestError("input contains NaN or infinity")
    outs = runner.predict(x)
    if len(outs) == 1:
        return npy.to_npy(outs[0]), npy.CONTENT_TYPE
    buf = io.BytesIO()
    np.savez(buf, **dict(zip(runner.output_keys, outs, strict=True)))  # type: ignore[arg-type]
    return buf.getvalue(), NPZ_CONTENT_TYPE


def format_outputs(outs: Sequence[np.ndarray], keys: Sequence[str], *, row_format: bool) -> dict[str, Any]:
    if row_format:
        if len(outs) == 1:
            return {"predictions": outs[0].tolist()}
        lists = [o.tolist() for o in outs]
        return {"predictions": [dict(zip(keys, row, strict=True)) for row in zip(*lists, strict=True)]}
    if len(outs) == 1:
        return {"outputs": outs[0].tolist()}
    return {"outputs": {k: o.tolist() for k, o in zip(keys, outs, strict=True)}}


def dump_json(doc: Any) -> bytes:
    """Compact JSON; a non-finite output value becomes null (JSON has no NaN)."""
    try:
        return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        return json.dumps(_finite(doc), separators=(",", ":"), allow_nan=False).encode()


def _finite(v: Any) -> Any:
    if isinstance(v, float):
        return v if v == v and v not in (float("inf"), float("-inf")) else None
    if isinstance(v, list):
        return [_finite(x) for x in v]
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    return v


def error_doc(message: str) -> dict[str, str]:
    return {"error": message}


# -- model status and metadata ---------------------------------------------------------
def model_status(active: ActiveModel) -> dict[str, Any]:
    """``GET /v1/models/<name>``: one AVAILABLE version (the active one)."""
    return {
        "model_version_status": [
            {
                "version": active.version,
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }


_DT = {
    "float32": "DT_FLOAT",
    "float16": "DT_HALF",
    "float64": "DT_DOUBLE",
    "int8": "DT_INT8",
    "uint8": "DT_UINT8",
    "int16": "DT_INT16",
    "int32": "DT_INT32",
    "int64": "DT_INT64",
    "bool": "DT_BOOL",
    "uint16": "DT_UINT16",
    "uint32": "DT_UINT32",
    "uint64": "DT_UINT64",
}


def _tensor_info(spec: TensorSpec, *, logical_float: bool) -> dict[str, Any]:
    sig = spec.shape_signature or spec.shape
    info: dict[str, Any] = {
        # the dtype callers send/receive as JSON: quantized tensors take floats
        "dtype": "DT_FLOAT" if logical_float and spec.quantized else _DT.get(spec.dtype, spec.dtype),
        "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in sig], "unknown_rank": False},
        "name": spec.name,
        "tflite_dtype": spec.dtype,
    }
    if spec.quantized:
        info["quantization"] = {"scale": list(spec.scale), "zero_point": list(spec.zero_point)}
    return info


def model_metadata(active: ActiveModel) -> dict[str, Any]:
    """``GET /v1/models/<name>/metadata``: TF Serving's signature_def shape, plus
    each tensor's TF Lite dtype and quantization."""
    r = active.runner
    return {
        "model_spec": {"name": active.name, "signature_name": "", "version": active.version},
        "metadata": {
            "signature_def": {
                "signature_def": {
                    SIGNATURE: {
                        "inputs": {
                            k: _tensor_info(s, logical_float=True)
                            for k, s in zip(r.input_keys, r.inputs, strict=True)
                        },
                        "outputs": {
                            k: _tensor_info(s, logical_float=True)
                            for k, s in zip(r.output_keys, r.outputs, strict=True)
                        },
                        "method_name": "tensorflow/serving/predict",
                    }
                }
            }
        },
        "litefleet": {"sha256": active.sha256},
    }
