"""The output distribution sketch: what a model answered, in fixed buckets every device shares.

Three producers and one format: the agent records a sketch of every model version it serves
(:class:`ClassRecorder` / :class:`ValueRecorder`, on the inference path, see
:mod:`agent.serving.inference`), ``litefleet convert`` records one of the chosen variant on its
validation data in the model card (``output_baseline``), and the rollout controller compares
them. docs/agent-api.md ("Output sketch") describes the JSON; docs/protocol.md the wire.

A model is a **classifier** when its first output (the runtime's output 0) has shape ``[1, C]``
or ``[C]`` with ``C >= 2``. Its sketch (kind ``classes``) counts the top-1 class index, and the
top-1 confidence in 20 buckets of width 0.05 over [0, 1] (bucket k holds
``k/20 <= confidence < (k+1)/20``; 1.0 falls in the last). The confidence is the top-1 value
when the dequantized row already is a probability vector (every value within one quantum of
[0, 1] and the sum within ``0.01 + C * scale / 2`` of 1; ``scale`` = 0 for float outputs), else
the top-1 softmax probability of the row. Above :data:`SMALL_CLASSES` classes the recorder
checks that on every row only until the model has shown what its rows are (see
:meth:`ClassRecorder._large`); for a model whose rows are all alike, which every real
classifier's are, that is the same rule. Any other model's sketch (kind ``values``) is a
histogram of the first output's dequantized elements over :data:`VALUE_EDGES`: signed
quarter-octave buckets from 2**-16 to 2**16 in magnitude, a zero bucket ``[-2**-16, 2**-16)``,
and an open bucket at each end.

Guarantees:

- Buckets are fixed for every model, version, device and converter, so sketches add up
  (:meth:`Sketch.plus`) and difference (:meth:`Sketch.minus`) across messages and devices.
- The recorders allocate their counters once; recording one row costs a few list operations
  for ``C <= 64`` classes (~1.5 µs), an argmax (and now and then two reductions) above
  (``bench/RESULTS.md``, "Rollouts"). They are not thread-safe: the model runner calls them
  under its own lock.
- :meth:`Sketch.from_json` accepts exactly what :meth:`Sketch.to_json` writes (buckets from the
  fixed scheme, counts that add up) and raises :class:`SketchError` for anything else, so a
  consumer can skip a junk sketch instead of trusting it.
- Everything except the recorders' counters is pure.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # agent.model_card reads baselines with this module: no import back
    from agent.model_card import TensorSpec

CONFIDENCE_BUCKETS = 20
# upper bounds of the confidence buckets, as the JSON writes them
CONFIDENCE_UPPER = tuple(round((k + 1) / CONFIDENCE_BUCKETS, 2) for k in range(CONFIDENCE_BUCKETS))
# classes above this count use numpy reductions; below, list operations are cheaper
# (measured: tolist + max/index/min/sum on 10 floats ~1 µs, three numpy reductions ~6 µs)
SMALL_CLASSES = 64
MAX_CLASSES = 1 << 20  # what a sketch may name (a junk guard for parsers)
# rows of more than SMALL_CLASSES classes: checked one by one at first, then 1 in RECHECK_EVERY
DECIDE_ROWS = 16
RECHECK_EVERY = 64
_UNDECIDED, _PROBS, _SCORES, _PER_ROW = range(4)
SUB_BUCKETS = 4  # per power of two
MIN_EXP, MAX_EXP = -16, 16


def _value_edges() -> tuple[float, ...]:
    mags = [2.0**e * (1 + j / SUB_BUCKETS) for e in range(MIN_EXP, MAX_EXP) for j in range(SUB_BUCKETS)]
    mags.append(2.0**MAX_EXP)
    return (*(-m for m in reversed(mags)), *mags)


# bucket i of a values histogram holds VALUE_EDGES[i-1] <= x < VALUE_EDGES[i]; bucket 0 is
# (-inf, -2**16), the last [2**16, inf) (and NaN). Its upper bound is VALUE_EDGES[i] (None: open).
VALUE_EDGES = _value_edges()
VALUE_BUCKETS = len(VALUE_EDGES) + 1
_EDGE_INDEX = {edge: i for i, edge in enumerate(VALUE_EDGES)}
_EDGES_ARRAY = np.asarray(VALUE_EDGES, dtype=np.float64)


class SketchKind(StrEnum):
    CLASSES = "classes"
    VALUES = "values"


class SketchError(ValueError):
    """A sketch document that is not one :meth:`Sketch.to_json` could have written."""


def classifier_classes(shape: Sequence[int]) -> int | None:
    """``C`` when a first output of ``shape`` makes its model a classifier, else None."""
    dims = tuple(int(d) for d in shape)
    if len(dims) == 2 and dims[0] == 1 and dims[1] >= 2:
        return dims[1]
    if len(dims) == 1 and dims[0] >= 2:
        return dims[0]
    return None


# -- the record ----------------------------------------------------------------------------------
Pairs = tuple[tuple[Any, int], ...]


@dataclass(frozen=True)
class Sketch:
    """One sketch: ``n`` rows (inferences) and the non-empty buckets, ascending.

    ``classes``: ``(class index, count)``; ``confidence``: ``(upper bound, count)``;
    ``histogram`` (values): ``(upper bound or None for the open top bucket, count)``.
    """

    kind: SketchKind
    n: int = 0
    classes: tuple[tuple[int, int], ...] = ()
    confidence: tuple[tuple[float, int], ...] = ()
    histogram: tuple[tuple[float | None, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        if self.kind is SketchKind.CLASSES:
            return {
                "kind": self.kind.value,
                "n": self.n,
                "classes": [list(p) for p in self.classes],
                "confidence": [list(p) for p in self.confidence],
            }
        return {"kind": self.kind.value, "n": self.n, "histogram": [list(p) for p in self.histogram]}

    @classmethod
    def from_json(cls, doc: object) -> Sketch:
        """Parse and check a sketch document; :class:`SketchError` for anything else."""
        if not isinstance(doc, Mapping):
            raise SketchError("a sketch is a JSON object")
        try:
            kind = SketchKind(str(doc.get("kind")))
        except (ValueError, TypeError) as exc:
            raise SketchError(f"unknown sketch kind {str(doc.get('kind'))[:40]!r}") from exc
        n = _count(doc.get("n"), "n")
        if kind is SketchKind.CLASSES:
            classes = _pairs(doc.get("classes"), "classes", _class_key)
            confidence = _pairs(doc.get("confidence"), "confidence", _confidence_key)
            if sum(c for _, c in classes) != n or sum(c for _, c in confidence) != n:
                raise SketchError("class and confidence counts must each add up to n")
            return cls(kind, n, classes=classes, confidence=confidence)
        histogram = _pairs(doc.get("histogram"), "histogram", _value_key)
        if n == 0 and histogram:
            raise SketchError("a values histogram with n = 0 must be empty")
        return cls(kind, n, histogram=histogram)

    def _combine(self, other: Sketch, sign: int) -> Sketch:
        if other.kind is not self.kind:
            raise SketchError(f"cannot combine a {self.kind} sketch with a {other.kind} one")

        def merge(a: Pairs, b: Pairs) -> Pairs:
            counts: dict[Any, int] = dict(a)
            for key, c in b:
                counts[key] = counts.get(key, 0) + sign * c
            if any(c < 0 for c in counts.values()):
                raise SketchError("a count went down: not the same sketch (a restart?)")
            return tuple((k, c) for k, c in sorted(counts.items(), key=_order) if c)

        n = self.n + sign * other.n
        if n < 0:
            raise SketchError("n went down: not the same sketch (a restart?)")
        return Sketch(
            self.kind,
            n,
            classes=merge(self.classes, other.classes),
            confidence=merge(self.confidence, other.confidence),
            histogram=merge(self.histogram, other.histogram),
        )

    def plus(self, other: Sketch) -> Sketch:
        """The sketch of both sets of rows (two devices, two intervals)."""
        return self._combine(other, 1)

    def minus(self, earlier: Sketch) -> Sketch:
        """The rows since ``earlier`` (a previous message of the same boot and version);
        :class:`SketchError` when a count went down."""
        return self._combine(earlier, -1)


def _order(item: tuple[Any, int]) -> float:
    key = item[0]
    return math.inf if key is None else float(key)


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SketchError(f"{what} must be a non-negative integer")
    return value


def _class_key(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_CLASSES:
        raise SketchError(f"class index must be an integer in 0..{MAX_CLASSES - 1}")
    return value


def _confidence_key(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value not in CONFIDENCE_UPPER:
        raise SketchError("confidence bucket bounds are 0.05, 0.1, ..., 1.0")
    return float(value)


def _value_key(value: object) -> float | None:
    if value is None:
        return None
    # value in the table compares an int of any size without converting it (float(10**400) raises)
    if isinstance(value, bool) or not isinstance(value, int | float) or value not in _EDGE_INDEX:
        raise SketchError("histogram bounds must be edges of the fixed value buckets")
    return float(value)


def _pairs(value: object, what: str, key: Callable[[object], Any]) -> Pairs:
    if not isinstance(value, list) or len(value) > MAX_CLASSES:
        raise SketchError(f"{what} must be a list of [bucket, count] pairs")
    out: list[tuple[Any, int]] = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2:
            raise SketchError(f"{what} must be a list of [bucket, count] pairs")
        out.append((key(item[0]), _count(item[1], f"a {what} count")))
    order = [_order(p) for p in out]
    if any(b <= a for a, b in itertools.pairwise(order)):
        raise SketchError(f"{what} buckets must be ascending and distinct")
    return tuple(out)


# -- the recorders (the inference path) ------------------------------------------------------
class ClassRecorder:
    """Counts of a classifier's top-1 class and confidence; see the module doc for the rule."""

    __slots__ = (
        "_czp",
        "_hi",
        "_lo",
        "_mode",
        "_need_hi",
        "_need_lo",
        "_rows",
        "_scale",
        "_sum_tol",
        "_zp",
        "classes",
        "confidence",
        "record",
    )

    def __init__(self, spec: TensorSpec) -> None:
        c = classifier_classes(spec.shape)
        if c is None:
            raise ValueError(f"output shape {list(spec.shape)} is not a classifier's")
        scale = spec.scale[0] if spec.quantized and len(spec.scale) == 1 else 0.0
        self._scale = scale or 1.0  # the unit of the raw values (1: floats)
        self._zp = float(spec.zero_point[0]) if scale else 0.0
        self._czp = c * self._zp
        quantum = scale or 1e-6
        self._lo, self._hi = -quantum, 1.0 + quantum
        self._sum_tol = 0.01 + c * scale / 2
        # a bound no code of this encoding can cross needs no check: TF Lite's int8 softmax
        # (scale 1/256, zero point -128) spans [0, 255/256] (measured: the checks cost ~8 µs of
        # ~20 µs per MobileNetV2 row under load)
        self._need_lo = self._need_hi = True
        if scale:
            info = np.iinfo(spec.dtype)
            self._need_lo = (info.min - self._zp) * scale < self._lo
            self._need_hi = (info.max - self._zp) * scale > self._hi
        self._mode = _UNDECIDED  # how the numpy path checks rows, see _large
        self._rows = 0
        self.classes = [0] * c
        self.confidence = [0] * CONFIDENCE_BUCKETS
        self.record: Callable[[np.ndarray], None] = self._small if c <= SMALL_CLASSES else self._large
        if spec.quantized and len(spec.scale) > 1:  # per-channel scores: rare; dequantize whole rows
            self.record = self._per_channel(spec)

    def reset(self) -> None:
        self.classes[:] = [0] * len(self.classes)
        self.confidence[:] = [0] * CONFIDENCE_BUCKETS
        self._mode, self._rows = _UNDECIDED, 0

    def counts(self) -> RecorderCounts:
        """A copy of the counters (the caller holds the runner's lock)."""
        return RecorderCounts(SketchKind.CLASSES, tuple(self.classes), tuple(self.confidence))

    def _bump(self, i: int, conf: float) -> None:
        if conf >= 1.0:
            b = CONFIDENCE_BUCKETS - 1
        elif conf > 0.0:
            b = int(conf * CONFIDENCE_BUCKETS)
        else:  # 0, negative, NaN
            b = 0
        self.classes[i] += 1
        self.confidence[b] += 1

    def _small(self, y: np.ndarray) -> None:
        # one Python frame, builtins only: right after a REST request's JSON and HTTP work the
        # caches are cold, and every extra frame or numpy call costs microseconds there
        rows = y.tolist()
        sc, zp = self._scale, self._zp
        for r in rows if y.ndim == 2 else (rows,):
            top = max(r)
            conf = (top - zp) * sc
            if not (
                (not self._need_lo or (min(r) - zp) * sc >= self._lo)
                and (not self._need_hi or conf <= self._hi)
                and abs((sum(r) - self._czp) * sc - 1.0) <= self._sum_tol
            ):
                conf = 1.0 / math.fsum([math.exp((v - top) * sc) for v in r])
            self.classes[r.index(top)] += 1
            if conf >= 1.0:
                self.confidence[CONFIDENCE_BUCKETS - 1] += 1
            elif conf > 0.0:
                self.confidence[int(conf * CONFIDENCE_BUCKETS)] += 1
            else:  # 0, negative, NaN
                self.confidence[0] += 1

    def _is_probabilities(self, row: np.ndarray, top: float) -> bool:
        sc, zp = self._scale, self._zp
        return (
            (not self._need_lo or (float(row.min()) - zp) * sc >= self._lo)
            and (not self._need_hi or (top - zp) * sc <= self._hi)
            and abs((float(row.sum()) - self._czp) * sc - 1.0) <= self._sum_tol
        )

    def _large(self, y: np.ndarray) -> None:
        """Rows of many classes. Right after an inference the caches are cold and every
        numpy reduction costs ~5-17 µs (measured on MobileNetV2's 1,000 int8 scores: the sum
        17 µs, a row checked in full 31 µs, 1 % of the inference), so the numpy path checks
        every row only until the model has shown what its rows are: the first
        :data:`DECIDE_ROWS` rows, then every :data:`RECHECK_EVERY`-th; a row that contradicts
        the others makes every later row checked. A model whose rows are all alike (softmax
        scores, or logits: every real classifier) gets exactly the per-row rule."""
        if y.size != len(self.classes):  # a batch: row by row
            for row in y.reshape(-1, len(self.classes)):
                self._large(row)
            return
        # one row, in whatever shape: its flat argmax is the class (two numpy calls in all)
        i = int(y.argmax())
        top = y.item(i)
        self._rows += 1
        mode = self._mode
        if mode == _PER_ROW or self._rows <= DECIDE_ROWS or self._rows % RECHECK_EVERY == 0:
            probs = self._is_probabilities(y, top)
            if mode == _UNDECIDED:
                self._mode = _PROBS if probs else _SCORES
            elif mode != _PER_ROW and (mode == _PROBS) != probs:
                self._mode = _PER_ROW
        else:
            probs = mode == _PROBS
        sc = self._scale
        if probs:
            conf = (top - self._zp) * sc
        else:
            conf = float(1.0 / np.exp((y.astype(np.float64) - top) * sc).sum())
        self._bump(i, conf)

    def _per_channel(self, spec: TensorSpec) -> Callable[[np.ndarray], None]:
        scale = np.asarray(spec.scale, dtype=np.float64)
        zp = np.asarray(spec.zero_point, dtype=np.float64)
        self._scale, self._zp, self._czp = 1.0, 0.0, 0.0
        self._sum_tol = 0.01 + len(self.classes) * float(scale.max()) / 2

        def record(y: np.ndarray) -> None:
            self._large(((y.reshape(-1, len(self.classes)) - zp) * scale).astype(np.float64))

        return record


