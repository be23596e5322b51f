"""Tiny TF Lite models (int8, float, two inputs, two outputs), built once per session in a child
process and cached."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

MODELS = ("int8", "float", "multi", "two_out")


_STAMP = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class TinyModels:
    dir: Path

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.tflite"

    @property
    def int8(self) -> Path:
        return self.path("int8")

    @property
    def float(self) -> Path:
        return self.path("float")

    @property
    def multi(self) -> Path:
        return self.path("multi")

    @property
    def two_out(self) -> Path:
        return self.path("two_out")


def ensure_models(cache_dir: Path) -> TinyModels:
    """Build the models into ``cache_dir/<stamp>`` unless already there."""
    out = cache_dir / _STAMP
    if not all((out / f"{m}.tflite").exists() for m in MODELS):
        # a private folder per build, so concurrent test runs never see half a file
        work = out / f".build-{os.getpid()}"
        work.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
        subprocess.run(
            [sys.executable, __file__, str(work)], check=True, env=env, capture_output=True, timeout=600
        )
        for m in MODELS:
            os.replace(work / f"{m}.tflite", out / f"{m}.tflite")
        work.rmdir()
    return TinyModels(out)


def models_for(request: pytest.FixtureRequest) -> TinyModels:
    """For a session fixture in each test module: ``return models_for(request)``.
    Cached in pytest's cache folder, or the temp folder under ``-p no:cacheprovider``."""
    cache = getattr(request.config, "cache", None)
    if cache is None:
        return ensure_models(Path(tempfile.gettempdir()) / "litefleet-tiny-models")
    return ensure_models(Path(cache.mkdir("litefleet-tiny-models")))


def _build(out: Path) -> None:  # pragma: no cover - runs in the child process
    import tensorflow as tf

    keras = tf.keras
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)

    def cnn() -> object:
        return keras.Sequential(
            [
                keras.Input(shape=(8, 8, 1), name="image"),
                keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                keras.layers.Flatten(),
                keras.layers.Dense(10, activation="softmax", name="probs"),
            ]
        )

    model = cnn()
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    (out / "float.tflite").write_bytes(conv.convert())

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([rng.random((1, 8, 8, 1), dtype=np.float32)] for _ in range(50))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    (out / "int8.tflite").write_bytes(conv.convert())

    a = keras.Input(shape=(4,), name="a")
    b = keras.Input(shape=(3,), name="b")
    joined = keras.layers.Concatenate()([a, b])
    sum_out = keras.layers.Dense(2, name="sum")(joined)
    scaled = keras.layers.Dense(5, name="scaled")(joined)
    multi = keras.Model([a, b], [sum_out, scaled])
    conv = tf.lite.TFLiteConverter.from_keras_model(multi)
    (out / "multi.tflite").write_bytes(conv.convert())

    x = keras.Input(shape=(4,), name="x")
    two = keras.Model(x, [keras.layers.Dense(2)(x), keras.layers.Dense(3)(x)])
    conv = tf.lite.TFLiteConverter.from_keras_model(two)
    (out / "two_out.tflite").write_bytes(conv.convert())


if __name__ == "__main__":
    _build(Path(sys.argv[1]))
