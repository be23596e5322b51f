"""Turn a :class:`converter.convert.results.ConversionResult` into the JSON report and the terminal table.

Pure functions of the result: no TensorFlow, no I/O. :func:`build_report`
is what ``--report PATH.json`` holds (its keys are listed in
docs/converter.md); :func:`table_rows` and :func:`table_notes` are what the
CLI prints (:mod:`converter.cli.convert` lays out the table).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from converter.convert.results import ConversionResult, VariantResult

REPORT_FORMAT = "litefleet.convert-report/1"
_LABELS = {
    "none": "float32",
    "dynamic": "dynamic",
    "float16": "float16",
    "int8": "int8",
    "int16x8": "int16x8",
}


def _variant_dict(v: VariantResult, base_size: int | None) -> dict[str, Any]:
    d: dict[str, Any] = {"mode": v.mode}
    if v.error is not None:
        d["error"] = v.error
        return d
    d["size_bytes"] = v.size_bytes
    if base_size:
        d["size_ratio_to_float32"] = round(v.size_bytes / base_size, 4)
    if v.comparison is not None:
        c = v.comparison
        d.update(
            accuracy=c.accuracy,
            agreement=c.agreement,
            max_abs_error=c.max_abs_error,
            mean_abs_error=c.mean_abs_error,
            samples=c.samples,
        )
    if v.latency is not None:
        d.update(
            latency_ms_p50=v.latency.p50_ms,
            latency_ms_p99=v.latency.p99_ms,
            latency_ms_mean=v.latency.mean_ms,
            latency_runs=v.latency.runs,
        )
    return d


def _base_size(result: ConversionResult) -> int | None:
    base = result.variants.get("none")
    return base.size_bytes if base is not None and base.error is None else None


def build_report(result: ConversionResult) -> dict[str, Any]:
    """The ``--report`` document."""
    base = _base_size(result)
    return {
        "format": REPORT_FORMAT,
        "source": result.source,
        "requested": result.requested,
        "chosen": result.mode,
        "io_type": result.io_type,
        "reason": result.selection.reason if result.selection else None,
        "rejected": dict(result.selection.rejected) if result.selection else {},
        "source_accuracy": result.source_accuracy,
        "evaluation": result.evaluation,
        "threads": result.threads,
        "runtime": result.runtime,
        "converter": result.versions,
        "outputs": {
            "tflite": str(result.paths.tflite),
            "card": str(result.paths.card),
            "golden": str(result.paths.golden),
        },
        "variants": [_variant_dict(v, base) for v in result.variants.values()],
        "output_baseline": result.output_baseline,
        "output_baseline_from": result.baseline_from,
        "notes": list(result.notes),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _size(n: int) -> str:
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    if n >= 1 << 10:
        return f"{n / (1 << 10):.1f} KiB"
    return f"{n} B"


# the comparison table's columns: the variant, figures, then what became of it
TABLE_COLUMNS = (
    "variant",
    "size",
    "x fp32",
    "top-1 %",
    "agree %",
    "max err",
    "mean err",
    "p50 ms",
    "p99 ms",
    "",
)


def table_rows(result: ConversionResult) -> list[tuple[str, ...]]:
    """The source and every variant as text cells under :data:`TABLE_COLUMNS`."""
    base = _base_size(result)
    rows: list[tuple[str, ...]] = [
        (
            f"{result.source['format']} (source)",
            "-",
            "-",
            _fmt(result.source_accuracy, ".2f"),
            *["-"] * 5,
            "",
        ),
    ]
    rejected = result.selection.rejected if result.selection else {}
    for v in result.variants.values():
        label = _LABELS.get(v.mode, v.mode)
        if v.error is not None:
            rows.append((label, *["-"] * 8, "failed"))
            continue
        c, lat = v.comparison, v.latency
        mark = "<- written" if v.mode == result.mode else ("rejected" if v.mode in rejected else "")
        rows.append(
            (
                label,
                _size(v.size_bytes),
                _fmt(v.size_bytes / base if base else None, ".2f"),
                _fmt(c.accuracy if c else None, ".2f"),
                _fmt(c.agreement if c else None, ".2f"),
                _fmt(c.max_abs_error if c else None, ".2g"),
                _fmt(c.mean_abs_error if c else None, ".2g"),
                _fmt(lat.p50_ms if lat else None, ".3g"),
                _fmt(lat.p99_ms if lat else None, ".3g"),
                mark,
            )
        )
    return rows


def table_notes(result: ConversionResult) -> list[str]:
    """The lines under the table: what was measured how, the choice explained, what was written."""
    out = []
    rejected = result.selection.rejected if result.selection else {}
    ev = result.evaluation
    if ev:
        out.append(
            f"measured on {ev['samples']} {ev['role']} samples from {ev['file']}"
            + ("" if ev["labels"] else " (no labels: top-1 % not measured)")
            + f"; latency: LiteRT {result.runtime['version']}, XNNPACK, "
            f"{result.threads} thread(s), invoke only"
        )
    else:
        out.append(
            f"no --validate data: accuracy not measured; latency: LiteRT "
            f"{result.runtime['version']}, {result.threads} thread(s)"
        )
    if result.selection is not None:
        out.append(f"auto picked {result.selection.reason}")
        for mode, why in result.selection.rejected.items():
            out.append(f"  not {_LABELS.get(mode, mode)}: {why}")
    for v in result.variants.values():
        if v.error is not None and v.mode not in rejected:
            out.append(f"  {_LABELS.get(v.mode, v.mode)} failed: {v.error}")
    out.extend(f"note: {n}" for n in result.notes)
    out.append(
        f"wrote {result.paths.tflite}, {result.paths.card}, {result.paths.golden}"
        + (f" and {result.report_path}" if result.report_path else "")
    )
    return out
