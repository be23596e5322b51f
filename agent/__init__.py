"""litefleet device agent: pulls signed models over MQTT and serves LiteRT inference.

This package never imports TensorFlow, Keras or :mod:`converter`.
"""

__version__ = "0.1.0"
