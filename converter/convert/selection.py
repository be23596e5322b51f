"""``--quantize auto``: pick a variant from measured candidates. Pure: no TensorFlow, no I/O.

The rule, applied by :func:`choose_variant` and documented in docs/converter.md:

1. A candidate that failed to convert is out.
2. A candidate whose accuracy drop exceeds ``max_accuracy_drop`` points is
   out. The drop is the source model's top-1 accuracy minus the candidate's
   when labels were given, else the candidate's top-1 disagreement with the
   source model in percent.
3. A candidate slower (p50) than the float32 conversion by more than
   ``tie_tolerance`` (5 %) is out: it would buy size at the cost of speed, and
   auto optimises speed. (Dynamic-range models often land here with XNNPACK.)
4. Of the rest, the fastest p50 wins; candidates within ``tie_tolerance`` of
   the fastest count as equally fast. Among equally fast ones int8 wins (a
   full-integer model runs on any integer unit and gives the same results on
   every CPU), then the smallest file, then a fixed order of modes.

Every comparison of speeds has the same tolerance, and ties are broken by
things that do not change between runs (the mode, the file size): timing noise
smaller than 5 % cannot change the choice. It used to: rule 3 was a strict
``>``, and an int8 model 1.6 % slower than float32 in one of six runs was
refused there, so that run chose dynamic (issue 12). The choice can still
differ between runs when two candidates' speeds differ by about 5 % itself.

The float32 candidate (``none``) is the baseline and is always measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from converter.errors import ConversionError

BASELINE = "none"
DEFAULT_CANDIDATES = ("none", "float16", "dynamic", "int8")
DEFAULT_MAX_ACCURACY_DROP = 1.0
TIE_TOLERANCE = 0.05
# the last tie-break: a fixed order, never a measurement
MODE_ORDER = ("int8", "int16x8", "dynamic", "float16", "none")


@dataclass(frozen=True)
class Candidate:
    """What was measured of one converted variant (plain numbers only)."""

    mode: str
    size_bytes: int = 0
    latency_ms_p50: float = 0.0
    accuracy: float | None = None  # percent, with labels
    agreement: float | None = None  # percent of top-1 equal to the source model
    error: str | None = None  # why it could not be converted


@dataclass(frozen=True)
class Selection:
    mode: str
    reason: str
    rejected: dict[str, str] = field(default_factory=dict)


def accuracy_drop(candidate: Candidate, source_accuracy: float | None) -> float | None:
    """Points lost against the source model (see rule 2); None if unmeasurable."""
    if source_accuracy is not None and candidate.accuracy is not None:
        return source_accuracy - candidate.accuracy
    if candidate.agreement is not None:
        return 100.0 - candidate.agreement
    return None


def _tie_break(c: Candidate) -> tuple[bool, int, int]:
    """Among equally fast candidates: int8, then the smallest file, then the mode order."""
    order = MODE_ORDER.index(c.mode) if c.mode in MODE_ORDER else len(MODE_ORDER)
    return (c.mode != "int8", c.size_bytes, order)


def choose_variant(
    candidates: Sequence[Candidate],
    *,
    source_accuracy: float | None,
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    tie_tolerance: float = TIE_TOLERANCE,
) -> Selection:
    """Apply the module's rule; raise :class:`ConversionError` if nothing qualifies."""
    rejected: dict[str, str] = {}
    by_mode = {c.mode: c for c in candidates}
    base = by_mode.get(BASELINE)
    base_p50 = base.latency_ms_p50 if base is not None and base.error is None else None
    labelled = source_accuracy is not None
    eligible: list[Candidate] = []
    for c in candidates:
        if c.error is not None:
            rejected[c.mode] = f"could not be converted: {c.error}"
            continue
        drop = accuracy_drop(c, source_accuracy)
        if drop is None:
            rejected[c.mode] = "no top-1 measure (the first output is not class scores)"
            continue
        if drop > max_accuracy_drop + 1e-9:
            rejected[c.mode] = (
                f"loses {drop:.2f} points of top-1 accuracy, more than {max_accuracy_drop:g}"
                if labelled
                else f"top-1 differs from the source on {drop:.2f} % of samples, "
                f"more than {max_accuracy_drop:g}"
            )
            continue
        if (
            base_p50 is not None
            and c.mode != BASELINE
            and c.latency_ms_p50 > base_p50 * (1.0 + tie_tolerance)
        ):
            rejected[c.mode] = (
                f"slower than float32 (p50 {c.latency_ms_p50:.4g} ms > {base_p50:.4g} ms "
                f"by more than {tie_tolerance:.0%})"
            )
            continue
        eligible.append(c)
    if not eligible:
        detail = "; ".join(f"{m}: {why}" for m, why in rejected.items())
        raise ConversionError(f"auto found no acceptable variant ({detail})")
    fastest = min(c.latency_ms_p50 for c in eligible)
    tied = [c for c in eligible if c.latency_ms_p50 <= fastest * (1.0 + tie_tolerance)]
    best = min(tied, key=_tie_break)
    for c in eligible:
        if c is best:
            continue
        if c in tied:
            rejected[c.mode] = (
                f"as fast as {best.mode} (p50 {c.latency_ms_p50:.4g} ms, within "
                f"{tie_tolerance:.0%}), "
                + (
                    "int8 preferred"
                    if best.mode == "int8"
                    else f"but larger ({c.size_bytes} bytes > {best.size_bytes})"
                )
            )
        else:
            rejected[c.mode] = (
                f"slower than {best.mode} (p50 {c.latency_ms_p50:.4g} ms > {best.latency_ms_p50:.4g} ms)"
            )
    drop = accuracy_drop(best, source_accuracy)
    within = (
        f"within {max_accuracy_drop:g} point(s) of the source's top-1 accuracy"
        if labelled
        else f"whose top-1 differs from the source on at most {max_accuracy_drop:g} % of samples"
    )
    reason = (
        f"{best.mode}: the fastest variant {within} (p50 {best.latency_ms_p50:.4g} ms"
        + (f" vs float32 {base_p50:.4g} ms" if base_p50 is not None and best.mode != BASELINE else "")
        + (f", drop {drop:.2f} points" if labelled else f", differs on {drop:.2f} %")
        + f", {best.size_bytes} bytes)"
    )
    return Selection(mode=best.mode, reason=reason, rejected=rejected)
