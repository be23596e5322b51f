"""The converter's Python API: :func:`convert_model` does what ``litefleet convert`` does.

Flow: check the request and the outputs (before any heavy work), load the
source, load and check the data, convert each variant, run the source model
and every variant on the same validation inputs, time the variants
round-robin, choose (``auto``) or keep the requested mode, build golden
vectors and the card, then publish ``OUT.tflite``, ``OUT.card.json``,
``OUT.golden.npz`` (and the report, if asked) all at once.

Guarantees:
- Bad requests fail before TensorFlow is imported where they can (unknown
  mode, existing outputs without ``force``, missing files).
- Nothing is written unless everything succeeded (see
  :class:`converter.convert.artifacts.AtomicOutputs`).
- The requested mode's failure is raised; a failure of an ``auto``
  candidate or a ``compare`` variant is recorded in the result instead.
- ``progress`` (if given) is called with a short phrase at each phase; it
  is how the CLI shows a spinner. This module never prints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import converter
from agent.model_card import ModelCard
from agent.serving.runtime import resolve_runtime
from converter.convert import measure
from converter.convert.artifacts import (
    DEFAULT_GOLDEN_COUNT,
    AtomicOutputs,
    OutputPaths,
    build_golden,
    golden_bytes,
    random_inputs,
    tensor_specs,
)
from converter.convert.datasets import Dataset, load_dataset
from converter.convert.quantize import (
    CALIBRATED_MODES,
    DEFAULT_CALIBRATION_SAMPLES,
    IO_TYPES,
    MODES,
    convert_variant,
)
from converter.convert.report import build_report
from converter.convert.results import ConversionResult, VariantResult
from converter.convert.selection import (
    BASELINE,
    DEFAULT_CANDIDATES,
    DEFAULT_MAX_ACCURACY_DROP,
    Candidate,
    choose_variant,
)
from converter.convert.sources import SourceModel, load_source
from converter.errors import BadInputError, ConversionError

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES = (*MODES, "auto")
Progress = Callable[[str], None]


def _variant_plan(quantize: str, candidates: Sequence[str], compare: Sequence[str]) -> tuple[list[str], bool]:
    """Modes to convert, in order, and whether the first failure is fatal. Pure."""
    for m in (*candidates, *compare):
        if m not in MODES:
            raise BadInputError(f"unknown quantize mode {m!r}; choose from {', '.join(MODES)}")
    if quantize == "auto":
        modes = [BASELINE, *[m for m in candidates if m != BASELINE]]
        return list(dict.fromkeys([*modes, *compare])), False
    return list(dict.fromkeys([quantize, *compare])), True


def _check_request(
    quantize: str,
    io_type: str,
    threads: int,
    golden_count: int,
    max_accuracy_drop: float,
) -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise BadInputError(
            f"unknown quantize mode {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}"
        )
    if io_type not in IO_TYPES:
        raise BadInputError(f"unknown I/O type {io_type!r}; choose one of {', '.join(IO_TYPES)}")
    if threads < 1:
        raise BadInputError("--threads must be at least 1")
    if golden_count < 1:
        raise BadInputError("the golden vector count must be at least 1")
    if max_accuracy_drop < 0:
        raise BadInputError("--max-accuracy-drop must not be negative")


def _versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    return {
        "litefleet": converter.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def convert_model(
    src: str | Path,
    out: str | Path,
    *,
    quantize: str = "none",
    calibration: str | Path | None = None,
    validate: str | Path | None = None,
    io_type: str = "int8",
    threads: int = 1,
    runtime: str = "auto",
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    compare: Sequence[str] = (),
    golden_count: int = DEFAULT_GOLDEN_COUNT,
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES,
    latency_runs: int = measure.DEFAULT_LATENCY_RUNS,
    report: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ConversionResult:
    """Convert ``src`` to ``out`` (a ``.tflite`` path); see the module docstring.

    ``quantize`` is one of ``none|dynamic|float16|int8|int16x8|auto``.
    ``calibration``/``validate`` are ``.npy``/``.npz`` files or image folders.
    ``io_type`` is the int8 model's input/output type (``int8``, ``uint8`` or
    ``float32``). ``compare`` adds variants that are measured for the report
    but not written. Raises :class:`BadInputError` or :class:`ConversionError`.
    """
    say = progress or (lambda _msg: None)
    _check_request(quantize, io_type, threads, golden_count, max_accuracy_drop)
    paths = OutputPaths.for_model(out)
    report_path = Path(report) if report is not None else None
    targets = [*paths.all(), *([report_path] if report_path else [])]
    if not force:
        existing = [str(p) for p in targets if os.path.lexists(p)]
        if existing:
            raise BadInputError(f"{', '.join(existing)} already exist(s); use --force to overwrite")
    modes, strict = _variant_plan(quantize, candidates, compare)
    if calibration is None and validate is None:  # refuse before loading anything
        if quantize in CALIBRATED_MODES:
            raise BadInputError(f"--quantize {quantize} needs calibration data (--calibration DATA)")
        if quantize == "auto":
            raise BadInputError("--quantize auto needs --validate DATA (or --calibration DATA)")
    notes: list[str] = []

    say("loading the model")
    source = load_source(src)
    say("reading data")
    cal = load_dataset(calibration, "calibration", source.inputs) if calibration else None
    val = load_dataset(validate, "validation", source.inputs) if validate else None
    if cal is None and val is not None and any(m in CALIBRATED_MODES for m in modes):
        cal = val
        notes.append("no --calibration given: calibrated on the validation data")
    evaluation = val if val is not None else (cal if quantize == "auto" else None)
    if quantize == "auto" and val is None:
        notes.append("no --validate given: auto compared variants on the calibration data")

    variants: dict[str, VariantResult] = {}
    for mode in modes:
        say(f"converting ({mode})")
        try:
            variants[mode] = VariantResult(
                mode, convert_variant(source, mode, cal, io_type=io_type, max_samples=calibration_samples)
            )
        except (BadInputError, ConversionError) as exc:
            if strict and mode == modes[0]:
                raise
            logger.info("variant %s failed: %s", mode, exc)
            variants[mode] = VariantResult(mode, error=str(exc))
    ok = {m: v for m, v in variants.items() if v.error is None}
    input_names = [s.name for s in source.inputs]

    source_accuracy = None
    if evaluation is not None:
        say(f"running the source model on {len(evaluation)} samples")
        ref = source.predict(list(evaluation.xs))
        source_accuracy = measure.accuracy(ref[0], evaluation.y)
        for mode, v in ok.items():
            say(f"running {mode} on {len(evaluation)} samples")
            got = measure.run_converted(
                v.tflite,
                list(evaluation.xs),
                input_names=input_names,
                output_names=source.output_names,
                threads=threads,
                runtime=runtime,
            )
            v.comparison = measure.compare_outputs(ref, got, evaluation.y)

    timing_data = evaluation if evaluation is not None else cal
    sample = list(timing_data.xs) if timing_data is not None else random_inputs(source.inputs, 1)
    say(f"timing {len(ok)} variant(s)")
    stats = measure.measure_latency(
        {m: v.tflite for m, v in ok.items()},
        [x[:1] for x in sample],
        input_names=input_names,
        threads=threads,
        runtime=runtime,
        runs=latency_runs,
    )
    for mode, s in stats.items():
        variants[mode].latency = s

    selection = None
    chosen = modes[0]
    if quantize == "auto":
        auto_modes = {BASELINE, *candidates}  # --compare extras are shown, not chosen
        selection = choose_variant(
            [_candidate(v) for m, v in variants.items() if m in auto_modes],
            source_accuracy=source_accuracy,
            max_accuracy_drop=max_accuracy_drop,
        )
        chosen = selection.mode
        logger.info("auto chose %s", selection.reason)

    say("writing golden vectors")
    golden_src, golden_from = _golden_source(val, cal, source, golden_count)
    golden = build_golden(
        variants[chosen].tflite,
        golden_src,
        input_names=input_names,
        mode=chosen,
        count=golden_count,
        threads=threads,
        runtime=runtime,
    )
    rt = resolve_runtime(runtime)
    result = ConversionResult(
        paths=paths,
        requested=quantize,
        mode=chosen,
        io_type=io_type,
        source=source.describe(),
        variants=variants,
        card=ModelCard(mode=chosen, inputs=(), outputs=()),  # replaced below
        threads=threads,
        runtime={"name": rt.name, "version": rt.version},
        versions=_versions(),
        source_accuracy=source_accuracy,
        evaluation=_describe_data(evaluation, val is not None),
        selection=selection,
        report_path=report_path,
        notes=notes,
        calibration_samples=calibration_samples,
    )
    golden_info = {
        "file": paths.golden.name,
        "count": int(golden["input_0"].shape[0]),
        "inputs": golden_from,
    }
    result.card = _card(result, golden_info, cal)

    with AtomicOutputs() as outputs:
        outputs.stage(paths.golden, golden_bytes(golden))
        outputs.stage(paths.card, result.card.to_json().encode())
        if report_path is not None:
            outputs.stage(report_path, (json.dumps(build_report(result), indent=2) + "\n").encode())
        outputs.stage(paths.tflite, variants[chosen].tflite)  # last: readers key on it
        outputs.commit()
    return result


def _candidate(v: VariantResult) -> Candidate:
    return Candidate(
        mode=v.mode,
        size_bytes=v.size_bytes,
        latency_ms_p50=v.latency.p50_ms if v.latency else 0.0,
        accuracy=v.comparison.accuracy if v.comparison else None,
        agreement=v.comparison.agreement if v.comparison else None,
        error=v.error,
    )


def _golden_source(
    val: Dataset | None, cal: Dataset | None, source: SourceModel, count: int
) -> tuple[list[np.ndarray], str]:
    if val is not None:
        return list(val.xs), "validation"
    if cal is not None:
        return list(cal.xs), "calibration"
    return random_inputs(source.inputs, count), "random"


def _describe_data(data: Dataset | None, is_validation: bool) -> dict[str, Any]:
    if data is None:
        return {}
    return {
        "file": data.path,
        "samples": len(data),
        "labels": data.y is not None,
        "role": "validation" if is_validation else "calibration",
    }


def _card(result: ConversionResult, golden: dict[str, Any], cal: Dataset | None) -> ModelCard:
    v = result.chosen
    inputs, outputs = tensor_specs(v.tflite)
    metrics: dict[str, Any] = {
        "threads": result.threads,
        "runtime": result.runtime,
        "size_bytes": v.size_bytes,
    }
    if v.latency is not None:
        metrics.update(
            latency_ms_p50=round(v.latency.p50_ms, 4),
            latency_ms_p99=round(v.latency.p99_ms, 4),
            latency_runs=v.latency.runs,
        )
    if v.comparison is not None:
        c = v.comparison
        metrics.update(
            accuracy=c.accuracy,
            source_accuracy=result.source_accuracy,
            agreement=c.agreement,
            max_abs_error=c.max_abs_error,
            mean_abs_error=c.mean_abs_error,
            evaluation=result.evaluation,
        )
    base = result.variants.get(BASELINE)
    if base is not None and base.error is None and v.mode != BASELINE:
        metrics["size_ratio_to_float32"] = round(v.size_bytes / base.size_bytes, 4)
    extra: dict[str, Any] = {
        "converter": result.versions,
        "quantization": {
            "requested": result.requested,
            "io_type": result.io_type if result.mode == "int8" else None,
            "calibration": None
            if cal is None or result.mode not in CALIBRATED_MODES
            else {
                "file": cal.path,
                "samples": len(cal),
                "samples_used": min(len(cal), result.calibration_samples),
            },
        },
    }
    if result.selection is not None:
        extra["quantization"]["reason"] = result.selection.reason
    return ModelCard(
        mode=result.mode,
        inputs=inputs,
        outputs=outputs,
        tflite_sha256=hashlib.sha256(v.tflite).hexdigest(),
        tflite_size_bytes=v.size_bytes,
        source=result.source,
        metrics=metrics,
        golden=golden,
        extra=extra,
    )
