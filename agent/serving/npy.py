"""Read and write single arrays in NumPy's ``.npy`` format, safely.

:func:`parse_npy` accepts untrusted bytes (a REST body, an MQTT payload):

- never unpickles: only plain numeric and boolean dtypes are accepted
  (:data:`ALLOWED_DTYPES`, any byte order); object, string, void and
  structured dtypes are refused;
- the header is at most :data:`MAX_HEADER_BYTES` and is read with
  :func:`ast.literal_eval` (literals only, no code), then checked key by key;
- the data length must equal ``prod(shape) * itemsize`` exactly; at most
  :data:`MAX_DIMS` dimensions;
- the result is a read-only view of the given bytes (no copy), in native byte
  order and C order (a big-endian or Fortran-order array is converted: one
  copy).

Every refusal is :class:`agent.errors.BadRequestError` (400) with a reason.
:func:`to_npy` writes format 1.0 (2.0 when the header needs it).
"""

from __future__ import annotations

import ast
import math
import struct
from typing import Any

import numpy as np

from agent.errors import BadRequestError

MAGIC = b"\x93NUMPY"
MAX_HEADER_BYTES = 10_000  # NumPy's own reader refuses longer headers by default
MAX_DIMS = 16
ALLOWED_DTYPES = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8"})
CONTENT_TYPE = "application/x-npy"


def is_npy(data: bytes | bytearray | memoryview) -> bool:
    return bytes(data[:6]) == MAGIC


def _dtype(descr: Any) -> np.dtype[Any]:
    if not (
        isinstance(descr, str) and len(descr) == 3 and descr[0] in "<>|=" and descr[1:] in ALLOWED_DTYPES
    ):
        raise BadRequestError(
            f".npy dtype {str(descr)[:40]!r} is not allowed: plain numbers only "
            "(bool, int8..int64, uint8..uint64, float16, float32 or float64)"
        )
    return np.dtype(descr)


def parse_npy(data: bytes | bytearray | memoryview) -> np.ndarray:
    """The array held in ``data`` (see the module's guarantees)."""
    view = memoryview(data)
    if len(view) < 10 or bytes(view[:6]) != MAGIC:
        raise BadRequestError("body is not a .npy file (bad magic)")
    major = view[6]
    if major == 1:
        (hlen,) = struct.unpack("<H", view[8:10])
        start = 10
    elif major in (2, 3):
        if len(view) < 12:
            raise BadRequestError(".npy file is truncated")
        (hlen,) = struct.unpack("<I", view[8:12])
        start = 12
    else:
        raise BadRequestError(f".npy format version {major} is not supported")
    if hlen > MAX_HEADER_BYTES:
        raise BadRequestError(f".npy header is {hlen} bytes, more than {MAX_HEADER_BYTES}")
    if start + hlen > len(view):
        raise BadRequestError(".npy file is truncated in its header")
    try:
        header_text = bytes(view[start : start + hlen]).decode("utf-8" if major == 3 else "latin1")
        header = ast.literal_eval(header_text)
    except (ValueError, SyntaxError, UnicodeDecodeError, RecursionError, MemoryError, TypeError) as exc:
        raise BadRequestError(".npy header is not a Python literal") from exc
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise BadRequestError(".npy header must hold exactly descr, fortran_order and shape")
    dtype = _dtype(header["descr"])
    fortran = header["fortran_order"]
    shape = header["shape"]
    if not isinstance(fortran, bool):
        raise BadRequestError(".npy fortran_order must be True or False")
    if (
        not isinstance(shape, tuple)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise BadRequestError(f".npy shape must be a tuple of at most {MAX_DIMS} non-negative ints")
    body = view[start + hlen :]
    expected = math.prod(shape) * dtype.itemsize
    if len(body) != expected:
        raise BadRequestError(
            f".npy data is {len(body)} bytes; shape {list(shape)} of {dtype} needs {expected}"
        )
    arr = np.frombuffer(body, dtype=dtype)
    arr = arr.reshape(shape, order="F" if fortran else "C")
    if not dtype.isnative:
        arr = arr.astype(dtype.newbyteorder("="))
    if fortran and arr.ndim > 1:
        arr = np.ascontiguousarray(arr)
    return arr


def to_npy(arr: np.ndarray) -> bytes:
    """``arr`` as ``.npy`` bytes (C order; the header padded to 64 bytes as NumPy does)."""
    arr = np.require(arr, requirements="C")  # not ascontiguousarray: it makes a 0-d array 1-d
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"refusing to write dtype {arr.dtype}")
    header = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (  # noqa: UP031
        arr.dtype.str,
        tuple(int(d) for d in arr.shape),
    )
    for major, prefix in ((1, 10), (2, 12)):
        pad = 64 - (prefix + len(header) + 1) % 64
        text = (header + " " * (pad % 64) + "\n").encode("latin1")
        if major == 1 and len(text) > 0xFFFF:
            continue
        size = struct.pack("<H", len(text)) if major == 1 else struct.pack("<I", len(text))
        return MAGIC + bytes([major, 0]) + size + text + arr.tobytes()
    raise AssertionError("unreachable")
