"""The output sketch and shadow counts of a metrics message's model entry, as records (pure).

A model-version entry of a metrics message (``docs/agent-api.md``) may carry ``outputs``
(what the model answered since it was loaded: the top-1 class counts and confidence
histogram of a classifier, or a value histogram) and ``shadow`` (how often the version
agreed with the previous one on sampled live requests). Both are cumulative since the
version was loaded, like ``histogram_ms``; ``docs/rollouts.md`` says how the rollout gates
use them.

Guarantees:

* parsing never raises and never returns a half-read record: a field that is absent gives
  ``None`` with no complaint; a field that is present but wrong (not the documented shape,
  a negative or non-integer count, counts that do not add up, a confidence bucket outside
  the fixed 20, more than :data:`MAX_BUCKETS` buckets, a count above :data:`MAX_COUNT`)
  gives ``None`` and a short reason, so the caller can ignore it *and count it*;
* class indices are integers in ``[0, MAX_CLASSES)``, each listed once; histogram bounds
  are finite numbers (``None``: the open bucket), each listed once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

# 2**53: beyond it a JSON number is no longer an exact integer in most parsers
MAX_COUNT = 2**53
MAX_CLASSES = 1 << 20  # as agent.output_sketch
MAX_BUCKETS = 4096
# the classifier sketch's confidence buckets: 20 of width 0.05 over [0, 1], by upper bound
CONFIDENCE_BOUNDS = tuple(round(0.05 * i, 2) for i in range(1, 21))


class SketchKind(StrEnum):
    CLASSES = "classes"
    VALUES = "values"


@dataclass(frozen=True)
class OutputSketch:
    """Cumulative output distribution of one model version on one device."""

    kind: SketchKind
    n: int
    classes: tuple[tuple[int, int], ...] = ()  # (top-1 class index, count)
    confidence: tuple[tuple[float, int], ...] = ()  # (bucket upper bound, count)
    histogram: tuple[tuple[float | None, int], ...] = ()  # values: (upper bound or None, count)


@dataclass(frozen=True)
class ShadowCounts:
    """Cumulative shadow comparison counts; ``off`` says why a shadow asked for is not running."""

    against: str | None = None
    k: int | None = None
    sampled: int = 0
    compared: int = 0
    agreed: int = 0
    dropped: int = 0
    errors: int = 0
    off: str | None = None


class SketchError(ValueError):
    """Why a present field is unusable (short, safe to log)."""


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SketchError(f"{what} is not a count")
    if not math.isfinite(value) or value < 0 or value != int(value) or value > MAX_COUNT:
        raise SketchError(f"{what} is not a count in [0, 2**53]")
    return int(value)


def _pairs(value: Any, what: str) -> list[tuple[Any, int]]:
    if not isinstance(value, list):
        raise SketchError(f"{what} is not a list")
    if len(value) > MAX_BUCKETS:
        raise SketchError(f"{what} has more than {MAX_BUCKETS} buckets")
    out: list[tuple[Any, int]] = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2:
            raise SketchError(f"{what} has an entry that is not a [key, count] pair")
        out.append((item[0], _count(item[1], what)))
    return out


def _class_index(key: Any) -> int:
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < MAX_CLASSES:
        raise SketchError(f"a class index is not an integer in [0, {MAX_CLASSES})")
    return key


def _confidence_bound(key: Any) -> float:
    if isinstance(key, bool) or not isinstance(key, int | float) or not math.isfinite(key):
        raise SketchError("a confidence bound is not a number")
    for bound in CONFIDENCE_BOUNDS:
        if abs(key - bound) < 1e-6:
            return bound
    raise SketchError("a confidence bound is not one of the 20 fixed buckets")


def _value_bound(key: Any) -> float | None:
    if key is None:
        return None
    if isinstance(key, bool) or not isinstance(key, int | float) or not math.isfinite(key):
        raise SketchError("a histogram bound is not a finite number or null")
    return float(key)


def _unique(keys: list[Any], what: str) -> None:
    if len(set(keys)) != len(keys):
        raise SketchError(f"{what} lists a bucket twice")


def _sum_is(pairs: list[tuple[Any, int]], n: int, what: str) -> None:
    if sum(c for _, c in pairs) != n:
        raise SketchError(f"{what} counts do not add up to n")


def _outputs(doc: Any) -> OutputSketch:
    if not isinstance(doc, dict):
        raise SketchError("outputs is not an object")
    try:
        kind = SketchKind(str(doc.get("kind")))
    except ValueError as exc:
        raise SketchError("outputs.kind is neither classes nor values") from exc
    n = _count(doc.get("n"), "outputs.n")
    if kind is SketchKind.CLASSES:
        classes = [(_class_index(k), c) for k, c in _pairs(doc.get("classes", []), "outputs.classes")]
        _unique([k for k, _ in classes], "outputs.classes")
        _sum_is(classes, n, "outputs.classes")
        conf = [(_confidence_bound(k), c) for k, c in _pairs(doc.get("confidence", []), "outputs.confidence")]
        _unique([k for k, _ in conf], "outputs.confidence")
        if conf:
            _sum_is(conf, n, "outputs.confidence")
        return OutputSketch(kind, n, classes=tuple(sorted(classes)), confidence=tuple(sorted(conf)))
    hist = [(_value_bound(k), c) for k, c in _pairs(doc.get("histogram", []), "outputs.histogram")]
    _unique([k for k, _ in hist], "outputs.histogram")
    _sum_is(hist, n, "outputs.histogram")
    return OutputSketch(kind, n, histogram=tuple(hist))


def _text(value: Any, limit: int = 64) -> str | None:
    if isinstance(value, str):
        return value[:limit]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _shadow(doc: Any) -> ShadowCounts:
    if not isinstance(doc, dict):
        raise SketchError("shadow is not an object")
    if "off" in doc:
        return ShadowCounts(off=_text(doc.get("off")) or "unknown")
    counts = {
        key: _count(doc.get(key, 0), f"shadow.{key}")
        for key in ("sampled", "compared", "agreed", "dropped", "errors")
    }
    if counts["agreed"] > counts["compared"] or counts["compared"] > counts["sampled"]:
        raise SketchError("shadow counts do not hold agreed <= compared <= sampled")
    k = doc.get("k")
    return ShadowCounts(
        against=_text(doc.get("against")),
        k=_count(k, "shadow.k") if k is not None else None,
        sampled=counts["sampled"],
        compared=counts["compared"],
        agreed=counts["agreed"],
        dropped=counts["dropped"],
        errors=counts["errors"],
    )


def parse_outputs(value: Any) -> tuple[OutputSketch | None, str | None]:
    """``(sketch, None)``, ``(None, None)`` when absent, ``(None, why)`` when unusable."""
    if value is None:
        return None, None
    try:
        return _outputs(value), None
    except SketchError as exc:
        return None, str(exc)


def parse_shadow(value: Any) -> tuple[ShadowCounts | None, str | None]:
    """``(counts, None)``, ``(None, None)`` when absent, ``(None, why)`` when unusable."""
    if value is None:
        return None, None
    try:
        return _shadow(value), None
    except SketchError as exc:
        return None, str(exc)


def parse_baseline(value: Any) -> tuple[OutputSketch | None, str | None]:
    """A model card's ``output_baseline`` (the same shape as ``outputs``)."""
    return parse_outputs(value)
