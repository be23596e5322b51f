"""The output sketch and the shadow evaluation on real LiteRT models, in process.

The sketch must count exactly what was served; the shadow's agreement must be the agreement
of the two models on the sampled calls; nothing of it may change an answer.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import agent
from agent.serving.inference import ModelRunner
from agent.serving.registry import ActiveModel, ModelRegistry
from agent.serving.shadow import Shadow, ShadowWorker, compare_outputs, previous_inputs
from tests.support.tiny_models import TinyModels, models_for


@pytest.fixture(scope="session")
def tiny(request: pytest.FixtureRequest) -> TinyModels:
    return models_for(request)


def confidence_bucket_uppers(probs: np.ndarray) -> list[float]:
    """The sketch's confidence bucket upper bounds, computed here from probability rows."""
    top = probs.max(axis=1)
    return [round((min(int(c * 20), 19) + 1) / 20, 2) for c in top]


def test_the_sketch_counts_exactly_what_was_served(digits_int8, digits_data) -> None:
    """Every call path (float in one by one, the int8 fast path, a batch) lands in the sketch
    once per sample: its class histogram is np.bincount of the predictions."""
    x = digits_data.x_test[:120]
    registry = ModelRegistry()
    runner = ModelRunner.from_file(digits_int8.tflite, name="digits", version="1")
    registry.activate(ActiveModel("digits", "1", "", runner))
    models = agent.active_models(registry)
    preds = [models.predict("digits", xi[None]) for xi in x[:60]]  # float in: quantized, one by one
    spec = runner.inputs[0]
    q = np.clip(np.round(x[60:90] / spec.scale[0]) + spec.zero_point[0], -128, 127).astype(np.int8)
    raw = [models.predict("digits", qi[None]) for qi in q]  # exact dtype: the fast path
    oscale, ozp = runner.outputs[0].scale[0], runner.outputs[0].zero_point[0]
    preds += [(r.astype(np.float32) - ozp) * oscale for r in raw]
    preds.append(models.predict("digits", x[90:]))  # one batch of 30
    probs = np.concatenate(preds)
    assert probs.shape == (120, 10)

    sketch = runner.stats.snapshot().outputs
    assert sketch is not None
    doc = sketch.sketch().to_json()
    classes = np.bincount(probs.argmax(axis=1), minlength=10)
    assert doc["kind"] == "classes" and doc["n"] == 120
    assert doc["classes"] == [[i, int(c)] for i, c in enumerate(classes) if c]
    uppers, counts = np.unique(confidence_bucket_uppers(probs), return_counts=True)
    assert doc["confidence"] == [[float(u), int(c)] for u, c in zip(uppers, counts, strict=True)]
    assert runner.stats.snapshot().ok == 60 + 30 + 1  # calls; the sketch counts samples


def run_calls(model: ModelRunner, xs: np.ndarray) -> np.ndarray:
    return np.concatenate([model.predict(xi[None]) for xi in xs])


def top1_on(path: Path, xs: np.ndarray) -> np.ndarray:
    """What ``path`` answers for float inputs, one call each (a model of its own)."""
    model = agent.load_model(path)
    return np.array([int(np.argmax(model.predict(xi[None], dequantize=True))) for xi in xs])


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("pair", ["float-shadowed-by-int8", "digits-shadowed-by-tiny"])
def test_shadow_agreement_is_the_two_models_agreement_on_the_sampled_calls(
    pair: str, k: int, tiny: TinyModels, digits_int8, digits_data
) -> None:
    active_path, previous_path = {
        "float-shadowed-by-int8": (tiny.float, tiny.int8),  # float in, the previous quantizes
        "digits-shadowed-by-tiny": (digits_int8.tflite, tiny.float),  # int8 in, dequantized for it
    }[pair]
    xs = digits_data.x_test[:240]
    active = ModelRunner.from_file(active_path, name="m", version="2")
    previous = ModelRunner.from_file(previous_path, name="m", version="1", record_stats=False)
    worker = ShadowWorker(max_jobs=10_000, max_bytes=1 << 30)  # nothing dropped here
    worker.start()
    shadow = Shadow(active=active, runner=previous, k=k, submit=worker.submit)
    active.set_tap(shadow.offer)
    try:
        run_calls(active, xs)
        assert worker.wait_idle(60)
    finally:
        worker.stop()
    sampled = np.arange(k - 1, len(xs), k)  # calls k, 2k, 3k, ... (1-based)
    want = top1_on(active_path, xs[sampled]) == top1_on(previous_path, xs[sampled])
    assert 0 < want.sum() < len(sampled), "the two models must disagree sometimes for this test"
    report = shadow.report()
    assert report == {
        "against": "1",
        "k": k,
        "sampled": len(sampled),
        "compared": len(sampled),
        "agreed": int(want.sum()),
        "dropped": 0,
        "errors": 0,
    }


