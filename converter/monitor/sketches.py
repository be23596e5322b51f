"""The output sketch and shadow counts of a metrics message's model entry, as records (pure).

A model-version entry of a metrics message (``docs/agent-api.md``) may carry ``outputs``
(what the model answered since it was loaded: the top-1 class counts and confidence
histogram of a classifier, or a value histogram) and ``shadow`` (how often the version
agreed with the previous one on sampled live requests). Both are cumulative since the
version was loaded, like ``histogram_ms``; ``docs/rollouts.md`` says how the rollout gates
use them.

One parser per format: ``outputs`` (and a card's ``output_baseline``) are read by
:meth:`agent.output_sketch.Sketch.from_json`, the same code that defines the buckets the
agent writes; this module only turns its verdict into the monitor's "value or reason".

Guarantees:

* parsing never raises and never returns a half-read record: a field that is absent gives
  ``None`` with no complaint; a field that is present but wrong (not the documented shape,
  buckets outside the fixed scheme, counts that are negative or do not add up, shadow counts
  that do not hold ``agreed <= compared <= sampled``, a count above :data:`MAX_COUNT`) gives
  ``None`` and a short reason, so the caller can ignore it *and count it*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from agent.output_sketch import Sketch as OutputSketch
from agent.output_sketch import SketchError, SketchKind

__all__ = ["OutputSketch", "ShadowCounts", "SketchKind", "parse_baseline", "parse_outputs", "parse_shadow"]

# 2**53: beyond it a JSON number is no longer an exact integer in most parsers
MAX_COUNT = 2**53


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


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SketchError(f"{what} is not a count")
    if not math.isfinite(value) or value < 0 or value != int(value) or value > MAX_COUNT:
        raise SketchError(f"{what} is not a count in [0, 2**53]")
    return int(value)


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
        sketch = OutputSketch.from_json(value)
    except SketchError as exc:
        return None, f"outputs: {exc}"
    if sketch.n > MAX_COUNT:
        return None, "outputs.n is not a count in [0, 2**53]"
    return sketch, None


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
