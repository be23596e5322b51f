"""Large but quick-to-build TF Lite models for delivery tests (a ~14 MB float32 Dense layer)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_BUILD = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
n_in, n_out = int(sys.argv[1]), int(sys.argv[2])
for out, seed in zip(sys.argv[3::2], map(int, sys.argv[4::2])):
    rng = np.random.default_rng(seed)
    w = tf.constant(rng.standard_normal((n_in, n_out)).astype("float32") * 0.01)
    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, n_in], tf.float32)], autograph=False)
        def f(self, x):
            return tf.nn.softmax(tf.matmul(x, w))
    m = M()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([m.f.get_concrete_function()], m)
    data = conv.convert()
    open(out, "wb").write(data)
    # golden vectors in the format litefleet's converter writes
    it = Interpreter(model_content=data)
    it.allocate_tensors()
    x = rng.standard_normal((4, 1, n_in)).astype("float32")
    ys = []
    for xi in x:
        it.set_tensor(it.get_input_details()[0]["index"], xi)
        it.invoke()
        ys.append(it.get_tensor(it.get_output_details()[0]["index"]))
    np.savez(out[: -len(".tflite")] + ".golden.npz", input_0=x.reshape(4, n_in),
             output_0=np.concatenate(ys), atol_0=np.float64(1e-4))
"""


def build_dense_model(path: Path, *, megabytes: float = 14.0, seed: int = 0) -> Path:
    """A float32 model of about ``megabytes`` MB (one n x 1000 weight matrix)."""
    return build_dense_models([path], megabytes=megabytes, seeds=[seed])[0]


def build_dense_models(paths: list[Path], *, megabytes: float, seeds: list[int]) -> list[Path]:
    """Several such models (one per seed: different bytes, same signature) in one
    TensorFlow process, which is most of the cost."""
    n_out = 1000
    n_in = int(megabytes * 1e6 / 4 / n_out)
    pairs: list[str] = []
    for path, seed in zip(paths, seeds, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        pairs += [str(path), str(seed)]
    subprocess.run(
        [sys.executable, "-c", _BUILD, str(n_in), str(n_out), *pairs],
        check=True,
        capture_output=True,
    )
    for path in paths:
        write_card(path)
    return paths


def write_card(path: Path, mode: str = "none") -> Path:
    """``<stem>.card.json`` beside a model, describing its tensors as the converter's card does
    (``litefleet push`` wants a card and golden vectors with every model)."""
    import hashlib

    from agent.model_card import ModelCard, TensorSpec
    from agent.serving.runtime import load_interpreter

    data = path.read_bytes()
    it = load_interpreter(data)
    card = ModelCard(
        mode=mode,
        inputs=tuple(TensorSpec.from_details(d) for d in it.get_input_details()),
        outputs=tuple(TensorSpec.from_details(d) for d in it.get_output_details()),
        tflite_sha256=hashlib.sha256(data).hexdigest(),
        tflite_size_bytes=len(data),
    )
    out = path.with_name(path.name[: -len(".tflite")] + ".card.json")
    out.write_text(card.to_json())
    return out
