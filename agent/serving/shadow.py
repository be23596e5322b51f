"""Shadow evaluation: the previous version answers a sample of the live calls too, off the request path.

While a rollout rule asks for it (``shadow_k``, :mod:`agent.activation.shadowing` decides), a
:class:`Shadow` is the active runner's tap (:meth:`agent.serving.inference.ModelRunner.set_tap`):
every ``k``-th answered call on the active version (REST, MQTT and in-process alike; calls
number 1, 2, ... since the shadow started, so calls k, 2k, 3k, ... are sampled) puts a copy of
its inputs and outputs on the :class:`ShadowWorker`'s bounded queue. The worker's one thread
runs the previous version's runner on the inputs and compares (:func:`compare_outputs`), a
batch at a time (8 samples, or whatever is queued 50 ms after the first one).

Agreement: for a classifier (:func:`agent.output_sketch.classifier_classes`) a row agrees when
both top-1 classes are equal; otherwise when every element of every output is within
``VALUE_ATOL + VALUE_RTOL * max|previous|`` (per row and output, in dequantized units) plus one
quantum of each side's output quantization.

Guarantees:

- Nothing here can make a live answer wrong or unavailable: the tap copies what it needs and
  never raises, never blocks (a full queue drops the sample and counts it), and every failure
  of the previous model (an exception, a mismatch of shapes) is counted in ``errors``.
- Memory is bounded: at most ``max_jobs`` samples and ``max_bytes`` of their arrays wait in the
  queue; a sample that does not fit is dropped (counted).
- Counters are in rows (one per sample of a batch): ``sampled = compared + dropped + errors``
  once the queue is empty; ``agreed <= compared``. They are kept per active version
  (:class:`ShadowCounts`), so they only grow within one boot.
- Threads: :meth:`Shadow.offer` runs on the request's thread, :meth:`Shadow.run` on the worker's;
  the counters sit behind the shadow's own lock. The main thread creates and closes shadows
  (:class:`agent.activation.shadowing.ShadowManager`); a closed shadow's queued samples are
  skipped (counted as dropped) and its runner is released as soon as the worker lets go of it.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.model_card import TensorSpec
from agent.output_sketch import classifier_classes
from agent.serving.inference import ModelRunner, dequantize

logger = logging.getLogger(__name__)

VALUE_ATOL = 1e-3
VALUE_RTOL = 1e-2
DEFAULT_MAX_JOBS = 16
# the worker runs samples in batches of this many, or whatever is queued after DEFAULT_LINGER_S
DEFAULT_BATCH = 8
DEFAULT_LINGER_S = 0.05
# a sampled MobileNetV2 float input is 0.6 MB: 8 MiB holds a dozen of them
DEFAULT_MAX_BYTES = 8 * 1024 * 1024


class ShadowMismatchError(ValueError):
    """The previous version cannot run or be compared on what the active one was given."""


# -- pure ------------------------------------------------------------------------------------------
def _floats(y: np.ndarray, spec: TensorSpec) -> np.ndarray:
    return dequantize(y, spec) if spec.quantized else np.asarray(y, dtype=np.float64)


def _quantum(spec: TensorSpec) -> float:
    return max(spec.scale) if spec.quantized else 0.0


def rows_of(outputs: Sequence[np.ndarray]) -> int:
    """Samples in a call's outputs (the first axis is the batch; a 1-D output is one sample)."""
    first = outputs[0]
    return int(first.shape[0]) if first.ndim > 1 else 1


def compare_outputs(
    new: Sequence[np.ndarray],
    old: Sequence[np.ndarray],
    new_specs: Sequence[TensorSpec],
    old_specs: Sequence[TensorSpec],
) -> tuple[int, int]:
    """``(rows compared, rows that agree)`` of the active version's raw outputs ``new`` and the
    previous version's ``old`` (in the same output order). :class:`ShadowMismatchError` when
    they cannot be compared."""
    rows = rows_of(new)
    classes = classifier_classes(new_specs[0].shape)
    if classes is not None:
        if classifier_classes(old_specs[0].shape) != classes:
            raise ShadowMismatchError("the versions' class counts differ")
        a = _floats(new[0], new_specs[0]).reshape(-1, classes).argmax(axis=1)
        b = _floats(old[0], old_specs[0]).reshape(-1, classes).argmax(axis=1)
        if a.shape != b.shape:
            raise ShadowMismatchError("the versions answered different batch sizes")
        return int(a.size), int(np.count_nonzero(a == b))
    if len(new) != len(old):
        raise ShadowMismatchError("the versions have different output counts")
    agree = np.ones(rows, dtype=bool)
    for n, o, ns, os_ in zip(new, old, new_specs, old_specs, strict=True):
        if n.size != o.size:
            raise ShadowMismatchError(f"output shapes differ: {list(n.shape)} vs {list(o.shape)}")
        nf = _floats(n, ns).reshape(rows, -1)
        of = _floats(o, os_).reshape(rows, -1)
        if nf.shape[1] == 0:
            continue
        tol = VALUE_ATOL + VALUE_RTOL * np.abs(of).max(axis=1) + _quantum(ns) + _quantum(os_)
        agree &= np.abs(nf - of).max(axis=1) <= tol
    return rows, int(np.count_nonzero(agree))


