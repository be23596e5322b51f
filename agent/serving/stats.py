"""Per-model counters and a fixed log-bucketed latency histogram.

Guarantees:
- Memory is constant: a :class:`ModelStats` holds :data:`N_BUCKETS` integers,
  two counters and the output sketch's fixed counters
  (:mod:`agent.output_sketch`), however many inferences it records (no list
  of samples).
- Buckets are fixed for every model, version and device, so histograms can
  be subtracted (interval = now - previous) and summed across a fleet.
  Bucket 0 holds latencies under 1.024 µs, the last one those of 2**37 ns
  (137 s) or more; in between, every power of two is split into 8 equal
  sub-buckets, so a quantile read from the histogram is within 6.25 % of the
  true value (the midpoint of a bucket whose width is at most 1/8 of its
  lower bound).
- The bucket of a latency is two list lookups, a shift and a mask
  (:func:`bucket_index`): cheap enough for the inference hot path, which
  inlines the same expression under the model's own lock
  (see :mod:`agent.serving.inference`). A snapshot takes the same lock, so it is
  consistent.

Everything here except :class:`ModelStats` itself is pure.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.output_sketch import OutputRecorder, RecorderCounts

SUB_BITS = 3
SUB = 1 << SUB_BITS  # sub-buckets per power of two
MIN_EXP = 10  # 2**10 ns = 1.024 µs: everything faster lands in bucket 0
MAX_EXP = 37  # 2**37 ns = 137 s: everything slower lands in the last bucket
N_BUCKETS = 1 + (MAX_EXP - MIN_EXP) * SUB + 1


def _tables() -> tuple[tuple[int, ...], tuple[int, ...]]:
    base: list[int] = []
    shift: list[int] = []
    for bits in range(65):  # bits = v.bit_length(), v < 2**64
        if bits <= MIN_EXP:
            base.append(0)
            shift.append(64)  # v >> 64 == 0: stays in bucket 0
        elif bits <= MAX_EXP:
            base.append(1 + (bits - 1 - MIN_EXP) * SUB)
            shift.append(bits - 1 - SUB_BITS)
        else:
            base.append(N_BUCKETS - 1)
            shift.append(64)
    return tuple(base), tuple(shift)


# bucket of v nanoseconds = BASE[b] + ((v >> SHIFT[b]) & (SUB - 1)) with b = v.bit_length()
BASE, SHIFT = _tables()
MASK = SUB - 1


def bucket_index(ns: int) -> int:
    """The histogram bucket of a latency of ``ns`` nanoseconds (``ns >= 0``)."""
    if ns >= 1 << 64:
        return N_BUCKETS - 1
    b = ns.bit_length()
    return BASE[b] + ((ns >> SHIFT[b]) & MASK)


def bucket_bounds_ns(index: int) -> tuple[float, float]:
    """``[low, high)`` of bucket ``index`` in nanoseconds (the last one is open)."""
    if not 0 <= index < N_BUCKETS:
        raise IndexError(f"bucket {index} outside 0..{N_BUCKETS - 1}")
    if index == 0:
        return 0.0, float(1 << MIN_EXP)
    if index == N_BUCKETS - 1:
        return float(1 << MAX_EXP), float("inf")
    octave, sub = divmod(index - 1, SUB)
    unit = 1 << (MIN_EXP + octave - SUB_BITS)
    return float((SUB + sub) * unit), float((SUB + sub + 1) * unit)


def quantile_ns(counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram, interpolated linearly inside its
    bucket; None when the histogram is empty. The open last bucket answers its
    lower bound."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within 0..1, got {q}")
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total  # the rank-th smallest sample (1-based, fractional)
    seen = 0
    for index, n in enumerate(counts):
        if n <= 0:
            continue
        if seen + n >= rank:
            low, high = bucket_bounds_ns(index)
            if high == float("inf"):
                return low
            fraction = (rank - seen) / n
            return low + (high - low) * min(max(fraction, 0.0), 1.0)
        seen += n
    low, _ = bucket_bounds_ns(len(counts) - 1)
    return low


def mean_ns(counts: Sequence[int]) -> float:
    """Mean from bucket midpoints (the open last bucket counts as its lower bound)."""
    total = 0.0
    n = 0
    for index, c in enumerate(counts):
        if c:
            low, high = bucket_bounds_ns(index)
            total += c * (low if high == float("inf") else (low + high) / 2)
            n += c
    return total / n if n else 0.0


def subtract(now: Sequence[int], before: Sequence[int]) -> list[int]:
    """Interval histogram ``now - before`` (counters only grow; negatives clamp to 0)."""
    return [max(a - b, 0) for a, b in zip(now, before, strict=True)]


@dataclass(frozen=True)
class StatsSnapshot:
    """A consistent copy of one model version's counters."""

    name: str
    version: str
    ok: int  # inferences answered
    errors: int  # runtime failures (not the caller's fault)
    bad_requests: int  # refused before reaching the runtime (the caller's fault)
    counts: tuple[int, ...]  # latency histogram of answered inferences
    # the output sketch's counters (None: not recorded), and the shadow's report (None: no
    # shadow asked for this version)
    outputs: RecorderCounts | None = None
    shadow: dict[str, Any] | None = None

    @property
    def requests(self) -> int:
        return self.ok + self.errors + self.bad_requests

    def quantile_ms(self, q: float) -> float | None:
        ns = quantile_ns(self.counts, q)
        return None if ns is None else ns / 1e6

    def mean_ms(self) -> float | None:
        """Mean latency from the bucket midpoints (within the same 6.25 %)."""
        return mean_ns(self.counts) / 1e6 if self.ok else None


