"""A host (x86-64) ``tflite_runtime`` of the armhf userland's version, for bit-exact checks.

The armhf userland runs ``tflite-runtime`` 2.14.0 (its last release, the only LiteRT with
32-bit ARM wheels); the host's venv runs ``ai-edge-litert``. Their int8 kernels may round a
requantization differently (one quantum apart on the digits model), so "bit-exact under
emulation" for armhf is checked against the same runtime version on the host.

``ensure_host_tflite_runtime()`` returns the ``python`` of a private venv under
``.cache/pi/host-tflite-runtime/`` with exactly :data:`PINS`, built once (``venv`` + ``pip``
from PyPI) and reused while its manifest's key matches. It needs a CPython 3.11 host
interpreter: tflite-runtime 2.14 has no wheels for newer ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from .rootfs_build import file_lock, run_build_tool
from .specs import ARCHES, DEFAULT_CACHE_DIR, UserlandBuildError

logger = logging.getLogger(__name__)

# tflite-runtime 2.14 is built against numpy 1.x; the armhf userland's runtime pin is reused
PINS = (
    *(pin for pin in ARCHES["armhf"].wheels if pin.startswith("tflite-runtime==")),
    "numpy==1.26.4",
)


def _key() -> str:
    blob = json.dumps({"pins": PINS, "python": list(sys.version_info[:2])})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_host_tflite_runtime(cache_dir: Path | None = None) -> Path:
    """Path of the reference venv's python; builds the venv when missing or stale."""
    if sys.version_info[:2] != (3, 11):
        raise UserlandBuildError(
            f"tflite-runtime 2.14 needs CPython 3.11 on the host, not {sys.version.split()[0]}"
        )
    home = (cache_dir or DEFAULT_CACHE_DIR) / "host-tflite-runtime"
    python = home / "venv" / "bin" / "python"
    with file_lock(home / ".lock"):
        try:
            manifest = json.loads((home / "manifest.json").read_text())
        except (OSError, ValueError):
            manifest = {}
        if manifest.get("key") == _key() and python.exists():
            return python
        started = time.monotonic()
        partial = home / "venv.partial"
        shutil.rmtree(partial, ignore_errors=True)
        # the base interpreter, not this venv's: a venv made from a venv's python works,
        # but would depend on this venv staying where it is
        base = Path(getattr(sys, "_base_executable", sys.executable))
        run_build_tool([str(base), "-m", "venv", str(partial)], what="creating the reference venv")
        run_build_tool(
            [
                str(partial / "bin/python"),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--progress-bar",
                "off",
                "--only-binary=:all:",
                *PINS,
            ],
            what="installing the reference tflite-runtime",
        )
        shutil.rmtree(home / "venv", ignore_errors=True)
        # only bin/python is used, and it works after the rename (the pip script's shebang
        # would still name venv.partial)
        partial.rename(home / "venv")
        manifest = {"key": _key(), "pins": PINS, "build_s": round(time.monotonic() - started, 1)}
        tmp = home / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, home / "manifest.json")
        logger.info("reference tflite-runtime venv built in %.1f s", manifest["build_s"])
        return python
