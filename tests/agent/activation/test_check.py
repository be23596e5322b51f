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


def test_a_child_stuck_without_cpu_is_no_verdict_and_a_new_one_checks(
    tmp_path: Path,
    gather_models: list[Path],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The fork copies a lock another thread of the agent holds at that instant, and the
    child blocks on it for good (seen: libfaketime's lock in pthread_cond_init as the child
    recreated the GIL; the model was then rejected as a timeout and never tried again). A
    child with no CPU time for STALL_S is killed and a new one checks: the model passes."""
    import logging
    import os
    import threading

    from agent.activation import check

    model = gather_models[0]
    first = tmp_path / "first-child"
    real_check, real_fork = check._child_check, check._fork_check
    attempts: list[float | None] = []  # each child inherits the list as it was at its fork

    def fork_check(*args, stall_s):  # type: ignore[no-untyped-def]
        attempts.append(stall_s)
        return real_fork(*args, stall_s=stall_s)

    def first_blocks(*args):  # type: ignore[no-untyped-def]
        if len(attempts) == 1:  # the first attempt's child, however late it is scheduled
            first.write_text(str(os.getpid()))
            threading.Event().wait()  # blocked on a lock, using no CPU
        return real_check(*args)

    monkeypatch.setattr(check, "_fork_check", fork_check)
    monkeypatch.setattr(check, "_child_check", first_blocks)
    monkeypatch.setattr(check, "STALL_S", 1.0)
    with caplog.at_level(logging.WARNING, logger="agent.activation.check"):
        assert check_isolated(model, None, None, threads=1, runtime="auto", timeout_s=30)
    assert attempts == [1.0, None]  # the new child has the usual bounds, no stall watch
    assert "used no CPU for 1 s" in caplog.text
    assert not Path(f"/proc/{first.read_text()}").exists()  # killed and reaped


def test_a_second_stuck_child_is_bounded_as_before_and_rejected(
    gather_models: list[Path],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checked once more, not forever: a model whose check hangs without using CPU in every
    child is ended by the wall-clock bound (2 x timeout + 10 s) and rejected."""
    import threading
    import time

    from agent.activation import check

    monkeypatch.setattr(check, "_child_check", lambda *a: threading.Event().wait())
    monkeypatch.setattr(check, "STALL_S", 1.0)
    started = time.monotonic()
    with pytest.raises(ModelRejectedError) as exc:
        check_isolated(gather_models[0], None, None, threads=1, runtime="auto", timeout_s=1)
    assert exc.value.reason == "timeout" and "more than 12 s" in str(exc.value)
    assert time.monotonic() - started >= 12
