"""A Debian bookworm rootfs that boots under ``systemd-nspawn``, built once and cached.

``ensure_rootfs(arch)`` returns a :class:`Rootfs` whose ``root`` is booted by
:mod:`.machine` (always under a fresh overlay: the cached tree is never written) and whose
``wheels`` folder holds the agent's dependency wheels for that architecture. It guarantees:

- the host's own apt state is never touched: ``mmdebstrap`` runs apt inside the new tree
  (its own sources, state and cache, removed at the end);
- everything lives under ``.cache/systemd/<arch>/``; ``manifest.json`` records the key of
  :meth:`.specs.MachineSpec.key` (packages, builder version, the project's requirements): a
  warm call with the same key reuses the rootfs and wheels without any network;
- a rootfs is built in ``rootfs.partial`` and the wheels in ``wheels.partial``, each renamed
  into place, then the manifest is written: an interrupted build is never reused; a file lock
  serialises builders (two test sessions, or the CLI and a session);
- an emulated architecture (arm64 through qemu-user and binfmt_misc) is made bootable, and
  only with test-only files, each for a limit of emulation (see :mod:`.specs`): the Pi 4's
  ``/proc/cpuinfo``, ``QEMU_CPU`` for every service, and a ``LoadCredential=`` reset for the
  Debian units that would fail at boot without it.

CLI: ``python -m tests.systemd.rootfs build --arch amd64|arm64|all``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.pi.rootfs_build import file_lock, run_build_tool, sha256_file
from tests.pi.specs import UserlandBuildError

from .specs import (
    BUILDER_VERSION,
    CPUINFO,
    DEFAULT_CACHE_DIR,
    MACHINES,
    PI4,
    MachineSpec,
    host_arch,
    mmdebstrap_command,
)

logger = logging.getLogger(__name__)

TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "systemd-nspawn": "systemd-container",
    "arch-test": "arch-test",
}


class MachineUnavailable(RuntimeError):
    """This host cannot boot the machine (a tool missing, not root): the tests skip."""


@dataclass(frozen=True)
class Rootfs:
    spec: MachineSpec
    home: Path  # .cache/systemd/<arch>
    manifest: dict[str, Any]

    @property
    def root(self) -> Path:
        return self.home / "rootfs"

    @property
    def wheels(self) -> Path:
        """The agent's dependency wheels for this architecture (no litefleet wheel)."""
        return self.home / "wheels"


def check_host(spec: MachineSpec) -> None:
    """Raise :class:`MachineUnavailable` when this host cannot build or boot ``spec``."""
    if os.geteuid() != 0:
        raise MachineUnavailable("systemd-nspawn and overlay mounts need root")
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise MachineUnavailable(f"apt-get install {' '.join(missing)} (scripts/setup.sh does)")
    if spec.arch != host_arch():
        ensure_binfmt(spec)


def ensure_binfmt(spec: MachineSpec) -> None:
    """Make the kernel run ``spec``'s binaries through qemu-user (binfmt_misc), as Debian's
    qemu-user-static does at install on a systemd host; this host's PID 1 is not systemd, so
    the registration from /usr/lib/binfmt.d is written here when missing."""
    if subprocess.run(["arch-test", spec.arch], capture_output=True, check=False).returncode == 0:
        return
    conf = Path("/usr/lib/binfmt.d") / f"qemu-{spec.machine}.conf"
    if not conf.exists():
        raise MachineUnavailable(f"{conf} is missing (apt-get install qemu-user-static)")
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "register").exists():
        run_build_tool(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)], what="mounting binfmt_misc")
    if not (misc / f"qemu-{spec.machine}").exists():
        (misc / "register").write_text(conf.read_text().strip())
    if subprocess.run(["arch-test", spec.arch], capture_output=True, check=False).returncode != 0:
        raise MachineUnavailable(f"{spec.arch} binaries still do not run after registering {conf}")


def _emulation_files(spec: MachineSpec, root: Path) -> list[str]:
    """The test-only files an emulated rootfs needs to boot and run the agent; their paths."""
    written = []
    cpuinfo = root / CPUINFO
    cpuinfo.parent.mkdir(parents=True, exist_ok=True)
    cpuinfo.write_text(PI4.cpuinfo)
    written.append(CPUINFO)
    conf = root / "etc/systemd/system.conf.d/50-litefleet-emulation.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        "# test-only: every service runs under qemu-user as the Pi 4's core (tests/systemd)\n"
        f"[Manager]\nDefaultEnvironment=QEMU_CPU={spec.qemu_cpu}\n"
    )
    written.append(str(conf.relative_to(root)))
    # Debian units that load credentials (systemd-sysctl, -sysusers, -tmpfiles-setup...)
    for unit in sorted((root / "lib/systemd/system").glob("*.service")):
        if "LoadCredential=" not in unit.read_text():
            continue
        dropin = root / f"etc/systemd/system/{unit.name}.d/50-litefleet-emulation.conf"
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text("# test-only: LoadCredential= fails under qemu-user\n[Service]\nLoadCredential=\n")
        written.append(str(dropin.relative_to(root)))
    return written


