"""ModelRunner and the in-process API: arithmetic (pure), locking and failures
(with a fake interpreter), and real LiteRT models (built once by TensorFlow in
a child process, see test_inference_models.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agent
from agent.errors import BadRequestError, InferenceError
from agent.model_card import TensorSpec
from agent.serving.inference import ModelRunner, dequantize, quantize
from agent.serving.registry import ActiveModel, ModelRegistry
from agent.serving.runtime import load_interpreter
from tests.support.tiny_models import TinyModels, models_for


@pytest.fixture(scope="session")
def tiny_models(request: pytest.FixtureRequest) -> TinyModels:
    return models_for(request)


I8 = TensorSpec("x", (1, 4), "int8", scale=(0.5,), zero_point=(-3,))


# -- quantization arithmetic (pure) ---------------------------------------------------
def test_quantize_rounds_half_away_from_zero_and_saturates() -> None:
    x = np.array([[0.25, -0.25, 0.75, -0.75]], np.float32)  # /0.5 = ±0.5, ±1.5
    assert quantize(x, I8).tolist() == [[-2, -4, -1, -5]]
    big = np.array([[1000.0, -1000.0, 63.0, -62.5]], np.float32)
    assert quantize(big, I8).tolist() == [[127, -128, 123, -128]]
    # just below a half: float32 arithmetic would round 0.49999997 + 0.5 up to 1.0
    unit = TensorSpec("x", (1, 4), "int8", scale=(1.0,), zero_point=(0,))
    below = [np.nextafter(np.float32(v), np.float32(0)) for v in (0.5, -0.5, 1.5, -1.5)]
    assert quantize(np.array([below], np.float32), unit).tolist() == [[0, 0, 1, -1]]
    ties = np.array([[0.5, -0.5, 1.5, -2.5]], np.float32)
    assert quantize(ties, unit).tolist() == [[1, -1, 2, -3]]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-30000, 30000, allow_nan=False, width=32), min_size=1, max_size=8))
def test_rounding_matches_std_round(values: list[float]) -> None:
    import math

    spec = TensorSpec("x", (1, len(values)), "int16", scale=(1.0,), zero_point=(0,))
    want = [int(math.copysign(math.floor(abs(v) + 0.5), v)) for v in values]  # exact in float64
    assert quantize(np.array([values], np.float32), spec).tolist() == [want]


def test_quantize_per_channel_uses_the_last_axis() -> None:
    spec = TensorSpec("x", (1, 2), "int8", scale=(1.0, 0.1), zero_point=(0, 5))
    assert quantize(np.array([[3.0, 0.3]], np.float32), spec).tolist() == [[3, 8]]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-60, 60, allow_nan=False, width=32), min_size=4, max_size=4))
def test_dequantize_inverts_quantize_within_half_a_step(values: list[float]) -> None:
    x = np.array([values], np.float32)
    back = dequantize(quantize(x, I8), I8)
    assert back.dtype == np.float32
    assert np.all(np.abs(back - x) <= 0.25 + 1e-6)


# -- a fake interpreter: locking and runtime failures --------------------------------
class FakeInterpreter:
    """Doubles its input; can be told to fail; notices overlapping invocations."""

    def __init__(self, *, fail: bool = False, delay_s: float = 0.0) -> None:
        self.fail = fail
        self.delay_s = delay_s
        self.busy = False
        self.overlaps = 0
        self.tensors: dict[int, np.ndarray] = {0: np.zeros((1, 2), np.float32)}

    def get_input_details(self) -> list[dict[str, Any]]:
        return [
            {
                "name": "in",
                "index": 0,
                "shape": np.array([1, 2]),
                "dtype": np.float32,
                "quantization": (0.0, 0),
            }
        ]

    def get_output_details(self) -> list[dict[str, Any]]:
        return [
            {
                "name": "out",
                "index": 1,
                "shape": np.array([1, 2]),
                "dtype": np.float32,
                "quantization": (0.0, 0),
            }
        ]

    def set_tensor(self, index: int, value: np.ndarray) -> None:
        if value.shape != (1, 2) or value.dtype != np.float32:
            raise ValueError("Cannot set tensor: Dimension mismatch")
        self.tensors[index] = np.array(value)

    def invoke(self) -> None:
        if self.busy:
            self.overlaps += 1
        self.busy = True
        time.sleep(self.delay_s)
        self.busy = False
        if self.fail:
            raise RuntimeError("kernel exploded")
        self.tensors[1] = self.tensors[0] * 2

    def get_tensor(self, index: int) -> np.ndarray:
        return self.tensors[index].copy()


def test_invocations_never_overlap() -> None:
    fake = FakeInterpreter(delay_s=0.002)
    runner = ModelRunner(fake)
    results: list[bool] = []

    def work(k: int) -> None:
        for _ in range(10):
            x = np.full((1, 2), k, np.float32)
            results.append(bool((runner.predict(x)[0] == 2 * k).all()))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake.overlaps == 0
    assert results == [True] * 40


def test_runtime_failure_is_an_inference_error_and_is_counted() -> None:
    runner = ModelRunner(FakeInterpreter(fail=True), name="m", version="7")
    with pytest.raises(InferenceError, match="m v7: runtime failed: kernel exploded"):
        runner.predict(np.ones((1, 2), np.float32))
    with pytest.raises(InferenceError):
        runner.predict(np.ones((3, 2), np.float64))  # general path too
    snap = runner.stats.snapshot()
    assert (snap.ok, snap.errors, snap.bad_requests) == (0, 2, 0)


def test_stats_count_answers_and_bad_requests_and_can_be_off() -> None:
    runner = ModelRunner(FakeInterpreter())
    runner.predict(np.ones((1, 2), np.float32))  # fast path
    runner.predict([[1, 2], [3, 4]])  # general path, one batch = one answer
    with pytest.raises(BadRequestError):
        runner.predict([[1, 2, 3]])
    snap = runner.stats.snapshot()
    assert (snap.ok, snap.errors, snap.bad_requests, snap.requests) == (2, 0, 1, 3)
    assert snap.quantile_ms(0.5) is not None
    quiet = ModelRunner(FakeInterpreter(), record_stats=False)
    quiet.predict(np.ones((1, 2), np.float32))
    quiet.predict([[1, 2], [3, 4]])
    assert quiet.stats.snapshot().requests == 0


# -- real models ------------------------------------------------------------------
def raw_loop(path: Any, x: np.ndarray) -> np.ndarray:
    """What a user of the bare runtime writes, on a separate interpreter."""
    it = load_interpreter(path)
    i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    it.set_tensor(i, x)
    it.invoke()
    return np.asarray(it.get_tensor(o))


def digits_batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 8, 8, 1), dtype=np.float32)


def test_exact_int8_input_matches_the_bare_runtime(tiny_models: TinyModels) -> None:
    runner = ModelRunner.from_file(tiny_models.int8)
    x = np.random.default_rng(1).integers(-128, 128, (1, 8, 8, 1), dtype=np.int8)
    out = runner.predict(x)
    assert len(out) == 1 and out[0].dtype == np.int8
    np.testing.assert_array_equal(out[0], raw_loop(tiny_models.int8, x))


def test_floats_to_an_int8_model_are_quantized_and_outputs_dequantized(tiny_models: TinyModels) -> None:
    runner = ModelRunner.from_file(tiny_models.int8)
    x = digits_batch(1)
    (out,) = runner.predict(x)
    q = quantize(x, runner.inputs[0])
    want = dequantize(raw_loop(tiny_models.int8, q), runner.outputs[0])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, want)
    # and the caller may ask for the raw integers instead
    (raw,) = runner.predict(x, dequantize_outputs=False)
    assert raw.dtype == np.int8


def test_a_batch_runs_row_by_row_without_resizing(tiny_models: TinyModels) -> None:
    runner = ModelRunner.from_file(tiny_models.int8)
    x = digits_batch(7, seed=3)
    (out,) = runner.predict(x)
    assert out.shape == (7, 10)
    for k in range(7):
        np.testing.assert_array_equal(out[k : k + 1], runner.predict(x[k : k + 1])[0])
    assert runner.inputs[0].shape == (1, 8, 8, 1)
    # one sample may omit the batch axis
    np.testing.assert_array_equal(runner.predict(x[0])[0], out[:1])


def test_float_model_accepts_float64_and_integer_lists(tiny_models: TinyModels) -> None:
    runner = ModelRunner.from_file(tiny_models.float)
    x = digits_batch(2)
    (a,) = runner.predict(x)
    (b,) = runner.predict(x.astype(np.float64))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    (c,) = runner.predict(np.zeros((1, 8, 8, 1), np.int64).tolist())
    assert c.shape == (1, 10) and c.dtype == np.float32


def test_multi_input_model_by_signature_key_tensor_name_or_list(tiny_models: TinyModels) -> None:
    runner = ModelRunner.from_file(tiny_models.multi)
    assert sorted(runner.input_keys) == ["a", "b"]
    assert sorted(runner.output_keys) == ["output_0", "output_1"]
    a, b = np.ones((2, 4), np.float32), np.full((2, 3), 0.5, np.float32)
    by_key = runner.predict({"a": a, "b": b})
    names = {k: s.name for k, s in zip(runner.input_keys, runner.inputs, strict=True)}
    by_name = runner.predict({names["a"]: a, names["b"]: b})
    ordered = [a if k == "a" else b for k in runner.input_keys]
    by_list = runner.predict(ordered)
    for x, y, z in zip(by_key, by_name, by_list, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    assert sorted(o.shape for o in by_key) == [(2, 2), (2, 5)]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((1, 8, 8, 2), np.float32), "does not fit"),
        (np.zeros((8, 8), np.float32), "does not fit"),
        (np.zeros((0, 8, 8, 1), np.float32), "empty batch"),
        (np.full((1, 8, 8, 1), np.nan, np.float32), "NaN"),
        (np.full((1, 8, 8, 1), np.inf, np.float64), "NaN or infinity"),
        (np.full((1, 8, 8, 1), 300, np.int64), "out of range"),
        (np.zeros((1, 8, 8, 1), bool), "expected numbers"),
        ([["a"] * 8] * 8, "expected numbers"),
        ([[1, 2], [3]], "rectangular"),
        ({"nope": np.zeros((1, 8, 8, 1))}, "unknown input"),
        ({}, "missing input"),
    ],
)
def test_caller_mistakes_are_bad_requests(tiny_models: TinyModels, bad: Any, message: str) -> None:
    runner = ModelRunner.from_file(tiny_models.int8)
    with pytest.raises(BadRequestError, match=message) as info:
        runner.predict(bad)
    assert info.value.status == 400
    assert runner.stats.snapshot().bad_requests == 1


def test_multi_input_mistakes(tiny_models: TinyModels) -> None:
    runner = ModelRunner.from_file(tiny_models.multi)
    with pytest.raises(BadRequestError, match="give a mapping"):
        runner.predict(np.ones((1, 4), np.float32))
    with pytest.raises(BadRequestError, match="same batch size"):
        runner.predict({"a": np.ones((2, 4)), "b": np.ones((3, 3))})


def test_concurrent_callers_each_get_their_own_answer(tiny_models: TinyModels) -> None:
    runner = ModelRunner.from_file(tiny_models.int8)
    xs = [digits_batch(1, seed=k) for k in range(6)]
    expected = [runner.predict(x)[0] for x in xs]
    failures: list[int] = []

    def work(k: int) -> None:
        for _ in range(50):
            if not np.array_equal(runner.predict(xs[k])[0], expected[k]):
                failures.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert runner.stats.snapshot().ok == 6 + 300


# -- the in-process API ---------------------------------------------------------------
def test_load_model_predict_like_keras(tiny_models: TinyModels) -> None:
    model = agent.load_model(tiny_models.int8, threads=2)
    assert model.name == "int8" and model.inputs[0].dtype == "int8"
    y = model.predict(digits_batch(3))
    assert isinstance(y, np.ndarray) and y.shape == (3, 10) and y.dtype == np.float32
    assert "int8" in repr(model)
    multi = agent.load_model(tiny_models.multi)
    outs = multi.predict({"a": np.ones((1, 4)), "b": np.ones((1, 3))})
    assert isinstance(outs, list) and len(outs) == 2
    assert len(model.predict_all(digits_batch(1))) == 1


def test_active_models_follow_the_registry(tiny_models: TinyModels) -> None:
    registry = ModelRegistry()
    models = agent.active_models(registry)
    with pytest.raises(BadRequestError) as info:
        models.predict("digits", digits_batch(1))
    assert info.value.status == 404
    v1 = ModelRunner.from_file(tiny_models.int8, name="digits", version="1")
    v2 = ModelRunner.from_file(tiny_models.float, name="digits", version="2")
    registry.activate(ActiveModel("digits", "1", "aa", v1))
    pinned = models.get("digits")
    assert models.predict("digits", digits_batch(1)).shape == (1, 10)
    registry.activate(ActiveModel("digits", "2", "bb", v2))
    models.predict("digits", digits_batch(1))
    assert v2.stats.snapshot().ok == 1
    assert pinned.version == "1" and pinned.predict(digits_batch(1)).shape == (1, 10)
    with pytest.raises(BadRequestError, match="version 1 is not active"):
        models.predict("digits", digits_batch(1), version="1")

    class Daemon:
        registry = ModelRegistry()

    assert agent.active_models(Daemon()).names() == []


def test_import_agent_is_light() -> None:
    code = (
        "import sys, agent; heavy = [m for m in ('numpy', 'agent.serving.api', 'ai_edge_litert', "
        "'tensorflow') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = "import agent; print(agent.load_model.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "agent.serving.api"
