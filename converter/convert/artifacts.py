"""What ``convert`` writes beside ``OUT.tflite`` (golden vectors, card) and how it writes it.

Golden vectors (``OUT.golden.npz``; the device checks them before it activates
a model, so this layout is a contract):
- ``input_0``..``input_{k-1}``: N samples per model input, in the order of the
  interpreter's ``get_input_details()`` (the card's ``inputs`` order), shaped
  ``[N, *input_shape[1:]]`` and already in the input's dtype (int8 inputs are
  quantized with the input's scale and zero point);
- ``output_0``..``output_{m-1}``: the converted model's own raw outputs on the
  host for those inputs, same layout, in the output's dtype;
- ``atol_0``..``atol_{m-1}``: float64 scalars, the largest absolute difference
  the device may see per element, in the output's raw units (see
  :func:`golden_atol`).

Guarantees of :class:`AtomicOutputs`: every file is written to a temporary
name in its destination folder, flushed and fsynced, and only renamed into
place with ``os.replace`` once all of them are complete (the ``.tflite``
last, so a reader that sees it sees its card and golden vectors too); the
folder is fsynced after. On any failure the temporary files are removed and
no output is left behind.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from agent.model_card import TensorSpec
from agent.serving.inference import ModelRunner, quantize
from agent.serving.runtime import load_interpreter
from converter.convert.measure import signature_order
from converter.convert.quantize import calibration_indices
from converter.errors import BadInputError, ConversionError

logger = logging.getLogger(__name__)

DEFAULT_GOLDEN_COUNT = 8


# -- paths --------------------------------------------------------------------
@dataclass(frozen=True)
class OutputPaths:
    tflite: Path
    card: Path
    golden: Path

    @classmethod
    def for_model(cls, out: str | Path) -> OutputPaths:
        out = Path(out)
        if out.suffix != ".tflite":
            raise BadInputError(f"output {out} must end in .tflite")
        stem = out.with_suffix("")
        return cls(out, Path(f"{stem}.card.json"), Path(f"{stem}.golden.npz"))

    def all(self) -> tuple[Path, ...]:
        return (self.tflite, self.card, self.golden)


# -- golden vectors -------------------------------------------------------------
def golden_atol(y: np.ndarray, mode: str) -> float:
    """Allowed absolute difference for one output, in its raw units. Pure.

    - Integer outputs: 1.0, one quantum. The same int8 kernels on ARM and x86
      agree bit for bit in practice, but requantization rounding may
      legitimately differ by one step between kernel implementations.
    - Float outputs of a float32 model (``none``): ``1e-4 + 1e-3 * max|y|``.
      Another CPU sums in another order and may fuse multiply-adds; that moves
      float32 results by ~1e-6 relative, so 1e-3 leaves wide room while a wrong
      model (wrong weights, wrong preprocessing) is off by tens of percent.
    - Float outputs of quantized modes (dynamic, float16, int8/int16x8 with
      float I/O): ``1e-3 + 1e-2 * max|y|``. Dynamic-range models quantize
      activations at run time per kernel, float16 models may run in half
      precision on ARMv8.2+ CPUs (Pi 5), and a dequantized int8 output that is
      one quantum off moves by scale <= range/255 <= 2*max|y|/255 < 1e-2*max|y|.
    """
    if np.dtype(y.dtype).kind in "iu":
        return 1.0
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    if mode == "none":
        return 1e-4 + 1e-3 * peak
    return 1e-3 + 1e-2 * peak


def random_inputs(specs: Sequence[Any], count: int, seed: int = 0) -> list[np.ndarray]:
    """Deterministic stand-in samples (uniform [0, 1) floats, small ints) for source inputs."""
    rng = np.random.default_rng(seed)
    out = []
    for spec in specs:
        shape = (count, *(1 if d is None else d for d in spec.shape[1:]))
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            out.append(rng.random(shape).astype(dtype))
        else:
            out.append(rng.integers(0, 10, size=shape).astype(dtype))
    return out


def build_golden(
    tflite: bytes,
    xs: Sequence[np.ndarray],
    *,
    input_names: Sequence[str],
    mode: str,
    count: int = DEFAULT_GOLDEN_COUNT,
    threads: int = 1,
    runtime: str = "auto",
) -> dict[str, np.ndarray]:
    """Run ``count`` samples of ``xs`` (source order, float) through ``tflite``; see module doc."""
    interpreter = load_interpreter(tflite, threads=threads, runtime=runtime)
    in_perm, _ = signature_order(interpreter, input_names, [])
    runner = ModelRunner(interpreter, name="golden")
    idx = calibration_indices(int(xs[0].shape[0]), count)
    per_input: list[list[np.ndarray]] = [[] for _ in runner.inputs]
    per_output: list[list[np.ndarray]] = [[] for _ in runner.outputs]
    for i in idx:
        sample = []
        for k, (spec, src) in enumerate(zip(runner.inputs, in_perm, strict=True)):
            x = np.asarray(xs[src][i : i + 1]).reshape(spec.shape)
            x = quantize(x, spec) if spec.quantized else x.astype(spec.dtype)
            sample.append(np.ascontiguousarray(x))
            per_input[k].append(x[0])
        for k, y in enumerate(runner.run_raw(sample)):
            per_output[k].append(np.array(y[0], copy=True))
    golden: dict[str, np.ndarray] = {}
    for k, arrs in enumerate(per_input):
        golden[f"input_{k}"] = np.stack(arrs)
    for k, arrs in enumerate(per_output):
        y = np.stack(arrs)
        golden[f"output_{k}"] = y
        golden[f"atol_{k}"] = np.array(golden_atol(y, mode), dtype=np.float64)
    return golden


def golden_bytes(golden: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **golden)  # type: ignore[arg-type]  # numpy stubs: allow_pickle
    return buf.getvalue()


def tensor_specs(tflite: bytes) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The model's inputs and outputs as the runtime reports them (for the card)."""
    interpreter = load_interpreter(tflite)
    return (
        tuple(TensorSpec.from_details(d) for d in interpreter.get_input_details()),
        tuple(TensorSpec.from_details(d) for d in interpreter.get_output_details()),
    )


