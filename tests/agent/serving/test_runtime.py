"""The runtime loader picks LiteRT and refuses nonsense clearly."""

from __future__ import annotations

import pytest

from agent.errors import ModelLoadError, RuntimeUnavailableError
from agent.serving.runtime import load_interpreter, resolve_runtime


def test_auto_prefers_litert() -> None:
    rt = resolve_runtime("auto")
    assert rt.name == "litert"
    assert rt.version not in ("", "unknown")


def test_unknown_runtime_is_refused() -> None:
    with pytest.raises(RuntimeUnavailableError, match="unknown runtime"):
        resolve_runtime("onnx")


def test_garbage_model_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError):
        load_interpreter(b"\x00" * 64)
