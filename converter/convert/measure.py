"""Measure converted models against their source: accuracy, agreement, error, size, latency.

Guarantees:
- Every converted model runs through :func:`agent.serving.runtime.load_interpreter`
  and :class:`agent.serving.inference.ModelRunner`, the code path the device uses;
  float inputs are quantized with the model's own input parameters and
  integer outputs dequantized before they are compared.
- Inputs and outputs are matched to the source model by the TF Lite
  signature's names, not by tensor order (the converter may reorder them).
- Latency is the time of ``invoke()`` alone, on one fixed input, after a
  warm-up, with the thread count given (XNNPACK is LiteRT's default CPU
  delegate). Several models are timed round-robin, one invoke each in turn,
  so a burst of load from another process hits every model alike and the
  ratios stay fair on a shared machine.
- The statistics functions are pure and take plain arrays.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.model_card import TensorSpec
from agent.serving.inference import ModelRunner, quantize
from agent.serving.runtime import load_interpreter

logger = logging.getLogger(__name__)

DEFAULT_LATENCY_RUNS = 200
DEFAULT_LATENCY_MAX_S = 5.0
MIN_LATENCY_RUNS = 20
WARMUP_RUNS = 5
_SIGNATURE_KEY = "serving_default"


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p99_ms: float
    mean_ms: float
    runs: int


@dataclass(frozen=True)
class OutputComparison:
    """A variant's outputs against the source model's, on the same inputs.

    ``accuracy`` and ``agreement`` are percentages (None when the first output
    is not a class-score vector, or, for accuracy, when there are no labels).
    Errors are over the first output, in float units.
    """

    accuracy: float | None
    agreement: float | None
    max_abs_error: float
    mean_abs_error: float
    samples: int


# -- pure statistics ----------------------------------------------------------
def top1(scores: np.ndarray) -> np.ndarray | None:
    """Predicted classes of a [N, C] (or [N, ..., C]) score array; None if not a classifier."""
    if scores.ndim < 2 or scores.shape[-1] < 2:
        return None
    return np.asarray(np.argmax(scores.reshape(scores.shape[0], -1, scores.shape[-1])[:, 0, :], axis=-1))


def accuracy(scores: np.ndarray, labels: np.ndarray | None) -> float | None:
    """Top-1 accuracy in percent, or None without labels or class scores."""
    pred = top1(scores)
    if pred is None or labels is None:
        return None
    return float(np.mean(pred == labels) * 100.0)


def compare_outputs(
    source: Sequence[np.ndarray], variant: Sequence[np.ndarray], labels: np.ndarray | None
) -> OutputComparison:
    """Compare first outputs: accuracy vs labels, top-1 agreement, abs error."""
    ref = np.asarray(source[0], dtype=np.float64)
    got = np.asarray(variant[0], dtype=np.float64).reshape(ref.shape)
    diff = np.abs(ref - got)
    p_ref, p_got = top1(ref), top1(got)
    agreement = None if p_ref is None or p_got is None else float(np.mean(p_ref == p_got) * 100.0)
    return OutputComparison(
        accuracy=accuracy(got, labels),
        agreement=agreement,
        max_abs_error=float(diff.max()) if diff.size else 0.0,
        mean_abs_error=float(diff.mean()) if diff.size else 0.0,
        samples=int(ref.shape[0]),
    )


def latency_stats(seconds: Sequence[float]) -> LatencyStats:
    """p50/p99/mean in milliseconds of invoke durations given in seconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return LatencyStats(
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=float(ms.mean()),
        runs=int(ms.size),
    )


# -- running models -----------------------------------------------------------
def _perm(names: Sequence[str], sig: Mapping[str, int], details: Sequence[Mapping[str, Any]]) -> list[int]:
    """For each tensor of ``details`` (runtime order), its position in ``names`` (source order)."""
    by_index = {int(v): k for k, v in sig.items()}
    order = []
    for d in details:
        name = by_index.get(int(d["index"]))
        if name is None or name not in names:
            return list(range(len(details)))
        order.append(list(names).index(name))
    return order


def signature_order(
    interpreter: Any, input_names: Sequence[str], output_names: Sequence[str]
) -> tuple[list[int], list[int]]:
    """Positions of the source's inputs/outputs for each runtime input/output."""
    get_sigs = getattr(interpreter, "_get_full_signature_list", None)
    sig = (get_sigs() or {}).get(_SIGNATURE_KEY) if get_sigs else None
    ins, outs = interpreter.get_input_details(), interpreter.get_output_details()
    if not sig:
        return list(range(len(ins))), list(range(len(outs)))
    return _perm(input_names, sig["inputs"], ins), _perm(output_names, sig["outputs"], outs)


