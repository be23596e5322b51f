"""The card's output baseline: what the converted model answers on the converter's data, in the
sketch a device records (agent.output_sketch); and cards from before it still load everywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import agent
from agent.activation.check import load_checked
from agent.model_card import parse_card
from agent.output_sketch import Sketch
from agent.serving.inference import ModelRunner
from converter.convert.report import build_report
from tests.support.harness import REPO_ROOT, must
from tests.support.models import ConvertedModel


def test_the_baseline_is_the_chosen_models_sketch_on_the_validation_data(
    digits_int8: ConvertedModel, digits_float32: ConvertedModel, digits_data
) -> None:
    x = digits_data.x_test
    for m in (digits_int8, digits_float32):
        card = parse_card(m.card.read_bytes())
        assert card.output_baseline is not None
        baseline = Sketch.from_json(card.output_baseline)
        # what the model answers on the validation inputs, counted here
        probs = agent.load_model(m.tflite).predict(x, dequantize=True)
        assert baseline.n == len(x) == 450
        assert [c for _, c in baseline.classes] == [c for c in np.bincount(probs.argmax(1)) if c]
        # and exactly the sketch a device serving those inputs one by one records
        device = ModelRunner.from_file(m.tflite)
        for xi in x:
            device.predict(xi[None])
        counts = device.stats.snapshot().outputs
        assert counts is not None and counts.sketch() == baseline
        # the --report JSON says the same, and where it comes from
        report = build_report(m.result)
        assert report["output_baseline"] == card.output_baseline
        assert report["output_baseline_from"] == "validation"


def old_card(m: ConvertedModel, folder: Path) -> Path:
    """A copy of ``m`` whose card is as convert wrote it before the baseline existed."""
    folder.mkdir()
    for src in (m.tflite, m.golden):
        (folder / src.name).write_bytes(src.read_bytes())
    doc = json.loads(m.card.read_text())
    assert "output_baseline" in doc
    del doc["output_baseline"]
    (folder / m.card.name).write_text(json.dumps(doc, indent=2))
    return folder / m.tflite.name


def test_a_card_without_a_baseline_still_loads_everywhere(
    broker, tmp_path: Path, digits_int8: ConvertedModel
) -> None:
    model = old_card(digits_int8, tmp_path / "old")
    card, golden = model.with_suffix(".card.json"), model.with_suffix(".golden.npz")
    parsed = parse_card(card.read_bytes())
    assert parsed.output_baseline is None and "output_baseline" not in json.loads(parsed.to_json())
    # the agent's activation checks, in process and as the child the daemon runs
    load_checked(model, card, golden)
    args = ["--model", str(model), "--card", str(card), "--golden", str(golden)]
    out = subprocess.run(
        [sys.executable, "-m", "agent.activation.check", *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    assert json.loads(out.stdout) == {"ok": True}
    # the host signs and publishes it
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    assert "with card and golden vectors" in must(
        "push", str(model), "--repo", str(repo), "--name", "digits", "--broker", broker.url
    )


def test_a_baseline_this_version_cannot_read_never_costs_the_card(
    tmp_path: Path, digits_int8: ConvertedModel
) -> None:
    """A newer converter may write another sketch kind: the card loads, the baseline is None,
    the card writes back what it read, and the model passes its activation checks."""
    doc = json.loads(digits_int8.card.read_text())
    doc["output_baseline"] = {"kind": "quantiles", "n": 3, "q": [0.1, 0.5]}
    card_path = tmp_path / "future.card.json"
    card_path.write_text(json.dumps(doc))
    card = parse_card(card_path.read_bytes())
    assert card.output_baseline is None
    assert json.loads(card.to_json())["output_baseline"] == doc["output_baseline"]
    load_checked(digits_int8.tflite, card_path, digits_int8.golden)
