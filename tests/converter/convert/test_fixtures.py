"""The shared digits fixtures: other engineers' tests rely on these promises."""

from __future__ import annotations

import json

import numpy as np

from agent.model_card import parse_card
from tests.support.models import ConvertedModel, DigitsData


def test_digits_data_split(digits_data: DigitsData) -> None:
    x_train, _, x_test, y_test = digits_data
    assert x_train.dtype == np.float32 and x_train.shape[1:] == (8, 8, 1)
    assert x_train.min() >= 0.0 and x_train.max() <= 1.0
    assert len(x_train) + len(x_test) == 1797 and len(x_test) == 450
    assert y_test.dtype.kind == "i" and set(np.unique(y_test)) == set(range(10))


def test_digits_int8_files(digits_int8: ConvertedModel) -> None:
    card = parse_card(digits_int8.card.read_bytes())
    assert card.mode == "int8"
    assert card.inputs[0].dtype == "int8" and card.outputs[0].dtype == "int8"
    assert card.golden == {"file": digits_int8.golden.name, "count": 8, "inputs": "validation"}
    with np.load(digits_int8.golden) as g:
        assert sorted(g.files) == ["atol_0", "input_0", "output_0"]
        assert g["input_0"].shape == (8, 8, 8, 1) and g["input_0"].dtype == np.int8
        assert g["output_0"].shape == (8, 10) and g["output_0"].dtype == np.int8
        assert g["atol_0"].dtype == np.float64 and float(g["atol_0"]) == 1.0
    assert json.loads(digits_int8.card.read_text())["tflite"]["size_bytes"] == (
        digits_int8.tflite.stat().st_size
    )


def test_digits_float32_files(digits_float32: ConvertedModel) -> None:
    card = parse_card(digits_float32.card.read_bytes())
    assert card.mode == "none" and card.inputs[0].dtype == "float32"
    with np.load(digits_float32.golden) as g:
        assert g["input_0"].dtype == np.float32 and g["output_0"].dtype == np.float32
        assert 1e-4 < float(g["atol_0"]) < 2e-3
