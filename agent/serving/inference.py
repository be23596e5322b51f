"""Run one loaded TF Lite model: quantize in, invoke, dequantize out, one caller at a time.

:class:`ModelRunner` takes ownership of an interpreter created by
:func:`agent.serving.runtime.load_interpreter`. Guarantees:

- **One invocation at a time.** An interpreter is not thread-safe and its
  ``invoke`` releases the GIL, so every use of the tensors happens under the
  runner's lock. Different models run in parallel.
- **Fast path.** One input array of exactly the model's dtype (and, as the
  runtime checks, shape) goes straight to the runtime's native
  ``SetTensor``/``Invoke``/``GetTensor``: no validation pass, no conversion,
  no copy besides the two the runtime makes (into the input tensor, out of
  the output tensor; the closures live in :mod:`agent.serving.fast_path`).
  Those native calls skip the Python wrapper's
  "no numpy views of internal buffers" check, which the runner never needs
  because it never hands out views; in exchange the interpreter's own
  ``invoke()`` refuses to run while a runner holds it (use the runner).
- **Float in, float out.** Floats sent to a quantized (int8/uint8/int16)
  input are quantized with its scale and zero point, rounding half away from
  zero and saturating, as TF Lite's Quantize kernel does; the outputs are then
  dequantized (``dequantize_outputs=None``), or as asked.
- **Batches without reallocation.** A batch larger than the model's fixed
  batch runs chunk by chunk on the allocated tensors, straight into
  preallocated result arrays; tensors are never resized.
- **Caller mistakes are** :class:`agent.errors.BadRequestError` **(400)**:
  wrong shapes, dtypes, unknown input names, empty batches, NaN or infinity
  in floats that need converting. (An exact-dtype float array takes the fast
  path unchecked, as it would with the bare runtime; the REST and MQTT
  decoders refuse NaN before they get here.) Runtime failures are
  :class:`agent.errors.InferenceError`.
- **Stats.** With ``record_stats`` (the default) every call is counted in
  :attr:`ModelRunner.stats` (answered with its latency, runtime error, bad
  request) inside the same lock: two clock reads and a few integer
  operations, no allocation. With ``record_outputs`` too (the default), the
  first output of every answered call goes into the output sketch
  (:mod:`agent.output_sketch`), after the latency is taken, under the same
  lock; a failure there is logged once and never reaches the caller.
- **Shadow tap.** While :meth:`ModelRunner.set_tap` holds a tap (the shadow
  evaluation, :mod:`agent.serving.shadow`), every answered live call
  (:meth:`ModelRunner.predict` and the fast path, not :meth:`ModelRunner.run_raw`)
  hands it the inputs as the model ran them and the raw outputs, after the
  lock is released. Without one it costs a list lookup.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import BadRequestError, InferenceError
from agent.model_card import TensorSpec
from agent.output_sketch import recorder_for
from agent.serving.fast_path import (
    FastPath,
    NativeCalls,
    Tap,
    counted_fast_path,
    native_calls,
    plain_fast_path,
)
from agent.serving.runtime import load_interpreter
from agent.serving.stats import BASE, MASK, SHIFT, ModelStats

logger = logging.getLogger(__name__)

ArrayLike = Any


def _round_half_away(t: np.ndarray) -> np.ndarray:
    """Round halves away from zero (``std::round``, which TF Lite uses), exactly.

    ``trunc(t) + trunc(2 * (t - trunc(t)))``: every step is exact in float32
    (unlike ``t + copysign(0.5, t)``, which rounds 0.49999997 + 0.5 up to 1.0).
    Overwrites ``t`` and returns a new array.
    """
    whole: np.ndarray = np.trunc(t)
    t -= whole
    t *= 2
    np.trunc(t, out=t)
    whole += t
    return whole


@functools.lru_cache(maxsize=512)
def _constants(spec: TensorSpec, ndim: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``(scale, zero_point, lowest, highest)`` of a quantized tensor, shaped for
    ``ndim`` dimensions (per-channel along the last axis). Cached: treat as read-only."""
    scale = np.asarray(spec.scale, dtype=np.float32)
    zp = np.asarray(spec.zero_point, dtype=np.float32)
    if scale.size > 1:
        scale = scale.reshape((1,) * (ndim - 1) + (-1,))
        zp = zp.reshape(scale.shape)
    info = np.iinfo(spec.dtype)
    return scale, zp, float(info.min), float(info.max)


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Float -> the integer dtype of ``spec``: ``round(x / scale) + zero_point``,
    halves away from zero, saturated to the dtype's range (float32 arithmetic)."""
    scale, zp, lowest, highest = _constants(spec, x.ndim)
    t = _round_half_away(np.divide(x, scale, dtype=np.float32))
    t += zp
    np.maximum(t, lowest, out=t)
    np.minimum(t, highest, out=t)
    return t.astype(spec.dtype)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Integer -> float32: ``(q - zero_point) * scale``."""
    scale, zp, _, _ = _constants(spec, q.ndim)
    out: np.ndarray = np.subtract(q, zp, dtype=np.float32)
    out *= scale
    return out


def _signature_keys(
    interpreter: Any,
    inputs: tuple[int, ...],
    outputs: tuple[int, ...],
) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The signature's friendly names (``image``, ``output_0``) of each input and
    output tensor, in tensor order; None without exactly one complete signature."""
    try:
        if len(interpreter.get_signature_list()) != 1:
            return None
        sig = interpreter.get_signature_runner()
        ins = {int(d["index"]): k for k, d in sig.get_input_details().items()}
        outs = {int(d["index"]): k for k, d in sig.get_output_details().items()}
        del sig  # it holds the native interpreter
    except (AttributeError, ValueError, KeyError, TypeError, RuntimeError):
        return None
    if set(ins) != set(inputs) or set(outs) != set(outputs):
        return None
    return tuple(ins[i] for i in inputs), tuple(outs[i] for i in outputs)


