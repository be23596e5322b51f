"""Files that must survive a crash or a power cut, and hashing them (shared by host and device).

Guarantees: :func:`atomic_write` leaves either the old or the new file after a
crash or power cut (temp file in the same folder, fsync, ``os.replace``, fsync
of the folder); a failure is a :class:`agent.errors.StorageError` naming the
file, and no temp file is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

from agent.errors import StorageError


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content.

    ``durable=False`` skips the fsyncs: a crash still never shows a mix of old and
    new, but a power cut may leave the file empty -- only for files whose content
    is checked by hash when read back."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` where ``out`` is, in one rename: an ``out`` that exists is
    renamed aside first and removed after, so a reader sees the old folder or the new one, never a
    mix. ``tmp`` and ``out`` must be in the same folder (same file system); the parent is fsynced."""
    if out.exists():
        trash = out.parent / f".{out.name}.{secrets.token_hex(4)}.old"
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)


def read_json(path: Path) -> Any:
    return json.loads(path.read_bytes())
