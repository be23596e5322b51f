"""Tiny .tflite models for the agent's inference, REST, MQTT and metrics tests.

The models are built by TensorFlow in a child process (``python
tests/agent/serving/test_inference_models.py OUTDIR``), once, and cached in pytest's cache
folder, so test processes never import TensorFlow and reruns are instant.
Weights are untrained but seeded: the tests check plumbing (shapes, dtypes,
quantization arithmetic, batching), not accuracy.

- ``int8.tflite``: digits-shaped CNN, int8 input [1,8,8,1], int8 output [1,10]
- ``float.tflite``: the same network with float32 input and output
- ``multi.tflite``: two float inputs ``a`` [1,4] and ``b`` [1,3], two outputs
- ``two_out.tflite``: one float input [1,4], two outputs
"""

from __future__ import annotations

import pytest

from tests.support.tiny_models import TinyModels, models_for


@pytest.fixture(scope="session")
def tiny_models(request: pytest.FixtureRequest) -> TinyModels:
    return models_for(request)


# -- the models are what the other tests assume ---------------------------------
def test_int8_model_has_int8_io(tiny_models: TinyModels) -> None:
    from agent.serving.inference import ModelRunner

    r = ModelRunner.from_file(tiny_models.int8)
    assert [s.dtype for s in r.inputs] == ["int8"] and [s.dtype for s in r.outputs] == ["int8"]
    assert r.inputs[0].shape == (1, 8, 8, 1) and r.inputs[0].quantized
    assert r.outputs[0].shape == (1, 10) and r.outputs[0].quantized


def test_multi_model_has_two_inputs_and_outputs(tiny_models: TinyModels) -> None:
    from agent.serving.inference import ModelRunner

    r = ModelRunner.from_file(tiny_models.multi)
    assert sorted(s.shape for s in r.inputs) == [(1, 3), (1, 4)]
    assert len(r.outputs) == 2
