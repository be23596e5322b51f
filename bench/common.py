"""What the benches share: their PASS/FAIL lines and building models in a child process.

A bench imports TensorFlow only in a child (``python bench/<bench>.py --build DIR``), so
its own process measures the device side without TensorFlow's threads and memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHECKS: list[tuple[bool, str]] = []


def check(ok: bool, text: str) -> None:
    """Record one goal's verdict and print it as a PASS/FAIL line."""
    CHECKS.append((ok, text))
    print(f"{'PASS' if ok else 'FAIL'}  {text}", flush=True)


def exit_code() -> int:
    """0 when every recorded check passed."""
    return 0 if all(ok for ok, _ in CHECKS) else 1


def build_in_child(script: str, out: Path) -> None:
    """Run ``script --build out`` (the bench's TensorFlow part) with its output in
    ``out/build.log``; raises if it fails."""
    print(f"building models with TensorFlow (once, in a child; log in {out / 'build.log'})", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "build.log", "wb") as log:
        subprocess.run(
            [sys.executable, script, "--build", str(out)],
            check=True,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
