"""Each source format converts: .keras (see test_convert_modes), legacy .h5, SavedModel,
a .keras trained under the JAX backend, and calibration from a folder of images."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.model_card import parse_card
from converter.convert.pipeline import ConvertConfig, convert_model
from converter.convert.sources import source_sha256
from tests.support.models import DigitsData

REPO = Path(__file__).resolve().parents[3]


def _int8(src: Path, out: Path, files: dict[str, Path], **kw: object) -> dict[str, float]:
    calibration = kw.pop("calibration", files["calibration"])
    r = convert_model(
        src,
        out,
        ConvertConfig(quantize="int8", latency_runs=20, **kw),  # type: ignore[arg-type]
        calibration=calibration,  # type: ignore[arg-type]
        validate=files["validation"],
    )
    metrics: dict[str, float] = parse_card(r.paths.card.read_bytes()).metrics
    assert abs(metrics["accuracy"] - metrics["source_accuracy"]) <= 1.0
    return metrics


def test_legacy_h5(digits_files: dict[str, Path], tmp_path: Path) -> None:
    from converter.convert.sources import import_keras

    keras = import_keras()
    h5 = tmp_path / "digits.h5"
    keras.saving.load_model(digits_files["keras"]).save(h5)
    metrics = _int8(h5, tmp_path / "h5.tflite", digits_files)
    assert metrics["source_accuracy"] > 95.0
    card = parse_card((tmp_path / "h5.card.json").read_bytes())
    assert card.source["format"] == "h5"
    assert card.source["sha256"] == hashlib.sha256(h5.read_bytes()).hexdigest()


def test_saved_model_folder(digits_files: dict[str, Path], tmp_path: Path) -> None:
    from converter.convert.sources import import_keras

    keras = import_keras()
    folder = tmp_path / "digits_savedmodel"
    keras.saving.load_model(digits_files["keras"]).export(str(folder))
    metrics = _int8(folder, tmp_path / "sm.tflite", digits_files)
    assert metrics["source_accuracy"] > 95.0
    card = parse_card((tmp_path / "sm.card.json").read_bytes())
    assert card.source["format"] == "saved_model"
    assert card.source["sha256"] == source_sha256(folder)
    assert card.inputs[0].dtype == "int8"


def test_keras_file_trained_under_jax(digits_files: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("jax")
    model = tmp_path / "digits_jax.keras"
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "support" / "models.py"), str(model), "6"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "jax"  # it really trained under JAX
    metrics = _int8(model, tmp_path / "jax.tflite", digits_files)
    assert metrics["source_accuracy"] > 90.0


def test_calibration_from_a_folder_of_images(
    digits_files: dict[str, Path], digits_data: DigitsData, tmp_path: Path
) -> None:
    from converter.convert.sources import import_tensorflow

    tf = import_tensorflow()
    folder = tmp_path / "images"
    folder.mkdir()
    for i, x in enumerate(digits_data.x_train[:64]):
        png = tf.io.encode_png(np.round(x * 255).astype(np.uint8))
        (folder / f"{i:03d}.png").write_bytes(png.numpy())
    (folder / "notes.txt").write_text("ignored")
    _int8(digits_files["keras"], tmp_path / "img.tflite", digits_files, calibration=folder)
    doc = parse_card((tmp_path / "img.card.json").read_bytes())
    assert doc.extra["quantization"]["calibration"]["samples"] == 64
