"""Every quantize mode on the digits CNN, checked with real figures through LiteRT."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from agent.model_card import TensorSpec, check_signature, parse_card
from agent.serving.inference import ModelRunner
from agent.serving.runtime import load_interpreter
from converter.convert.quantize import list_ops
from tests.support.models import ConvertedModel, convert_digits


def _convert(digits_files: dict[str, Path], tmp_path: Path, mode: str, **options: object) -> ConvertedModel:
    options.setdefault("latency_runs", 20)
    return convert_digits(
        digits_files["keras"],
        digits_files["calibration"],
        digits_files["validation"],
        tmp_path / f"digits_{mode}.tflite",
        mode,
        **options,
    )


def check_artifacts(m: ConvertedModel) -> dict[str, object]:
    """The three files agree with each other and with the runtime; returns the card JSON."""
    data = m.tflite.read_bytes()
    card = parse_card(m.card.read_bytes())
    assert card.tflite_sha256 == hashlib.sha256(data).hexdigest()
    assert card.tflite_size_bytes == len(data)
    interpreter = load_interpreter(data)
    runner = ModelRunner(interpreter)
    check_signature(card, runner.inputs, runner.outputs)  # raises if the card lies
    with np.load(m.golden) as g:
        count = card.golden["count"]
        assert card.golden["file"] == m.golden.name
        for k, spec in enumerate(runner.inputs):
            assert g[f"input_{k}"].shape == (count, *spec.shape[1:])
            assert g[f"input_{k}"].dtype == np.dtype(spec.dtype)
        for i in range(count):
            outs = runner.run_raw([g[f"input_{k}"][i : i + 1] for k in range(len(runner.inputs))])
            for k, y in enumerate(outs):
                assert g[f"output_{k}"].dtype == y.dtype
                diff = np.abs(y[0].astype(np.float64) - g[f"output_{k}"][i].astype(np.float64))
                assert diff.max() <= float(g[f"atol_{k}"])
    doc: dict[str, object] = json.loads(m.card.read_text())
    return doc


def _metrics(m: ConvertedModel) -> dict[str, float]:
    metrics: dict[str, float] = parse_card(m.card.read_bytes()).metrics
    return metrics


def test_int8_keeps_accuracy_within_one_point_at_under_040x_size(
    digits_int8: ConvertedModel, digits_float32: ConvertedModel
) -> None:
    doc = check_artifacts(digits_int8)
    metrics = _metrics(digits_int8)
    assert metrics["source_accuracy"] > 95.0  # the Keras model really learned digits
    assert abs(metrics["accuracy"] - metrics["source_accuracy"]) <= 1.0
    assert metrics["agreement"] >= 98.0
    ratio = digits_int8.tflite.stat().st_size / digits_float32.tflite.stat().st_size
    assert ratio <= 0.40
    card = parse_card(digits_int8.card.read_bytes())
    assert [t.dtype for t in card.inputs + card.outputs] == ["int8", "int8"]
    assert card.inputs[0].quantized and card.outputs[0].quantized
    assert doc["quantization"] == {  # type: ignore[comparison-overlap]
        "requested": "int8",
        "io_type": "int8",
        "calibration": {"file": str(digits_int8.calibration), "samples": 1347, "samples_used": 200},
    }
    assert metrics["latency_ms_p50"] > 0 and metrics["latency_ms_p99"] >= metrics["latency_ms_p50"]
    assert metrics["runtime"]["name"] == "litert"  # type: ignore[index]
    assert doc["converter"]["tensorflow"].startswith("2.")  # type: ignore[index]


def test_float32_matches_keras(digits_float32: ConvertedModel) -> None:
    check_artifacts(digits_float32)
    metrics = _metrics(digits_float32)
    assert metrics["accuracy"] == metrics["source_accuracy"]
    assert metrics["agreement"] == 100.0 and metrics["max_abs_error"] < 1e-4


@pytest.mark.parametrize("io_type", ["uint8", "float32"])
def test_int8_io_types(digits_files: dict[str, Path], tmp_path: Path, io_type: str) -> None:
    m = _convert(digits_files, tmp_path, "int8", io_type=io_type)
    check_artifacts(m)
    card = parse_card(m.card.read_bytes())
    assert card.inputs[0].dtype == io_type and card.outputs[0].dtype == io_type
    assert card.inputs[0].quantized == (io_type != "float32")
    metrics = card.metrics
    assert abs(metrics["accuracy"] - metrics["source_accuracy"]) <= 1.0
    ops = list_ops(m.tflite.read_bytes())
    assert ops is not None
    assert {o.name for o in ops if "float32" in o.input_dtypes + o.output_dtypes} <= {
        "QUANTIZE",
        "DEQUANTIZE",
    }


def test_dynamic_range(digits_files: dict[str, Path], tmp_path: Path, digits_float32: ConvertedModel) -> None:
    from converter.convert.pipeline import ConvertConfig, convert_model

    r = convert_model(  # no calibration data: dynamic range needs none
        digits_files["keras"],
        tmp_path / "d.tflite",
        ConvertConfig(quantize="dynamic", latency_runs=20),
        validate=digits_files["validation"],
    )
    m = ConvertedModel(*r.paths.all(), digits_files["keras"], Path(), Path(), r)
    check_artifacts(m)
    card = parse_card(m.card.read_bytes())
    assert card.mode == "dynamic" and card.inputs[0].dtype == "float32"
    assert abs(card.metrics["accuracy"] - card.metrics["source_accuracy"]) <= 1.0
    assert m.tflite.stat().st_size <= 0.40 * digits_float32.tflite.stat().st_size
    assert json.loads(m.card.read_text())["quantization"]["calibration"] is None


def test_float16(digits_files: dict[str, Path], tmp_path: Path, digits_float32: ConvertedModel) -> None:
    m = _convert(digits_files, tmp_path, "float16")
    check_artifacts(m)
    card = parse_card(m.card.read_bytes())
    assert card.mode == "float16" and card.outputs[0].dtype == "float32"
    assert card.metrics["agreement"] >= 99.5
    assert card.metrics["max_abs_error"] < 0.01
    ratio = m.tflite.stat().st_size / digits_float32.tflite.stat().st_size
    assert 0.45 <= ratio <= 0.65  # float16 weights: half, plus the fixed overhead


def test_int16x8(digits_files: dict[str, Path], tmp_path: Path) -> None:
    m = _convert(digits_files, tmp_path, "int16x8")
    check_artifacts(m)
    card = parse_card(m.card.read_bytes())
    assert card.inputs[0].dtype == "float32"
    assert abs(card.metrics["accuracy"] - card.metrics["source_accuracy"]) <= 1.0
    ops = list_ops(m.tflite.read_bytes())
    assert ops is not None and any("int16" in o.output_dtypes for o in ops if o.name == "CONV_2D")


def test_auto_picks_int8_for_digits_and_reports_every_candidate(
    digits_files: dict[str, Path], tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    m = _convert(digits_files, tmp_path, "auto", report=report, latency_runs=100)
    doc = check_artifacts(m)
    rep = json.loads(report.read_text())
    assert rep["requested"] == "auto" and rep["chosen"] == "int8" == doc["mode"]
    assert [v["mode"] for v in rep["variants"]] == ["none", "float16", "dynamic", "int8"]
    assert set(rep["rejected"]) == {"none", "float16", "dynamic"}
    assert rep["reason"].startswith("int8: the fastest variant within 1 point")
    int8 = next(v for v in rep["variants"] if v["mode"] == "int8")
    assert int8["size_ratio_to_float32"] <= 0.40
    assert int8["latency_runs"] == 100
    assert doc["quantization"]["reason"] == rep["reason"]  # type: ignore[index]


def test_golden_vectors_fall_back_to_calibration_then_random(
    digits_files: dict[str, Path], tmp_path: Path
) -> None:
    from converter.convert.pipeline import ConvertConfig, convert_model

    r = convert_model(
        digits_files["keras"],
        tmp_path / "a.tflite",
        ConvertConfig(quantize="int8", golden_count=3, latency_runs=20),
        calibration=digits_files["calibration"],
    )
    assert r.card.golden == {"file": "a.golden.npz", "count": 3, "inputs": "calibration"}
    assert r.card.metrics.get("accuracy") is None  # nothing to validate against
    # the output baseline too comes from the calibration data then, every sample of it
    with np.load(digits_files["calibration"]) as cal:
        assert r.card.output_baseline is not None and r.card.output_baseline["n"] == len(cal["x"])
    assert r.baseline_from == "calibration"
    r = convert_model(digits_files["keras"], tmp_path / "b.tflite", ConvertConfig(latency_runs=20))
    assert r.card.golden["inputs"] == "random" and r.card.mode == "none"
    # random stand-ins say nothing about the data a model will see: no baseline
    assert r.card.output_baseline is None and "output_baseline" not in json.loads(r.card.to_json())
    with np.load(tmp_path / "b.golden.npz") as g:
        assert g["input_0"].shape == (8, 8, 8, 1)


def test_card_tensor_specs_survive_a_round_trip(digits_int8: ConvertedModel) -> None:
    card = parse_card(digits_int8.card.read_bytes())
    interpreter = load_interpreter(digits_int8.tflite)
    spec = TensorSpec.from_details(interpreter.get_input_details()[0])
    assert card.inputs[0] == spec