def _warn_once(label: str) -> Callable[[Exception], None]:
    """A callback that logs the first sketch failure of one runner."""
    warned: list[bool] = []

    def failed(exc: Exception) -> None:
        if not warned:
            warned.append(True)
            logger.warning("%s: output sketch not recorded: %r", label, exc)

    return failed


class ModelRunner:
    """A loaded model ready to answer ``predict`` calls from any thread."""

    def __init__(
        self,
        interpreter: Any,
        *,
        name: str = "model",
        version: str = "0",
        record_stats: bool = True,
        record_outputs: bool = True,
        lock: threading.Lock | None = None,
    ) -> None:
        """``lock``: given when runners share ``interpreter`` (the fleet simulator's
        :class:`agent.serving.pool.InterpreterPool`): every use of it takes it."""
        self.name = name
        self.version = version
        input_details = interpreter.get_input_details()
        output_details = interpreter.get_output_details()
        self.inputs = tuple(TensorSpec.from_details(d) for d in input_details)
        self.outputs = tuple(TensorSpec.from_details(d) for d in output_details)
        self._in_idx = tuple(int(d["index"]) for d in input_details)
        self._out_idx = tuple(int(d["index"]) for d in output_details)
        self._in_dtype = tuple(np.dtype(d["dtype"]) for d in input_details)
        self._in_shape = tuple(tuple(int(s) for s in d["shape"]) for d in input_details)
        keys = _signature_keys(interpreter, self._in_idx, self._out_idx)
        # names for callers: the signature's (``image``, ``output_0``) when the
        # model has one signature, else the tensor names
        self.input_keys: tuple[str, ...] = keys[0] if keys else tuple(s.name for s in self.inputs)
        self.output_keys: tuple[str, ...] = keys[1] if keys else tuple(s.name for s in self.outputs)
        self._any_quantized_output = any(s.quantized for s in self.outputs)
        self._lock = lock if lock is not None else threading.Lock()
        sketching = record_stats and record_outputs and bool(self.outputs)
        self.stats = ModelStats(
            name, version, lock=self._lock, outputs=recorder_for(self.outputs[0]) if sketching else None
        )
        self._recording = record_stats
        self._tap: list[Tap | None] = [None]
        # no reference back to the runner from what it keeps (its fast path holds this): a
        # cycle would leave a replaced runner's interpreter to the cyclic GC, which an idle
        # agent seldom runs (measured: +11 MB per MobileNetV2 version replaced)
        self._sketch_failed = _warn_once(f"{name} v{version}")
        self._interpreter = interpreter  # owned (or shared under ``lock``): only through this runner
        self._set, self._invoke, self._get = native_calls(interpreter)
        self._label = f"{name} v{version}"
        self._fast: FastPath | None = None
        if len(self._in_idx) == 1 and self._out_idx:
            calls = NativeCalls(
                self._set,
                self._invoke,
                self._get,
                self._in_idx[0],
                self._out_idx,
                self._in_dtype[0],
                self._lock,
                self._label,
            )
            self._fast = (
                counted_fast_path(calls, self.stats, self._tap, self._sketch_failed)
                if record_stats
                else plain_fast_path(calls)
            )

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        threads: int = 1,
        runtime: str = "auto",
        name: str = "model",
        version: str = "0",
        record_stats: bool = True,
        record_outputs: bool = True,
    ) -> ModelRunner:
        interpreter = load_interpreter(path, threads=threads, runtime=runtime)
        return cls(
            interpreter, name=name, version=version, record_stats=record_stats, record_outputs=record_outputs
        )

    @property
    def integer_io(self) -> bool:
        return any(s.quantized for s in self.inputs) or self._any_quantized_output

    @property
    def fast_path(self) -> FastPath | None:
        """The exact-dtype shortcut :meth:`predict` tries first: ``fast(x)`` returns
        the outputs, or None when ``x`` needs the checking path. None for models
        with several inputs."""
        return self._fast

    def set_tap(self, tap: Tap | None) -> None:
        """Hand every answered live call to ``tap`` from now on (None: stop). Any thread."""
        self._tap[0] = tap

    @property
    def tap(self) -> Tap | None:
        return self._tap[0]

    @property
    def model_batch(self) -> int:
        """The batch size the model's tensors were allocated for (usually 1)."""
        shape = self._in_shape[0] if self._in_shape else ()
        return shape[0] if shape else 1

    # -- the hot paths ---------------------------------------------------------
    def run_raw(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run one chunk whose arrays already have the model's exact dtypes and
        shapes (the runtime checks them: a mismatch is an InferenceError)."""
        if len(inputs) != len(self._in_idx):
            raise BadRequestError(f"model takes {len(self._in_idx)} inputs, got {len(inputs)}")
        with self._lock:
            t0 = time.perf_counter_ns()
            try:
                for idx, x in zip(self._in_idx, inputs, strict=True):
                    self._set(idx, x)
                self._invoke()
                out = [self._get(idx) for idx in self._out_idx]
            except (ValueError, RuntimeError, TypeError) as exc:
                if self._recording:
                    self.stats.acc[0] += 1
                raise InferenceError(f"{self._label}: runtime failed: {exc}") from exc
            if self._recording:
                self._count_ok(time.perf_counter_ns() - t0)
                recorder = self.stats.outputs
                if recorder is not None:
                    try:
                        recorder.record(out[0])
                    except Exception as exc:  # the answer stands whatever the sketch does
                        self._sketch_failed(exc)
            return out

    def predict(
        self,
        inputs: ArrayLike | Sequence[ArrayLike] | Mapping[str, ArrayLike],
        *,
        dequantize_outputs: bool | None = None,
    ) -> list[np.ndarray]:
        """Run a batch. ``inputs`` is one array (single-input models), a list in
        input order, or a mapping from input name. The leading axis is the batch;
        one sample may omit it.

        Returns one array per output with the batch as leading axis. Integer
        outputs are dequantized when ``dequantize_outputs`` is true, or, when it
        is None, when floats arrived for a quantized input.
        """
        fast = self._fast
        if fast is not None and not (dequantize_outputs and self._any_quantized_output):
            out = fast(inputs)
            if out is not None:
                return out
        try:
            prepared, floats_in = self._prepare(self._as_list(inputs))
        except BadRequestError:
            if self._recording:
                self.stats.record_bad_request()
            raise
        outs = self._run_batch(prepared)
        tap = self._tap[0]
        if tap is not None:
            tap(prepared, outs)
        want_float = floats_in if dequantize_outputs is None else dequantize_outputs
        if want_float and self._any_quantized_output:
            outs = [dequantize(o, s) if s.quantized else o for o, s in zip(outs, self.outputs, strict=True)]
        return outs

    # -- internals ---------------------------------------------------------------
    def _count_ok(self, ns: int) -> None:
        """Record one answered call; the caller holds the lock."""
        b = ns.bit_length()
        self.stats.counts[BASE[b] + ((ns >> SHIFT[b]) & MASK)] += 1

    def _sketch(self, outs: list[np.ndarray]) -> None:
        """Put the first output of an answered call into the sketch; the caller holds the lock."""
        recorder = self.stats.outputs
        if recorder is not None:
            try:
                recorder.record(outs[0])
            except Exception as exc:  # the answer stands whatever the sketch does
                self._sketch_failed(exc)

    def _run_batch(self, prepared: list[np.ndarray]) -> list[np.ndarray]:
        batch = prepared[0].shape[0]
        step = self.model_batch
        if batch == step:
            return self.run_raw(prepared)
        results: list[np.ndarray] = []
        with self._lock:
            t0 = time.perf_counter_ns()
            try:
                for start in range(0, batch, step):
                    for idx, x in zip(self._in_idx, prepared, strict=True):
                        self._set(idx, x[start : start + step])
                    self._invoke()
                    for k, idx in enumerate(self._out_idx):
                        chunk = self._get(idx)
                        if start == 0:
                            if not chunk.ndim or chunk.shape[0] != step:
                                raise BadRequestError(
                                    f"output {self.outputs[k].name!r} has no batch axis; "
                                    f"send {step} sample(s) per request"
                                )
                            results.append(np.empty((batch, *chunk.shape[1:]), dtype=chunk.dtype))
                        results[k][start : start + step] = chunk
            except (ValueError, RuntimeError, TypeError) as exc:
                if self._recording:
                    self.stats.acc[0] += 1
                raise InferenceError(f"{self._label}: runtime failed: {exc}") from exc
            except BadRequestError:
                if self._recording:
                    self.stats.acc[1] += 1
                raise
            if self._recording:
                self._count_ok(time.perf_counter_ns() - t0)
                self._sketch(results)
        return results

    def _as_list(self, inputs: Any) -> list[Any]:
        if isinstance(inputs, Mapping):
            # by signature key or by tensor name
            keys, names = self.input_keys, [s.name for s in self.inputs]
            unknown = [k for k in inputs if k not in keys and k not in names]
            if unknown:
                raise BadRequestError(f"unknown input(s) {sorted(map(str, unknown))}; model has {list(keys)}")
            out = []
            for key, name in zip(keys, names, strict=True):
                if key in inputs:
                    out.append(inputs[key])
                elif name in inputs:
                    out.append(inputs[name])
                else:
                    raise BadRequestError(f"missing input {key!r}; model has {list(keys)}")
            if len(inputs) != len(keys):
                raise BadRequestError(f"input(s) given twice; model has {list(keys)}")
            return out
        if len(self._in_idx) == 1:
            return [inputs]
        if not isinstance(inputs, list | tuple) or len(inputs) != len(self._in_idx):
            raise BadRequestError(
                f"model takes {len(self._in_idx)} inputs: give a mapping from "
                f"{list(self.input_keys)} or a list in that order"
            )
        return list(inputs)

    def _prepare(self, arrays: list[Any]) -> tuple[list[np.ndarray], bool]:
        """Check and convert every input; return them and whether floats were quantized."""
        prepared: list[np.ndarray] = []
        floats_in = False
        batch: int | None = None
        for arr, spec, key, want, shape in zip(
            arrays, self.inputs, self.input_keys, self._in_dtype, self._in_shape, strict=True
        ):
            x = _as_batch(arr, key, want, shape, self.model_batch)
            if batch is None:
                batch = x.shape[0]
            elif x.shape[0] != batch:
                raise BadRequestError("all inputs must have the same batch size")
            x, quantized = _convert(x, spec, key, want)
            floats_in = floats_in or quantized
            prepared.append(x)
        return prepared, floats_in


def _as_batch(arr: Any, key: str, want: np.dtype[Any], shape: tuple[int, ...], step: int) -> np.ndarray:
    """``arr`` as a batch of numbers that fits an input of ``shape`` (batch a multiple of ``step``)."""
    try:
        x = np.asarray(arr)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequestError(f"input {key!r}: not a rectangular array of numbers") from exc
    kind = x.dtype.kind
    if kind not in "biuf" or (kind == "b" and want.kind != "b"):
        raise BadRequestError(f"input {key!r}: expected numbers, got {x.dtype}")
    if x.ndim == len(shape) - 1:  # one sample without its batch axis
        x = x[np.newaxis]
    if x.ndim != len(shape) or tuple(x.shape[1:]) != shape[1:]:
        raise BadRequestError(
            f"input {key!r}: shape {list(x.shape)} does not fit the model's {['N', *shape[1:]]}"
        )
    if x.shape[0] == 0:
        raise BadRequestError(f"input {key!r}: empty batch")
    if x.shape[0] % step:
        raise BadRequestError(f"input {key!r}: batch must be a multiple of {step}")
    return x


def _convert(x: np.ndarray, spec: TensorSpec, key: str, want: np.dtype[Any]) -> tuple[np.ndarray, bool]:
    """``x`` in the input's dtype, contiguous; and whether floats were quantized for it."""
    kind = x.dtype.kind
    quantized = False
    if kind == "f":
        if not np.isfinite(x).all():
            raise BadRequestError(f"input {key!r}: contains NaN or infinity")
        if spec.quantized:
            quantized = True
            x = quantize(x, spec)
        elif want.kind != "f":
            raise BadRequestError(f"input {key!r}: model wants {want}, got floats")
    elif want.kind in "iu" and x.dtype != want:
        info = np.iinfo(want)
        if x.min() < info.min or x.max() > info.max:
            raise BadRequestError(f"input {key!r}: values out of range for {want}")
    if want.kind == "b" and kind != "b":
        raise BadRequestError(f"input {key!r}: model wants booleans, got {x.dtype}")
    return np.ascontiguousarray(x, dtype=want), quantized
