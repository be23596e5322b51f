"""One set of loaded interpreters per model file, shared by the simulated devices.

A device loads its model twice per activation (the golden check, then serving),
each time creating a LiteRT interpreter and packing the weights for XNNPACK
(10-18 ms and ~15 MB for MobileNetV2 int8 here). A thousand simulated devices in
one process would pay that a thousand times over for the same bytes, and hold a
thousand copies. :class:`InterpreterPool` keeps ``per_model`` interpreters per
model content (SHA-256 of the file's bytes) and hands each device its own
:class:`agent.serving.inference.ModelRunner` (its own statistics) on one of them,
with that interpreter's lock, so devices take turns on it. Each device still runs
its own checks (card, signature, every golden vector) through its runner.

Guarantees:

- a runner always runs the bytes of the file it was asked for: the pool is keyed
  by the content's SHA-256, read from that file on every request;
- an interpreter is used by one thread at a time (its lock);
- at most ``max_models`` model contents are kept (the oldest dropped first; a
  device that still serves one keeps it alive through its runner).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from agent.errors import ModelLoadError
from agent.serving.inference import ModelRunner
from agent.serving.runtime import load_interpreter


class InterpreterPool:
    """Implements :class:`agent.activation.check.RunnerSource`; thread-safe."""

    def __init__(self, *, per_model: int | None = None, max_models: int = 16) -> None:
        # one per core: devices checking the same model at once take turns per interpreter
        self.per_model = per_model or os.cpu_count() or 1
        self.max_models = max_models
        self._lock = threading.Lock()
        self._models: OrderedDict[tuple[str, int, str], list[tuple[Any, threading.Lock]]] = OrderedDict()
        self._turn = itertools.count()
        self.loads = 0  # interpreters created
        self.requests = 0  # runners handed out

    def runner(self, model: Path, *, threads: int, runtime: str, name: str, version: str) -> ModelRunner:
        try:
            data = Path(model).read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"cannot read {model}: {exc.strerror}") from exc
        key = (hashlib.sha256(data).hexdigest(), threads, runtime)
        with self._lock:
            self.requests += 1
            slots = self._models.get(key)
            if slots is None:
                # created under the lock: the first device of a push loads, the others wait
                # for it instead of loading the same bytes at once
                slots = [
                    (load_interpreter(data, threads=threads, runtime=runtime), threading.Lock())
                    for _ in range(self.per_model)
                ]
                self.loads += len(slots)
                self._models[key] = slots
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
            interpreter, lock = slots[next(self._turn) % len(slots)]
        return ModelRunner(interpreter, name=name, version=version, lock=lock)