def previous_inputs(
    inputs: Sequence[np.ndarray], new_specs: Sequence[TensorSpec], old_specs: Sequence[TensorSpec]
) -> list[np.ndarray]:
    """What to give the previous version for the inputs the active one ran: the same arrays
    when both take the same encoding, else dequantized floats (the previous version's runner
    quantizes them for itself)."""
    if len(inputs) != len(old_specs):
        raise ShadowMismatchError("the versions take different numbers of inputs")
    out = []
    for x, ns, os_ in zip(inputs, new_specs, old_specs, strict=True):
        same = ns.dtype == os_.dtype and ns.scale == os_.scale and ns.zero_point == os_.zero_point
        out.append(x if same or not ns.quantized else dequantize(x, ns))
    return out


def compatible(active: ModelRunner, previous: ModelRunner) -> str | None:
    """None when ``previous`` can shadow ``active``, else why not (pure over their specs)."""
    if sorted(active.input_keys) != sorted(previous.input_keys):
        return f"inputs {list(active.input_keys)} vs {list(previous.input_keys)}"
    by_key = dict(zip(previous.input_keys, previous.inputs, strict=True))
    for key, spec in zip(active.input_keys, active.inputs, strict=True):
        if tuple(spec.shape[1:]) != tuple(by_key[key].shape[1:]):
            return f"input {key!r} shape {list(spec.shape)} vs {list(by_key[key].shape)}"
    if not active.outputs or not previous.outputs:
        return "a version without outputs"
    classes = classifier_classes(active.outputs[0].shape)
    if classes is not None:
        other = classifier_classes(previous.outputs[0].shape)
        return None if other == classes else f"{classes} classes vs {other}"
    shapes = [s.shape for s in active.outputs]
    if shapes != [s.shape for s in previous.outputs]:
        return f"output shapes {shapes} vs {[s.shape for s in previous.outputs]}"
    return None


# -- the sample queue and its thread --------------------------------------------------------------
@dataclass(frozen=True)
class ShadowJob:
    """One sampled call: copies of what the active version ran and answered."""

    shadow: Shadow
    inputs: tuple[np.ndarray, ...]
    outputs: tuple[np.ndarray, ...]
    rows: int

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.inputs) + sum(a.nbytes for a in self.outputs)


