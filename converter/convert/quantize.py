"""One TF Lite conversion per quantization mode, and the checks that keep each mode honest.

Modes (``--quantize``):
- ``none``: float32 weights and activations;
- ``dynamic``: int8 weights, float activations quantized on the fly (no data);
- ``float16``: float16 weights, float32 compute on CPUs;
- ``int8``: full-integer int8 weights and activations, calibrated from data;
  model inputs/outputs are int8 (default), uint8, or float32 (``io_type``);
- ``int16x8``: int16 activations, int8 weights, calibrated; float32 I/O.

Guarantees:
- ``int8`` and ``int16x8`` really are integer models: TensorFlow 2.21
  silently leaves ops it cannot quantize in float even when asked for integer
  ops only, so every op of the result is inspected and any op that computes in
  float raises :class:`BadInputError` naming the ops and suggesting
  ``dynamic`` or ``float16``.
- Ops the LiteRT runtime has no kernels for at all (they would need TensorFlow
  "Select" ops, which device runtimes lack) raise :class:`ConversionError`
  naming them, in every mode.
- Calibration uses at most ``max_samples`` samples, spread evenly over the
  data (data sorted by class would otherwise calibrate on one class).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from converter.convert.datasets import Dataset
from converter.convert.sources import SourceModel, import_tensorflow
from converter.errors import BadInputError, ConversionError

logger = logging.getLogger(__name__)

MODES = ("none", "dynamic", "float16", "int8", "int16x8")
CALIBRATED_MODES = ("int8", "int16x8")
IO_TYPES = ("int8", "uint8", "float32")
DEFAULT_CALIBRATION_SAMPLES = 200

_FLOAT_DTYPES = frozenset({"float32", "float16", "float64"})
_BOUNDARY_OPS = frozenset({"QUANTIZE", "DEQUANTIZE"})
_FLEX_RE = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")


@dataclass(frozen=True)
class OpInfo:
    """One operator of a converted model, as the interpreter lists it."""

    name: str
    input_dtypes: tuple[str, ...]
    output_dtypes: tuple[str, ...]


# -- pure checks ---------------------------------------------------------------
def float_compute_ops(ops: Sequence[OpInfo]) -> list[str]:
    """Names of ops that compute in floating point (QUANTIZE/DEQUANTIZE excepted), sorted."""
    return sorted(
        {
            op.name
            for op in ops
            if op.name not in _BOUNDARY_OPS
            and any(d in _FLOAT_DTYPES for d in (*op.input_dtypes, *op.output_dtypes))
        }
    )


def flex_ops_in_error(message: str) -> list[str]:
    """TensorFlow op names a converter error says LiteRT cannot run, sorted."""
    return sorted(set(_FLEX_RE.findall(message)))


def calibration_indices(n: int, max_samples: int) -> np.ndarray:
    """Up to ``max_samples`` indices spread evenly over ``range(n)``."""
    if n <= max_samples:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_samples).round().astype(np.int64))


# -- inspection ----------------------------------------------------------------
def list_ops(tflite: bytes) -> list[OpInfo] | None:
    """The ops of a model, through the same runtime loader the device uses.

    Returns None when the runtime does not expose op details (then the
    integer-only check is skipped with a debug log).
    """
    from agent.serving.runtime import load_interpreter

    interpreter = load_interpreter(tflite, allocate=False)
    get_ops = getattr(interpreter, "_get_ops_details", None)
    if get_ops is None:
        logger.debug("runtime lists no op details; integer-only check skipped")
        return None
    dtypes = {int(t["index"]): np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    return [
        OpInfo(
            name=str(op["op_name"]),
            input_dtypes=tuple(dtypes.get(int(i), "?") for i in op["inputs"] if int(i) >= 0),
            output_dtypes=tuple(dtypes.get(int(i), "?") for i in op["outputs"] if int(i) >= 0),
        )
        for op in get_ops()
    ]


# -- conversions ---------------------------------------------------------------
def _representative(calibration: Dataset, max_samples: int) -> Callable[[], Iterator[list[Any]]]:
    idx = calibration_indices(len(calibration), max_samples)

    def gen() -> Iterator[list[Any]]:
        for i in idx:
            yield [x[i : i + 1] for x in calibration.xs]

    return gen


def _run(converter: Any, mode: str) -> bytes:
    try:
        with warnings.catch_warnings():
            # "Statistics for quantized inputs were expected": TF's note about
            # int8 I/O without input ranges; the ranges come from calibration.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            return bytes(converter.convert())
    except Exception as exc:  # TensorFlow raises ConverterError, ValueError, RuntimeError...
        message = str(exc)
        flex = flex_ops_in_error(message)
        if flex:
            raise ConversionError(
                f"the model uses TensorFlow ops LiteRT has no kernels for: {', '.join(flex)} "
                "(replace them with TF Lite builtin ops; device runtimes have no Select TF ops)"
            ) from exc
        first = next((ln for ln in message.splitlines() if ln.strip()), type(exc).__name__)
        raise ConversionError(f"TensorFlow could not convert the model ({mode}): {first[:300]}") from exc


def convert_none(source: SourceModel) -> bytes:
    """float32 model, no quantization."""
    return _run(source.make_converter(), "none")


def convert_dynamic(source: SourceModel) -> bytes:
    """Dynamic-range quantization: int8 weights, activations quantized at run time."""
    tf = import_tensorflow()
    conv = source.make_converter()
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    return _run(conv, "dynamic")


def convert_float16(source: SourceModel) -> bytes:
    """float16 weights (half the size); CPUs dequantize them and compute in float32."""
    tf = import_tensorflow()
    conv = source.make_converter()
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_types = [tf.float16]
    return _run(conv, "float16")


def convert_int8(
    source: SourceModel,
    calibration: Dataset,
    *,
    io_type: str = "int8",
    max_samples: int = DEFAULT_CALIBRATION_SAMPLES,
) -> bytes:
    """Full-integer int8, calibrated on ``calibration``; I/O in ``io_type``."""
    if io_type not in IO_TYPES:
        raise BadInputError(f"unknown I/O type {io_type!r}; choose one of {', '.join(IO_TYPES)}")
    tf = import_tensorflow()
    conv = source.make_converter()
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = _representative(calibration, max_samples)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if io_type != "float32":
        conv.inference_input_type = getattr(tf, io_type)
        conv.inference_output_type = getattr(tf, io_type)
    tflite = _run(conv, "int8")
    _require_integer(tflite, "int8")
    return tflite


def convert_int16x8(
    source: SourceModel,
    calibration: Dataset,
    *,
    max_samples: int = DEFAULT_CALIBRATION_SAMPLES,
) -> bytes:
    """int16 activations with int8 weights, calibrated; float32 I/O.

    More precise than int8, but XNNPACK has no int16 kernels, so it runs on
    LiteRT's reference kernels: slow on most CPUs.
    """
    tf = import_tensorflow()
    conv = source.make_converter()
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = _representative(calibration, max_samples)
    conv.target_spec.supported_ops = [
        tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
    ]
    tflite = _run(conv, "int16x8")
    _require_integer(tflite, "int16x8")
    return tflite


def _require_integer(tflite: bytes, mode: str) -> None:
    ops = list_ops(tflite)
    if ops is None:
        return
    bad = float_compute_ops(ops)
    if bad:
        raise BadInputError(
            f"{mode} cannot express these ops of the model, they stay in float: "
            f"{', '.join(bad)}; use --quantize dynamic or --quantize float16"
        )


def convert_variant(
    source: SourceModel,
    mode: str,
    calibration: Dataset | None,
    *,
    io_type: str = "int8",
    max_samples: int = DEFAULT_CALIBRATION_SAMPLES,
) -> bytes:
    """Convert ``source`` in ``mode`` (one of :data:`MODES`) and return the .tflite bytes."""
    if mode in CALIBRATED_MODES and calibration is None:
        raise BadInputError(f"--quantize {mode} needs calibration data (--calibration DATA)")
    logger.debug("converting %s as %s", source.path, mode)
    if mode == "none":
        return convert_none(source)
    if mode == "dynamic":
        return convert_dynamic(source)
    if mode == "float16":
        return convert_float16(source)
    if mode == "int8":
        assert calibration is not None
        return convert_int8(source, calibration, io_type=io_type, max_samples=max_samples)
    if mode == "int16x8":
        assert calibration is not None
        return convert_int16x8(source, calibration, max_samples=max_samples)
    raise BadInputError(f"unknown quantize mode {mode!r}; choose one of {', '.join(MODES)}")
