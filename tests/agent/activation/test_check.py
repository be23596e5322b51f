"""The candidate checks with the real runtime: the card against the signed SHA-256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent.activation.check import check_isolated, load_checked
from agent.errors import ModelRejectedError
from agent.model_card import CARD_FORMAT
from agent.serving.runtime import load_interpreter
from tests.agent.activation.test_manager import gather_models  # noqa: F401  (fixture)


def write_card(model: Path, out: Path, sha256: str) -> Path:
    from agent.serving.inference import ModelRunner

    runner = ModelRunner(load_interpreter(model), name="m", version="1")
    doc = {
        "format": CARD_FORMAT,
        "mode": "none",
        "inputs": [s.to_dict() for s in runner.inputs],
        "outputs": [s.to_dict() for s in runner.outputs],
        "tflite": {"sha256": sha256, "size_bytes": model.stat().st_size},
    }
    out.write_text(json.dumps(doc))
    return out


def test_the_card_is_compared_with_the_signed_hash_when_given(
    tmp_path: Path,
    gather_models: list[Path],  # noqa: F811
) -> None:
    """With the download's verified SHA-256 at hand, the check compares the card with it
    instead of hashing the file again; without it, with the file's own hash."""
    model = gather_models[0]
    real = hashlib.sha256(model.read_bytes()).hexdigest()
    other = hashlib.sha256(b"another model").hexdigest()
    card = write_card(model, tmp_path / "card.json", real)
    load_checked(model, card, None)
    load_checked(model, card, None, model_sha256=real)
    assert check_isolated(model, card, None, threads=1, runtime="auto", model_sha256=real)
    # a card for the file on disk, but the signed model is another one: refused
    with pytest.raises(ModelRejectedError) as exc:
        load_checked(model, card, None, model_sha256=other)
    assert exc.value.reason == "card"
    with pytest.raises(ModelRejectedError) as exc:
        check_isolated(model, card, None, threads=1, runtime="auto", model_sha256=other)
    assert exc.value.reason == "card"
    # and a card for another model is refused either way
    wrong = write_card(model, tmp_path / "wrong.json", other)
    with pytest.raises(ModelRejectedError) as exc:
        load_checked(model, wrong, None)
    assert exc.value.reason == "card"
