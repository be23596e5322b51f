"""Fixtures for the emulated Raspberry Pi tests: userlands built once per session.

A userland fixture skips only when qemu is not installed; a failed build is an error (a
broken mirror or a bad pin must not pass as "skipped").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .reference import ensure_host_tflite_runtime
from .userland import ARCHES, Userland, ensure_userland, qemu_binary


def _userland(arch: str, board: str | None = None) -> Userland:
    if qemu_binary(arch) is None:
        pytest.skip(f"{ARCHES[arch].qemu} is not installed (apt-get install qemu-user-static)")
    return ensure_userland(arch, board=board)


@pytest.fixture(scope="session", params=sorted(ARCHES))
def userland(request: pytest.FixtureRequest) -> Userland:
    """Each emulated userland in turn (arm64, armhf)."""
    return _userland(request.param)


@pytest.fixture(scope="session")
def arm64_userland() -> Userland:
    """64-bit Raspberry Pi OS userland: Pi 4 (Cortex-A72), ai-edge-litert."""
    return _userland("arm64")


@pytest.fixture(scope="session", params=[b.name for b in ARCHES["arm64"].boards])
def arm64_board_userland(request: pytest.FixtureRequest) -> Userland:
    """The arm64 userland as each 64-bit board in turn: Pi 4, Pi 5, Pi 3 (their cores)."""
    return _userland("arm64", request.param)


@pytest.fixture(scope="session")
def armhf_userland() -> Userland:
    """32-bit Raspberry Pi OS userland: Pi 2 (Cortex-A7), tflite-runtime, Debian's numpy."""
    return _userland("armhf")


@pytest.fixture(scope="session")
def host_tflite_runtime() -> Path:
    """python of a host venv with the armhf userland's tflite-runtime version."""
    return ensure_host_tflite_runtime()