class ShadowWorker:
    """One thread that runs sampled calls on the previous versions, from a bounded queue.

    :meth:`submit` (any thread) never blocks. The thread starts with :meth:`start` (the main
    thread calls it when the first shadow starts, so an agent that never shadows has none).
    """

    def __init__(
        self,
        *,
        max_jobs: int = DEFAULT_MAX_JOBS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        batch: int = DEFAULT_BATCH,
        linger_s: float = DEFAULT_LINGER_S,
    ) -> None:
        if max_jobs < 1 or max_bytes < 1:
            raise ValueError("the shadow queue needs room for at least one sample")
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self.batch = max(1, min(batch, max_jobs))
        self.linger_s = linger_s
        self._jobs: collections.deque[ShadowJob] = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._busy = False
        self.high_water = 0  # the most samples ever waiting at once

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            thread, self._thread = self._thread, None
            self._stopping = True
            self._jobs.clear()
            self._bytes = 0
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None

    def submit(self, job: ShadowJob) -> bool:
        """Queue ``job``; False (nothing queued) when the queue is full or stopped."""
        size = job.nbytes
        with self._cond:
            if (
                self._thread is None
                or len(self._jobs) >= self.max_jobs
                or self._bytes + size > self.max_bytes
            ):
                return False
            self._jobs.append(job)
            self._bytes += size
            self.high_water = max(self.high_water, len(self._jobs))
            if len(self._jobs) in (1, self.batch):  # the only moments the worker acts on
                self._cond.notify()
        return True

    def wait_idle(self, timeout_s: float) -> bool:
        """True once nothing is queued or running (tests and benchmarks)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._jobs or self._stopping)
                # a few samples at a time: every wake-up of this thread takes the GIL from
                # the request threads (measured on digits over REST at k = 10: ~350 µs of
                # CPU per sample woken one by one, against ~25 µs of work)
                self._cond.wait_for(lambda: len(self._jobs) >= self.batch or self._stopping, self.linger_s)
                if self._stopping:
                    return
                jobs = list(self._jobs)
                self._jobs.clear()
                self._bytes = 0
                self._busy = True
            for job in jobs:
                job.shadow.run(job)
            # the last samples must not keep their shadow (and the active runner) alive
            del jobs, job


# -- one shadowed version ---------------------------------------------------------------------------
class ShadowCounts:
    """The counters of one active version's shadows, in samples, behind their own lock. One
    object per active runner (:class:`agent.activation.shadowing.ShadowManager` keeps it), so
    a shadow that stops and starts again on the same version (a re-target without ``shadow_k``,
    then one with it) goes on counting: the counters never go down within one boot."""

    __slots__ = ("agreed", "compared", "dropped", "errors", "lock", "sampled")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sampled = self.compared = self.agreed = self.dropped = self.errors = 0


class Shadow:
    """The previous version (``runner``) shadowing the active one (``active``) on 1 in ``k`` calls."""

    def __init__(
        self,
        *,
        active: ModelRunner,
        runner: ModelRunner,
        k: int,
        submit: Callable[[ShadowJob], bool],
        counts: ShadowCounts | None = None,
    ) -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        self.active = active
        self.against = runner.version
        self.k = k
        self._runner: ModelRunner | None = runner
        self._submit = submit
        self.counts = counts or ShadowCounts()
        self._lock = self.counts.lock
        self._calls = 0
        self._warned = False

    @property
    def runner(self) -> ModelRunner | None:
        """The previous version's runner; None once closed."""
        return self._runner

    def set_k(self, k: int) -> None:
        with self._lock:
            self.k = max(1, k)

    def close(self) -> None:
        """Stop sampling and let go of the previous version's runner (main thread)."""
        with self._lock:
            self._runner = None

    def report(self) -> dict[str, Any]:
        """The metrics payload's ``shadow`` entry."""
        c = self.counts
        with self._lock:
            return {
                "against": self.against,
                "k": self.k,
                "sampled": c.sampled,
                "compared": c.compared,
                "agreed": c.agreed,
                "dropped": c.dropped,
                "errors": c.errors,
            }

    # -- the request's thread ------------------------------------------------------------------
    def offer(self, inputs: Sequence[np.ndarray], outputs: list[np.ndarray]) -> None:
        """The tap: count the call; copy and queue every k-th one. Never raises."""
        with self._lock:
            if self._runner is None:
                return
            self._calls += 1
            if self._calls < self.k:
                return
            self._calls = 0
        try:
            rows = rows_of(outputs)
            job = ShadowJob(
                self,
                tuple(np.array(x, copy=True) for x in inputs),
                tuple(np.array(y, copy=True) for y in outputs),
                rows,
            )
            queued = self._submit(job)
        except Exception as exc:  # a sample is never worth a failed answer
            self._failed(exc)
            with self._lock:
                self.counts.sampled += 1
                self.counts.errors += 1
            return
        with self._lock:
            self.counts.sampled += rows
            if not queued:
                self.counts.dropped += rows

    # -- the worker's thread -------------------------------------------------------------------
    def run(self, job: ShadowJob) -> None:
        """Run the previous version on ``job`` and count the outcome. Never raises."""
        runner = self._runner
        if runner is None:  # closed while the sample waited: it was dropped
            with self._lock:
                self.counts.dropped += job.rows
            return
        try:
            old = self._previous_outputs(runner, job.inputs)
            compared, agreed = compare_outputs(job.outputs, old, self.active.outputs, runner.outputs)
        except Exception as exc:  # the previous model's failure is a count, not an error
            self._failed(exc)
            with self._lock:
                self.counts.errors += job.rows
            return
        with self._lock:
            self.counts.compared += compared
            self.counts.agreed += agreed

    def _previous_outputs(self, runner: ModelRunner, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        xs = previous_inputs(inputs, self.active.inputs, _by_key(runner.inputs, runner, self.active))
        feed: Any = xs[0] if len(xs) == 1 else dict(zip(self.active.input_keys, xs, strict=True))
        outs = runner.predict(feed, dequantize_outputs=False)
        if sorted(runner.output_keys) == sorted(self.active.output_keys):
            by_key = dict(zip(runner.output_keys, outs, strict=True))
            return [by_key[k] for k in self.active.output_keys]
        return outs

    def _failed(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "shadow of %s v%s by v%s: a sample failed: %r",
                self.active.name,
                self.active.version,
                self.against,
                exc,
            )


def _by_key(specs: Sequence[TensorSpec], runner: ModelRunner, active: ModelRunner) -> list[TensorSpec]:
    """``runner``'s input specs in ``active``'s input order (by signature key)."""
    by_key = dict(zip(runner.input_keys, specs, strict=True))
    return [by_key.get(k, s) for k, s in zip(active.input_keys, specs, strict=True)]
