"""A model with two inputs and two outputs through the whole converter: int8 with
calibration from ``x_0``/``x_1`` in an ``.npz``, validation, the model card and golden
vectors, then the device's API by input name. The trap this guards against: a TF Lite
model's input order is not necessarily the Keras model's, so every step must match inputs
by name, never by position."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.support.harness import litefleet


@pytest.fixture(scope="module")
def two_input_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    import keras

    keras.utils.set_random_seed(3)
    # "zeta" comes first in Keras but sorts last: an order mix-up cannot go unnoticed
    zeta = keras.Input((8, 8, 1), name="zeta")
    alpha = keras.Input((5,), name="alpha")
    h = keras.layers.Conv2D(4, 3, activation="relu")(zeta)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Concatenate()([h, keras.layers.Dense(8, activation="relu")(alpha)])
    logits = keras.layers.Dense(4, name="logits")(h)
    score = keras.layers.Dense(1, name="score")(keras.layers.Dense(4, activation="relu")(alpha))
    model = keras.Model([zeta, alpha], [logits, score])
    folder = tmp_path_factory.mktemp("multi")
    path = folder / "two.keras"
    model.save(path)
    return path, model


def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 1, (n, 8, 8, 1)).astype(np.float32), rng.normal(0, 1, (n, 5)).astype(np.float32))


@pytest.mark.parametrize("io_type", ["int8", "float32"])
def test_two_inputs_two_outputs_int8(two_input_model, tmp_path: Path, io_type: str) -> None:
    import agent

    src, keras_model = two_input_model
    z_cal, a_cal = data(64, 1)
    z_val, a_val = data(32, 2)
    np.savez(tmp_path / "calib.npz", x_0=z_cal, x_1=a_cal)
    np.savez(tmp_path / "val.npz", x_0=z_val, x_1=a_val)
    out = tmp_path / "two.tflite"
    code, _, err = litefleet(
        "convert",
        str(src),
        "-o",
        str(out),
        "--quantize",
        "int8",
        "--io-type",
        io_type,
        "--calibration",
        str(tmp_path / "calib.npz"),
        "--validate",
        str(tmp_path / "val.npz"),
        "--report",
        str(tmp_path / "r.json"),
    )
    assert code == 0, err
    card = json.loads(out.with_suffix(".card.json").read_text())
    names = sorted(i["name"] for i in card["inputs"])
    assert len(names) == 2 and "alpha" in names[0] and "zeta" in names[1], names

    model = agent.load_model(out)
    want_logits, want_score = (np.asarray(t) for t in keras_model([z_val, a_val]))
    got = model.predict({"zeta": z_val, "alpha": a_val})
    assert isinstance(got, list) and len(got) == 2
    by_shape = {g.shape[-1]: g for g in got}
    logits, score = by_shape[4], by_shape[1]
    # int8 noise, not a mix-up: small on average (a validation sample beyond the calibration
    # range may be clipped, hence the looser bound on the worst one)
    for got_t, want_t in ((logits, want_logits), (score, want_score)):
        err = np.abs(got_t - want_t)
        span = np.ptp(want_t)
        assert err.mean() < 0.03 * span and err.max() < 0.25 * span, (err.mean(), err.max())
    assert (logits.argmax(1) == want_logits.argmax(1)).mean() >= 0.9

    # the device's pre-activation check: the card's signature and the golden vectors
    from agent.activation.check import load_checked

    load_checked(out, out.with_suffix(".card.json"), out.with_suffix(".golden.npz"))

    # the report measured the written int8 variant against the source on the 32 validation
    # samples (converter.convert.measure compares the first output: the logits, hence an agreement)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["variants"], report
    assert [v["mode"] for v in report["variants"]] == ["int8"] and report["chosen"] == "int8", report
    variant = report["variants"][0]
    assert "error" not in variant, variant
    assert variant["size_bytes"] == out.stat().st_size > 0, variant
    assert variant["samples"] == 32, variant
    assert variant["accuracy"] is None  # no labels in val.npz
    assert variant["agreement"] is not None and 90.0 <= variant["agreement"] <= 100.0, variant
    max_err, mean_err = variant["max_abs_error"], variant["mean_abs_error"]
    assert np.isfinite([max_err, mean_err]).all() and 0.0 <= mean_err <= max_err, variant
    assert max_err < 0.25 * np.ptp(want_logits), (max_err, np.ptp(want_logits))
    assert variant["latency_runs"] > 0 and variant["latency_ms_p50"] > 0, variant


def test_calibration_with_too_few_arrays_is_refused(two_input_model, tmp_path: Path) -> None:
    src, _ = two_input_model
    z_cal, _ = data(16, 1)
    np.savez(tmp_path / "one.npz", x=z_cal)
    out = tmp_path / "bad.tflite"
    code, _, err = litefleet(
        "convert", str(src), "-o", str(out), "--quantize", "int8", "--calibration", str(tmp_path / "one.npz")
    )
    assert code == 2 and "2" in err and "x_0" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_inputs_in_the_wrong_order_are_refused_by_shape(two_input_model, tmp_path: Path) -> None:
    src, _ = two_input_model
    z_cal, a_cal = data(16, 1)
    np.savez(tmp_path / "swapped.npz", x_0=a_cal, x_1=z_cal)
    code, _, err = litefleet(
        "convert",
        str(src),
        "-o",
        str(tmp_path / "s.tflite"),
        "--quantize",
        "int8",
        "--calibration",
        str(tmp_path / "swapped.npz"),
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