def _build_wheel_cache(spec: MachineSpec, home: Path) -> list[str]:
    """The agent's dependency wheels for ``spec``, fetched once (with network) by the very
    script a user runs; sessions then make their wheelhouse offline from them."""
    from .products import run_wheelhouse

    partial = home / "wheels.partial"
    shutil.rmtree(partial, ignore_errors=True)
    run_wheelhouse(spec.arch, partial)
    wheels = partial / "wheels"
    for own in wheels.glob("litefleet-*.whl"):
        own.unlink()  # each session builds the project's wheel from the working tree
    shutil.rmtree(home / "wheels", ignore_errors=True)
    wheels.rename(home / "wheels")
    shutil.rmtree(partial)
    return sorted(p.name for p in (home / "wheels").glob("*.whl"))


def _build_rootfs(spec: MachineSpec, home: Path) -> list[str]:
    partial = home / "rootfs.partial"
    if partial.exists():
        run_build_tool(["rm", "-rf", "--one-file-system", str(partial)], what="removing a stale build")
    run_build_tool(
        mmdebstrap_command(spec, partial),
        what=f"mmdebstrap {spec.arch}",
        timeout_s=1800,
    )
    emulation = _emulation_files(spec, partial) if spec.emulated else []
    if (home / "rootfs").exists():
        old = str(home / "rootfs")
        run_build_tool(["rm", "-rf", "--one-file-system", old], what="removing the old rootfs")
    partial.rename(home / "rootfs")
    return emulation


def _read_manifest(home: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((home / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def ensure_rootfs(arch: str, *, cache_dir: Path | None = None, rebuild: bool = False) -> Rootfs:
    """The cached rootfs and wheels for ``arch``, built unless a matching one exists.

    Raises :class:`MachineUnavailable` when the host lacks what it takes, and
    :class:`tests.pi.specs.UserlandBuildError` when a build step fails.
    """
    if arch not in MACHINES:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(MACHINES)}")
    spec = MACHINES[arch]
    check_host(spec)
    home = (cache_dir or DEFAULT_CACHE_DIR) / arch
    with file_lock(home / ".lock"):
        manifest = {} if rebuild else (_read_manifest(home) or {})
        rootfs_ok = manifest.get("key") == spec.key() and (home / "rootfs/usr/bin/python3").exists()
        wheels_ok = manifest.get("wheels_key") == spec.wheels_key() and (home / "wheels").is_dir()
        if rootfs_ok and wheels_ok:
            return Rootfs(spec, home, manifest)
        (home / "manifest.json").unlink(missing_ok=True)
        if not rootfs_ok:
            started = time.monotonic()
            logger.info("%s: building the systemd test machine's rootfs in %s", arch, home)
            manifest = {
                "key": spec.key(),
                "arch": arch,
                "builder_version": BUILDER_VERSION,
                "packages": list(spec.packages),
                "emulation_files": _build_rootfs(spec, home),
                "rootfs_built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "rootfs_build_s": round(time.monotonic() - started, 1),
            }
        if not wheels_ok:
            started = time.monotonic()
            logger.info("%s: fetching the agent's wheels into %s", arch, home / "wheels")
            wheels = _build_wheel_cache(spec, home)
            manifest.update(
                wheels_key=spec.wheels_key(),
                wheels={name: sha256_file(home / "wheels" / name) for name in wheels},
                wheels_build_s=round(time.monotonic() - started, 1),
            )
        tmp = home / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, home / "manifest.json")
        return Rootfs(spec, home, manifest)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.systemd.rootfs", description="Build the systemd test machines' rootfs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the rootfs and wheel cache, or check they are current")
    build.add_argument("--arch", choices=[*MACHINES, "all"], default="amd64")
    build.add_argument("--rebuild", action="store_true")
    build.add_argument("--cache-dir", type=Path, default=None)
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        for arch in MACHINES if opts.arch == "all" else [opts.arch]:
            fs = ensure_rootfs(arch, cache_dir=opts.cache_dir, rebuild=opts.rebuild)
            print(f"{arch}: {fs.root} (keys {fs.manifest['key']}, {fs.manifest['wheels_key']})")
    except (MachineUnavailable, UserlandBuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
