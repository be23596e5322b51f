"""Run one loaded TF Lite model: quantize in, invoke, dequantize out, one caller at a time.

:class:`ModelRunner` wraps an interpreter created by :func:`agent.runtime.load_interpreter`.
It caches the tensor details once (``get_input_details`` costs microseconds),
serializes invocations with a lock (an interpreter is not thread-safe), and
keeps the common case -- one input of exactly the model's dtype and shape --
to ``set_tensor``/``invoke``/``get_tensor`` and nothing more.

Float inputs to an integer model are quantized with the input's scale and
zero point; outputs of an integer model are dequantized when the caller sent
floats (or asks for it). A batch larger than the model's fixed batch is run
row by row on the allocated tensors, so tensors are never reallocated.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import BadRequestError, InferenceError
from agent.model_card import TensorSpec
from agent.runtime import load_interpreter

ArrayLike = Any


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Float -> the integer dtype of ``spec`` with round-half-away and saturation."""
    info = np.iinfo(spec.dtype)
    scale = np.asarray(spec.scale, dtype=np.float32)
    zp = np.asarray(spec.zero_point, dtype=np.float32)
    if scale.size > 1:  # per-channel quantization of an input is along the last axis
        scale = scale.reshape((1,) * (x.ndim - 1) + (-1,))
        zp = zp.reshape(scale.shape)
    q = np.round(np.asarray(x, dtype=np.float32) / scale) + zp
    return np.clip(q, info.min, info.max).astype(spec.dtype)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    scale = np.asarray(spec.scale, dtype=np.float32)
    zp = np.asarray(spec.zero_point, dtype=np.float32)
    if scale.size > 1:
        scale = scale.reshape((1,) * (q.ndim - 1) + (-1,))
        zp = zp.reshape(scale.shape)
    return ((q.astype(np.float32) - zp) * scale).astype(np.float32)


