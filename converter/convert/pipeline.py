"""The converter's Python API: :func:`convert_model` does what ``litefleet convert`` does.

Flow: check the request and the outputs (before any heavy work), load the
source, load and check the data, convert each variant, run the source model
and every variant on the same validation inputs, time the variants
round-robin, choose (``auto``) or keep the requested mode, build golden
vectors, the output baseline (the chosen variant's output sketch on the
validation data, else the calibration data) and the card, then publish ``OUT.tflite``, ``OUT.card.json``,
``OUT.golden.npz`` (and the report, if asked) all at once.

Guarantees:
- Bad requests fail before TensorFlow is imported where they can (unknown
  mode, existing outputs without ``force``, missing files).
- Nothing is written unless everything succeeded (see
  :class:`converter.convert.artifacts.AtomicOutputs`).
- The requested mode's failure is raised; a failure of an ``auto``
  candidate or a ``compare`` variant is recorded in the result instead.
- The settings are one frozen :class:`ConvertConfig`, checked when it is made.
- ``progress`` (if given) is called with a short phrase at each phase; it
  is how the CLI shows a spinner. This module never prints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
    Selection,
    choose_variant,
)
from converter.convert.sources import SourceModel, load_source
from converter.errors import BadInputError, ConversionError

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES = (*MODES, "auto")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ConvertConfig:
    """How :func:`convert_model` converts and measures: one setting per ``convert`` flag,
    with the CLI's defaults (in the manner of python-tuf's ``UpdaterConfig``).

    ``quantize`` is one of ``none|dynamic|float16|int8|int16x8|auto``; ``io_type`` the
    int8 model's input/output type (``int8``, ``uint8`` or ``float32``); ``candidates``
    the modes ``auto`` chooses from; ``compare`` extra variants measured for the report
    but not written. A setting out of range raises :class:`BadInputError` here, before
    anything is loaded."""

    quantize: str = "none"
    io_type: str = "int8"
    threads: int = 1
    runtime: str = "auto"
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP
    candidates: Sequence[str] = DEFAULT_CANDIDATES
    compare: Sequence[str] = ()
    golden_count: int = DEFAULT_GOLDEN_COUNT
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES
    latency_runs: int = measure.DEFAULT_LATENCY_RUNS
    force: bool = False

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_CHOICES:
            raise BadInputError(
                f"unknown quantize mode {self.quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}"
            )
        if self.io_type not in IO_TYPES:
            raise BadInputError(f"unknown I/O type {self.io_type!r}; choose one of {', '.join(IO_TYPES)}")
        for m in (*self.candidates, *self.compare):
            if m not in MODES:
                raise BadInputError(f"unknown quantize mode {m!r}; choose from {', '.join(MODES)}")
        if self.threads < 1:
            raise BadInputError("--threads must be at least 1")
        if self.golden_count < 1:
            raise BadInputError("the golden vector count must be at least 1")
        if self.max_accuracy_drop < 0:
            raise BadInputError("--max-accuracy-drop must not be negative")
        if self.calibration_samples < 1 or self.latency_runs < 1:
            raise BadInputError("--calibration-samples and --latency-runs must be at least 1")

    def variant_plan(self) -> tuple[list[str], bool]:
        """Modes to convert, in order, and whether the first failure is fatal."""
        if self.quantize == "auto":
            modes = [BASELINE, *[m for m in self.candidates if m != BASELINE]]
            return list(dict.fromkeys([*modes, *self.compare])), False
        return list(dict.fromkeys([self.quantize, *self.compare])), True


@dataclass
class _Data:
    """The data of one conversion, as loaded and checked against the model's inputs."""

    calibration: Dataset | None
    validation: Dataset | None
    notes: list[str] = field(default_factory=list)

    def evaluation(self, quantize: str) -> Dataset | None:
        """What variants are compared on: validation data, else (``auto``) calibration data."""
        if self.validation is not None:
            return self.validation
        return self.calibration if quantize == "auto" else None


