"""The exact-dtype fast path of :class:`agent.serving.inference.ModelRunner`, as closures.

A fast path serves one input array of exactly the model's dtype straight to the runtime's
native ``SetTensor``/``Invoke``/``GetTensor`` under the runner's lock, and returns None
whenever that does not apply, so the runner's checking path takes over and explains why.

Guarantees:

- No validation pass, no conversion, no copy besides the runtime's own two (see
  ``bench/RESULTS.md``, *Inference*).
- The counted variant records the call in :class:`agent.serving.stats.ModelStats` under the
  lock (latency, runtime error, the output sketch after the latency is taken); a failing sketch
  is reported to ``sketch_failed`` and never reaches the caller. After the lock is released it
  hands an answered call to the shadow tap, when one is set.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import InferenceError
from agent.serving.stats import BASE, MASK, SHIFT, ModelStats

# what the fast path returns when it does not apply (the general path takes over)
FastPath = Callable[[Any], "list[np.ndarray] | None"]
# a shadow tap: (inputs as the model ran them, raw outputs) of one answered call; never raises
Tap = Callable[[Sequence[np.ndarray], list[np.ndarray]], None]


def native_calls(interpreter: Any) -> tuple[Any, Any, Any]:
    """``(set_tensor, invoke, get_tensor)``, native when the runtime exposes them.

    LiteRT, tflite-runtime and tf.lite wrap a C++ object in ``_interpreter``
    whose ``SetTensor``/``Invoke``/``GetTensor`` the public methods call after
    a Python-level safety check; calling them directly saves ~0.2 µs a call.
    """
    native = getattr(interpreter, "_interpreter", None)
    calls = tuple(getattr(native, n, None) for n in ("SetTensor", "Invoke", "GetTensor"))
    if all(callable(c) for c in calls):
        return calls  # type: ignore[return-value]
    return interpreter.set_tensor, interpreter.invoke, interpreter.get_tensor


@dataclass(frozen=True)
class NativeCalls:
    """What a fast path closes over: the native calls and one model's tensors."""

    set_tensor: Any
    invoke: Any
    get_tensor: Any
    in_index: int
    out_index: tuple[int, ...]
    dtype: np.dtype[Any]
    lock: threading.Lock
    label: str


def plain_fast_path(c: NativeCalls) -> FastPath:
    """A closure for one exact-dtype input: returns the outputs, or None when the
    input is not an ndarray of the model's dtype or the runtime refuses its
    shape (the caller then takes the checking path, which explains why)."""
    acquire, release = c.lock.acquire, c.lock.release
    set_tensor, invoke, get_tensor = c.set_tensor, c.invoke, c.get_tensor
    in_index, dtype, out_index, label = c.in_index, c.dtype, c.out_index, c.label
    single = len(out_index) == 1
    o0 = out_index[0]

    def fast(x: Any) -> list[np.ndarray] | None:
        try:
            if x.dtype is not dtype:
                return None
        except AttributeError:
            return None
        acquire()
        try:
            try:
                set_tensor(in_index, x)
            except (ValueError, TypeError):
                return None
            try:
                invoke()
            except (RuntimeError, ValueError) as exc:
                raise InferenceError(f"{label}: runtime failed: {exc}") from exc
            if single:
                return [get_tensor(o0)]
            return [get_tensor(o) for o in out_index]
        finally:
            release()

    return fast


def counted_fast_path(
    c: NativeCalls, stats: ModelStats, tap: list[Tap | None], sketch_failed: Callable[[Exception], None]
) -> FastPath:
    """:func:`plain_fast_path` that also counts the call in ``stats`` (latency, errors,
    output sketch) and hands an answered call to the shadow ``tap`` when there is one."""
    acquire, release = c.lock.acquire, c.lock.release
    set_tensor, invoke, get_tensor = c.set_tensor, c.invoke, c.get_tensor
    in_index, dtype, out_index, label = c.in_index, c.dtype, c.out_index, c.label
    single = len(out_index) == 1
    o0 = out_index[0]
    # perf_counter (a float) is about twice as cheap to call as perf_counter_ns
    counts, acc, clock = stats.counts, stats.acc, time.perf_counter

    def fast_counted(x: Any) -> list[np.ndarray] | None:
        try:
            if x.dtype is not dtype:
                return None
        except AttributeError:
            return None
        acquire()
        try:
            t0 = clock()
            try:
                set_tensor(in_index, x)
            except (ValueError, TypeError):
                return None
            try:
                invoke()
            except (RuntimeError, ValueError) as exc:
                acc[0] += 1
                raise InferenceError(f"{label}: runtime failed: {exc}") from exc
            out = [get_tensor(o0)] if single else [get_tensor(o) for o in out_index]
            d = int((clock() - t0) * 1e9)
            b = d.bit_length()
            counts[BASE[b] + ((d >> SHIFT[b]) & MASK)] += 1
            recorder = stats.outputs  # read per call: None switches the sketch off
            if recorder is not None:
                try:
                    recorder.record(out[0])
                except Exception as exc:  # the answer stands whatever the sketch does
                    sketch_failed(exc)
        finally:
            release()
        t = tap[0]
        if t is not None:
            t((x,), out)
        return out

    return fast_counted
