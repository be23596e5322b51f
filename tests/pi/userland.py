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
  ``/proc/cpuinfo`` describes a real Pi (LiteRT segfaults otherwise; each board in
  ``specs.ARCHES`` gets a hard-linked copy of the rootfs with its own), an empty
  ``/etc/ld.so.cache`` stops the host's being read, every ``sys.path`` folder exists in the
  rootfs (a missing one would fall back to the host's x86-64 packages), and ``.pyc`` files
  are compiled by the emulated interpreter as a Debian install would;
- a child started as ``[sys.executable, ...]`` runs emulated too: the host cannot exec an
  ARM ELF (no binfmt_misc), so ``sys.executable`` names a small host shell script in the
  rootfs (``usr/bin/python3.11-qemu``, rewritten on every call for this qemu and this
  rootfs location) that starts the emulated interpreter again (qemu ``-0``).

Build steps live in :mod:`.rootfs_build`, the specs (packages, pins, CPUs) in :mod:`.specs`.

The project's own code is not copied in: :meth:`Userland.environment` puts the repository
on ``PYTHONPATH``; qemu's ``-L`` falls back to host paths that are absent from the rootfs,
so the emulated interpreter reads the working tree as it is.

CLI: ``python -m tests.pi.userland build --arch arm64`` (or ``scripts/pi-userland.sh``).
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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .rootfs_build import (
    PrivateApt,
    build_rootfs,
    clone_for_board,
    download_wheels,
    file_lock,
    prune_downloads,
    sha256_file,
    write_trampoline,
)
from .specs import (
    ARCHES,
    BUILDER_VERSION,
    DEFAULT_CACHE_DIR,
    PYTHON,
    REPO_ROOT,
    SITE_PACKAGES,
    ArchSpec,
    Board,
    UserlandBuildError,
    emulated_python_command,
    guest_environment,
)

__all__ = ["ARCHES", "REPO_ROOT", "Userland", "UserlandBuildError", "ensure_userland", "qemu_binary"]

logger = logging.getLogger(__name__)


def qemu_binary(arch: str) -> str | None:
    """Path of the qemu user-mode emulator for ``arch``, or None when it is not installed."""
    return shutil.which(ARCHES[arch].qemu)


@dataclass(frozen=True)
class Userland:
    """A built rootfs, as one board, and how to run its Python under qemu."""

    spec: ArchSpec
    board: Board
    home: Path  # .cache/pi/<arch>
    root: Path  # .cache/pi/<arch>/boards/<board>/rootfs
    qemu: str
    manifest: Mapping[str, Any] = field(repr=False)

    @property
    def python(self) -> Path:
        return self.root / PYTHON

    @property
    def site_packages(self) -> Path:
        return self.root / SITE_PACKAGES

    def command(self, args: Sequence[str | os.PathLike[str]]) -> list[str]:
        """The host command that runs ``python3.11 *args`` inside the userland."""
        return emulated_python_command(self.board.cpu, self.qemu, self.root, args)

    def environment(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """A clean environment (see :func:`.specs.guest_environment`) updated with ``env``."""
        return guest_environment(self.home, env)

    def scratch_copy(self, dest: Path) -> Userland:
        """This board's userland in ``dest/rootfs``, a hard-linked copy of the built rootfs
        (~0.2 s, no extra space) for a test that installs into it; the cached rootfs is not
        touched as long as files are replaced, not rewritten in place (what installers do)."""
        root = clone_for_board(self.home / "rootfs", self.board, dest)
        write_trampoline(self.board.cpu, self.qemu, root)
        return replace(self, root=root)

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
    if not (home / "rootfs" / PYTHON).exists():
        return None
    return manifest


def _board_rootfs(spec: ArchSpec, board: Board, home: Path, qemu: str, manifest: Mapping[str, Any]) -> Path:
    """The board's hard-linked copy of the rootfs, made again when the rootfs was rebuilt."""
    dest = home / "boards" / board.name
    stamp = {"rootfs": [manifest["key"], manifest["built_at"]], "board": asdict(board)}
    try:
        current = json.loads((dest / "board.json").read_text())
    except (OSError, ValueError):
        current = None
    root = dest / "rootfs"
    if current != stamp or not (root / PYTHON).exists():
        logger.info("%s: preparing board %s", spec.arch, board.name)
        clone_for_board(home / "rootfs", board, dest)
        (dest / "board.json").write_text(json.dumps(stamp, indent=2) + "\n")
    write_trampoline(board.cpu, qemu, root)
    return root


def ensure_userland(
    arch: str = "arm64", *, board: str | None = None, cache_dir: Path | None = None, rebuild: bool = False
) -> Userland:
    """The userland for ``arch`` ("arm64" or "armhf") as ``board`` (default: the
    architecture's first, a Pi 4 or a Pi 2), built unless a matching one exists.

    Raises :class:`UserlandBuildError` when qemu is missing or a build step fails.
    """
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHES)}")
    spec = ARCHES[arch]
    chosen = spec.board(board)
    qemu = qemu_binary(arch)
    if qemu is None:
        raise UserlandBuildError(f"{spec.qemu} not found (apt-get install qemu-user-static)")
    home = (cache_dir or DEFAULT_CACHE_DIR) / arch
    with file_lock(home / ".lock"):
        manifest = None if rebuild else _reusable(spec, home)
        if manifest is not None:
            logger.debug("%s: reusing %s (key %s)", arch, home / "rootfs", manifest["key"])
            root = _board_rootfs(spec, chosen, home, qemu, manifest)
            return Userland(spec=spec, board=chosen, home=home, root=root, qemu=qemu, manifest=manifest)
        started = time.monotonic()
        logger.info("%s: building the emulated userland in %s", arch, home)
        apt = PrivateApt(spec, home)
        degraded = apt.update()
        packages = apt.resolve(spec.debs)
        debs = apt.download(packages, home / "debs")
        wheels = download_wheels(spec, home / "wheels")
        prune_downloads([*debs, *wheels], [home / "debs", home / "wheels"])
        partial = build_rootfs(spec, home, qemu, debs, wheels)
        shutil.rmtree(home / "boards", ignore_errors=True)
        shutil.rmtree(home / "rootfs", ignore_errors=True)
        partial.rename(home / "rootfs")
        manifest = {
            "key": spec.key(),
            "arch": arch,
            "builder_version": BUILDER_VERSION,
            "os": spec.os_name,
            "debian_packages": packages,
            "debian_suites_unavailable": degraded,
            "wheels": {w.name: sha256_file(w) for w in wheels},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_s": round(time.monotonic() - started, 1),
        }
        tmp = home / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, home / "manifest.json")
        logger.info("%s: built in %.1f s", arch, manifest["build_s"])
        root = _board_rootfs(spec, chosen, home, qemu, manifest)
        return Userland(spec=spec, board=chosen, home=home, root=root, qemu=qemu, manifest=manifest)


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
    run.add_argument("--board", help="pi4 (default), pi5, pi3 for arm64; pi2 for armhf")
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
                for board in ARCHES[arch].boards[1:]:  # prepare every board the tests use
                    ensure_userland(arch, board=board.name, cache_dir=opts.cache_dir)
                boards = ", ".join(b.name for b in ARCHES[arch].boards)
                print(
                    f"{arch}: {land.home} (key {land.manifest['key']}, boards {boards}, "
                    f"{time.monotonic() - started:.1f} s)"
                )
            return 0
        land = ensure_userland(opts.arch, board=opts.board, cache_dir=opts.cache_dir)
        args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
        return land.popen(args, stdin=None).wait()
    except UserlandBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
