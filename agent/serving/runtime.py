"""Load a TF Lite interpreter from whichever LiteRT runtime this machine has.

The host's measurements and the device's inference both go through
:func:`load_interpreter`, so a latency figure on the host was taken with the
same code path the device runs.

Order for ``runtime="auto"``: ``ai_edge_litert`` (LiteRT, x86-64 and aarch64
wheels), ``tflite_runtime`` (the last release still has 32-bit ARM wheels),
then ``tensorflow.lite`` (host only; the device never needs TensorFlow).
All imports are lazy and go through :mod:`importlib`, so importing this
module costs nothing and never pulls TensorFlow in by accident.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import RuntimeUnavailableError
from agent.logs import native_stderr_logged

logger = logging.getLogger(__name__)

RUNTIMES = ("litert", "tflite_runtime", "tensorflow")
RUNTIME_CHOICES = ("auto", *RUNTIMES)

# runtime name -> module that holds its ``Interpreter`` class
_MODULES = {
    "litert": "ai_edge_litert.interpreter",
    "tflite_runtime": "tflite_runtime.interpreter",
    "tensorflow": "tensorflow.lite",
}


@dataclass(frozen=True)
class Runtime:
    """A resolved runtime: its name, version and ``Interpreter`` class."""

    name: str
    version: str
    interpreter_class: Any


_resolved: dict[str, Runtime] = {}


def _import_runtime(name: str) -> Runtime:
    module = importlib.import_module(_MODULES[name])
    if name == "tensorflow":
        tf = importlib.import_module("tensorflow")
        version = str(tf.__version__)
        cls = module.Interpreter
    else:
        package = importlib.import_module(_MODULES[name].split(".")[0])
        version = str(getattr(package, "__version__", "unknown"))
        cls = module.Interpreter
    return Runtime(name=name, version=version, interpreter_class=cls)


def resolve_runtime(preference: str = "auto") -> Runtime:
    """Return the runtime named by ``preference`` (or the first available for ``auto``).

    Raises :class:`RuntimeUnavailableError` naming what was tried.
    """
    if preference not in RUNTIME_CHOICES:
        raise RuntimeUnavailableError(
            f"unknown runtime {preference!r}; choose one of {', '.join(RUNTIME_CHOICES)}"
        )
    if preference in _resolved:
        return _resolved[preference]
    candidates = RUNTIMES if preference == "auto" else (preference,)
    failures = []
    for name in candidates:
        try:
            runtime = _import_runtime(name)
        except ImportError as exc:
            failures.append(f"{name}: {exc}")
            logger.debug("runtime %s unavailable: %s", name, exc)
            continue
        logger.debug("using runtime %s %s", runtime.name, runtime.version)
        _resolved[preference] = runtime
        return runtime
    raise RuntimeUnavailableError(
        "no TF Lite runtime could be imported (install ai-edge-litert or tflite-runtime): "
        + "; ".join(failures)
    )


def load_interpreter(
    model: str | Path | bytes,
    *,
    threads: int = 1,
    runtime: str = "auto",
    allocate: bool = True,
) -> Any:
    """Create an interpreter for ``model`` (a path or the model's bytes).

    ``threads`` is passed to the runtime as ``num_threads`` (XNNPACK, the
    default CPU delegate of LiteRT and tflite-runtime >= 2.14, uses it).
    Tensors are allocated unless ``allocate`` is false. Any runtime failure is
    re-raised as :class:`agent.errors.ModelLoadError`.
    """
    from agent.errors import ModelLoadError

    if threads < 1:
        raise ValueError("threads must be at least 1")
    rt = resolve_runtime(runtime)
    kwargs: dict[str, Any] = {"num_threads": threads}
    if isinstance(model, bytes | bytearray | memoryview):
        kwargs["model_content"] = bytes(model)
    else:
        kwargs["model_path"] = str(model)
    try:
        # LiteRT's C++ side prints an unprefixed "INFO: Created ... XNNPACK delegate" on
        # stderr here: it goes to the debug log instead of the operator's console
        with native_stderr_logged(logger):
            interpreter = rt.interpreter_class(**kwargs)
            if allocate:
                interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{rt.name} could not load the model: {exc}") from exc
    return interpreter
