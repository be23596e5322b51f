"""The latency histogram: fixed buckets, bounded error, cheap index (pure)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.serving.stats import (
    N_BUCKETS,
    ModelStats,
    bucket_bounds_ns,
    bucket_index,
    mean_ns,
    quantile_ns,
    subtract,
)


@given(st.integers(min_value=0, max_value=2**70))
def test_every_latency_falls_inside_its_bucket(ns: int) -> None:
    index = bucket_index(ns)
    low, high = bucket_bounds_ns(index)
    assert 0 <= index < N_BUCKETS
    assert low <= ns < high


@given(st.integers(min_value=0, max_value=2**40), st.integers(min_value=0, max_value=2**40))
def test_buckets_are_ordered(a: int, b: int) -> None:
    if a <= b:
        assert bucket_index(a) <= bucket_index(b)


def test_buckets_are_log_spaced_with_bounded_width() -> None:
    for index in range(1, N_BUCKETS - 1):
        low, high = bucket_bounds_ns(index)
        assert (high - low) / low <= 1 / 8 + 1e-12
        assert bucket_bounds_ns(index + 1)[0] == high
    assert bucket_bounds_ns(0) == (0.0, 1024.0)
    assert bucket_bounds_ns(N_BUCKETS - 1)[1] == float("inf")
    with pytest.raises(IndexError):
        bucket_bounds_ns(N_BUCKETS)


def test_quantiles_are_within_the_promised_error() -> None:
    rng = np.random.default_rng(0)
    samples = rng.lognormal(mean=np.log(2e6), sigma=0.6, size=20_000).astype(np.int64)
    counts = [0] * N_BUCKETS
    for s in samples:
        counts[bucket_index(int(s))] += 1
    for q in (0.5, 0.9, 0.99):
        exact = float(np.quantile(samples, q))
        estimate = quantile_ns(counts, q)
        assert estimate is not None
        assert abs(estimate - exact) / exact < 0.0625
    assert abs(mean_ns(counts) - samples.mean()) / samples.mean() < 0.0625


def test_quantile_edge_cases() -> None:
    assert quantile_ns([0] * N_BUCKETS, 0.5) is None
    counts = [0] * N_BUCKETS
    counts[-1] = 3
    assert quantile_ns(counts, 0.99) == 2.0**37
    with pytest.raises(ValueError):
        quantile_ns(counts, 1.5)


def test_interval_histogram_is_a_difference() -> None:
    s = ModelStats("m", "1")
    s.record_ok(5_000)
    before = s.snapshot()
    s.record_ok(2_000_000)
    s.record_ok(2_000_000)
    s.record_error()
    s.record_bad_request()
    after = s.snapshot()
    interval = subtract(after.counts, before.counts)
    assert sum(interval) == 2
    estimate = quantile_ns(interval, 0.5)
    assert estimate is not None and abs(estimate - 2e6) / 2e6 < 0.0625
    assert (after.ok, after.errors, after.bad_requests, after.requests) == (3, 1, 1, 5)
    assert after.mean_ms() is not None
    counts, acc = s.counts, s.acc
    s.reset()  # in place: the hot path holds references to these very lists
    assert s.counts is counts and s.acc is acc
    assert s.snapshot().requests == 0 and s.snapshot().mean_ms() is None
