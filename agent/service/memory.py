"""Handing freed heap memory back to the system after a refresh (glibc's ``malloc_trim``).

Guarantees:

- a no-op where the C library has no ``malloc_trim`` (musl, Bionic on Android): never raises;
- the library is looked up once per process (the first call), on the caller's thread.
"""

from __future__ import annotations

from typing import Any


def release_free_memory() -> None:
    """Hand freed heap pages back to the system (glibc only; a no-op elsewhere).

    A refresh parses and verifies metadata and may download megabytes; the
    memory is freed afterwards but glibc keeps it mapped. On a 512 MB Pi
    that is worth a system call after each refresh (measured: a few MB)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None