def run_converted(
    tflite: bytes,
    xs: Sequence[np.ndarray],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    threads: int = 1,
    runtime: str = "auto",
) -> list[np.ndarray]:
    """Run ``tflite`` on float inputs (source order); float outputs in source order."""
    interpreter = load_interpreter(tflite, threads=threads, runtime=runtime)
    in_perm, out_perm = signature_order(interpreter, input_names, output_names)
    runner = ModelRunner(interpreter, name="candidate")
    feed = {spec.name: xs[src] for spec, src in zip(runner.inputs, in_perm, strict=True)}
    outs = runner.predict(feed, dequantize_outputs=True)
    ordered: list[np.ndarray] = [np.empty(0)] * len(outs)
    for runtime_pos, source_pos in enumerate(out_perm):
        ordered[source_pos] = outs[runtime_pos]
    return ordered


def output_baseline(
    tflite: bytes,
    xs: Sequence[np.ndarray],
    *,
    input_names: Sequence[str],
    threads: int = 1,
    runtime: str = "auto",
) -> dict[str, Any] | None:
    """The output sketch (:mod:`agent.output_sketch`) of ``tflite`` on float inputs ``xs``
    (source order), as a device serving those inputs would record it: the same runner, the
    same recorder, the runtime's first output. None for a model without outputs."""
    interpreter = load_interpreter(tflite, threads=threads, runtime=runtime)
    in_perm, _ = signature_order(interpreter, input_names, [])
    runner = ModelRunner(interpreter, name="baseline")
    feed = {spec.name: xs[src] for spec, src in zip(runner.inputs, in_perm, strict=True)}
    runner.predict(feed)
    counts = runner.stats.snapshot().outputs
    return counts.sketch().to_json() if counts is not None else None


def raw_inputs(interpreter: Any, xs: Sequence[np.ndarray], input_names: Sequence[str]) -> list[np.ndarray]:
    """One sample per runtime input, in the runtime's dtype (quantized if it is integer)."""
    in_perm, _ = signature_order(interpreter, input_names, [])
    out = []
    for d, src in zip(interpreter.get_input_details(), in_perm, strict=True):
        spec = TensorSpec.from_details(d)
        x = np.asarray(xs[src][:1])
        x = x.reshape(tuple(int(s) for s in d["shape"]))
        out.append(quantize(x, spec) if spec.quantized else x.astype(d["dtype"]))
    return out


def measure_latency(
    models: Mapping[str, bytes],
    sample: Sequence[np.ndarray],
    *,
    input_names: Sequence[str],
    threads: int = 1,
    runtime: str = "auto",
    runs: int = DEFAULT_LATENCY_RUNS,
    max_seconds: float = DEFAULT_LATENCY_MAX_S,
) -> dict[str, LatencyStats]:
    """Time ``invoke()`` of every model round-robin on the same float ``sample``.

    Each model gets ``runs`` timed invokes, or fewer (never under
    :data:`MIN_LATENCY_RUNS`) once its own invokes have taken ``max_seconds``.
    """
    interpreters = {}
    for name, tflite in models.items():
        interp = load_interpreter(tflite, threads=threads, runtime=runtime)
        details = interp.get_input_details()
        for d, x in zip(details, raw_inputs(interp, sample, input_names), strict=True):
            interp.set_tensor(d["index"], x)
        for _ in range(WARMUP_RUNS):
            interp.invoke()
        interpreters[name] = interp
    times: dict[str, list[float]] = {name: [] for name in models}
    spent = dict.fromkeys(models, 0.0)
    active = list(models)
    clock = time.perf_counter
    while active:
        for name in list(active):
            invoke = interpreters[name].invoke
            t0 = clock()
            invoke()
            dt = clock() - t0
            times[name].append(dt)
            spent[name] += dt
            n = len(times[name])
            if n >= runs or (spent[name] >= max_seconds and n >= MIN_LATENCY_RUNS):
                active.remove(name)
    stats = {name: latency_stats(t) for name, t in times.items()}
    for name, s in stats.items():
        logger.debug("latency %s: p50 %.4f ms p99 %.4f ms (%d runs)", name, s.p50_ms, s.p99_ms, s.runs)
    return stats
