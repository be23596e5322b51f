"""The agent and glibc's allocator: short-lived chunk buffers stay in the heap while a
download runs (``mallopt``), and freed heap memory goes back to the system after each
refresh (``malloc_trim``).

Guarantees:

- both are no-ops where the C library is not glibc (musl, Bionic on Android): never raise;
- the library is looked up once per process (the first call), on the caller's thread;
- :func:`tune_allocator` changes the process's allocator once, however often it is called.
"""

from __future__ import annotations

from typing import Any

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# allocations up to this size come from the heap, not from a mmap of their own
MMAP_THRESHOLD = 1 << 20
# free memory at the heap's top is kept up to this size while the agent works
TRIM_THRESHOLD = 16 << 20


def _glibc() -> Any:
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 (glibc has it; another libc.so.6 may not)
            _libc.mallopt  # noqa: B018
        except (OSError, AttributeError):
            _libc = False
    return _libc


def tune_allocator() -> None:
    """Keep the download's transient buffers in the heap (glibc only; once per process).

    Each 256 KiB chunk of a model passes through several buffers of its size that live
    for microseconds (paho assembles the packet from the socket, then slices out the topic
    and the payload). glibc serves blocks of 128 KiB and more with a mmap of their own,
    and gives back the heap's top once more than 256 KiB of it is free, so each buffer
    cost fresh page faults: about 64 per buffer. Measured with 99 real agents
    (bench/bench_activation.py): a MobileNetV2 int8 activation took 3,212 minor faults and
    103.7 ms of agent CPU, 2,158 and 97.5 ms with this. The memory is not kept: after
    each refresh :func:`release_free_memory` hands every free page back, as before
    (``malloc_trim(0)`` does not look at the threshold)."""
    global _tuned
    libc = _glibc()
    if _tuned or not libc:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    _tuned = True


def release_free_memory() -> None:
    """Hand freed heap pages back to the system (glibc only; a no-op elsewhere).

    A refresh parses and verifies metadata and may download megabytes; the
    memory is freed afterwards but glibc keeps it mapped. On a 512 MB Pi
    that is worth a system call after each refresh (measured: a few MB)."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


_libc: Any = None
_tuned = False
