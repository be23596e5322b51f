"""The in-process Python API for applications that embed the agent.

Two ways in, both importable from the package itself (``import agent`` stays
light: this module is imported on first use):

- ``agent.load_model(path, threads=2)`` loads a ``.tflite`` file without any
  agent around it and returns a :class:`Model`.
- ``agent.active_models(daemon)`` (or a :class:`agent.serving.registry.ModelRegistry`)
  gives the models a running embedded agent serves; :meth:`ActiveModels.predict`
  always uses the version active at the moment of the call, so an update
  never interrupts the application.

::

    import agent
    model = agent.load_model("digits.tflite", threads=2)
    probs = model.predict(images)          # float32 in, float32 out, any batch
    model.inputs[0].shape, model.outputs[0].dtype

Guarantees: :meth:`Model.predict` is safe to call from several threads (calls
on one model are serialized, different models run in parallel); float inputs
to a quantized model are quantized and its outputs dequantized; an input of
the model's exact dtype and shape costs no more than the bare runtime's
``set_tensor``/``invoke``/``get_tensor`` (see ``bench/RESULTS.md``). Mistakes
raise :class:`agent.errors.BadRequestError`, runtime failures
:class:`agent.errors.InferenceError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.model_card import TensorSpec
from agent.serving.inference import ArrayLike, ModelRunner
from agent.serving.registry import ActiveModel, ModelRegistry

Inputs = ArrayLike | Sequence[ArrayLike] | Mapping[str, ArrayLike]


class Model:
    """One loaded model version. Wraps an :class:`agent.serving.inference.ModelRunner`."""

    __slots__ = ("_fast", "_predict", "_single", "runner", "sha256")

    def __init__(self, runner: ModelRunner, *, sha256: str = "") -> None:
        self.runner = runner
        self.sha256 = sha256
        self._single = len(runner.outputs) == 1
        self._predict = runner.predict
        # the runner's exact-dtype fast path, called straight from here: one Python
        # call less per prediction (it returns None when it does not apply)
        self._fast = runner.fast_path

    @property
    def name(self) -> str:
        return self.runner.name

    @property
    def version(self) -> str:
        return self.runner.version

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """Name, shape, dtype and quantization of each input, in order."""
        return self.runner.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.runner.outputs

    def predict(self, x: Inputs, *, dequantize: bool | None = None) -> Any:
        """Run ``x`` (one array, a list in input order, or a mapping by input
        name; leading axis = batch). Like Keras: the output array for
        single-output models, a list of arrays otherwise."""
        if dequantize is None and self._fast is not None:
            outs = self._fast(x)
            if outs is not None:
                return outs[0] if self._single else outs
        outs = self._predict(x, dequantize_outputs=dequantize)
        return outs[0] if self._single else outs

    def predict_all(self, x: Inputs, *, dequantize: bool | None = None) -> list[np.ndarray]:
        """Like :meth:`predict` but always a list, one array per output."""
        return self._predict(x, dequantize_outputs=dequantize)

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}{list(s.shape)}:{s.dtype}" for s in self.inputs)
        return f"Model({self.name!r} v{self.version}: {ins})"


def load_model(
    path: str | Path,
    *,
    threads: int = 1,
    runtime: str = "auto",
    name: str | None = None,
    version: str = "0",
    record_stats: bool = False,
) -> Model:
    """Load a ``.tflite`` file for in-process use.

    ``threads`` is the runtime's thread count; ``runtime`` is ``auto``,
    ``litert``, ``tflite_runtime`` or ``tensorflow``. Raises
    :class:`agent.errors.ModelLoadError` or
    :class:`agent.errors.RuntimeUnavailableError`.
    """
    p = Path(path)
    runner = ModelRunner.from_file(
        p,
        threads=threads,
        runtime=runtime,
        name=name or p.stem,
        version=version,
        record_stats=record_stats,
    )
    return Model(runner)


class HasRegistry(Protocol):
    @property
    def registry(self) -> ModelRegistry: ...


class ActiveModels:
    """The models a running agent serves, for the application that embeds it."""

    def __init__(self, source: ModelRegistry | HasRegistry) -> None:
        self._registry: ModelRegistry = source if isinstance(source, ModelRegistry) else source.registry

    def names(self) -> list[str]:
        return self._registry.names()

    def get(self, name: str, version: str | None = None) -> Model:
        """The version of ``name`` active now, pinned: it keeps answering even
        after an update replaces it. Raises BadRequestError (404) when none."""
        active: ActiveModel = self._registry.get(name, version)
        return Model(active.runner, sha256=active.sha256)

    def predict(
        self,
        name: str,
        x: Inputs,
        *,
        version: str | None = None,
        dequantize: bool | None = None,
    ) -> Any:
        """Run ``x`` on whichever version of ``name`` is active at this moment."""
        runner = self._registry.get(name, version).runner
        fast = runner.fast_path
        outs = fast(x) if fast is not None and dequantize is None else None
        if outs is None:
            outs = runner.predict(x, dequantize_outputs=dequantize)
        return outs[0] if len(outs) == 1 else outs


def active_models(source: ModelRegistry | HasRegistry) -> ActiveModels:
    """The models of a running embedded agent (its daemon object or its registry)."""
    return ActiveModels(source)
