"""litefleet device agent: pulls signed models over MQTT and serves LiteRT inference.

This package never imports TensorFlow, Keras or :mod:`converter`. ``import
agent`` is cheap (no numpy, no runtime); the in-process API is loaded on
first use::

    import agent
    model = agent.load_model("model.tflite", threads=2)
    y = model.predict(x)

See :mod:`agent.serving.api`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public names served lazily from agent.serving.api (PEP 562)
_API = ("load_model", "Model", "active_models", "ActiveModels")

if TYPE_CHECKING:
    from agent.serving.api import ActiveModels, Model, active_models, load_model

__all__ = ["ActiveModels", "Model", "__version__", "active_models", "load_model"]


def __getattr__(name: str) -> Any:
    if name in _API:
        from agent.serving import api

        return getattr(api, name)
    raise AttributeError(f"module 'agent' has no attribute {name!r}")
