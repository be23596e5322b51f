"""litefleet host side: convert, quantize, validate, sign and publish models."""

__version__ = "0.1.0"
