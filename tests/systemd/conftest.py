"""Fixtures for the tests under a real systemd: cached rootfs, wheelhouses, booted machines.

A machine fixture skips only when this host cannot boot one (not root, or systemd-nspawn,
mmdebstrap or arch-test missing: ``scripts/setup.sh`` installs them); a failed build is an
error. Every fixture that boots a machine gives it a fresh overlay and removes it afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pi.specs import UserlandBuildError

from .device import Device
from .machine import Machine
from .products import offline_wheelhouse
from .rootfs import MachineUnavailable, Rootfs, ensure_rootfs
from .specs import REPO_ROOT

# where machines keep their overlays (the upper layer holds a 150 MB venv)
SCRATCH = Path(tempfile.gettempdir())


def machine_rootfs(arch: str) -> Rootfs:
    try:
        return ensure_rootfs(arch)
    except MachineUnavailable as exc:
        pytest.skip(f"no {arch} machine on this host: {exc}")
    except UserlandBuildError:
        raise


_wheelhouses: dict[str, Path] = {}


@pytest.fixture(scope="session")
def wheelhouse_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wheelhouses")


def wheelhouse_for(arch: str, rootfs: Rootfs, base: Path) -> Path:
    """This session's wheelhouse for ``arch``, from the working tree (made once).

    ``LITEFLEET_SYSTEMD_AGENT_SOURCE=DIR`` builds the litefleet wheel from another source
    tree (an older release, to see which checks it fails); install.sh is always this tree's."""
    if arch not in _wheelhouses:
        source = Path(os.environ.get("LITEFLEET_SYSTEMD_AGENT_SOURCE") or REPO_ROOT)
        _wheelhouses[arch] = offline_wheelhouse(arch, base / arch, rootfs.wheels, source=source)
    return _wheelhouses[arch]


@pytest.fixture(scope="module")
def new_machine(wheelhouse_dir: Path) -> Iterator[object]:
    """A factory: ``new_machine(arch)`` boots a fresh machine with the session's wheelhouse at
    /media/wheelhouse; each is closed at the end of the module."""
    machines: list[Machine] = []

    def make(arch: str, *, binds: dict[Path, str] | None = None) -> Machine:
        rootfs = machine_rootfs(arch)
        wheels = wheelhouse_for(arch, rootfs, wheelhouse_dir)
        workdir = Path(tempfile.mkdtemp(prefix=f"lf-systemd-{arch}-", dir=SCRATCH))
        machine = Machine(rootfs, workdir, binds={wheels: "/media/wheelhouse", **(binds or {})})
        machines.append(machine)
        machine.boot()
        return machine

    yield make
    for machine in machines:
        machine.close()


def open_device(arch: str, new_machine: object) -> Device:
    """A booted machine with the host side running, nothing installed yet."""
    host = Path(tempfile.mkdtemp(prefix=f"lf-host-{arch}-", dir=SCRATCH))
    xfer = host / "xfer"
    xfer.mkdir()
    machine = new_machine(arch, binds={xfer: "/media/litefleet"})  # type: ignore[operator]
    device = Device(arch=arch, machine=machine, workdir=host, secure=not machine.spec.emulated)
    device.start_host_side()
    return device


def close_device(device: Device) -> None:
    device.close()
    device.machine.close()
    shutil.rmtree(device.workdir, ignore_errors=True)
