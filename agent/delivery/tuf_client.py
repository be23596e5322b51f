"""python-tuf's client, imported without its HTTP stack.

``tuf.ngclient`` imports its default fetcher, ``Urllib3Fetcher``, and with it
urllib3 (2.1 MB of resident memory, measured) even when the caller supplies
its own fetcher, as the agent always does (metadata arrives over MQTT). On a
small device that is memory for nothing, so this module puts a placeholder
for ``tuf.ngclient.urllib3_fetcher`` in ``sys.modules`` before importing
python-tuf -- unless urllib3 is already loaded, in which case the real module
costs nothing more. The placeholder refuses to be used: an ``Updater`` built
without a fetcher fails loudly instead of reaching for the network.

It also makes securesystemslib check ``ed25519`` signatures through the
libcrypto Python has loaded (:mod:`agent.delivery.ed25519`) instead of pyca/cryptography,
which a device install does not have (securesystemslib then falls back to pure
Python: 4.1 ms per signature here against 0.07 ms). :class:`Ed25519Key` raises what
``SSlibKey.verify_signature`` raises in the same cases (``UnverifiedSignatureError``
for a bad signature, ``VerificationError`` for anything else), so python-tuf counts
signatures exactly as before. Where no usable libcrypto is found nothing changes.

Import ``Updater`` and ``FetcherInterface`` from here, not from ``tuf.ngclient``.
"""

from __future__ import annotations

import sys
import types
from typing import Any

_NAME = "tuf.ngclient.urllib3_fetcher"

if "urllib3" not in sys.modules and _NAME not in sys.modules:
    _placeholder = types.ModuleType(_NAME)

    class Urllib3Fetcher:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError(
                "the litefleet agent fetches TUF metadata over MQTT; pass fetcher= to the Updater"
            )

    _placeholder.Urllib3Fetcher = Urllib3Fetcher  # type: ignore[attr-defined]
    sys.modules[_NAME] = _placeholder

from securesystemslib.exceptions import UnverifiedSignatureError, VerificationError  # noqa: E402
from securesystemslib.signer import KEY_FOR_TYPE_AND_SCHEME, Signature, SSlibKey  # noqa: E402
from tuf.ngclient import Updater  # noqa: E402
from tuf.ngclient.fetcher import FetcherInterface  # noqa: E402

from agent.delivery.ed25519 import available, verify_ed25519  # noqa: E402

__all__ = ["Ed25519Key", "FetcherInterface", "Updater"]


class Ed25519Key(SSlibKey):
    """securesystemslib's ``ed25519`` key, checked through libcrypto (see the module)."""

    def verify_signature(self, signature: Signature, data: bytes) -> None:
        if self.scheme != "ed25519":  # registered only where available(): see below
            super().verify_signature(signature, data)
            return
        failed = f"Unknown failure to verify signature by {self.keyid}"
        if signature.keyid != self.keyid:
            raise VerificationError(failed)
        try:
            public = bytes.fromhex(self.keyval["public"])
            sig = bytes.fromhex(signature.signature)
        except (KeyError, TypeError, ValueError) as exc:
            raise VerificationError(failed) from exc
        if not verify_ed25519(public, sig, data):
            raise UnverifiedSignatureError(f"Failed to verify signature by {self.keyid}")


if available():
    _table: dict[tuple[str, str], Any] = KEY_FOR_TYPE_AND_SCHEME
    _table[("ed25519", "ed25519")] = Ed25519Key
