"""Deterministic tiny models and data for tests, the demo and the benchmarks.

Guarantees:
- :func:`digits_data` always returns the same split of scikit-learn's digits
  (8x8x1 float32 images scaled to [0, 1], int64 labels 0-9, 25 % held out,
  stratified, ``random_state=0``).
- :func:`train_digits_cnn` trains a small CNN on it in a few seconds on one
  core, with fixed seeds; held-out accuracy is about 97-98 %.
- Nothing is downloaded: the digits ship inside scikit-learn, and
  :func:`mobilenet_v2` uses ``weights=None``.

TensorFlow and Keras are imported inside the functions, so importing this
module is cheap. The Keras backend is whatever ``KERAS_BACKEND`` says (the
JAX-backend test trains with it set to ``jax`` in a subprocess); it defaults
to TensorFlow here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DIGITS_SHAPE = (8, 8, 1)
DIGITS_CLASSES = 10


@dataclass(frozen=True)
class DigitsData:
    x_train: np.ndarray  # float32 [N, 8, 8, 1] in [0, 1]
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray

    def __iter__(self) -> Any:  # allows `x_train, y_train, x_test, y_test = data`
        return iter((self.x_train, self.y_train, self.x_test, self.y_test))


def digits_data() -> DigitsData:
    """scikit-learn's 1,797 digits, split 75/25 (stratified, seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., np.newaxis]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return DigitsData(np.ascontiguousarray(x_train), y_train, np.ascontiguousarray(x_test), y_test)


def _keras() -> Any:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    return keras


def build_digits_cnn() -> Any:
    """The untrained digits CNN: two 3x3 convolutions, pooling, a dense softmax head.

    About 12k parameters: big enough that int8 weights dominate the .tflite
    file, small enough to train in seconds.
    """
    keras = _keras()
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(shape=DIGITS_SHAPE, name="image"),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(DIGITS_CLASSES, activation="softmax", name="probs"),
        ],
        name="digits_cnn",
    )


def train_digits_cnn(data: DigitsData | None = None, *, epochs: int = 12, seed: int = 0) -> Any:
    """Train :func:`build_digits_cnn` with fixed seeds and return the Keras model."""
    keras = _keras()
    data = data or digits_data()
    keras.utils.set_random_seed(seed)
    model = build_digits_cnn()
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(data.x_train, data.y_train, epochs=epochs, batch_size=32, verbose=0, shuffle=True)
    return model


def keras_accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent of a Keras model."""
    probs = np.asarray(model.predict(x, batch_size=256, verbose=0))
    return float(np.mean(np.argmax(probs, axis=-1) == y) * 100.0)


def save_digits_cnn(path: str | Path, data: DigitsData | None = None) -> Path:
    """Train the digits CNN and save it as ``.keras`` (or ``.h5`` by suffix)."""
    path = Path(path)
    model = train_digits_cnn(data)
    model.save(path)
    return path


def save_digits_npz(path: str | Path, x: np.ndarray, y: np.ndarray | None = None) -> Path:
    """Write converter input data: ``x`` and optional integer labels ``y``."""
    path = Path(path)
    if y is None:
        np.savez(path, x=x)
    else:
        np.savez(path, x=x, y=y)
    return path


def save_model_with_op(path: str | Path, op: str) -> Path:
    """A tiny 8-feature classifier with ``keras.ops.<op>`` in the middle, saved as ``.keras``.

    ``sin`` has a float-only TF Lite kernel (int8 cannot express it); ``erf``
    has no TF Lite kernel at all (it would need TensorFlow Select ops).
    """
    keras = _keras()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,), name="features")
    hidden = getattr(keras.ops, op)(keras.layers.Dense(8)(inputs))
    outputs = keras.layers.Dense(3, activation="softmax")(hidden)
    path = Path(path)
    keras.Model(inputs, outputs, name=f"with_{op}").save(path)
    return path


@dataclass(frozen=True)
class ConvertedModel:
    """A model converted by ``converter.convert.pipeline.convert_model`` for tests to use.

    ``tflite``, ``card`` and ``golden`` are the three files ``convert`` writes
    side by side; ``keras`` is the source; ``calibration``/``validation`` are the
    ``.npz`` files it was converted and measured with; ``result`` is the
    :class:`converter.convert.pipeline.ConversionResult`.
    """

    tflite: Path
    card: Path
    golden: Path
    keras: Path
    calibration: Path
    validation: Path
    result: Any


def convert_digits(
    keras_path: Path,
    calibration: Path,
    validation: Path,
    out: Path,
    quantize: str,
    **options: Any,
) -> ConvertedModel:
    """Convert the digits CNN with the converter's API (latency runs kept short)."""
    from converter.convert.pipeline import ConvertConfig, convert_model

    options.setdefault("latency_runs", 50)
    report = options.pop("report", None)
    result = convert_model(
        keras_path,
        out,
        ConvertConfig(quantize=quantize, **options),
        calibration=calibration,
        validate=validation,
        report=report,
    )
    paths = result.paths
    return ConvertedModel(paths.tflite, paths.card, paths.golden, keras_path, calibration, validation, result)


def synthetic_images(count: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """Image-like float32 samples in [-1, 1] (MobileNet's input range): smooth random
    colour fields plus fine noise. Not real photos; for calibration and timing only."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1.0, 1.0, (count, 7, 7, 3))
    reps = -(-size // 7)
    smooth = np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)[:, :size, :size, :]
    fine = rng.normal(0.0, 0.15, (count, size, size, 3))
    return np.clip(smooth + fine, -1.0, 1.0).astype(np.float32)


def mobilenet_v2(
    input_size: int = 224,
    bn_data: np.ndarray | None = None,
    classifier_activation: str | None = "softmax",
) -> Any:
    """Keras MobileNetV2 with random weights (``weights=None``: nothing downloaded).

    With ``weights=None`` every batch-norm layer starts with mean 0 / variance 1,
    activations shrink about threefold per block, and every output ends up exactly
    1/1000: any two models then "agree" trivially. Given ``bn_data``, the
    batch-norm statistics are set from one pass over it (momentum 0, training
    mode), so the random network produces varied, input-dependent outputs.
    ``classifier_activation=None`` gives logits instead of softmax scores.
    """
    keras = _keras()
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        input_shape=(input_size, input_size, 3),
        weights=None,
        classes=1000,
        classifier_activation=classifier_activation,
    )
    if bn_data is not None:
        bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
        saved = [layer.momentum for layer in bns]
        for layer in bns:
            layer.momentum = 0.0
        model(bn_data, training=True)
        for layer, momentum in zip(bns, saved, strict=True):
            layer.momentum = momentum
    return model


if __name__ == "__main__":  # used by the JAX-backend test: train and save under any backend
    import sys

    out = Path(sys.argv[1])
    model = train_digits_cnn(epochs=int(sys.argv[2]) if len(sys.argv) > 2 else 12)
    model.save(out)
    import keras

    print(keras.backend.backend())


def _never_returning_model(path: Path) -> None:
    """A real TF Lite model whose invoke() loops forever (a WHILE that never ends)."""
    code = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
class M(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 1], tf.float32)], autograph=False)
    def f(self, x):
        i0 = tf.reduce_sum(x) * 0.0
        _, acc = tf.while_loop(lambda i, a: tf.greater_equal(i, -1.0),
                               lambda i, a: (i + 1.0, a * 1.0001), [i0, x])
        return tf.reshape(acc, [1, 64])[:, :10]
m = M()
conv = tf.lite.TFLiteConverter.from_concrete_functions([m.f.get_concrete_function()], m)
open(sys.argv[1], "wb").write(conv.convert())
"""
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True)
