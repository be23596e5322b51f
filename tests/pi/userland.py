"""An emulated Raspberry Pi userland: Debian bookworm's Python and the agent's wheels under qemu.

``ensure_userland(arch)`` returns a :class:`Userland` whose ``run``/``popen`` start the
rootfs's own ``python3.11`` under qemu user-mode emulation
(``qemu-aarch64-static -cpu cortex-a72 -L ROOTFS ROOTFS/usr/bin/python3.11``), with
exactly the wheels a Pi would install. It guarantees:

- the host's packages and apt state are never touched: Debian packages are resolved and
  downloaded under a private apt configuration (``APT_CONFIG``) and unpacked with
  ``dpkg -x``; wheels come from ``pip download --only-binary=:all: --platform ...``;
- everything lives under ``.cache/pi/<arch>/`` (downloads in ``debs/`` and ``wheels/`` are
  kept), and ``manifest.json`` records a key over the package lists, versions and build
  steps: a warm call with the same key reuses the rootfs without any network;
- a rootfs is built in ``rootfs.partial`` and renamed into place, then the manifest is
  written, so an interrupted build is never reused; a file lock serialises builders;
- the traps of a ``dpkg -x`` rootfs under ``qemu -L`` are closed: absolute symlinks are made
  relative (they would resolve on the host), the ``update-alternatives`` links that install
  scripts would make are made, the CA bundle is built from Debian's ``ca-certificates``,
  ``/proc/cpuinfo`` describes a real Pi (LiteRT segfaults otherwise), an empty
  ``/etc/ld.so.cache`` stops the host's being read, every ``sys.path`` folder exists in the
  rootfs (a missing one would fall back to the host's x86-64 packages), and ``.pyc`` files
  are compiled by the emulated interpreter as a Debian install would.

The project's own code is not copied in: :meth:`Userland.environment` puts the repository
on ``PYTHONPATH``; qemu's ``-L`` falls back to host paths that are absent from the rootfs,
so the emulated interpreter reads the working tree as it is.

CLI: ``python -m tests.pi.userland build --arch arm64`` (or ``scripts/pi-userland.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

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


def qemu_binary(arch: str) -> str | None:
    """Path of the qemu user-mode emulator for ``arch``, or None when it is not installed."""
    return shutil.which(ARCHES[arch].qemu)


def _emulated_python(
    spec: ArchSpec, qemu: str, root: Path, args: Sequence[str | os.PathLike[str]]
) -> list[str]:
    # qemu opens the program itself on the host (so the rootfs path), and -L makes the
    # guest's every path lookup try ROOTFS/<path> first, then the host's <path>
    return [qemu, "-cpu", spec.cpu, "-L", str(root), str(root / PYTHON), *map(str, args)]


@dataclass(frozen=True)
class Userland:
    """A built rootfs and how to run its Python under qemu."""

    spec: ArchSpec
    home: Path  # .cache/pi/<arch>
    qemu: str
    manifest: Mapping[str, Any] = field(repr=False)

    @property
    def root(self) -> Path:
        return self.home / "rootfs"

    @property
    def python(self) -> Path:
        return self.root / PYTHON

    @property
    def site_packages(self) -> Path:
        return self.root / SITE_PACKAGES

    def command(self, args: Sequence[str | os.PathLike[str]]) -> list[str]:
        """The host command that runs ``python3.11 *args`` inside the userland."""
        return _emulated_python(self.spec, self.qemu, self.root, args)

    def environment(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """A clean environment (nothing of the host's leaks in), updated with ``env``.

        ``PYTHONPATH`` is the repository root, so ``agent`` imports from the working tree;
        pass your own ``PYTHONPATH`` to replace it.
        """
        base = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(self.home / "home"),
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

    def popen(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start the emulated interpreter; ``kwargs`` go to :class:`subprocess.Popen`."""
        return subprocess.Popen(self.command(args), env=self.environment(env), **kwargs)

    def run(
        self,
        args: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 300.0,
        check: bool = False,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run the emulated interpreter to completion, capturing text output."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(
            self.command(args),
            env=self.environment(env),
            timeout=timeout,
            check=check,
            **kwargs,
        )


# --- building ---------------------------------------------------------------------------


def run_build_tool(
    cmd: Sequence[str],
    *,
    what: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 600.0,
    ok_codes: tuple[int, ...] = (0,),
) -> subprocess.CompletedProcess[str]:
    logger.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(
            list(cmd),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserlandBuildError(f"{what}: {exc}") from exc
    if proc.returncode not in ok_codes:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise UserlandBuildError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def optional_suites_failed(apt_stderr: str) -> list[str] | None:
    """The optional suites whose index ``apt-get update`` could not fetch, or None when a
    required suite failed or the failure is not a fetch failure. Pure."""
    failed = re.findall(r"^E: Failed to fetch (\S+)", apt_stderr, re.M)
    optional = [(m, s) for m, s, required in SUITES if not required]

    def suite_of(url: str) -> str | None:
        return next((s for m, s in optional if url.startswith(f"{m}/dists/{s}/")), None)

    suites = [suite_of(url) for url in failed]
    if not failed or None in suites:
        return None
    return sorted({s for s in suites if s is not None})


class _PrivateApt:
    """apt-get under a private configuration: its own sources, state and cache."""

    def __init__(self, spec: ArchSpec, home: Path) -> None:
        self.spec = spec
        self.dir = home / "apt"
        self.conf = self.dir / "apt.conf"

    def _write_config(self) -> None:
        d = self.dir
        for sub in (
            "state/lists/partial",
            "cache/archives/partial",
            "etc/apt.conf.d",
            "etc/preferences.d",
            "etc/trusted.gpg.d",
        ):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "state/status").touch()  # nothing installed: resolve the whole closure
        if not Path(DEBIAN_KEYRING).exists():
            raise UserlandBuildError(f"{DEBIAN_KEYRING} is missing (apt-get install debian-archive-keyring)")
        sources = "".join(
            f"deb [arch={self.spec.arch} signed-by={DEBIAN_KEYRING}] {mirror} {suite} main\n"
            for mirror, suite, _ in SUITES
        )
        (d / "etc/sources.list").write_text(sources)
        settings = {
            "APT::Architecture": self.spec.arch,
            "APT::Architectures::": self.spec.arch,
            "APT::Install-Recommends": "false",
            "APT::Get::Assume-Yes": "true",
            "Dir::State": d / "state",
            "Dir::State::status": d / "state/status",
            "Dir::Cache": d / "cache",
            "Dir::Etc": d / "etc",
            "Dir::Etc::Main": d / "etc/apt.conf.main",
            "Dir::Etc::Parts": d / "etc/apt.conf.d",
            "Dir::Etc::SourceList": d / "etc/sources.list",
            "Dir::Etc::SourceParts": d / "etc/sources.list.d",
            "Dir::Etc::Preferences": d / "etc/preferences",
            "Dir::Etc::PreferencesParts": d / "etc/preferences.d",
            "Dir::Etc::Trusted": d / "etc/trusted.gpg",
            "Dir::Etc::TrustedParts": d / "etc/trusted.gpg.d",
            "Dir::Log": d / "log",
            "Debug::NoLocking": "true",
            "Acquire::Retries": "3",
        }
        if os.geteuid() == 0:
            # downloads go to a folder the _apt user cannot write
            settings["APT::Sandbox::User"] = "root"
        self.conf.write_text("".join(f'{k} "{v}";\n' for k, v in settings.items()))

    def _env(self) -> dict[str, str]:
        # APT_CONFIG is read before /etc/apt/apt.conf.d, and ours points Dir::Etc elsewhere:
        # the host's apt configuration is neither read nor written
        return {**os.environ, "APT_CONFIG": str(self.conf), "LC_ALL": "C"}

    def update(self) -> list[str]:
        """Fetch the package lists; return the optional suites that could not be fetched."""
        self._write_config()
        proc = run_build_tool(
            ["apt-get", "update"], what="apt-get update", env=self._env(), ok_codes=(0, 100)
        )
        if proc.returncode == 0:
            return []
        degraded = optional_suites_failed(proc.stderr)
        if degraded is None:
            tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
            raise UserlandBuildError(f"apt-get update failed:\n{tail}")
        logger.warning(
            "%s: could not fetch the index of %s; building from the other suites",
            self.spec.arch,
            ", ".join(degraded),
        )
        return degraded

    def resolve(self, roots: Sequence[str]) -> dict[str, str]:
        """Package -> version of ``roots`` and their dependency closure, as apt would install."""
        proc = run_build_tool(
            ["apt-get", "-s", "install", *roots],
            what="resolving Debian packages",
            env=self._env(),
        )
        found = dict(re.findall(r"^Inst (\S+) \((\S+) ", proc.stdout, re.M))
        missing = [r for r in roots if r not in found]
        if missing:
            raise UserlandBuildError(f"apt did not resolve {missing}")
        return found

    def download(self, packages: Mapping[str, str], dest: Path) -> list[Path]:
        """The .deb of each package (name -> version) in ``dest``, downloading those missing."""
        dest.mkdir(parents=True, exist_ok=True)

        def deb_path(name: str, version: str) -> Path | None:
            escaped = version.replace(":", "%3a")
            hits = [
                p
                for p in dest.glob(f"{name}_{escaped}_*.deb")
                if p.name.rsplit("_", 1)[1] in (f"{self.spec.arch}.deb", "all.deb")
            ]
            return hits[0] if hits else None

        todo = [f"{n}={v}" for n, v in sorted(packages.items()) if deb_path(n, v) is None]
        if todo:
            logger.info("%s: downloading %d Debian packages", self.spec.arch, len(todo))
            run_build_tool(
                ["apt-get", "download", *todo],
                what="apt-get download",
                env=self._env(),
                cwd=dest,
            )
        paths = []
        for name, version in sorted(packages.items()):
            path = deb_path(name, version)
            if path is None:
                raise UserlandBuildError(f"apt-get download left no .deb for {name}={version}")
            paths.append(path)
        return paths


def _download_wheels(spec: ArchSpec, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "--only-binary=:all:",
        "--no-deps",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
        "-d",
        str(dest),
    ]
    for platform in spec.pip_platforms:
        cmd += ["--platform", platform]
    run_build_tool([*cmd, *spec.wheels], what=f"pip download for {spec.arch}")
    wheels = []
    for pin in spec.wheels:
        name, version = pin.split("==")
        stem = re.sub(r"[-_.]+", "_", name).lower()
        hits = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
        if len(hits) != 1:
            raise UserlandBuildError(f"expected one wheel for {pin} in {dest}, found {hits}")
        wheels.append(hits[0])
    return wheels


def _install_wheel(wheel: Path, site: Path) -> None:
    """Unpack a wheel as pip would: ``*.data/{purelib,platlib}`` into site-packages."""
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts, headers, data: the agent needs none
                parts = parts[2:]
            target = site.joinpath(*parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                target.chmod(mode | stat.S_IRUSR | stat.S_IWUSR)


def _relativise_symlinks(root: Path) -> int:
    """Rewrite absolute symlinks to relative ones: under ``qemu -L`` the kernel resolves an
    absolute target on the host (``sitecustomize.py -> /etc/python3.11/...``)."""
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            link = Path(dirpath) / name
            if not link.is_symlink():
                continue
            target = os.readlink(link)
            if not target.startswith("/"):
                continue
            relative = os.path.relpath(root / target.lstrip("/"), link.parent)
            link.unlink()
            link.symlink_to(relative)
            count += 1
    return count


def _build_ca_bundle(root: Path) -> int:
    """What ``update-ca-certificates`` makes from the default configuration: every
    certificate ``ca-certificates`` ships, concatenated."""
    certs = sorted((root / "usr/share/ca-certificates").rglob("*.crt"))
    if not certs:
        raise UserlandBuildError("ca-certificates shipped no certificates")
    bundle = root / "etc/ssl/certs/ca-certificates.crt"
    bundle.parent.mkdir(parents=True, exist_ok=True)
    with open(bundle, "w") as out:
        for cert in certs:
            text = cert.read_text()
            out.write(text if text.endswith("\n") else text + "\n")
    # openssl's OPENSSLDIR is /usr/lib/ssl: cert.pem and certs/ must point into the rootfs
    # (openssl ships them as links; make sure they exist even if it stops doing so)
    ssl_dir = root / "usr/lib/ssl"
    ssl_dir.mkdir(parents=True, exist_ok=True)
    for name, target in (
        ("cert.pem", "../../../etc/ssl/certs/ca-certificates.crt"),
        ("certs", "../../../etc/ssl/certs"),
    ):
        link = ssl_dir / name
        if not link.is_symlink() and not link.exists():
            link.symlink_to(target)
    return len(certs)


def _build_rootfs(spec: ArchSpec, home: Path, qemu: str, debs: list[Path], wheels: list[Path]) -> Path:
    partial = home / "rootfs.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    for deb in debs:
        run_build_tool(["dpkg-deb", "-x", str(deb), str(partial)], what=f"dpkg -x {deb.name}")
    site = partial / SITE_PACKAGES
    for folder in SYS_PATH_DIRS:
        (partial / folder).mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        _install_wheel(wheel, site)
    for link, target in spec.alternatives:
        path = partial / link
        if not (path.parent / target).exists():
            raise UserlandBuildError(f"alternative {link} -> {target}: target missing")
        path.unlink(missing_ok=True)
        path.symlink_to(target)
    relinked = _relativise_symlinks(partial)
    certs = _build_ca_bundle(partial)
    (partial / "proc").mkdir(exist_ok=True)
    (partial / "proc/cpuinfo").write_text(spec.cpuinfo)
    # ld.so reads /etc/ld.so.cache; absent from the rootfs, qemu would hand it the host's
    (partial / "etc/ld.so.cache").write_bytes(b"")
    (home / "home").mkdir(exist_ok=True)
    logger.info(
        "%s: unpacked %d packages and %d wheels (%d links made relative, %d CA certificates)",
        spec.arch,
        len(debs),
        len(wheels),
        relinked,
        certs,
    )
    # byte-compile as dpkg's py3compile and pip would, with the emulated interpreter itself
    # (an emulated import of numpy + LiteRT takes ~4.5 s from source, ~1 s from .pyc)
    folders = [str(partial / d) for d in ("usr/lib/python3.11", *SYS_PATH_DIRS)]
    run_build_tool(
        _emulated_python(spec, qemu, partial, ["-m", "compileall", "-q", "-j0", *folders]),
        what="byte-compiling the rootfs",
        env=Userland(spec=spec, home=home, qemu=qemu, manifest={}).environment(),
        timeout_s=900,
    )
    return partial


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_manifest(home: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((home / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _reusable(spec: ArchSpec, home: Path) -> dict[str, Any] | None:
    manifest = _read_manifest(home)
    if manifest is None or manifest.get("key") != spec.key():
        return None
    root = home / "rootfs"
    if not (root / PYTHON).exists() or not (root / "proc/cpuinfo").exists():
        return None
    return manifest


def ensure_userland(arch: str = "arm64", *, cache_dir: Path | None = None, rebuild: bool = False) -> Userland:
    """The userland for ``arch`` ("arm64" or "armhf"), built unless a matching one exists.

    Raises :class:`UserlandBuildError` when qemu is missing or a build step fails.
    """
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHES)}")
    spec = ARCHES[arch]
    qemu = qemu_binary(arch)
    if qemu is None:
        raise UserlandBuildError(f"{spec.qemu} not found (apt-get install qemu-user-static)")
    home = (cache_dir or DEFAULT_CACHE_DIR) / arch
    with file_lock(home / ".lock"):
        manifest = None if rebuild else _reusable(spec, home)
        if manifest is not None:
            logger.debug("%s: reusing %s (key %s)", arch, home / "rootfs", manifest["key"])
            return Userland(spec=spec, home=home, qemu=qemu, manifest=manifest)
        started = time.monotonic()
        logger.info("%s: building the emulated userland in %s", arch, home)
        apt = _PrivateApt(spec, home)
        degraded = apt.update()
        packages = apt.resolve(spec.debs)
        debs = apt.download(packages, home / "debs")
        wheels = _download_wheels(spec, home / "wheels")
        partial = _build_rootfs(spec, home, qemu, debs, wheels)
        root = home / "rootfs"
        if root.exists():
            shutil.rmtree(root)
        partial.rename(root)
        manifest = {
            "key": spec.key(),
            "arch": arch,
            "builder_version": BUILDER_VERSION,
            "board": spec.board,
            "qemu": [qemu, "-cpu", spec.cpu],
            "debian_packages": packages,
            "debian_suites_unavailable": degraded,
            "wheels": {w.name: _sha256(w) for w in wheels},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_s": round(time.monotonic() - started, 1),
        }
        tmp = home / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, home / "manifest.json")
        logger.info("%s: built in %.1f s", arch, manifest["build_s"])
        return Userland(spec=spec, home=home, qemu=qemu, manifest=manifest)


# --- CLI --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.pi.userland",
        description="Build, inspect or use the emulated Raspberry Pi userland.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the userland, or check that it is current")
    build.add_argument("--arch", choices=[*ARCHES, "all"], default="arm64")
    build.add_argument("--rebuild", action="store_true", help="rebuild even when current")
    run = sub.add_parser("run", help="run the emulated python3.11 with the given arguments")
    run.add_argument("--arch", choices=list(ARCHES), default="arm64")
    run.add_argument("args", nargs=argparse.REMAINDER)
    for p in (build, run):
        p.add_argument("--cache-dir", type=Path, default=None)
        p.add_argument("-v", "--verbose", action="store_true")
    opts = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if opts.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    try:
        if opts.command == "build":
            for arch in ARCHES if opts.arch == "all" else [opts.arch]:
                started = time.monotonic()
                land = ensure_userland(arch, cache_dir=opts.cache_dir, rebuild=opts.rebuild)
                print(f"{arch}: {land.root} (key {land.manifest['key']}, {time.monotonic() - started:.1f} s)")
            return 0
        land = ensure_userland(opts.arch, cache_dir=opts.cache_dir)
        args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
        return land.popen(args, stdin=None).wait()
    except UserlandBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
