"""Tests and harness that run the device side in an emulated Raspberry Pi userland."""
