"""The repository's target files as records, and what a push changes (pure).

A target's signed ``custom`` field (``docs/protocol.md`` section 4) is parsed
once, by the same parsers the device uses (:func:`agent.protocol.parse_release`,
:func:`agent.protocol.parse_chunk_info`), into a :class:`SignedTarget`; the
host never reads it again by key, and :meth:`SignedTarget.custom` is the one
place that writes it.

:func:`plan_release` decides what a push does to the targets metadata: which
targets to sign, which files to upload, which older versions to drop
(:func:`versions_to_keep`). :class:`converter.repo.repository.Repository` signs
and writes the result.

Guarantees:

* ``SignedTarget.from_target_file(t.to_target_file()) == t`` for every target
  :func:`new_target` makes, and the custom fields are those of the protocol;
* a version's files never change once signed: a push of an existing version
  with other content is refused (:class:`~converter.errors.BadInputError`), and
  the same content with another rollout changes only the model target's rollout;
* a version that was published and dropped is never signed again;
* :func:`plan_retarget` and :func:`plan_removal` change only the rollout rule of one
  version, or take one version out, and say ``unchanged`` when the targets already are
  what they ask: applying either twice signs once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from tuf.api.metadata import TargetFile, Targets

from agent.protocol import (
    CARD_FILE,
    CUSTOM_KEY,
    GOLDEN_FILE,
    MODEL_FILE,
    NAME_RE,
    ChunkInfo,
    ModelRelease,
    ProtocolError,
    Rollout,
    chunk_hashes,
    consistent_target_file,
    parse_chunk_info,
    parse_release,
    target_path,
)
from converter.errors import BadInputError, RepositoryError

KIND_MODEL = "model"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedTarget:
    """One target file as the targets metadata signs it."""

    path: str
    length: int
    sha256: str
    kind: str  # "model", "card" or "golden": the file name's stem
    chunks: ChunkInfo
    release: ModelRelease | None = None  # model targets only
    published: str | None = None  # model targets: when first signed (ISO 8601, UTC)

    @property
    def file(self) -> str:
        """The name devices fetch it by (consistent snapshots)."""
        return consistent_target_file(self.path, self.sha256)

    def custom(self) -> dict[str, Any]:
        """The signed ``custom`` field (``docs/protocol.md`` 4.2)."""
        lf: dict[str, Any] = {"kind": self.kind}
        rel = self.release
        if rel is not None:
            lf.update(name=rel.name, version=rel.version, rollout=rel.rollout.to_dict())
            if self.published is not None:
                lf["published"] = self.published
            if rel.card_path is not None:
                lf["card"] = rel.card_path
            if rel.golden_path is not None:
                lf["golden"] = rel.golden_path
        lf.update(self.chunks.to_dict())
        return {CUSTOM_KEY: lf}

    def to_target_file(self) -> TargetFile:
        return TargetFile(self.length, {"sha256": self.sha256}, self.path, {"custom": self.custom()})

    @classmethod
    def from_target_file(cls, tf: TargetFile) -> SignedTarget:
        """Parse a target of this repository; RepositoryError if it is not a valid litefleet target."""
        custom = tf.unrecognized_fields.get("custom")
        try:
            if not isinstance(custom, Mapping) or not isinstance(custom.get(CUSTOM_KEY), Mapping):
                raise ProtocolError("no litefleet custom fields")
            lf = custom[CUSTOM_KEY]
            chunks = parse_chunk_info(custom, tf.length)
            release = parse_release(tf.path, custom)
        except ProtocolError as exc:
            raise RepositoryError(f"target {tf.path} in the repository is damaged: {exc}") from exc
        published = lf.get("published")
        return cls(
            path=tf.path,
            length=tf.length,
            sha256=tf.hashes["sha256"],
            kind=str(lf.get("kind")),
            chunks=chunks,
            release=release,
            published=published if isinstance(published, str) else None,
        )

    def with_rollout(self, rollout: Rollout) -> SignedTarget:
        if self.release is None:
            raise ValueError(f"{self.path} is not a model target")
        return replace(self, release=replace(self.release, rollout=rollout))


def new_target(
    path: str, data: bytes, chunk_size: int, release: ModelRelease | None = None, published: str | None = None
) -> SignedTarget:
    return SignedTarget(
        path=path,
        length=len(data),
        sha256=sha256_hex(data),
        kind=path.rsplit("/", 1)[1].split(".")[0],
        chunks=ChunkInfo(chunk_size, tuple(chunk_hashes(data, chunk_size))),
        release=release,
        published=published,
    )


def parse_targets(targets: Targets) -> dict[str, SignedTarget]:
    """Every target of the metadata, parsed; RepositoryError for a damaged one."""
    return {path: SignedTarget.from_target_file(tf) for path, tf in targets.targets.items()}


def model_releases(catalog: Mapping[str, SignedTarget], name: str) -> dict[int, Rollout]:
    """version -> rollout of every signed version of model ``name``."""
    return {
        t.release.version: t.release.rollout
        for t in catalog.values()
        if t.release is not None and t.release.name == name
    }


@dataclass
class TargetUpload:
    """A target file the broker must hold as retained chunks."""

    path: str
    sha256: str
    data: bytes
    chunk_size: int

    @property
    def file(self) -> str:
        return consistent_target_file(self.path, self.sha256)


@dataclass
class PublishPlan:
    """What a repository change asks of the broker, in the order to do it."""

    uploads: list[TargetUpload] = field(default_factory=list)
    metadata: list[tuple[str, bytes]] = field(default_factory=list)  # timestamp.json last
    clear_targets: list[tuple[str, int]] = field(default_factory=list)  # (file, chunk count)
    clear_metadata: list[str] = field(default_factory=list)


# -- releases -----------------------------------------------------------------------------


def versions_to_keep(releases: Mapping[int, Rollout]) -> set[int]:
    """Which versions of one model stay published.

    Every version from the newest one that goes to all devices (no canary) on
    is kept, since some device may be assigned any of them; below it, only the
    newest older version stays, as the way back (``push --version`` it to roll
    the fleet back). With no version for all devices, everything is kept.
    """
    full = [v for v, r in releases.items() if r.target == "all" and r.canary_pct >= 100]
    if not full:
        return set(releases)
    floor = max(full)
    keep = {v for v in releases if v >= floor}
    older = [v for v in releases if v < floor]
    if older:
        keep.add(max(older))
    return keep


@dataclass(frozen=True)
class ReleaseFiles:
    """The files of one model version: the model, and its card and golden vectors if any."""

    model: bytes
    card: bytes | None = None
    golden: bytes | None = None

    def named(self) -> dict[str, bytes]:
        """file name -> bytes, the model first."""
        files = {MODEL_FILE: self.model, CARD_FILE: self.card, GOLDEN_FILE: self.golden}
        return {name: data for name, data in files.items() if data is not None}


@dataclass(frozen=True)
class ReleaseChange:
    """What :func:`plan_release` decided."""

    name: str
    version: int
    put: tuple[SignedTarget, ...] = ()  # to sign, the model first
    uploads: tuple[TargetUpload, ...] = ()  # files the broker does not hold yet
    drop: tuple[SignedTarget, ...] = ()  # targets of versions no longer kept
    removed_versions: tuple[int, ...] = ()
    unchanged: bool = False


def _choose_version(catalog: Mapping[str, SignedTarget], name: str, latest: int, version: int | None) -> int:
    if not NAME_RE.match(name):
        raise BadInputError(f"model name {name!r} must be 1-63 lowercase letters, digits, '.', '_' or '-'")
    if version is None:
        return latest + 1
    if version < 1:
        raise BadInputError("--version must be at least 1")
    if target_path(name, version, MODEL_FILE) not in catalog and version <= latest:
        raise BadInputError(
            f"{name} version {version} was published before and removed; versions never go back "
            f"(devices would refuse it): use --version {latest + 1} or leave --version out"
        )
    return version


def _release_targets(
    name: str, version: int, files: ReleaseFiles, rollout: Rollout, chunk_size: int, now: str
) -> list[tuple[SignedTarget, bytes]]:
    release = ModelRelease(
        name,
        version,
        target_path(name, version, MODEL_FILE),
        rollout,
        target_path(name, version, CARD_FILE) if files.card is not None else None,
        target_path(name, version, GOLDEN_FILE) if files.golden is not None else None,
    )
    out = []
    for fname, data in files.named().items():
        is_model = fname == MODEL_FILE
        target = new_target(
            target_path(name, version, fname),
            data,
            chunk_size,
            release if is_model else None,
            now if is_model else None,
        )
        out.append((target, data))
    return out


def _retarget(
    catalog: Mapping[str, SignedTarget], existing: SignedTarget, new: list[tuple[SignedTarget, bytes]]
) -> SignedTarget | None:
    """A re-push of a signed version: the model target with the new rollout, or None if
    nothing changes. Any other difference in content is refused."""
    model, _ = new[0]
    rel = existing.release
    if rel is None or model.release is None:
        raise RepositoryError(f"target {existing.path} in the repository is not a model")
    if existing.sha256 != model.sha256:
        raise BadInputError(
            f"{rel.name} version {rel.version} exists with a different model file; push a new version"
        )
    for target, _ in new[1:]:
        old = catalog.get(target.path)
        if old is None or old.sha256 != target.sha256 or old.length != target.length:
            what = target.path.rsplit("/", 1)[1]
            raise BadInputError(f"{rel.name} version {rel.version} exists with a different {what}")
    if rel.rollout == model.release.rollout:
        return None
    return existing.with_rollout(model.release.rollout)


def plan_release(
    catalog: Mapping[str, SignedTarget],
    *,
    name: str,
    files: ReleaseFiles,
    latest: int,
    version: int | None,
    rollout: Rollout,
    chunk_size: int,
    now: str,
) -> ReleaseChange:
    """Add model ``name`` (``version``, default ``latest + 1``) or re-target a signed version.

    ``catalog`` is the current targets, ``latest`` the newest version of ``name`` ever
    published, ``now`` the ISO time recorded as ``published``."""
    version = _choose_version(catalog, name, latest, version)
    new = _release_targets(name, version, files, rollout, chunk_size, now)
    existing = catalog.get(new[0][0].path)
    if existing is None:
        put = tuple(t for t, _ in new)
        uploads = tuple(TargetUpload(t.path, t.sha256, data, chunk_size) for t, data in new)
    else:
        retargeted = _retarget(catalog, existing, new)
        if retargeted is None:
            return ReleaseChange(name, version, unchanged=True)
        put, uploads = (retargeted,), ()
    removed, drop = _no_longer_kept(catalog, name, {**model_releases(catalog, name), version: rollout})
    return ReleaseChange(name, version, put, uploads, drop, removed)


def _no_longer_kept(
    catalog: Mapping[str, SignedTarget], name: str, releases: Mapping[int, Rollout]
) -> tuple[tuple[int, ...], tuple[SignedTarget, ...]]:
    """The versions of ``name`` that :func:`versions_to_keep` drops once ``releases`` are
    signed, and their targets."""
    removed = sorted(set(releases) - versions_to_keep(releases))
    return removed_versions(catalog, name, removed)


def removed_versions(
    catalog: Mapping[str, SignedTarget], name: str, versions: Iterable[int]
) -> tuple[tuple[int, ...], tuple[SignedTarget, ...]]:
    folders = {f"models/{name}/{v}/" for v in versions}
    drop = tuple(t for path, t in catalog.items() if path.rsplit("/", 1)[0] + "/" in folders)
    return tuple(sorted(versions)), drop


def plan_retarget(
    catalog: Mapping[str, SignedTarget], *, name: str, version: int, rollout: Rollout
) -> ReleaseChange:
    """Give the signed ``version`` of ``name`` another rollout rule; no file changes (the
    rollout controller's next wave). Versions no longer kept are dropped as by a push."""
    existing = catalog.get(target_path(name, version, MODEL_FILE))
    if existing is None or existing.release is None:
        raise BadInputError(f"{name} version {version} is not in the repository")
    if existing.release.rollout == rollout:
        return ReleaseChange(name, version, unchanged=True)
    removed, drop = _no_longer_kept(catalog, name, {**model_releases(catalog, name), version: rollout})
    return ReleaseChange(name, version, (existing.with_rollout(rollout),), (), drop, removed)


def plan_removal(catalog: Mapping[str, SignedTarget], *, name: str, version: int) -> ReleaseChange:
    """Take ``version`` of ``name`` (model, card, golden) out of the signed targets: every
    device that took it goes back to the newest version its rule still selects (an
    aborted rollout). Nothing to do when it is not there."""
    removed, drop = removed_versions(catalog, name, [version])
    if not drop:
        return ReleaseChange(name, version, unchanged=True)
    return ReleaseChange(name, version, (), (), drop, removed)
