"""Digits models for the rollout end-to-end test: a slow twin, a permuted-label one, reseeded ones.

All take the digits data of :func:`tests.support.models.digits_data` and have the same
signature as the digits CNN ([1, 8, 8, 1] float32 in, [1, 10] softmax out), so a device
accepts each as a new version of the same model:

* :func:`slow_twin`: the trained digits CNN behind a detour that changes nothing: the
  image scaled up 8x (nearest), a stack of 3x3 convolutions whose weights copy their input
  (identity kernels), a max-pool back to 8x8. The same answers, bit for bit in float32,
  some 200x slower;
* :func:`trained`: the digits CNN trained with another seed, or on permuted labels (it
  passes its own golden vectors, and answers "the wrong class" consistently).

TensorFlow is imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.support.models import DigitsData, _keras, train_digits_cnn

# 60 layers of 16 channels at 64x64: ~570 M multiply-adds per inference, ~11 ms with LiteRT
# on one core here (measured: 40 layers 7.3 ms, 20 layers 4.0 ms) against ~0.05 ms for the
# digits CNN; 0.6 MB of weights. (Fewer pixels do not do: 16 layers of 64 channels at 8x8
# took 1.5 ms, within the p99 noise of 20 agents on 2 cores.)
SLOW_LAYERS = 60
SLOW_CHANNELS = 16
SLOW_SCALE = 8


def slow_twin(trained_keras: Path, out: Path) -> Path:
    keras = _keras()
    base = keras.models.load_model(trained_keras)
    c = SLOW_CHANNELS
    widen = np.zeros((3, 3, 1, c), np.float32)
    widen[1, 1, 0, 0] = 1.0
    same = np.zeros((3, 3, c, c), np.float32)
    for ch in range(c):
        same[1, 1, ch, ch] = 1.0
    narrow = np.zeros((1, 1, c, 1), np.float32)
    narrow[0, 0, 0, 0] = 1.0
    inputs = keras.Input(shape=(8, 8, 1), name="image")
    x = keras.layers.UpSampling2D(SLOW_SCALE)(inputs)
    x = keras.layers.Conv2D(c, 3, padding="same", use_bias=False, name="widen")(x)
    layers = [
        keras.layers.Conv2D(c, 3, padding="same", use_bias=False, name=f"copy{i}") for i in range(SLOW_LAYERS)
    ]
    for layer in layers:
        x = layer(x)
    x = keras.layers.Conv2D(1, 1, use_bias=False, name="narrow")(x)
    x = keras.layers.MaxPooling2D(SLOW_SCALE)(x)  # the max of 64 copies of a pixel is the pixel
    model = keras.Model(inputs, base(x), name="digits_slow")
    model.get_layer("widen").set_weights([widen])
    for layer in layers:
        layer.set_weights([same])
    model.get_layer("narrow").set_weights([narrow])
    model.save(out)
    return out


def trained(data: DigitsData, out: Path, *, seed: int, permute: bool = False) -> Path:
    """The digits CNN trained with ``seed``; ``permute``: on labels shifted by one class
    (``y -> (y + 1) % 10``: no class keeps its label)."""
    if permute:
        data = DigitsData(data.x_train, (data.y_train + 1) % 10, data.x_test, (data.y_test + 1) % 10)
    train_digits_cnn(data, seed=seed).save(out)
    return out
