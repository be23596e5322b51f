"""``repo.json``, the host repository's own state, as frozen records (pure).

``repo.json`` says which version of each role's metadata is current, the
settings chosen at ``repo init`` (expiry per role, chunk size), the newest
version ever published of each model (versions never go back, even after a
version was dropped), and what still awaits publishing. Everything else is in
the signed metadata itself.

The file (format 1)::

    {"format": 1,
     "expiry_days": {"root": 365, "targets": 90, "snapshot": 30, "timestamp": 14},
     "chunk_size": 262144,
     "versions": {"root": 1, "targets": 2, "snapshot": 2},
     "models": {"digits": {"latest": 3}},
     "pending_uploads": ["models/digits/3/model.tflite"],
     "pending_metadata": ["2.targets.json", "2.snapshot.json", "timestamp.json"],
     "root_keys": "offline"}

``root_keys`` is there only for a repository made with ``repo init --root-keys``.

Guarantees:

* :func:`parse_state` and :meth:`RepoState.to_json` round-trip, and
  ``parse_state`` reads every ``repo.json`` litefleet has written (format 1;
  keys it does not know, such as the unused ``published_metadata`` of the first
  releases, are ignored);
* ``parse_state`` raises :class:`ValueError` with one line saying what is wrong
  (a missing key, a value of the wrong type, another format), never a
  half-filled record;
* every change is a new record (``with_*`` methods); nothing here touches a
  file, so the caller writes the result (atomically) before it relies on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

REPO_FORMAT = 1
ROLES = ("root", "targets", "snapshot", "timestamp")


@dataclass(frozen=True)
class ExpiryDays:
    """How long each role's metadata is valid when it is signed, in days."""

    root: int = 365
    targets: int = 90
    snapshot: int = 30
    timestamp: int = 14

    def of(self, role: str) -> int:
        days: int = getattr(self, role)
        return days

    def with_days(self, overrides: Mapping[str, int]) -> ExpiryDays:
        unknown = set(overrides) - set(ROLES)
        if unknown:
            raise ValueError(f"no role {', '.join(sorted(unknown))}; roles are {', '.join(ROLES)}")
        return replace(self, **overrides)

    def to_json(self) -> dict[str, int]:
        return {role: self.of(role) for role in ROLES}


DEFAULT_EXPIRY = ExpiryDays()


@dataclass(frozen=True)
class RoleVersions:
    """The current version of each versioned role (timestamp has no version in its file name)."""

    root: int = 1
    targets: int = 1
    snapshot: int = 1

    def to_json(self) -> dict[str, int]:
        return {"root": self.root, "targets": self.targets, "snapshot": self.snapshot}


@dataclass(frozen=True)
class RepoState:
    expiry_days: ExpiryDays
    chunk_size: int
    versions: RoleVersions = RoleVersions()
    # model name -> the newest version ever published (also of versions since dropped)
    latest: Mapping[str, int] = field(default_factory=dict)
    # target paths and metadata file names not yet known to be on the broker
    pending_uploads: tuple[str, ...] = ()
    pending_metadata: tuple[str, ...] = ()
    # the root keys live in a folder of their own (removable media), not in keys/root
    root_keys_offline: bool = False

    def latest_version(self, name: str) -> int:
        """The newest version of ``name`` ever published, 0 for none."""
        return self.latest.get(name, 0)

    def with_root(self, version: int, pending_metadata: Iterable[str]) -> RepoState:
        return replace(
            self,
            versions=replace(self.versions, root=version),
            pending_metadata=_union(self.pending_metadata, pending_metadata),
        )

    def with_signed(
        self,
        *,
        targets: int,
        snapshot: int,
        metadata: Iterable[str],
        uploads: Iterable[str],
        target_paths: Iterable[str],
        latest: Mapping[str, int],
    ) -> RepoState:
        """After new targets/snapshot/timestamp versions: ``metadata`` and ``uploads`` are
        pending; a pending upload no longer among ``target_paths`` is dropped."""
        present = set(target_paths)
        return replace(
            self,
            versions=replace(self.versions, targets=targets, snapshot=snapshot),
            latest={**self.latest, **latest},
            pending_uploads=tuple(p for p in _union(self.pending_uploads, uploads) if p in present),
            pending_metadata=_union(self.pending_metadata, metadata),
        )

    def published(self) -> RepoState:
        """Everything current is on the broker."""
        return replace(self, pending_uploads=(), pending_metadata=())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REPO_FORMAT,
            "expiry_days": self.expiry_days.to_json(),
            "chunk_size": self.chunk_size,
            "versions": self.versions.to_json(),
            "models": {name: {"latest": v} for name, v in sorted(self.latest.items())},
            "pending_uploads": list(self.pending_uploads),
            "pending_metadata": list(self.pending_metadata),
            # written only when set: a repository made without it reads as before
            **({"root_keys": "offline"} if self.root_keys_offline else {}),
        }


def _union(old: Iterable[str], new: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(old) | set(new)))


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, not {value!r}")
    return value


def _names(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of names")
    return tuple(value)


def _object(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key)
    if not isinstance(value, Mapping):
        raise ValueError(f"{key} must be an object")
    return value


def parse_state(doc: Any) -> RepoState:
    """The state in a parsed ``repo.json`` document; ValueError if it is not one."""
    if not isinstance(doc, Mapping):
        raise ValueError("not a JSON object")
    if doc.get("format") != REPO_FORMAT:
        raise ValueError(f"unknown repository format {doc.get('format')!r}")
    expiry = _object(doc, "expiry_days")
    versions = _object(doc, "versions")
    models = _object(doc, "models")
    try:
        days = {role: _int(expiry[role], f"expiry_days.{role}") for role in ROLES}
        role_versions = {r: _int(versions[r], f"versions.{r}") for r in ("root", "targets", "snapshot")}
        latest = {str(n): _int(_object(models, n)["latest"], f"models.{n}.latest") for n in models}
    except KeyError as exc:
        raise ValueError(f"missing {exc.args[0]!r}") from exc
    return RepoState(
        expiry_days=ExpiryDays(**days),
        chunk_size=_int(doc.get("chunk_size"), "chunk_size"),
        versions=RoleVersions(**role_versions),
        latest=latest,
        pending_uploads=_names(doc.get("pending_uploads", []), "pending_uploads"),
        pending_metadata=_names(doc.get("pending_metadata", []), "pending_metadata"),
        root_keys_offline=_root_keys(doc.get("root_keys", "online")),
    )


def _root_keys(value: Any) -> bool:
    if value not in ("online", "offline"):
        raise ValueError(f"root_keys must be online or offline, not {value!r}")
    return bool(value == "offline")