def _versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    return {
        "litefleet": converter.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def _check_outputs(targets: Sequence[Path], force: bool) -> None:
    if not force:
        existing = [str(p) for p in targets if os.path.lexists(p)]
        if existing:
            raise BadInputError(f"{', '.join(existing)} already exist(s); use --force to overwrite")


def _check_data_given(quantize: str, calibration: object, validate: object) -> None:
    """Refuse a mode that needs data before anything is loaded."""
    if calibration is None and validate is None:
        if quantize in CALIBRATED_MODES:
            raise BadInputError(f"--quantize {quantize} needs calibration data (--calibration DATA)")
        if quantize == "auto":
            raise BadInputError("--quantize auto needs --validate DATA (or --calibration DATA)")


def _load_data(
    source: SourceModel,
    calibration: str | Path | None,
    validate: str | Path | None,
    modes: Sequence[str],
    quantize: str,
) -> _Data:
    data = _Data(
        load_dataset(calibration, "calibration", source.inputs) if calibration else None,
        load_dataset(validate, "validation", source.inputs) if validate else None,
    )
    if data.calibration is None and data.validation is not None and any(m in CALIBRATED_MODES for m in modes):
        data.calibration = data.validation
        data.notes.append("no --calibration given: calibrated on the validation data")
    if quantize == "auto" and data.validation is None:
        data.notes.append("no --validate given: auto compared variants on the calibration data")
    return data


def _convert_variants(
    source: SourceModel,
    modes: list[str],
    strict: bool,
    cal: Dataset | None,
    config: ConvertConfig,
    say: Progress,
) -> dict[str, VariantResult]:
    """Every mode converted; a failure is recorded, or raised for the requested mode."""
    variants: dict[str, VariantResult] = {}
    for mode in modes:
        say(f"converting ({mode})")
        try:
            tflite = convert_variant(
                source, mode, cal, io_type=config.io_type, max_samples=config.calibration_samples
            )
            variants[mode] = VariantResult(mode, tflite)
        except (BadInputError, ConversionError) as exc:
            if strict and mode == modes[0]:
                raise
            logger.info("variant %s failed: %s", mode, exc)
            variants[mode] = VariantResult(mode, error=str(exc))
    return variants


def _compare(
    source: SourceModel,
    evaluation: Dataset,
    ok: dict[str, VariantResult],
    config: ConvertConfig,
    say: Progress,
) -> float | None:
    """Run the source and every variant on ``evaluation``; the source's accuracy."""
    say(f"running the source model on {len(evaluation)} samples")
    ref = source.predict(list(evaluation.xs))
    for mode, v in ok.items():
        say(f"running {mode} on {len(evaluation)} samples")
        got = measure.run_converted(
            v.tflite,
            list(evaluation.xs),
            input_names=[s.name for s in source.inputs],
            output_names=source.output_names,
            threads=config.threads,
            runtime=config.runtime,
        )
        v.comparison = measure.compare_outputs(ref, got, evaluation.y)
    return measure.accuracy(ref[0], evaluation.y)


def _time_variants(
    source: SourceModel, timing_data: Dataset | None, ok: dict[str, VariantResult], config: ConvertConfig
) -> None:
    sample = list(timing_data.xs) if timing_data is not None else random_inputs(source.inputs, 1)
    stats = measure.measure_latency(
        {m: v.tflite for m, v in ok.items()},
        [x[:1] for x in sample],
        input_names=[s.name for s in source.inputs],
        threads=config.threads,
        runtime=config.runtime,
        runs=config.latency_runs,
    )
    for mode, s in stats.items():
        ok[mode].latency = s


def _choose(
    config: ConvertConfig, variants: dict[str, VariantResult], first: str, source_accuracy: float | None
) -> tuple[str, Selection | None]:
    """The mode to write: the requested one, or ``auto``'s choice among its candidates."""
    if config.quantize != "auto":
        return first, None
    auto_modes = {BASELINE, *config.candidates}  # --compare extras are shown, not chosen
    selection = choose_variant(
        [_candidate(v) for m, v in variants.items() if m in auto_modes],
        source_accuracy=source_accuracy,
        max_accuracy_drop=config.max_accuracy_drop,
    )
    logger.info("auto chose %s", selection.reason)
    return selection.mode, selection


def _write(result: ConversionResult, golden: dict[str, np.ndarray]) -> None:
    """All outputs at once (:class:`AtomicOutputs`), the model last."""
    paths = result.paths
    with AtomicOutputs() as outputs:
        outputs.stage(paths.golden, golden_bytes(golden))
        outputs.stage(paths.card, result.card.to_json().encode())
        if result.report_path is not None:
            outputs.stage(result.report_path, (json.dumps(build_report(result), indent=2) + "\n").encode())
        outputs.stage(paths.tflite, result.chosen.tflite)  # last: readers key on it
        outputs.commit()


def convert_model(
    src: str | Path,
    out: str | Path,
    config: ConvertConfig | None = None,
    *,
    calibration: str | Path | None = None,
    validate: str | Path | None = None,
    report: str | Path | None = None,
    progress: Progress | None = None,
) -> ConversionResult:
    """Convert ``src`` to ``out`` (a ``.tflite`` path) as ``config`` says; see the module docstring.

    ``calibration``/``validate`` are ``.npy``/``.npz`` files or image folders; ``report``
    a JSON file to write beside the outputs. Raises :class:`BadInputError` or
    :class:`ConversionError`.
    """
    config = config or ConvertConfig()
    say = progress or (lambda _msg: None)
    paths = OutputPaths.for_model(out)
    report_path = Path(report) if report is not None else None
    _check_outputs([*paths.all(), *([report_path] if report_path else [])], config.force)
    modes, strict = config.variant_plan()
    _check_data_given(config.quantize, calibration, validate)

    say("loading the model")
    source = load_source(src)
    say("reading data")
    data = _load_data(source, calibration, validate, modes, config.quantize)
    cal, val, evaluation = data.calibration, data.validation, data.evaluation(config.quantize)

    variants = _convert_variants(source, modes, strict, cal, config, say)
    ok = {m: v for m, v in variants.items() if v.error is None}
    source_accuracy = _compare(source, evaluation, ok, config, say) if evaluation is not None else None
    say(f"timing {len(ok)} variant(s)")
    _time_variants(source, evaluation if evaluation is not None else cal, ok, config)
    chosen, selection = _choose(config, variants, modes[0], source_accuracy)

    say("writing golden vectors")
    golden_src, golden_from = _golden_source(val, cal, source, config.golden_count)
    golden = build_golden(
        variants[chosen].tflite,
        golden_src,
        input_names=[s.name for s in source.inputs],
        mode=chosen,
        count=config.golden_count,
        threads=config.threads,
        runtime=config.runtime,
    )
    rt = resolve_runtime(config.runtime)
    result = ConversionResult(
        paths=paths,
        requested=config.quantize,
        mode=chosen,
        io_type=config.io_type,
        source=source.describe(),
        variants=variants,
        card=ModelCard(mode=chosen, inputs=(), outputs=()),  # replaced below
        threads=config.threads,
        runtime={"name": rt.name, "version": rt.version},
        versions=_versions(),
        source_accuracy=source_accuracy,
        evaluation=_describe_data(evaluation, val is not None),
        selection=selection,
        report_path=report_path,
        notes=data.notes,
        calibration_samples=config.calibration_samples,
    )
    golden_info = {"file": paths.golden.name, "count": int(golden["input_0"].shape[0]), "inputs": golden_from}
    baseline_data = val if val is not None else cal
    if baseline_data is not None:
        say(f"recording the output baseline on {len(baseline_data)} samples")
        result.output_baseline = measure.output_baseline(
            variants[chosen].tflite,
            list(baseline_data.xs),
            input_names=[s.name for s in source.inputs],
            threads=config.threads,
            runtime=config.runtime,
        )
        result.baseline_from = "validation" if val is not None else "calibration"
    result.card = _card(result, golden_info, cal)
    _write(result, golden)
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
        output_baseline=result.output_baseline,
    )
