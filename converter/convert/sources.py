"""Load a user's model: Keras 3 ``.keras``, legacy ``.h5``, or a SavedModel folder.

Guarantees:
- The format is decided from the file's content (zip => ``.keras``, HDF5
  signature => ``.h5``, a folder with ``saved_model.pb`` => SavedModel), not
  trusted from the name; anything else is a :class:`BadInputError` naming the
  path and what was expected.
- Keras always runs on the TensorFlow backend here, whatever ``KERAS_BACKEND``
  says, so a ``.keras`` file trained under JAX (or PyTorch) converts: the
  variable is set before Keras is first imported. If Keras was already
  imported with another backend in this process, that is a clear
  :class:`ConversionError` rather than a confusing failure later.
- :func:`source_sha256` is stable: a file's SHA-256, or for a folder the
  SHA-256 of the lines ``"<sha256 of file>  <relative posix path>\\n"`` sorted
  by path (the same text ``sha256sum`` prints, so it can be checked by hand).
- TensorFlow and Keras are imported inside functions only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.files import file_sha256
from converter.errors import BadInputError, ConversionError

logger = logging.getLogger(__name__)

FORMATS = ("keras", "h5", "saved_model")
_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_SIGNATURE_KEY = "serving_default"


@dataclass(frozen=True)
class InputSpec:
    """One model input as the source model declares it (``None`` = any size)."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


def detect_format(path: Path) -> str:
    """Return one of :data:`FORMATS` for ``path`` or raise :class:`BadInputError`."""
    if not os.path.lexists(path):
        raise BadInputError(f"source {path} does not exist")
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return "saved_model"
        raise BadInputError(
            f"source {path} is a folder without saved_model.pb: not a SavedModel "
            "(expected a .keras file, a .h5 file or a SavedModel folder)"
        )
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise BadInputError(f"cannot read source {path}: {exc.strerror or exc}") from exc
    if head.startswith(_ZIP_MAGIC):
        if _is_keras_archive(path):
            return "keras"
        raise BadInputError(
            f"source {path} is a zip archive but not a Keras model (no config.json inside; "
            "expected a .keras file, a legacy .h5 file or a SavedModel folder)"
        )
    if head == _HDF5_MAGIC:
        return "h5"
    raise BadInputError(
        f"source {path} is not a model litefleet can read "
        "(expected a .keras file, a legacy .h5 file or a SavedModel folder)"
    )


def _is_keras_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return "config.json" in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def source_sha256(path: Path) -> str:
    """SHA-256 of a file, or the stable folder hash described in the module docstring."""
    try:
        if not path.is_dir():
            return file_sha256(path)
        lines = []
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            lines.append(f"{file_sha256(p)}  {p.relative_to(path).as_posix()}\n")
        return hashlib.sha256("".join(lines).encode()).hexdigest()
    except OSError as exc:
        raise BadInputError(f"cannot read source {path}: {exc.strerror or exc}") from exc


def import_keras() -> Any:
    """Import Keras on the TensorFlow backend (see the module docstring)."""
    if "keras" not in sys.modules:
        if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
            logger.debug(
                "KERAS_BACKEND=%s overridden: conversion runs on tensorflow",
                os.environ["KERAS_BACKEND"],
            )
        os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ConversionError(
            f"Keras is already running on the {backend} backend in this process; "
            "save the model and convert it in a fresh process (litefleet convert)"
        )
    return keras


def import_tensorflow() -> Any:
    import_keras()
    import tensorflow as tf

    return tf


