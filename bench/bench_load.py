"""What keeping LiteRT's native stderr line out of the logs costs (issue 12).

    .venv/bin/python bench/bench_load.py

``agent.serving.runtime.load_interpreter`` points file descriptor 2 at a scratch file
while it creates an interpreter and allocates its tensors (LiteRT prints ``INFO: Created
TensorFlow Lite XNNPACK delegate for CPU.`` from C++ there), then re-logs what it caught
at debug (:func:`agent.logs.native_stderr_logged`). This measures, in one run, in
alternating blocks so drift hits both alike:

- **load**: median time of ``load_interpreter(model)`` (with the capture) over the same
  construction and ``allocate_tensors()`` without it (the bare runtime);
- **invoke**: median of ``invoke()`` on an interpreter made each way. The capture is not
  on this path at all; the ratio shows the interpreter it leaves behind runs the same.

Models: the tests' tiny float and int8 models (built once by TensorFlow in a child
process, cached in the temp folder).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BLOCKS = 20
PER_BLOCK = 10
INVOKES = 2000


def bare(path: Path) -> object:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    return it


def timed(fn: object, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    from agent.serving.runtime import load_interpreter
    from tests.support.tiny_models import ensure_models

    models = ensure_models(Path(tempfile.gettempdir()) / "litefleet-tiny-models")
    print("| model | load, capture / bare (median) | added per load | invoke, capture / bare (median) |")
    print("| --- | --- | --- | --- |")
    for name in ("float", "int8"):
        path = models.path(name)
        with_capture: list[float] = []
        without: list[float] = []
        for _ in range(BLOCKS):
            with_capture += timed(lambda p=path: load_interpreter(p), PER_BLOCK)
            without += timed(lambda p=path: bare(p), PER_BLOCK)
        a, b = load_interpreter(path), bare(path)
        inv_a, inv_b = [], []
        for _ in range(BLOCKS):
            inv_a += timed(a.invoke, INVOKES // BLOCKS)
            inv_b += timed(b.invoke, INVOKES // BLOCKS)  # type: ignore[attr-defined]
        load_ratio = statistics.median(with_capture) / statistics.median(without)
        added_us = (statistics.median(with_capture) - statistics.median(without)) * 1e6
        inv_ratio = statistics.median(inv_a) / statistics.median(inv_b)
        print(f"| tiny {name} | {load_ratio:.2f}x | {added_us:.0f} µs | {inv_ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
