"""What a conversion decided and measured, as plain records (read by the report and the CLI)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.model_card import ModelCard
from converter.convert import measure
from converter.convert.artifacts import OutputPaths
from converter.convert.quantize import DEFAULT_CALIBRATION_SAMPLES
from converter.convert.selection import Selection


@dataclass
class VariantResult:
    """One converted variant and what was measured of it."""

    mode: str
    tflite: bytes = b""
    error: str | None = None
    comparison: measure.OutputComparison | None = None
    latency: measure.LatencyStats | None = None

    @property
    def size_bytes(self) -> int:
        return len(self.tflite)


@dataclass
class ConversionResult:
    """Everything :func:`convert_model` decided and measured."""

    paths: OutputPaths
    requested: str
    mode: str
    io_type: str
    source: dict[str, Any]
    variants: dict[str, VariantResult]
    card: ModelCard
    threads: int
    runtime: dict[str, str]
    versions: dict[str, str]
    source_accuracy: float | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)
    selection: Selection | None = None
    report_path: Path | None = None
    calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES
    notes: list[str] = field(default_factory=list)
    # the chosen variant's output sketch (agent.output_sketch) on the validation data, else
    # on the calibration data; None without either
    output_baseline: dict[str, Any] | None = None
    baseline_from: str | None = None

    @property
    def chosen(self) -> VariantResult:
        return self.variants[self.mode]
