"""Inference for local apps.

- ``runtime``: whichever LiteRT runtime this machine has;
- ``inference``: one loaded model (quantize in, invoke, dequantize out);
- ``registry``: which runner serves each model name now;
- ``api``: the in-process API (``agent.load_model``); ``rest``: TensorFlow Serving's REST shape;
- ``mqtt_requests``: requests over MQTT; ``formats``/``npy``: request and response payloads;
- ``stats``: per-model counters and latency histograms.
"""
