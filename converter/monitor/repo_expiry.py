"""The signed expiry of the repository metadata retained on the broker (pure).

``litefleet status`` reads it once (:func:`converter.fleet.view.collect_expiry`); the
monitor keeps it live (:class:`RepoExpiry`) and exports it as
``litefleet_repo_metadata_expiry_timestamp_seconds{role}``.

Guarantees:

- Nothing is verified or trusted here: the expiry is read from ``signed.expires`` of
  whatever the broker holds, only to warn before devices refuse the repository.
- Per role the *newest* file counts (the highest ``N`` of ``N.<role>.json``; the broker
  keeps the previous ``targets``/``snapshot`` too, docs/protocol.md 3.1); a cleared file
  (zero-length retained message) is forgotten, so an older one counts again.
- Anything that is not TUF metadata with a parsable expiry is ignored, never raised.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime


def metadata_role(name: str) -> tuple[str | None, int]:
    """``("snapshot", 7)`` for ``7.snapshot.json``, ``("timestamp", 0)`` for ``timestamp.json``."""
    parts = name.split(".")
    if parts == ["timestamp", "json"]:
        return "timestamp", 0
    if (
        len(parts) == 3
        and parts[0].isdigit()
        and parts[1] in ("root", "targets", "snapshot")
        and parts[2] == "json"
    ):
        return parts[1], int(parts[0])
    return None, 0


def signed_expiry(payload: bytes) -> datetime | None:
    """``signed.expires`` of TUF metadata, or None for anything else."""
    try:
        doc = json.loads(payload)
        text = doc["signed"]["expires"]
        when = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except (ValueError, KeyError, TypeError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass
class RepoExpiry:
    """The expiry of every retained metadata file, by role and version (one owner: the
    monitor's writer thread; readers get :meth:`by_role`, a fresh dict)."""

    _files: dict[str, dict[int, float]] = field(default_factory=dict)

    def apply(self, filename: str, payload: bytes) -> bool:
        """Take one retained metadata message; False when it is not metadata the monitor reads."""
        role, number = metadata_role(filename)
        if role is None:
            return False
        files = self._files.setdefault(role, {})
        if not payload:
            files.pop(number, None)
            return True
        expires = signed_expiry(payload)
        if expires is None:
            files.pop(number, None)
            return False
        files[number] = expires.timestamp()
        return True

    def by_role(self) -> Mapping[str, float]:
        """role -> unix time its newest retained file expires."""
        return {role: files[max(files)] for role, files in sorted(self._files.items()) if files}
