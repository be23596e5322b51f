"""What the host makes for a machine, the way an operator makes it: the wheelhouse
(``scripts/wheelhouse.sh``) and a litefleet source tree with another version (an upgrade).

The wheelhouse is made per test session from the working tree, offline: ``pip`` is pointed at
the architecture's cached dependency wheels (:attr:`.rootfs.Rootfs.wheels`), which the cache
build fetched once with the same script.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from .specs import REPO_ROOT, WHEELHOUSE_SCRIPT


def run_wheelhouse(arch: str, out: Path, *, source: Path = REPO_ROOT, pip_args: str = "") -> Path:
    """``scripts/wheelhouse.sh --arch ARCH -o OUT``; returns OUT."""
    cmd = ["bash", str(WHEELHOUSE_SCRIPT), "--arch", arch, "-o", str(out), "--source", str(source)]
    if pip_args:
        cmd += ["--pip-args", pip_args]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(out.parent)},
    )
    if proc.returncode != 0:
        tail = proc.stdout[-2000:] + proc.stderr[-3000:]
        raise RuntimeError(f"wheelhouse.sh failed ({proc.returncode}):\n{tail}")
    return out


def offline_wheelhouse(arch: str, out: Path, cache: Path, *, source: Path = REPO_ROOT) -> Path:
    """The wheelhouse for ``arch`` from the working tree (or ``source``), with nothing but the
    cached wheels in ``cache`` as the package index."""
    return run_wheelhouse(arch, out, source=source, pip_args=f"--no-index --find-links {cache}")


def source_with_version(dest: Path, version: str) -> Path:
    """A copy of the project's sources whose distribution and agent say ``version``."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, dest / name)
    for package in ("agent", "converter"):
        shutil.copytree(REPO_ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = dest / "pyproject.toml"
    text, n = re.subn(r'(?m)^version = "[^"]+"$', f'version = "{version}"', pyproject.read_text())
    assert n == 1, "pyproject.toml has no version line"
    pyproject.write_text(text)
    init = dest / "agent" / "__init__.py"
    text, n = re.subn(r'(?m)^__version__ = "[^"]+"$', f'__version__ = "{version}"', init.read_text())
    assert n == 1, "agent/__init__.py has no __version__ line"
    init.write_text(text)
    return dest