class ValueRecorder:
    """A histogram of the first output's dequantized elements over :data:`VALUE_EDGES`."""

    __slots__ = ("_scale", "_zp", "hist", "rows")

    def __init__(self, spec: TensorSpec) -> None:
        self.hist = np.zeros(VALUE_BUCKETS, dtype=np.int64)
        self.rows = [0]
        q = spec.quantized
        self._scale = np.asarray(spec.scale, dtype=np.float32) if q else None
        self._zp = np.asarray(spec.zero_point, dtype=np.float32) if q else None

    def reset(self) -> None:
        self.hist[:] = 0
        self.rows[0] = 0

    def counts(self) -> RecorderCounts:
        """A copy of the counters (the caller holds the runner's lock)."""
        return RecorderCounts(SketchKind.VALUES, tuple(self.hist.tolist()), rows=self.rows[0])

    def record(self, y: np.ndarray) -> None:
        v = y
        if self._scale is not None and self._zp is not None:
            v = (y.astype(np.float32) - self._zp) * self._scale
        idx = np.searchsorted(_EDGES_ARRAY, v.reshape(-1), side="right")
        self.hist += np.bincount(idx, minlength=VALUE_BUCKETS)
        self.rows[0] += y.shape[0] if y.ndim > 1 else 1  # the first axis is the batch


