"""What an emulated Raspberry Pi userland is made of, and how its Python is started.

One :class:`ArchSpec` per Debian architecture fixes everything that goes into a rootfs
(Debian packages, exact wheel pins, the qemu CPU model, the ``/proc/cpuinfo`` it reads); its
JSON form, with :data:`SUITES` and :data:`BUILDER_VERSION`, is the cache key, so changing
any of them rebuilds. Pure data and command lines: nothing here touches the disk or network.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "pi"

# Bump when a build step changes what ends up in the rootfs: every cache is rebuilt.
BUILDER_VERSION = 1

DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# (mirror, suite, required). The security suite is optional: when its index cannot be
# fetched (a mirror mid-sync serves a Packages.xz that does not match its InRelease), the
# build goes on with the point-release packages and the manifest says so.
SUITES: tuple[tuple[str, str, bool], ...] = (
    (DEBIAN_MIRROR, "bookworm", True),
    (DEBIAN_MIRROR, "bookworm-updates", True),
    (DEBIAN_SECURITY_MIRROR, "bookworm-security", False),
)

PYTHON = "usr/bin/python3.11"
# A host shell script in the rootfs that starts PYTHON under qemu; the emulated interpreter
# is told (qemu -0) that this is its argv[0], so sys.executable names it and a child started
# with [sys.executable, ...] runs emulated too (an arm64 ELF cannot be exec'd on the host)
TRAMPOLINE = "usr/bin/python3.11-qemu"
SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"
# Debian's site.py adds these when they exist; both must exist in the rootfs, or a guest
# path lookup falls back to the host's folder of the same name
SYS_PATH_DIRS = (SITE_PACKAGES, "usr/lib/python3/dist-packages")

_PI4_CORE = """\
processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3
"""
_PI2_CORE = """\
processor\t: {n}
model name\t: ARMv7 Processor rev 5 (v7l)
BogoMIPS\t: 38.40
Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm
CPU implementer\t: 0x41
CPU architecture: 7
CPU variant\t: 0x0
CPU part\t: 0xc07
CPU revision\t: 5
"""


def _cpuinfo(core: str, cores: int, revision: str, model: str) -> str:
    body = "\n".join(core.format(n=n) for n in range(cores))
    return (
        f"{body}\nHardware\t: BCM2835\nRevision\t: {revision}\n"
        f"Serial\t\t: 100000000badc0de\nModel\t\t: {model}\n"
    )


@dataclass(frozen=True)
class ArchSpec:
    """Everything that defines one emulated userland; its JSON form is the cache key."""

    arch: str  # Debian architecture name
    triplet: str  # multiarch library folder
    qemu: str  # qemu user-mode binary, run explicitly (no binfmt_misc here)
    cpu: str  # qemu -cpu model: the CPU the board has (or the closest qemu offers)
    machine: str  # platform.machine() inside
    board: str  # what /proc/cpuinfo describes
    cpuinfo: str
    runtime_module: str  # module that holds the LiteRT ``Interpreter``
    debs: tuple[str, ...]  # Debian packages to install, with their dependencies
    wheels: tuple[str, ...]  # exact pins, installed with --no-deps (this is the lock)
    pip_platforms: tuple[str, ...]
    # links the packages' install scripts would make (update-alternatives): link -> target,
    # both relative to the rootfs, the target relative to the link's folder
    alternatives: tuple[tuple[str, str], ...] = ()

    def key(self) -> str:
        blob = json.dumps(
            {"spec": asdict(self), "suites": SUITES, "builder": BUILDER_VERSION},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_COMMON_DEBS = (
    "python3.11-minimal",
    "libpython3.11-stdlib",
    "libstdc++6",  # manylinux wheels (numpy, LiteRT) expect the system's C++ runtime
    "libc-bin",  # the C.UTF-8 locale; without it glibc reads the host's
    "ca-certificates",  # the bundle is built from its certificates (no install scripts)
)
_PURE_WHEELS = (
    "paho-mqtt==2.2.0",
    "tuf==7.0.1",
    "securesystemslib==1.6.0",
    "urllib3==2.8.0",
)

ARCHES: dict[str, ArchSpec] = {
    "arm64": ArchSpec(
        arch="arm64",
        triplet="aarch64-linux-gnu",
        qemu="qemu-aarch64-static",
        # -cpu max advertises SME and int8 results come out wrong; the Pi 4's core is exact
        cpu="cortex-a72",
        machine="aarch64",
        board="Raspberry Pi 4 Model B, 64-bit Raspberry Pi OS (Debian 12 bookworm arm64)",
        cpuinfo=_cpuinfo(_PI4_CORE, 4, "c03111", "Raspberry Pi 4 Model B Rev 1.1"),
        runtime_module="ai_edge_litert.interpreter",
        debs=_COMMON_DEBS,
        wheels=(
            "numpy==2.4.6",
            "ai-edge-litert==2.3.0",
            # ai-edge-litert's dependencies
            "flatbuffers==25.12.19",
            "ml-dtypes==0.6.0",
            "protobuf==7.36.2",
            "tqdm==4.70.1",
            "typing-extensions==4.16.0",
            "backports-strenum==1.2.8",
            *_PURE_WHEELS,
        ),
        pip_platforms=(
            "manylinux_2_27_aarch64",
            "manylinux_2_28_aarch64",
            "manylinux2014_aarch64",
            "manylinux_2_17_aarch64",
        ),
    ),
    "armhf": ArchSpec(
        arch="armhf",
        triplet="arm-linux-gnueabihf",
        qemu="qemu-arm-static",
        # qemu-arm has no Cortex-A53/A72; the Cortex-A7 is a Pi 2's core (ARMv7 + NEON)
        cpu="cortex-a7",
        machine="armv7l",
        board="Raspberry Pi 2 Model B, 32-bit Raspberry Pi OS (Debian 12 bookworm armhf)",
        cpuinfo=_cpuinfo(_PI2_CORE, 4, "a21041", "Raspberry Pi 2 Model B Rev 1.1"),
        runtime_module="tflite_runtime.interpreter",
        # PyPI has no armv7 numpy wheels: Debian's own, as `apt install python3-numpy` gives
        debs=(*_COMMON_DEBS, "python3-numpy"),
        wheels=("tflite-runtime==2.14.0", *_PURE_WHEELS),
        pip_platforms=("manylinux_2_34_armv7l", "linux_armv7l"),
        alternatives=(
            # libblas3/liblapack3 register these with update-alternatives in postinst
            ("usr/lib/arm-linux-gnueabihf/libblas.so.3", "blas/libblas.so.3"),
            ("usr/lib/arm-linux-gnueabihf/liblapack.so.3", "lapack/liblapack.so.3"),
        ),
    ),
}


class UserlandBuildError(RuntimeError):
    """A build step failed; the message says which and carries the tool's last output."""


def emulated_python_command(
    spec: ArchSpec, qemu: str, root: Path, args: Sequence[str | os.PathLike[str]]
) -> list[str]:
    # qemu opens the program itself on the host (so the rootfs path), and -L makes the
    # guest's every path lookup try ROOTFS/<path> first, then the host's <path>
    return [
        qemu,
        "-0",
        str(root / TRAMPOLINE),
        "-cpu",
        spec.cpu,
        "-L",
        str(root),
        str(root / PYTHON),
        *map(str, args),
    ]


def guest_environment(home: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment for the emulated Python (nothing of the host's leaks in),
    updated with ``env``. ``PYTHONPATH`` is the repository root, so ``agent`` imports from
    the working tree; pass your own ``PYTHONPATH`` to replace it."""
    base = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": str(home / "home"),
        "PYTHONPATH": str(REPO_ROOT),
        # the host's ~/.local would otherwise add x86-64 packages to sys.path
        "PYTHONNOUSERSITE": "1",
        "PYTHONUNBUFFERED": "1",
        # the project's own __pycache__ is shared with the host's 3.11; don't race it
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    for name in ("TZ", "TMPDIR"):
        if name in os.environ:
            base[name] = os.environ[name]
    base.update(env or {})
    return base