class ModelRunner:
    """A loaded model ready to answer ``predict`` calls from any thread."""

    def __init__(self, interpreter: Any, *, name: str = "model", version: str = "0") -> None:
        self.name = name
        self.version = version
        self._interpreter = interpreter
        self._input_details = interpreter.get_input_details()
        self._output_details = interpreter.get_output_details()
        self.inputs = tuple(TensorSpec.from_details(d) for d in self._input_details)
        self.outputs = tuple(TensorSpec.from_details(d) for d in self._output_details)
        self._in_idx = tuple(int(d["index"]) for d in self._input_details)
        self._out_idx = tuple(int(d["index"]) for d in self._output_details)
        self._in_dtype = tuple(np.dtype(d["dtype"]) for d in self._input_details)
        self._in_shape = tuple(tuple(int(s) for s in d["shape"]) for d in self._input_details)
        # bound methods looked up once: the hot path is three calls and a lock
        self._set = interpreter.set_tensor
        self._invoke = interpreter.invoke
        self._get = interpreter.get_tensor
        self._lock = threading.Lock()
        # runtime successes and failures (not caller mistakes): the activation
        # code judges a model on trial by these
        self.calls_ok = 0
        self.calls_failed = 0

    @classmethod
    def from_file(
        cls, path: str | Path, *, threads: int = 1, runtime: str = "auto",
        name: str = "model", version: str = "0",
    ) -> ModelRunner:
        return cls(load_interpreter(path, threads=threads, runtime=runtime), name=name, version=version)

    @property
    def integer_io(self) -> bool:
        return any(s.quantized for s in self.inputs) or any(s.quantized for s in self.outputs)

    # -- the hot path -------------------------------------------------------
    def run_raw(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run one exact-shape, exact-dtype sample. Caller guarantees the shapes."""
        with self._lock:
            try:
                for idx, x in zip(self._in_idx, inputs, strict=True):
                    self._set(idx, x)
                self._invoke()
                out = [self._get(idx) for idx in self._out_idx]
            except (ValueError, RuntimeError) as exc:
                self.calls_failed += 1
                raise InferenceError(f"{self.name} v{self.version}: runtime failed: {exc}") from exc
            self.calls_ok += 1
            return out

    def predict(
        self, inputs: ArrayLike | Sequence[ArrayLike] | Mapping[str, ArrayLike],
        *, dequantize_outputs: bool | None = None,
    ) -> list[np.ndarray]:
        """Run a batch. ``inputs`` is one array (single-input models), a list in
        input order, or a mapping from input name. The leading axis is the batch.

        Returns one array per output with the batch as leading axis. Integer
        outputs are dequantized when ``dequantize_outputs`` is true, or, when it is
        None, when any input arrived as floats for an integer input.
        """
        arrays = self._as_list(inputs)
        # fast path: one sample of exactly the right dtype and shape
        if (
            len(arrays) == 1 == len(self._in_idx)
            and isinstance(arrays[0], np.ndarray)
            and arrays[0].dtype == self._in_dtype[0]
            and arrays[0].shape == self._in_shape[0]
            and not dequantize_outputs
        ):
            return self.run_raw(arrays)
        prepared, floats_in = self._prepare(arrays)
        batch = prepared[0].shape[0]
        model_batch = self._in_shape[0][0] if self._in_shape[0] else 1
        if batch == model_batch:
            outs = self.run_raw(prepared)
        else:
            rows = [
                self.run_raw([p[i : i + model_batch] for p in prepared])
                for i in range(0, batch, model_batch)
            ]
            outs = [np.concatenate([r[k] for r in rows]) for k in range(len(self._out_idx))]
        want_float = floats_in if dequantize_outputs is None else dequantize_outputs
        if want_float:
            outs = [dequantize(o, s) if s.quantized else o for o, s in zip(outs, self.outputs, strict=True)]
        return outs

    # -- input checking -----------------------------------------------------
    def _as_list(self, inputs: Any) -> list[Any]:
        if isinstance(inputs, Mapping):
            names = [s.name for s in self.inputs]
            unknown = set(inputs) - set(names)
            if unknown:
                raise BadRequestError(f"unknown input(s) {sorted(unknown)}; model has {names}")
            missing = [n for n in names if n not in inputs]
            if missing:
                raise BadRequestError(f"missing input(s) {missing}")
            return [inputs[n] for n in names]
        if len(self._in_idx) == 1:
            return [inputs]
        if not isinstance(inputs, list | tuple) or len(inputs) != len(self._in_idx):
            raise BadRequestError(f"model takes {len(self._in_idx)} inputs, give a list or a mapping")
        return list(inputs)

    def _prepare(self, arrays: list[Any]) -> tuple[list[np.ndarray], bool]:
        prepared: list[np.ndarray] = []
        floats_in = False
        batch: int | None = None
        for arr, spec, want_dtype, shape in zip(arrays, self.inputs, self._in_dtype, self._in_shape, strict=True):
            try:
                x = np.asarray(arr)
            except (ValueError, TypeError) as exc:
                raise BadRequestError(f"input {spec.name!r}: not a rectangular array: {exc}") from exc
            if x.dtype == object or x.dtype.kind not in "biuf":
                raise BadRequestError(f"input {spec.name!r}: expected numbers, got {x.dtype}")
            if x.ndim == len(shape) - 1:  # one sample without its batch axis
                x = x[np.newaxis]
            if x.ndim != len(shape) or tuple(x.shape[1:]) != shape[1:]:
                raise BadRequestError(
                    f"input {spec.name!r}: shape {list(x.shape)} does not fit the model's "
                    f"{['N', *shape[1:]]}"
                )
            if x.shape[0] == 0:
                raise BadRequestError(f"input {spec.name!r}: empty batch")
            model_batch = shape[0] if shape else 1
            if x.shape[0] % model_batch:
                raise BadRequestError(f"input {spec.name!r}: batch must be a multiple of {model_batch}")
            if batch is None:
                batch = x.shape[0]
            elif x.shape[0] != batch:
                raise BadRequestError("all inputs must have the same batch size")
            if x.dtype.kind == "f":
                if not np.all(np.isfinite(x)):
                    raise BadRequestError(f"input {spec.name!r}: contains NaN or infinity")
                if spec.quantized:
                    floats_in = True
                    x = quantize(x, spec)
                elif want_dtype.kind != "f":
                    raise BadRequestError(f"input {spec.name!r}: model wants {want_dtype}, got floats")
            elif want_dtype.kind in "iu" and x.dtype != want_dtype:
                info = np.iinfo(want_dtype)
                if x.size and (x.min() < info.min or x.max() > info.max):
                    raise BadRequestError(f"input {spec.name!r}: values out of range for {want_dtype}")
            x = np.ascontiguousarray(x, dtype=want_dtype)
            prepared.append(x)
        return prepared, floats_in
