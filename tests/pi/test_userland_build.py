"""The userland builder's own steps, without qemu or network: fast, run by the default suite."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import pytest

from .rootfs_build import (
    clone_for_board,
    install_wheel,
    optional_suites_failed,
    prune_downloads,
    relativise_symlinks,
)
from .specs import ARCHES
from .userland import _reusable


def test_absolute_symlinks_become_relative_inside_the_rootfs(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc/python3.11").mkdir(parents=True)
    (root / "etc/python3.11/sitecustomize.py").write_text("# rootfs\n")
    (root / "usr/lib/python3.11").mkdir(parents=True)
    link = root / "usr/lib/python3.11/sitecustomize.py"
    link.symlink_to("/etc/python3.11/sitecustomize.py")
    rel = root / "usr/bin"
    rel.mkdir(parents=True)
    (rel / "python3").symlink_to("python3.11")

    assert relativise_symlinks(root) == 1
    assert not Path(link.readlink()).is_absolute()
    assert link.resolve() == (root / "etc/python3.11/sitecustomize.py").resolve()
    assert str((rel / "python3").readlink()) == "python3.11"  # relative ones are left alone


def test_wheel_unpacks_like_pip(tmp_path: Path) -> None:
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("demo/__init__.py", "x = 1\n")
        info = zipfile.ZipInfo("demo/_native.so")
        info.external_attr = 0o755 << 16
        zf.writestr(info, b"\x7fELF")
        zf.writestr("demo-1.0.data/purelib/demo_extra.py", "y = 2\n")
        zf.writestr("demo-1.0.data/scripts/demo-cli", "#!python\n")
        zf.writestr("demo-1.0.dist-info/METADATA", "Name: demo\n")
    site = tmp_path / "site"

    install_wheel(wheel, site)

    assert (site / "demo/__init__.py").read_text() == "x = 1\n"
    assert (site / "demo_extra.py").exists()
    assert (site / "demo/_native.so").stat().st_mode & 0o111
    assert not (site / "demo-1.0.data").exists()
    assert not any(site.rglob("demo-cli"))


def test_cache_key_follows_every_input() -> None:
    spec = ARCHES["arm64"]
    assert spec.key() == dataclasses.replace(spec).key()
    changed = [
        dataclasses.replace(spec, wheels=("numpy==2.4.5", *spec.wheels[1:])),
        dataclasses.replace(spec, debs=(*spec.debs, "libatomic1")),
        dataclasses.replace(spec, pip_platforms=spec.pip_platforms[:1]),
    ]
    assert len({spec.key(), *(c.key() for c in changed)}) == 1 + len(changed)
    # boards are hard-linked copies with their own cpuinfo: adding one rebuilds nothing
    assert dataclasses.replace(spec, boards=spec.boards[:1]).key() == spec.key()


def test_a_stale_or_half_built_cache_is_not_reused(tmp_path: Path) -> None:
    spec = ARCHES["arm64"]
    home = tmp_path / "arm64"
    (home / "rootfs/usr/bin").mkdir(parents=True)
    assert _reusable(spec, home) is None  # no manifest
    (home / "manifest.json").write_text(json.dumps({"key": spec.key()}))
    assert _reusable(spec, home) is None  # no interpreter
    (home / "rootfs/usr/bin/python3.11").write_bytes(b"")
    assert _reusable(spec, home) == {"key": spec.key()}
    (home / "manifest.json").write_text(json.dumps({"key": "0" * 16}))
    assert _reusable(spec, home) is None  # built from other inputs


@pytest.mark.parametrize(
    ("stderr", "expected"),
    [
        (
            "E: Failed to fetch http://deb.debian.org/debian-security/dists/bookworm-security/"
            "main/binary-armhf/Packages.xz  File has unexpected size (334084 != 351124).\n"
            "E: Some index files failed to download. They have been ignored, or old ones used.\n",
            ["bookworm-security"],
        ),
        (
            "E: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease  404\n",
            None,
        ),
        ("E: Could not get lock\n", None),
    ],
)
def test_only_an_optional_suite_may_fail_to_update(stderr: str, expected: list[str] | None) -> None:
    assert optional_suites_failed(stderr) == expected


def test_cpuinfo_describes_the_emulated_core() -> None:
    # LiteRT reads the part number; XNNPACK picks kernels by it: it must be qemu's core
    parts = {"cortex-a53": "0xd03", "cortex-a72": "0xd08", "cortex-a76": "0xd0b", "cortex-a7": "0xc07"}
    for spec in ARCHES.values():
        assert len({b.name for b in spec.boards}) == len(spec.boards)
        for board in spec.boards:
            assert f"CPU part\t: {parts[board.cpu]}" in board.cpuinfo
            assert board.cpuinfo.count("processor\t:") == 4
    assert ARCHES["arm64"].board().name == "pi4"
    with pytest.raises(ValueError, match="no board"):
        ARCHES["armhf"].board("pi5")


def test_a_board_is_a_hard_linked_copy_with_its_own_cpuinfo(tmp_path: Path) -> None:
    base = tmp_path / "rootfs"
    (base / "usr/bin").mkdir(parents=True)
    (base / "usr/bin/python3.11").write_bytes(b"\x7fELF")
    (base / "usr/bin/python3").symlink_to("python3.11")
    board = ARCHES["arm64"].board("pi5")

    root = clone_for_board(base, board, tmp_path / "boards/pi5")

    assert (root / "proc/cpuinfo").read_text() == board.cpuinfo
    assert not (base / "proc").exists()
    assert (root / "usr/bin/python3.11").stat().st_ino == (base / "usr/bin/python3.11").stat().st_ino
    assert str((root / "usr/bin/python3").readlink()) == "python3.11"


def test_superseded_downloads_are_pruned(tmp_path: Path) -> None:
    debs, wheels = tmp_path / "debs", tmp_path / "wheels"
    debs.mkdir()
    wheels.mkdir()
    keep = [debs / "libc6_2.36-9+deb12u14_arm64.deb", wheels / "numpy-2.4.6-cp311-x.whl"]
    stale = [debs / "libc6_2.36-9+deb12u13_arm64.deb", wheels / "numpy-2.4.5-cp311-x.whl"]
    for path in (*keep, *stale):
        path.write_bytes(b"")
    (debs / "notes.txt").write_text("not a download")

    assert prune_downloads(keep, [debs, wheels]) == 2
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert (debs / "notes.txt").exists()
