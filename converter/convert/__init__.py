"""Keras or SavedModel to TF Lite, measured against the source.

- ``sources``/``datasets``: the user's model and data; ``quantize``: one conversion per mode;
- ``measure``/``selection``: accuracy, agreement, size, latency and ``--quantize auto``;
- ``artifacts``: the model card and golden vectors; ``report``: JSON and table;
- ``pipeline``: :func:`convert_model`, what ``litefleet convert`` does.
"""