class ModelStats:
    """The live counters of one model version.

    The inference hot path writes ``counts``, ``acc`` and the ``outputs``
    recorder directly while it holds ``lock`` (the model runner's lock);
    everybody else goes through the methods, which take that lock. ``acc`` is
    ``[errors, bad_requests]``. ``outputs`` is read at every call, so setting
    it to None switches the sketch off (the benchmarks compare one runner with
    and without it). ``shadow`` is set and cleared by the main
    thread (:mod:`agent.activation.shadowing`); it answers the shadow's report,
    taking the shadow's own lock.
    """

    __slots__ = ("acc", "counts", "lock", "name", "outputs", "shadow", "version")

    def __init__(
        self,
        name: str,
        version: str,
        lock: threading.Lock | None = None,
        outputs: OutputRecorder | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.lock = lock or threading.Lock()
        self.counts = [0] * N_BUCKETS
        # one list, so the hot path needs no attribute writes
        self.acc = [0, 0]
        self.outputs = outputs
        self.shadow: Callable[[], dict[str, Any]] | None = None

    def record_ok(self, ns: int) -> None:
        with self.lock:
            self.counts[bucket_index(ns)] += 1

    def record_error(self) -> None:
        with self.lock:
            self.acc[0] += 1

    def record_bad_request(self) -> None:
        with self.lock:
            self.acc[1] += 1

    def reset(self) -> None:
        """Forget everything (e.g. the self-checks run before a model serves)."""
        with self.lock:
            self.counts[:] = [0] * N_BUCKETS
            self.acc[:] = [0, 0]
            if self.outputs is not None:
                self.outputs.reset()

    def snapshot(self) -> StatsSnapshot:
        with self.lock:
            counts = tuple(self.counts)
            errors, bad = self.acc
            outputs = self.outputs.counts() if self.outputs is not None else None
        shadow = self.shadow
        return StatsSnapshot(
            name=self.name,
            version=self.version,
            ok=sum(counts),
            errors=errors,
            bad_requests=bad,
            counts=counts,
            outputs=outputs,
            shadow=shadow() if shadow is not None else None,
        )


class ApiCounters:
    """Answers by channel and status class; thread-safe, a dict update per answer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}

    def record(self, channel: str, status: int) -> None:
        key = (channel, f"{status // 100}xx")
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            items = list(self._counts.items())
        out: dict[str, dict[str, int]] = {}
        for (channel, klass), n in sorted(items):
            out.setdefault(channel, {})[klass] = n
        return out