# -- atomic writes --------------------------------------------------------------
class AtomicOutputs:
    """Stage files next to their destinations; publish all with ``commit()`` or none.

    Use as a context manager: leaving the block without ``commit()`` (an
    exception, an early return) removes every staged file.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temp, destination), in commit order
        self._created_dirs: list[Path] = []

    def __enter__(self) -> AtomicOutputs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.discard()

    def _ensure_dir(self, folder: Path) -> None:
        missing = []
        p = folder
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInputError(f"cannot create output folder {folder}: {exc.strerror}") from exc
        self._created_dirs.extend(missing)  # deepest first: removal order

    def stage(self, dest: Path, data: bytes) -> None:
        """Write ``data`` to a temporary file beside ``dest`` and fsync it."""
        dest = Path(dest)
        self._ensure_dir(dest.parent)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        except OSError as exc:
            raise BadInputError(f"cannot write to {dest.parent}: {exc.strerror}") from exc
        self._staged.append((Path(tmp), dest))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
        except OSError as exc:
            raise ConversionError(f"cannot write {dest}: {exc.strerror or exc}") from exc

    def commit(self) -> None:
        """Rename every staged file into place, in staging order, then fsync the folders."""
        try:
            for tmp, dest in self._staged:
                os.replace(tmp, dest)
        except OSError as exc:
            raise ConversionError(f"cannot write {dest}: {exc.strerror or exc}") from exc
        folders = {dest.parent for _, dest in self._staged}
        self._staged = []
        self._created_dirs = []
        for folder in folders:
            with contextlib.suppress(OSError):
                dfd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)

    def discard(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._staged = []
        for folder in self._created_dirs:
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._created_dirs = []
