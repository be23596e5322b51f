"""Ed25519 through libcrypto (agent.delivery.ed25519) and its place in TUF verification.

Judged against RFC 8032's own test vectors and against pyca/cryptography (the host's
signer) on random keys and messages, valid and tampered."""

from __future__ import annotations

import ctypes
import os
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from securesystemslib.exceptions import UnverifiedSignatureError, VerificationError
from securesystemslib.signer import CryptoSigner, Key, Signature
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Timestamp

from agent.delivery import ed25519
from agent.delivery.tuf_client import Ed25519Key

# RFC 8032, section 7.1: TEST 1 (empty message) and TEST 2 (one byte)
RFC_VECTORS = [
    (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bac"
        "c61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e"
        "458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
]

pytestmark = pytest.mark.skipif(not ed25519.available(), reason="no libcrypto with Ed25519 here")


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@pytest.mark.parametrize(("public", "message", "signature"), RFC_VECTORS)
def test_rfc8032_vectors(public: str, message: str, signature: str) -> None:
    pub, msg, sig = bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)
    assert ed25519.verify_ed25519(pub, sig, msg)
    assert not ed25519.verify_ed25519(pub, sig, msg + b"\0")
    flipped = bytearray(sig)
    flipped[10] ^= 1
    assert not ed25519.verify_ed25519(pub, bytes(flipped), msg)


def test_agrees_with_pyca_on_valid_and_tampered_signatures() -> None:
    rng = random.Random(8032)
    for _ in range(100):
        key = Ed25519PrivateKey.generate()
        other = Ed25519PrivateKey.generate()
        data = os.urandom(rng.randrange(0, 3000))
        sig = key.sign(data)
        assert ed25519.verify_ed25519(raw_public(key), sig, data)
        assert not ed25519.verify_ed25519(raw_public(other), sig, data)
        bad = bytearray(sig)
        bad[rng.randrange(64)] ^= 1 << rng.randrange(8)
        assert not ed25519.verify_ed25519(raw_public(key), bytes(bad), data)
        if data:
            changed = bytearray(data)
            changed[rng.randrange(len(data))] ^= 1
            assert not ed25519.verify_ed25519(raw_public(key), sig, bytes(changed))


def test_malformed_input_is_false_and_leaves_no_openssl_error() -> None:
    key = Ed25519PrivateKey.generate()
    sig = key.sign(b"x")
    pub = raw_public(key)
    for args in [(pub[:31], sig, b"x"), (pub, sig[:63], b"x"), (pub, sig + b"\0", b"x"), (b"", b"", b"")]:
        assert not ed25519.verify_ed25519(*args)
    assert not ed25519.verify_ed25519(b"\xff" * 32, sig, b"x")  # not a point on the curve
    assert not ed25519.verify_ed25519(pub, b"\xff" * 64, b"x")  # s out of range
    lib = ctypes.CDLL(ed25519._loaded_libcrypto())
    lib.ERR_peek_error.restype = ctypes.c_ulong
    assert lib.ERR_peek_error() == 0


def test_tuf_keys_use_it_and_raise_what_securesystemslib_raises() -> None:
    signer = CryptoSigner.generate_ed25519()
    key = Key.from_dict(signer.public_key.keyid, signer.public_key.to_dict())
    assert type(key) is Ed25519Key
    sig = signer.sign(b"data")
    key.verify_signature(sig, b"data")
    with pytest.raises(UnverifiedSignatureError):
        key.verify_signature(sig, b"other data")
    with pytest.raises(VerificationError):  # another key's id
        key.verify_signature(Signature("0" * 64, sig.signature), b"data")
    with pytest.raises(VerificationError):  # not hex
        key.verify_signature(Signature(key.keyid, "zz"), b"data")


def test_a_threshold_counts_only_good_signatures() -> None:
    """Root says timestamp needs 2 of 2 keys: one good and one forged signature is not enough."""
    a, b, forger = (CryptoSigner.generate_ed25519() for _ in range(3))
    root = Metadata(Root())
    for s in (a, b):
        root.signed.add_key(s.public_key, "timestamp")
    root.signed.roles["timestamp"].threshold = 2
    root = Metadata.from_bytes(root.to_bytes())  # read back: keys built by Key.from_dict
    ts = Metadata(Timestamp())
    ts.sign(a)
    ts.sign(b, append=True)
    root.signed.verify_delegate("timestamp", ts.signed_bytes, ts.signatures)
    forged = Metadata(Timestamp())
    forged.sign(a)
    bad = forger.sign(forged.signed_bytes)
    forged.signatures[b.public_key.keyid] = Signature(b.public_key.keyid, bad.signature)
    with pytest.raises(UnsignedMetadataError):
        root.signed.verify_delegate("timestamp", forged.signed_bytes, forged.signatures)
