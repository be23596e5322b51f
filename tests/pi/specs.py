"""What an emulated Raspberry Pi userland is made of, and how its Python is started.

One :class:`ArchSpec` per Debian architecture fixes everything that goes into a rootfs
(Debian packages, exact wheel pins); its JSON form, with :data:`SUITES` and
:data:`BUILDER_VERSION`, is the cache key, so changing any of them rebuilds. Its
:class:`Board` list says which Raspberry Pi models the rootfs runs as: the core qemu emulates
and the ``/proc/cpuinfo`` it reads. Pure data and command lines: nothing here touches the
disk or network.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# LITEFLEET_PI_CACHE_DIR moves it out of the working tree, e.g. for CI runs that each start
# from a fresh clone but may share a machine
DEFAULT_CACHE_DIR = Path(os.environ.get("LITEFLEET_PI_CACHE_DIR") or REPO_ROOT / ".cache" / "pi")

# Bump when a build step changes what ends up in the rootfs: every cache is rebuilt.
BUILDER_VERSION = 2

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
# with [sys.executable, ...] runs emulated too (an arm64 ELF cannot be exec'd on the host).
# qemu does not apply -L to execve: a guest exec of "/usr/bin/python3" or "sh" runs the
# host's x86-64 program natively; sys.executable is a host path, so it reaches the rootfs.
TRAMPOLINE = "usr/bin/python3.11-qemu"
SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"
# Debian's site.py adds these when they exist; both must exist in the rootfs, or a guest
# path lookup falls back to the host's folder of the same name
SYS_PATH_DIRS = (SITE_PACKAGES, "usr/lib/python3/dist-packages")

# /proc/cpuinfo of each board, as its Raspberry Pi OS kernel prints it. LiteRT's CPU
# detection reads the part number (and segfaults without an ARM one); XNNPACK picks kernels
# by it, so it must be the core qemu emulates (-cpu).
_ARM64_CORE = """\
processor\t: {n}
BogoMIPS\t: 108.00
Features\t: {features}
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: {variant}
CPU part\t: {part}
CPU revision\t: {revision}
"""
_ARMV7_CORE = """\
processor\t: {n}
model name\t: ARMv7 Processor rev {revision} (v7l)
BogoMIPS\t: 38.40
Features\t: {features}
CPU implementer\t: 0x41
CPU architecture: 7
CPU variant\t: {variant}
CPU part\t: {part}
CPU revision\t: {revision}
"""


def _cpuinfo(core: str, revision_code: str, model: str, **fields: str) -> str:
    body = "\n".join(core.format(n=n, **fields) for n in range(4))
    return (
        f"{body}\nHardware\t: BCM2835\nRevision\t: {revision_code}\n"
        f"Serial\t\t: 100000000badc0de\nModel\t\t: {model}\n"
    )


@dataclass(frozen=True)
class Board:
    """One Raspberry Pi model: the core qemu emulates and the /proc/cpuinfo it reads."""

    name: str  # short id: pi4
    title: str
    cpu: str  # qemu -cpu model
    cpuinfo: str


@dataclass(frozen=True)
class ArchSpec:
    """Everything that defines one rootfs; its JSON form (boards aside) is the cache key."""

    arch: str  # Debian architecture name
    triplet: str  # multiarch library folder
    qemu: str  # qemu user-mode binary, run explicitly (no binfmt_misc here)
    machine: str  # platform.machine() inside
    os_name: str
    runtime_module: str  # module that holds the LiteRT ``Interpreter``
    debs: tuple[str, ...]  # Debian packages to install, with their dependencies
    wheels: tuple[str, ...]  # exact pins, installed with --no-deps (this is the lock)
    pip_platforms: tuple[str, ...]
    # boards this rootfs runs as; the first is the default. Each is a hard-linked copy of
    # the rootfs with its own /proc/cpuinfo, so boards do not enter the rootfs's key.
    boards: tuple[Board, ...]
    # links the packages' install scripts would make (update-alternatives): link -> target,
    # both relative to the rootfs, the target relative to the link's folder
    alternatives: tuple[tuple[str, str], ...] = ()

    def key(self) -> str:
        recipe = {k: v for k, v in asdict(self).items() if k != "boards"}
        blob = json.dumps({"spec": recipe, "suites": SUITES, "builder": BUILDER_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def board(self, name: str | None = None) -> Board:
        """The board called ``name``, or the default one."""
        if name is None:
            return self.boards[0]
        for board in self.boards:
            if board.name == name:
                return board
        raise ValueError(f"{self.arch} has no board {name!r}; choose from {[b.name for b in self.boards]}")


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

# qemu's default -cpu max advertises SVE/SME and int8 results come out wrong: always a real core
PI4 = Board(
    name="pi4",
    title="Raspberry Pi 4 Model B (Cortex-A72)",
    cpu="cortex-a72",
    cpuinfo=_cpuinfo(
        _ARM64_CORE,
        "c03111",
        "Raspberry Pi 4 Model B Rev 1.1",
        features="fp asimd evtstrm crc32 cpuid",
        variant="0x0",
        part="0xd08",
        revision="3",
    ),
)
PI5 = Board(
    name="pi5",
    title="Raspberry Pi 5 Model B (Cortex-A76)",
    cpu="cortex-a76",
    cpuinfo=_cpuinfo(
        _ARM64_CORE,
        "d04170",
        "Raspberry Pi 5 Model B Rev 1.0",
        features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
        "asimdrdm lrcpc dcpop asimddp",
        variant="0x4",
        part="0xd0b",
        revision="1",
    ),
)
PI3 = Board(
    name="pi3",
    title="Raspberry Pi 3 Model B (Cortex-A53; also Zero 2 W)",
    cpu="cortex-a53",
    cpuinfo=_cpuinfo(
        _ARM64_CORE,
        "a02082",
        "Raspberry Pi 3 Model B Rev 1.2",
        features="fp asimd evtstrm crc32 cpuid",
        variant="0x0",
        part="0xd03",
        revision="4",
    ),
)
# qemu-arm has no Cortex-A53/A72: the 32-bit OS is emulated on a Pi 2's Cortex-A7 (ARMv7 + NEON)
PI2 = Board(
    name="pi2",
    title="Raspberry Pi 2 Model B (Cortex-A7)",
    cpu="cortex-a7",
    cpuinfo=_cpuinfo(
        _ARMV7_CORE,
        "a21041",
        "Raspberry Pi 2 Model B Rev 1.1",
        features="half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm",
        variant="0x0",
        part="0xc07",
        revision="5",
    ),
)

ARCHES: dict[str, ArchSpec] = {
    "arm64": ArchSpec(
        arch="arm64",
        triplet="aarch64-linux-gnu",
        qemu="qemu-aarch64-static",
        machine="aarch64",
        os_name="64-bit Raspberry Pi OS (Debian 12 bookworm arm64)",
        runtime_module="ai_edge_litert.interpreter",
        # python3.11-venv: ensurepip and the pip/setuptools wheels Debian keeps apart, so
        # systemd/install.sh can make its venv with the Pi's own Python (tests/pi)
        debs=(*_COMMON_DEBS, "python3.11-venv"),
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
        boards=(PI4, PI5, PI3),
    ),
    "armhf": ArchSpec(
        arch="armhf",
        triplet="arm-linux-gnueabihf",
        qemu="qemu-arm-static",
        machine="armv7l",
        os_name="32-bit Raspberry Pi OS (Debian 12 bookworm armhf)",
        runtime_module="tflite_runtime.interpreter",
        # PyPI has no armv7 numpy wheels: Debian's own, as `apt install python3-numpy` gives
        debs=(*_COMMON_DEBS, "python3-numpy"),
        wheels=("tflite-runtime==2.14.0", *_PURE_WHEELS),
        pip_platforms=("manylinux_2_34_armv7l", "linux_armv7l"),
        boards=(PI2,),
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
    cpu: str, qemu: str, root: Path, args: Sequence[str | os.PathLike[str]]
) -> list[str]:
    # qemu opens the program itself on the host (so the rootfs path), and -L makes the
    # guest's every path lookup try ROOTFS/<path> first, then the host's <path>
    return [
        qemu,
        "-0",
        str(root / TRAMPOLINE),
        "-cpu",
        cpu,
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
