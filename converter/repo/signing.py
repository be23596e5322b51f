"""Signing keys and the signature chain of the repository's metadata.

Guarantees:

* :func:`sign_chain` links targets -> snapshot -> timestamp with the version,
  length and SHA-256 of the file below, clears old signatures first and signs
  with every given key, so a role is never published with a stale signature;
* :func:`load_signers` returns only keys that root lists for the role and
  raises :class:`~converter.errors.RepositoryError` when fewer than the role's
  threshold are on disk: the tool never signs below threshold;
* offline root keys (``repo init --root-keys``) go in a folder of their own, never
  inside the repository; when root must be signed without them,
  :class:`RootKeysNeededError` says which flag gives them.

The tuf and securesystemslib classes come from their documented public modules
(``tuf.api.metadata``, ``securesystemslib.signer``); pyproject.toml tells mypy that
those modules re-export them.
"""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from converter.errors import BadInputError, RepositoryError

SERIALIZER = JSONSerializer(compact=True)


def now_utc() -> datetime:
    """Whole seconds: TUF's expiry dates have no fractions."""
    return datetime.now(UTC).replace(microsecond=0)


def copy_metadata(md: Metadata[Any]) -> Metadata[Any]:
    """An independent copy to change (the loaded one stays as signed)."""
    return Metadata.from_bytes(md.to_bytes(SERIALIZER))


def load_signers(root: Root, keys_dir: Path, role: str) -> list[Signer]:
    """The private keys of ``role`` in ``keys_dir/<role>/<keyid>.pem`` that ``root`` lists."""
    found: list[Signer] = []
    for keyid in root.roles[role].keyids:
        pem = keys_dir / role / f"{keyid}.pem"
        if pem.exists():
            found.append(CryptoSigner.from_priv_key_uri(f"file2:{pem}", root.keys[keyid]))
    threshold = root.roles[role].threshold
    if len(found) < threshold:
        raise RepositoryError(
            f"only {len(found)} of the {threshold} {role} keys needed are in {keys_dir / role}"
        )
    return found


def new_signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


def _sign(md: Metadata[Any], signers: list[Signer]) -> bytes:
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    return md.to_bytes(SERIALIZER)


def sign_root(root: Metadata[Root], signers: list[Signer]) -> tuple[str, bytes]:
    """``N.root.json`` signed by every one of ``signers``."""
    return f"{root.signed.version}.root.json", _sign(root, signers)


def sign_chain(
    signers: dict[str, list[Signer]],
    targets: Metadata[Targets],
    snapshot: Metadata[Snapshot],
    timestamp: Metadata[Timestamp],
) -> list[tuple[str, bytes]]:
    """Sign targets -> snapshot -> timestamp, each pointing at the one below.
    Returns (file name, bytes) in publishing order, timestamp last."""
    t_bytes = _sign(targets, signers["targets"])
    snapshot.signed.meta["targets.json"] = MetaFile.from_data(targets.signed.version, t_bytes, ["sha256"])
    s_bytes = _sign(snapshot, signers["snapshot"])
    timestamp.signed.snapshot_meta = MetaFile.from_data(snapshot.signed.version, s_bytes, ["sha256"])
    return [
        (f"{targets.signed.version}.targets.json", t_bytes),
        (f"{snapshot.signed.version}.snapshot.json", s_bytes),
        ("timestamp.json", _sign(timestamp, signers["timestamp"])),
    ]


class RootKeysNeededError(BadInputError):
    """Root must be signed and its keys are offline: the operator gives their folder."""


def check_root_keys_target(root_dir: Path, root_keys: Path) -> None:
    """``repo init --root-keys``: an empty or new folder, neither inside the repository nor
    around it."""
    if root_keys.exists() and (not root_keys.is_dir() or any(root_keys.iterdir())):
        raise BadInputError(f"--root-keys {root_keys} exists and is not an empty folder")
    inside = root_keys.resolve().is_relative_to(root_dir.resolve())
    if inside or root_dir.resolve().is_relative_to(root_keys.resolve()):
        raise BadInputError(
            f"--root-keys {root_keys} must be a folder of its own (removable media), "
            f"not inside or around the repository {root_dir}"
        )


def private_temp(final: Path) -> Path:
    """An owner-only temporary folder beside ``final``, to be renamed into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
