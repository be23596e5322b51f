"""Ed25519 signature checks through the OpenSSL that Python has already loaded (``ctypes``).

Why: a device install has no pyca/cryptography (it is a host dependency), and
without it securesystemslib checks ed25519 signatures in pure Python: 4.1 ms per
signature on the 2-core x86 bench machine (about ten times that on a Pi), for every
signature of every metadata refresh. With pyca/cryptography installed, the import
alone costs 7.8 MB of resident memory (its own statically linked OpenSSL). Python's
``ssl`` and ``hashlib`` modules have already mapped the system's libcrypto into the
process, and OpenSSL 1.1.1 and later verify Ed25519 (RFC 8032, the scheme TUF's
``ed25519`` keys use): this module calls it through ``ctypes``.

This module imports nothing of securesystemslib or pyca/cryptography (the agent's
CLI asks :func:`available` before it decides to keep pyca/cryptography out of the
daemon); :mod:`agent.delivery.tuf_client` plugs it into securesystemslib.

Guarantees:

- :func:`verify_ed25519` is True only for a valid signature of ``data`` by ``public``;
  any malformed input (wrong lengths included) is False, never an exception, and
  leaves OpenSSL's per-thread error queue empty (Python's ``ssl`` reads that queue);
- :func:`available` is False, and nothing is changed, where no libcrypto with
  Ed25519 is found (OpenSSL older than 1.1.1, a Python without OpenSSL).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

EVP_PKEY_ED25519 = 1087  # NID_ED25519, the same in OpenSSL 1.1.1 and 3.x
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class _Libcrypto:
    """The handful of libcrypto functions an Ed25519 check needs, typed for ctypes."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        self.new_key = lib.EVP_PKEY_new_raw_public_key
        self.new_key.argtypes = [ctypes.c_int, vp, ctypes.c_char_p, sz]
        self.new_key.restype = vp
        self.free_key = lib.EVP_PKEY_free
        self.free_key.argtypes = [vp]
        self.free_key.restype = None
        self.new_ctx = lib.EVP_MD_CTX_new
        self.new_ctx.argtypes = []
        self.new_ctx.restype = vp
        self.free_ctx = lib.EVP_MD_CTX_free
        self.free_ctx.argtypes = [vp]
        self.free_ctx.restype = None
        self.verify_init = lib.EVP_DigestVerifyInit
        self.verify_init.argtypes = [vp, vp, vp, vp, vp]
        self.verify_init.restype = ctypes.c_int
        self.verify = lib.EVP_DigestVerify
        self.verify.argtypes = [vp, ctypes.c_char_p, sz, ctypes.c_char_p, sz]
        self.verify.restype = ctypes.c_int
        self.clear_errors = lib.ERR_clear_error
        self.clear_errors.argtypes = []
        self.clear_errors.restype = None


def _loaded_libcrypto() -> str | None:
    """The path of the libcrypto this process already maps (Python's ssl/hashlib), if any."""
    import hashlib  # noqa: F401 - maps libcrypto through _hashlib where Python links OpenSSL

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if "/libcrypto" in path and ".so" in path:
            return path.strip()
    return None


_lock = threading.Lock()
_lib: _Libcrypto | None = None
_looked = False


def _libcrypto() -> _Libcrypto | None:
    global _lib, _looked
    with _lock:
        if not _looked:
            _looked = True
            for name in (_loaded_libcrypto(), ctypes.util.find_library("crypto")):
                if not name:
                    continue
                try:
                    _lib = _Libcrypto(ctypes.CDLL(name))
                    break
                except (OSError, AttributeError) as exc:  # not there, or older than OpenSSL 1.1.1
                    logger.debug("libcrypto %s cannot check Ed25519: %s", name, exc)
        return _lib


def available() -> bool:
    """True when this process can check Ed25519 signatures through libcrypto."""
    return _libcrypto() is not None


def verify_ed25519(public: bytes, signature: bytes, data: bytes) -> bool:
    """True only when ``signature`` is ``public``'s valid Ed25519 signature of ``data``.
    Raises RuntimeError only where :func:`available` is False."""
    lib = _libcrypto()
    if lib is None:
        raise RuntimeError("no libcrypto with Ed25519 in this process")
    if len(public) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    key = lib.new_key(EVP_PKEY_ED25519, None, public, len(public))
    if not key:
        lib.clear_errors()
        return False
    ctx = lib.new_ctx()
    try:
        if not ctx or lib.verify_init(ctx, None, None, None, key) != 1:
            return False
        return bool(lib.verify(ctx, signature, len(signature), data, len(data)) == 1)
    finally:
        if ctx:
            lib.free_ctx(ctx)
        lib.free_key(key)
        lib.clear_errors()
