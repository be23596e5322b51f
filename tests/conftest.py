"""Shared fixtures: a real Mosquitto per test on a free loopback port."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# TensorFlow's C++ logging is noise in test output
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[object]:
    """A private Mosquitto (persistence on) in this test's tmp folder."""
    from converter.broker import BrokerConfig, BrokerProcess

    proc = BrokerProcess(BrokerConfig(data_dir=tmp_path / "broker"))
    proc.start()
    try:
        yield proc
    finally:
        proc.kill()
