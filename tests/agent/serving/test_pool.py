"""The fleet simulator's interpreter pool: shared interpreters, each device's own runner."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from agent.errors import ModelLoadError
from agent.serving.pool import InterpreterPool
from tests.agent.activation.test_manager import gather_models  # noqa: F401  (fixture)


def test_runners_share_interpreters_by_content_and_keep_their_own_figures(
    tmp_path: Path,
    gather_models: list[Path],  # noqa: F811
) -> None:
    pool = InterpreterPool(per_model=2)
    copy = tmp_path / "copy.tflite"
    copy.write_bytes(gather_models[0].read_bytes())  # same bytes, another file
    a = pool.runner(gather_models[0], threads=1, runtime="auto", name="g", version="1")
    b = pool.runner(copy, threads=1, runtime="auto", name="g", version="1")
    c = pool.runner(gather_models[1], threads=1, runtime="auto", name="g", version="2")
    assert pool.loads == 4 and pool.requests == 3  # two per content, not one per runner
    x = np.array([1], np.int32)
    assert a.predict(x)[0][0][0] == 10.0 and c.predict(x)[0][0][0] == 110.0  # each its own bytes

    def hammer(runner: object, want: float) -> None:  # devices taking turns on one interpreter
        for i in range(200):
            got = runner.predict(np.array([i % 4], np.int32))[0][0][0]  # type: ignore[attr-defined]
            assert got == want + 10 * (i % 4)

    threads = [threading.Thread(target=hammer, args=(r, w)) for r, w in ((a, 0.0), (b, 0.0), (c, 100.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert a.stats.snapshot().ok == 201 and b.stats.snapshot().ok == 200  # own statistics
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError):
        pool.runner(bad, threads=1, runtime="auto", name="g", version="3")
