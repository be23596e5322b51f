"""What a booted Debian machine for the systemd tests is made of. Pure data and command lines.

One :class:`MachineSpec` per architecture fixes the rootfs (Debian packages, the test-only
emulation files); its JSON form with :data:`BUILDER_VERSION` is the rootfs's cache key. The
wheel cache has its own key: the project's requirements and ``scripts/wheelhouse.sh`` (which
fetches the agent's wheels for the architecture). Changing either rebuilds only its part.
Nothing here touches the disk or the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.pi.specs import ARCHES as PI_ARCHES

REPO_ROOT = Path(__file__).resolve().parents[2]
# LITEFLEET_SYSTEMD_CACHE_DIR moves it out of the working tree (CI runs from fresh clones)
DEFAULT_CACHE_DIR = Path(os.environ.get("LITEFLEET_SYSTEMD_CACHE_DIR") or REPO_ROOT / ".cache" / "systemd")

# Bump when a build step changes what ends up in the rootfs or the wheel cache.
BUILDER_VERSION = 1

WHEELHOUSE_SCRIPT = REPO_ROOT / "scripts" / "wheelhouse.sh"

SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("LITEFLEET_DEBIAN_MIRROR", "http://deb.debian.org/debian")

# A Debian system as a Pi runs it: systemd as PID 1 with D-Bus and logind, Python 3.11 with venv
# (what systemd/install.sh needs), ps and ip. Mosquitto is for the host-side units (litefleet
# broker runs it); its own Debian service is disabled in the rootfs.
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "libnss-systemd",
    "python3",
    "python3-venv",
    "procps",
    "iproute2",
)

# Under qemu-user, LiteRT crashes creating an interpreter unless /proc/cpuinfo describes an ARM
# CPU, and qemu's default "-cpu max" advertises SME (int8 results come out wrong): the Pi 4's
# core and its cpuinfo, as tests/pi uses them.
PI4 = PI_ARCHES["arm64"].board("pi4")
EMULATION_DIR = "usr/local/share/litefleet-emulation"
CPUINFO = f"{EMULATION_DIR}/cpuinfo"

# The test-only drop-in for litefleet-agent.service under emulation (the real unit is not
# changed). Each line is a limit of qemu-user, not of systemd or the unit:
# - LoadCredential= fails ("Failed to set up credentials: Invalid argument", status 243);
# - PrivateUsers= fails ("Failed to set up user namespacing: Invalid argument", status 217);
# - ProtectProc= mounts a fresh /proc, so the Pi's cpuinfo is bound over it again.
# Seccomp directives (SystemCallFilter=, MemoryDenyWriteExecute=, RestrictAddressFamilies=...)
# are accepted but not applied under emulation; they need no line here.
AGENT_EMULATION_DROPIN = f"""\
# test-only: qemu-user emulation limits (tests/systemd/specs.py), never on a real Pi
[Service]
LoadCredential=
PrivateUsers=no
BindReadOnlyPaths=/{CPUINFO}:/proc/cpuinfo
"""


@dataclass(frozen=True)
class MachineSpec:
    """Everything that defines one architecture's rootfs and wheel cache."""

    arch: str  # Debian architecture
    machine: str  # uname -m inside
    packages: tuple[str, ...]
    # qemu -cpu for every process of an emulated guest (QEMU_CPU), None when native
    qemu_cpu: str | None = None

    @property
    def emulated(self) -> bool:
        return self.qemu_cpu is not None

    def key(self) -> str:
        """The rootfs's cache key: this spec and the builder."""
        blob = json.dumps({"spec": asdict(self), "builder": BUILDER_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def wheels_key(self) -> str:
        """The wheel cache's key: the architecture, the project's requirements and the script
        that fetches them."""
        recipe = {
            "arch": self.arch,
            "builder": BUILDER_VERSION,
            "requirements": agent_requirements(),
            "wheelhouse.sh": hashlib.sha256(WHEELHOUSE_SCRIPT.read_bytes()).hexdigest(),
        }
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def agent_requirements() -> dict[str, list[str]]:
    """The project's runtime and build requirements (the wheel cache depends on them)."""
    doc = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return {
        "dependencies": doc["project"]["dependencies"],
        "agent": doc["project"]["optional-dependencies"]["agent"],
        "build": doc["build-system"]["requires"],
    }


MACHINES: dict[str, MachineSpec] = {
    "amd64": MachineSpec(
        arch="amd64",
        machine="x86_64",
        packages=(*BASE_PACKAGES, "mosquitto"),
    ),
    "arm64": MachineSpec(
        arch="arm64",
        machine="aarch64",
        packages=BASE_PACKAGES,
        qemu_cpu=PI4.cpu,
    ),
}


def host_arch() -> str:
    """The Debian architecture of this machine."""
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


def mmdebstrap_command(spec: MachineSpec, target: Path) -> list[str]:
    """The rootfs build: Debian minbase plus ``spec.packages``, systemd-networkd enabled (the
    guest's side of the veth link), Mosquitto's own service disabled (the host-side unit runs
    it). Measured here: 25 s for amd64 on a quiet machine, ~3 min for arm64 (its maintainer
    scripts run emulated), up to 4x that while other tests load the machine. (Keeping the
    .debs between builds with mmdebstrap's sync-in/sync-out hooks took 71 s instead of 25 s
    for amd64, one run each: not worth it for a cache rebuilt only when the spec changes.)"""
    hooks = ['--customize-hook=chroot "$1" systemctl enable systemd-networkd.service']
    if "mosquitto" in spec.packages:
        hooks.append('--customize-hook=chroot "$1" systemctl disable mosquitto.service')
    return [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        f"--architectures={spec.arch}",
        f"--include={','.join(spec.packages)}",
        *hooks,
        SUITE,
        str(target),
        DEBIAN_MIRROR,
    ]
