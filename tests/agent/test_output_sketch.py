"""The output sketch: its rule, its fixed buckets, its JSON and its arithmetic (pure, fast)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.model_card import TensorSpec
from agent.output_sketch import (
    CONFIDENCE_UPPER,
    VALUE_BUCKETS,
    VALUE_EDGES,
    ClassRecorder,
    Sketch,
    SketchError,
    SketchKind,
    ValueRecorder,
    classifier_classes,
    recorder_for,
    value_bucket,
)

FLOAT10 = TensorSpec("probs", (1, 10), "float32")
INT8_10 = TensorSpec("probs", (1, 10), "int8", (1 / 256,), (-128,))


def sketch_of(recorder: ClassRecorder | ValueRecorder) -> Sketch:
    return recorder.counts().sketch()


def test_what_a_classifier_is() -> None:
    assert classifier_classes((1, 10)) == 10
    assert classifier_classes((10,)) == 10
    assert classifier_classes((1, 1)) is None  # one score: a value
    assert classifier_classes((1,)) is None
    assert classifier_classes((4, 10)) is None  # a fixed batch of 4 is not [1, C]
    assert classifier_classes((1, 8, 8, 3)) is None
    assert isinstance(recorder_for(FLOAT10), ClassRecorder)
    assert isinstance(recorder_for(TensorSpec("y", (1, 1), "float32")), ValueRecorder)


def test_probabilities_give_their_top_value_and_logits_their_softmax() -> None:
    rec = ClassRecorder(FLOAT10)
    probs = np.full((1, 10), 0.02, np.float32)
    probs[0, 7] = 0.82  # sums to 1.0: a probability vector, confidence 0.82
    rec.record(probs)
    logits = np.zeros((1, 10), np.float32)
    logits[0, 2] = 3.0  # softmax top-1: e^3 / (e^3 + 9) = 0.6905
    rec.record(logits)
    s = sketch_of(rec)
    assert s.kind is SketchKind.CLASSES and s.n == 2
    assert s.classes == ((2, 1), (7, 1))
    assert math.exp(3) / (math.exp(3) + 9) == pytest.approx(0.6905, abs=1e-4)
    assert s.confidence == ((0.7, 1), (0.85, 1))  # [0.65, 0.7) and [0.8, 0.85)


def test_quantized_scores_are_judged_in_dequantized_units() -> None:
    rec = ClassRecorder(INT8_10)
    q = np.full((1, 10), -128, np.int8)  # 0.0
    q[0, 4] = 127  # 255/256 = 0.996: the row sums to ~1, confidence 0.996
    rec.record(q)
    s = sketch_of(rec)
    assert s.classes == ((4, 1),) and s.confidence == ((1.0, 1),)


def test_a_batch_counts_every_row_as_single_calls_would() -> None:
    rng = np.random.default_rng(0)
    rows = rng.random((50, 10)).astype(np.float32)
    one_by_one, batched = ClassRecorder(FLOAT10), ClassRecorder(FLOAT10)
    for r in rows:
        one_by_one.record(r[None])
    batched.record(rows)
    assert sketch_of(batched) == sketch_of(one_by_one)
    assert [c for _, c in sketch_of(batched).classes] == np.bincount(rows.argmax(1)).tolist()


def test_many_classes_take_the_numpy_path_with_the_same_rule() -> None:
    rng = np.random.default_rng(1)
    spec = TensorSpec("p", (1, 1000), "float32")
    rec = ClassRecorder(spec)
    small = ClassRecorder(TensorSpec("p", (1, 1000), "float32"))
    small.record = small._small  # the list path, forced, for comparison
    for _ in range(20):
        row = rng.normal(0, 2, (1, 1000)).astype(np.float32)
        rec.record(row)
        small.record(row)
    assert sketch_of(rec) == sketch_of(small)


def test_many_classes_are_checked_row_by_row_until_the_model_shows_its_kind() -> None:
    """The numpy path checks the first DECIDE_ROWS rows, then 1 in RECHECK_EVERY; a row that
    contradicts the others turns checking on for every later row."""
    from agent.output_sketch import DECIDE_ROWS, RECHECK_EVERY

    rng = np.random.default_rng(2)
    spec = TensorSpec("p", (1, 100), "float32")

    def probs() -> np.ndarray:
        p = rng.random((1, 100)).astype(np.float32) ** 8
        return p / p.sum()

    def logits() -> np.ndarray:
        return rng.normal(0, 0.2, (1, 100)).astype(np.float32)  # sums near 0: not probabilities

    rows = [probs() for _ in range(RECHECK_EVERY * 2)]
    rows[RECHECK_EVERY - 1] = logits()  # a checked row: the contradiction is seen
    rows.append(logits())
    numpy_path, per_row = ClassRecorder(spec), ClassRecorder(spec)
    per_row.record = per_row._small  # the list path checks every row
    for r in rows:
        numpy_path.record(r)
        per_row.record(r)
    assert sketch_of(numpy_path) == sketch_of(per_row)
    # an unchecked row between two checks follows the model's kind so far (documented)
    latched = ClassRecorder(spec)
    sure = np.full((1, 100), 0.04 / 99, np.float32)
    sure[0, 0] = 0.96
    for _ in range(DECIDE_ROWS):
        latched.record(sure)
    odd = np.zeros((1, 100), np.float32)
    odd[0, 5] = 0.3  # sums to 0.3: its softmax top-1 would be 0.013 (bucket 0.05)
    latched.record(odd)
    assert sketch_of(latched).confidence == ((0.35, 1), (1.0, DECIDE_ROWS))  # its top value


def test_nan_and_infinity_never_raise() -> None:
    rec = ClassRecorder(FLOAT10)
    rec.record(np.full((1, 10), np.nan, np.float32))
    y = np.zeros((1, 10), np.float32)
    y[0, 1] = np.inf
    rec.record(y)
    assert sketch_of(rec).n == 2


def test_value_buckets_are_fixed_signed_quarter_octaves() -> None:
    assert len(VALUE_EDGES) == 258 and VALUE_BUCKETS == 259
    assert list(VALUE_EDGES) == sorted(VALUE_EDGES)
    assert VALUE_EDGES[128] == -(2.0**-16) and VALUE_EDGES[129] == 2.0**-16
    assert value_bucket(0.0) == 129  # the zero bucket [-2**-16, 2**-16)
    assert value_bucket(1.0) == value_bucket(1.2) == value_bucket(1.2499) != value_bucket(1.25)
    assert value_bucket(-1e9) == 0 and value_bucket(1e9) == value_bucket(float("nan")) == 258
    rec = ValueRecorder(TensorSpec("y", (1, 4), "float32"))
    rec.record(np.array([[0.0, 1.0, -3.5, 1e9]], np.float32))
    s = sketch_of(rec)
    assert s.n == 1
    assert s.histogram == ((-3.0, 1), (2.0**-16, 1), (1.25, 1), (None, 1))


def test_quantized_values_are_bucketed_dequantized() -> None:
    spec = TensorSpec("y", (1, 3), "int8", (0.5,), (10,))
    rec = ValueRecorder(spec)
    rec.record(np.array([[10, 12, 8]], np.int8))  # 0.0, 1.0, -1.0
    assert sketch_of(rec).histogram == ((-0.875, 1), (2.0**-16, 1), (1.25, 1))


def test_json_round_trip_and_junk_refused() -> None:
    rec = ClassRecorder(FLOAT10)
    rec.record(np.eye(10, dtype=np.float32)[3:4])
    doc = sketch_of(rec).to_json()
    assert doc == {"kind": "classes", "n": 1, "classes": [[3, 1]], "confidence": [[1.0, 1]]}
    assert Sketch.from_json(json.loads(json.dumps(doc))) == sketch_of(rec)
    junk: list[object] = [
        None,
        [],
        {"kind": "quantiles", "n": 1},
        {"kind": "classes", "n": -1, "classes": [], "confidence": []},
        {"kind": "classes", "n": True, "classes": [], "confidence": []},
        {"kind": "classes", "n": 2, "classes": [[3, 1]], "confidence": [[1.0, 1]]},  # does not add up
        {"kind": "classes", "n": 1, "classes": [[3, 1]], "confidence": [[0.33, 1]]},  # not a bucket
        {"kind": "classes", "n": 2, "classes": [[3, 1], [3, 1]], "confidence": [[1.0, 2]]},
        {"kind": "classes", "n": 1, "classes": [["3", 1]], "confidence": [[1.0, 1]]},
        {"kind": "values", "n": 1, "histogram": [[0.3, 1]]},  # not an edge
        {"kind": "values", "n": 1, "histogram": [[None, 1], [1.25, 1]]},  # open bucket is last
        {"kind": "values", "n": 1, "histogram": "1.25"},
        {"kind": "values", "n": 1, "histogram": [[10**400, 1]]},  # no OverflowError either
    ]
    for doc in junk:
        with pytest.raises(SketchError):
            Sketch.from_json(doc)


def test_sketches_add_and_difference() -> None:
    a = Sketch(SketchKind.CLASSES, 3, classes=((1, 2), (4, 1)), confidence=((0.5, 1), (1.0, 2)))
    b = Sketch(SketchKind.CLASSES, 1, classes=((4, 1),), confidence=((1.0, 1),))
    total = a.plus(b)
    assert total.n == 4 and total.classes == ((1, 2), (4, 2)) and total.confidence == ((0.5, 1), (1.0, 3))
    assert total.minus(b) == a
    with pytest.raises(SketchError):
        b.minus(a)  # a count went down: another boot, or junk
    with pytest.raises(SketchError):
        a.plus(Sketch(SketchKind.VALUES, 1, histogram=((None, 1),)))
    assert all(isinstance(u, float) for u in CONFIDENCE_UPPER) and CONFIDENCE_UPPER[-1] == 1.0


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "kind": st.sampled_from(["classes", "values", "x"]) | _json,
            "n": st.integers(-2, 5) | _json,
            "classes": st.lists(st.lists(st.integers(-1, 3) | _json, max_size=3), max_size=4) | _json,
            "confidence": st.lists(
                st.lists(st.sampled_from([0.05, 1.0, 0.3]) | _json, max_size=3), max_size=4
            ),
            "histogram": st.lists(
                st.lists(st.sampled_from([None, 1.25, 0.3]) | _json, max_size=3), max_size=4
            ),
        },
    )
    | _json
)
def test_any_json_is_a_sketch_or_a_sketch_error(doc: object) -> None:
    """A consumer reading sketches off the wire gets a Sketch or SketchError, nothing else."""
    try:
        sketch = Sketch.from_json(doc)
    except SketchError:
        return
    assert Sketch.from_json(sketch.to_json()) == sketch