class SourceModel:
    """A loaded source model that can make TFLite converters and run itself."""

    def __init__(
        self,
        path: Path,
        fmt: str,
        sha256: str,
        model: Any,
        inputs: Sequence[InputSpec],
        output_names: Sequence[str],
    ) -> None:
        self.path = path
        self.format = fmt
        self.sha256 = sha256
        self.inputs = tuple(inputs)
        # names the TFLite signature gives the outputs, in the source's output order
        self.output_names = tuple(output_names)
        self._model = model

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, "sha256": self.sha256}

    def make_converter(self) -> Any:
        """A fresh ``tf.lite.TFLiteConverter`` for this model (one per variant)."""
        tf = import_tensorflow()
        if self.format == "saved_model":
            return tf.lite.TFLiteConverter.from_saved_model(str(self.path), signature_keys=[_SIGNATURE_KEY])
        return tf.lite.TFLiteConverter.from_keras_model(self._model)

    def predict(self, xs: Sequence[np.ndarray], batch_size: int = 64) -> list[np.ndarray]:
        """Run the source model on ``xs`` (one array per input, samples first).

        Returns one float array per output, in :attr:`output_names` order.
        """
        tf = import_tensorflow()
        if self.format != "saved_model":  # Keras: predict() runs a compiled graph
            out = self._model.predict(xs[0] if len(xs) == 1 else list(xs), batch_size=batch_size, verbose=0)
            if isinstance(out, dict):
                out = [out[k] for k in out]
            return [np.asarray(o) for o in (out if isinstance(out, list | tuple) else [out])]
        n = int(xs[0].shape[0])
        chunks: list[list[np.ndarray]] = []
        for start in range(0, n, batch_size):
            part = [tf.constant(x[start : start + batch_size]) for x in xs]
            fn = self._model.signatures[_SIGNATURE_KEY]
            out = fn(**{spec.name: t for spec, t in zip(self.inputs, part, strict=True)})
            chunks.append([np.asarray(out[name]) for name in self.output_names])
        return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]


def _keras_inputs(model: Any) -> list[InputSpec]:
    specs = []
    for t in model.inputs:
        specs.append(
            InputSpec(
                name=str(t.name),
                shape=tuple(None if d is None else int(d) for d in t.shape),
                dtype=str(getattr(t.dtype, "name", t.dtype)),
            )
        )
    return specs


def load_source(path: str | Path) -> SourceModel:
    """Detect, hash and load ``path``; raise :class:`BadInputError` if it can't be read."""
    path = Path(path)
    fmt = detect_format(path)
    if not path.is_dir() and not os.access(path, os.R_OK):
        raise BadInputError(f"cannot read source {path}: permission denied")
    sha = source_sha256(path)
    keras = import_keras()
    tf = import_tensorflow()
    logger.debug("loading %s as %s (sha256 %s)", path, fmt, sha)
    if fmt == "saved_model":
        try:
            loaded = tf.saved_model.load(str(path))
        except Exception as exc:  # TensorFlow raises many types for a corrupt folder
            raise BadInputError(f"cannot read SavedModel {path}: {_first_line(exc)}") from exc
        if _SIGNATURE_KEY not in loaded.signatures:
            raise BadInputError(
                f"SavedModel {path} has no {_SIGNATURE_KEY!r} signature "
                f"(it has {sorted(loaded.signatures.keys())})"
            )
        fn = loaded.signatures[_SIGNATURE_KEY]
        in_sig = fn.structured_input_signature[1]
        inputs = [
            InputSpec(
                name=name,
                shape=tuple(None if d is None else int(d) for d in spec.shape.as_list()),
                dtype=spec.dtype.name,
            )
            for name, spec in sorted(in_sig.items())
        ]
        outputs = sorted(fn.structured_outputs.keys())
        return SourceModel(path, fmt, sha, loaded, inputs, outputs)
    try:
        model = keras.saving.load_model(str(path), compile=False)
    except Exception as exc:  # Keras raises ValueError, OSError, TypeError, zip errors...
        kind = "Keras" if fmt == "keras" else "legacy .h5"
        raise BadInputError(f"cannot read {kind} model {path}: {_first_line(exc)}") from exc
    if not hasattr(model, "inputs") or not model.inputs:
        raise BadInputError(
            f"{path} holds a Keras model without defined inputs (subclassed and never built); "
            "save a functional or Sequential model, or export a SavedModel"
        )
    outputs = [f"output_{i}" for i in range(len(model.outputs))]
    return SourceModel(path, fmt, sha, model, _keras_inputs(model), outputs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