OutputRecorder = ClassRecorder | ValueRecorder


def recorder_for(spec: TensorSpec) -> OutputRecorder:
    """The recorder for a model whose first output is ``spec``."""
    return ClassRecorder(spec) if classifier_classes(spec.shape) is not None else ValueRecorder(spec)


@dataclass(frozen=True)
class RecorderCounts:
    """A copy of a recorder's counters, taken under the runner's lock (cheap: list copies)."""

    kind: SketchKind
    first: tuple[int, ...]  # classes, or value buckets
    second: tuple[int, ...] = ()  # confidence buckets
    rows: int = 0

    def sketch(self) -> Sketch:
        """The JSON-ready sketch (built at report time, off the inference path)."""
        if self.kind is SketchKind.CLASSES:
            return Sketch(
                self.kind,
                sum(self.first),
                classes=tuple((i, c) for i, c in enumerate(self.first) if c),
                confidence=tuple((CONFIDENCE_UPPER[k], c) for k, c in enumerate(self.second) if c),
            )
        return Sketch(
            self.kind,
            self.rows,
            histogram=tuple(
                (VALUE_EDGES[i] if i < len(VALUE_EDGES) else None, c) for i, c in enumerate(self.first) if c
            ),
        )


def value_bucket(x: float) -> int:
    """The values bucket of one number (the same as the recorder's; for tests and tools)."""
    return bisect.bisect_right(VALUE_EDGES, x)