def test_a_previous_model_that_fails_changes_no_answer(tiny: TinyModels, digits_int8, digits_data) -> None:
    """The previous version refuses every sample (it takes other inputs): each failure is
    counted, and every answer is what the model gives without any shadow."""
    xs = digits_data.x_test[:100]
    reference = run_calls(ModelRunner.from_file(digits_int8.tflite), xs)
    active = ModelRunner.from_file(digits_int8.tflite, name="digits", version="2")
    failing = ModelRunner.from_file(tiny.multi, name="digits", version="1", record_stats=False)
    worker = ShadowWorker(max_jobs=1000)
    worker.start()
    shadow = Shadow(active=active, runner=failing, k=1, submit=worker.submit)
    active.set_tap(shadow.offer)
    try:
        got = run_calls(active, xs)
        assert worker.wait_idle(60)
    finally:
        worker.stop()
    np.testing.assert_array_equal(got, reference)
    report = shadow.report()
    assert report["sampled"] == report["errors"] == 100 and report["compared"] == report["agreed"] == 0
    assert active.stats.snapshot().errors == 0  # the shadow's failures are not the model's


@pytest.mark.parametrize("bound", ["jobs", "bytes"])
def test_the_queue_bound_holds_under_a_burst(bound: str, tiny: TinyModels, digits_int8, digits_data) -> None:
    """Two threads send 3,000 calls as fast as the fast path answers them, every one sampled:
    the queue never holds more than its bound, the rest is dropped and counted, and
    sampled = compared + dropped + errors once the worker is done."""
    active = ModelRunner.from_file(digits_int8.tflite, name="digits", version="2")
    previous = ModelRunner.from_file(tiny.float, name="digits", version="1", record_stats=False)
    spec = active.inputs[0]
    q = np.clip(np.round(digits_data.x_test[:100] / spec.scale[0]) + spec.zero_point[0], -128, 127).astype(
        np.int8
    )
    reference = [active.predict(qi[None]).copy() for qi in q]
    # one sample holds 64 input and 10 output bytes
    worker = ShadowWorker(max_jobs=4) if bound == "jobs" else ShadowWorker(max_bytes=160)
    limit = 4 if bound == "jobs" else 2
    worker.start()
    shadow = Shadow(active=active, runner=previous, k=1, submit=worker.submit)
    active.set_tap(shadow.offer)
    wrong: list[int] = []

    def burst() -> None:
        for i in range(1500):
            if not np.array_equal(active.predict(q[i % 100][None]), reference[i % 100]):
                wrong.append(i)

    try:
        threads = [threading.Thread(target=burst) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert worker.wait_idle(60)
    finally:
        worker.stop()
    report = shadow.report()
    assert wrong == []
    assert worker.high_water <= limit
    assert report["sampled"] == 3000 and report["errors"] == 0
    assert report["dropped"] > 0
    assert report["sampled"] == report["compared"] + report["dropped"] + report["errors"]


def test_compare_values_within_tolerance_and_classes_by_top1() -> None:
    from agent.model_card import TensorSpec

    vals = [TensorSpec("y", (1, 3, 1), "float32")]  # not [1, C]: compared value by value
    old = [np.array([[1.0, -2.0, 100.0], [0.0, 0.0, 0.0]], np.float32).reshape(2, 3, 1)]
    # tolerance: 1e-3 + 1e-2 * max|old| per row: 1.001, then 0.001
    near = [old[0] + np.array([[0.5, 0.5, 0.5], [0.0009, 0.0, 0.0]], np.float32).reshape(2, 3, 1)]
    far = [old[0] + np.array([[0.0, 0.0, 2.1], [0.002, 0.0, 0.0]], np.float32).reshape(2, 3, 1)]
    assert compare_outputs(near, old, vals, vals) == (2, 2)
    assert compare_outputs(far, old, vals, vals) == (2, 0)
    probs = [TensorSpec("p", (1, 3), "float32")]
    codes = [TensorSpec("p", (1, 3), "int8", (1 / 256,), (-128,))]
    new = [np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], np.float32)]
    prev = [np.array([[-128, 100, -100], [-128, 100, -100]], np.int8)]  # top-1 class 1 twice
    assert compare_outputs(new, prev, probs, codes) == (2, 1)
    # int8 codes for an input of another encoding are handed over as floats
    x = [np.array([[-128, 0, 127]], np.int8)]
    got = previous_inputs(x, [TensorSpec("x", (1, 3), "int8", (0.5,), (0,))], probs)
    np.testing.assert_array_equal(got[0], [[-64.0, 0.0, 63.5]])
    assert previous_inputs(x, codes, codes)[0] is x[0]


def test_a_replaced_runner_is_freed_without_the_cyclic_gc(tiny: TinyModels) -> None:
    """An idle agent seldom runs the cyclic GC: a runner (and its interpreter) must go as soon
    as nothing refers to it, also after a shadow came and went. (A reference cycle through the
    sketch's failure callback once kept every replaced MobileNetV2, +11 MB per version.)"""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        active = ModelRunner.from_file(tiny.float, name="m", version="2")
        previous = ModelRunner.from_file(tiny.int8, name="m", version="1", record_stats=False)
        worker = ShadowWorker()
        worker.start()
        shadow = Shadow(active=active, runner=previous, k=1, submit=worker.submit)
        active.set_tap(shadow.offer)
        active.stats.shadow = shadow.report
        for _ in range(5):
            active.predict(np.zeros((1, 8, 8, 1), np.float32))
        assert worker.wait_idle(30)
        gone = weakref.ref(active), weakref.ref(previous)
        # what ShadowManager.detach does, then the registry lets go
        active.stats.shadow = None
        active.set_tap(None)
        shadow.close()
        del active, previous, shadow
        assert [r() for r in gone] == [None, None]
        worker.stop()
    finally:
        gc.enable()
