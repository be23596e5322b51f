"""Calibration and validation data: read it, and check it fits the model before TensorFlow sees it.

Accepted forms (``role`` is ``calibration`` or ``validation``, used in messages):
- ``.npy``: the inputs of a single-input model, samples on the leading axis;
- ``.npz``: array ``x`` (or ``x_0``..``x_{k-1}`` for a model with k inputs)
  and optional ``y``, one integer class label per sample;
- a folder of images (PNG, JPEG, BMP, GIF), decoded with TensorFlow, resized
  to the model's height and width and scaled to [0, 1] float32; no labels.

Guarantees: arrays are loaded with ``allow_pickle=False``; :func:`fit_to_inputs`
is pure and either returns arrays of exactly the model's input dtype and
per-sample shape or raises :class:`BadInputError` with one line that names
the file, the input and both shapes or dtypes. Floats of another width are
cast to the model's float dtype; integers are never silently turned into
floats (a uint8 image fed to a [0, 1] model is a common, silent mistake).
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converter.convert.sources import InputSpec
from converter.errors import BadInputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@dataclass(frozen=True)
class Dataset:
    """Samples for a model: one array per input (samples first) and optional labels."""

    path: str
    xs: tuple[np.ndarray, ...]
    y: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.xs[0].shape[0])

    def take(self, n: int) -> Dataset:
        """The first ``n`` samples (all if fewer)."""
        return Dataset(self.path, tuple(x[:n] for x in self.xs), None if self.y is None else self.y[:n])


def _read_npz(path: Path, role: str) -> tuple[list[np.ndarray], np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            if "x" in names:
                xs = [npz["x"]]
            else:
                keys = sorted((k for k in names if k.startswith("x_")), key=_index_of)
                if not keys:
                    raise BadInputError(f"{role} data {path} has no array 'x' (it has {sorted(names)})")
                xs = [npz[k] for k in keys]
            y = npz["y"] if "y" in names else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise BadInputError(f"cannot read {role} data {path}: {exc}") from exc
    return xs, y


def _index_of(key: str) -> int:
    try:
        return int(key[2:])
    except ValueError:
        return 1 << 30


def load_dataset(path: str | Path, role: str, inputs: Sequence[InputSpec]) -> Dataset:
    """Read ``path`` and fit it to ``inputs`` (see :func:`fit_to_inputs`)."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{role} data {path} does not exist")
    if path.is_dir():
        return fit_to_inputs(load_image_folder(path, role, inputs), role, inputs)
    y: np.ndarray | None
    try:
        if path.suffix == ".npz":
            xs, y = _read_npz(path, role)
        elif path.suffix == ".npy":
            xs, y = [np.load(path, allow_pickle=False)], None
        else:
            raise BadInputError(
                f"{role} data {path}: expected a .npy file, a .npz file or a folder of images"
            )
    except (OSError, ValueError, EOFError) as exc:
        raise BadInputError(f"cannot read {role} data {path}: {exc}") from exc
    return fit_to_inputs(Dataset(str(path), tuple(xs), y), role, inputs)


def fit_to_inputs(data: Dataset, role: str, inputs: Sequence[InputSpec]) -> Dataset:
    """Check ``data`` against the model's inputs; cast float widths. Pure."""
    where = f"{role} data {data.path}"
    if len(data.xs) != len(inputs):
        raise BadInputError(
            f"{where} has {len(data.xs)} input array(s) but the model takes {len(inputs)} "
            f"({', '.join(s.name for s in inputs)}); use x_0..x_{len(inputs) - 1} in a .npz"
        )
    fitted = []
    n: int | None = None
    for x, spec in zip(data.xs, inputs, strict=True):
        want = ["N", *("?" if d is None else d for d in spec.shape[1:])]
        if x.ndim != len(spec.shape) or any(
            d is not None and d != s for d, s in zip(spec.shape[1:], x.shape[1:], strict=True)
        ):
            raise BadInputError(
                f"{where}: shape {list(x.shape)} does not fit model input "
                f"{spec.name!r} {want} (samples on the first axis)"
            )
        if x.shape[0] == 0:
            raise BadInputError(f"{where}: no samples")
        want_dtype = np.dtype(spec.dtype)
        if x.dtype.kind not in "biuf":
            raise BadInputError(f"{where}: dtype {x.dtype} is not numeric")
        if want_dtype.kind == "f" and x.dtype.kind != "f":
            raise BadInputError(
                f"{where}: dtype {x.dtype} does not fit model input {spec.name!r} "
                f"({want_dtype}); convert the data to floats the way the model was trained"
            )
        if want_dtype.kind in "iu" and x.dtype.kind not in "iu":
            raise BadInputError(
                f"{where}: dtype {x.dtype} does not fit model input {spec.name!r} ({want_dtype})"
            )
        if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
            raise BadInputError(f"{where}: contains NaN or infinity")
        if n is None:
            n = int(x.shape[0])
        elif x.shape[0] != n:
            raise BadInputError(f"{where}: input arrays have different sample counts")
        fitted.append(np.ascontiguousarray(x, dtype=want_dtype))
    y = data.y
    if y is not None:
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise BadInputError(
                f"{where}: labels 'y' must be one integer class per sample, "
                f"got {y.dtype} shape {list(y.shape)}"
            )
        if y.shape[0] != n:
            raise BadInputError(f"{where}: {y.shape[0]} labels for {n} samples")
        y = y.astype(np.int64)
    return Dataset(data.path, tuple(fitted), y)


def load_image_folder(path: Path, role: str, inputs: Sequence[InputSpec]) -> Dataset:
    """Decode every image in ``path`` (sorted by name) to the model's single image input."""
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise BadInputError(
            f"{role} data {path}: a folder of images needs a model with one [N, H, W, C] input"
        )
    _, height, width, channels = inputs[0].shape
    if height is None or width is None or channels not in (1, 3, 4):
        raise BadInputError(
            f"{role} data {path}: the model's input {list(inputs[0].shape)} has no fixed "
            "image size; give a .npy/.npz instead"
        )
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BadInputError(f"{role} data {path}: no {'/'.join(IMAGE_SUFFIXES)} files")
    from converter.convert.sources import import_tensorflow

    tf = import_tensorflow()
    images = []
    for f in files:
        try:
            img = tf.io.decode_image(f.read_bytes(), channels=channels, expand_animations=False)
        except Exception as exc:  # TensorFlow's InvalidArgumentError and friends
            raise BadInputError(f"{role} data: cannot decode image {f}") from exc
        img = tf.image.resize(tf.cast(img, tf.float32) / 255.0, (height, width))
        images.append(np.asarray(img, dtype=np.float32))
    logger.debug("read %d images from %s", len(images), path)
    return Dataset(str(path), (np.stack(images),), None)
