"""The model repository: TUF metadata, signing keys and target files on the host.

Layout of a repository folder ``DIR``::

    DIR/root.json              the root a device is given as ``trusted_root``
    DIR/repo.json              repository state: current versions, settings, pending publishes
    DIR/keys/<role>/<keyid>.pem  private keys (owner-only; DIR/keys is 0700); with
                               ``repo init --root-keys ROOTDIR`` the root keys are in
                               ROOTDIR/root/ instead (removable media), asked for only
                               when root is signed (:meth:`Repository.use_root_keys`)
    DIR/metadata/              signed metadata as devices fetch it:
                               N.root.json, N.targets.json, N.snapshot.json, timestamp.json
    DIR/targets/<sha256>       content-addressed copies of the target files

Roles: root (signs the keys of every role), targets (signs which model files
exist, their hashes, chunk hashes and rollout rules), snapshot (signs which
targets metadata is current), timestamp (signs which snapshot is current and
expires soonest). Consistent snapshots are on. Every role may have several
keys and a threshold (``repo init --keys``/``--threshold``).

All changes are computed in memory, written to the folder (metadata files
first, ``repo.json`` last, each atomically), then published; ``repo.json``
records which targets still await publishing, so a push that fails half-way
is finished by the next push or ``litefleet repo publish``.

Guarantees:

* the repository's state is read once, on :meth:`Repository.open`, into typed
  records (:class:`~converter.repo.state.RepoState`, the targets as
  :class:`~converter.repo.targets.SignedTarget`); every change makes new
  records, writes them, and only then replaces the loaded ones;
* a failed :meth:`Repository.init` leaves nothing behind, and the folder,
  ``keys/`` and every private key are owner-only;
* the pure decisions live in :mod:`converter.repo.targets` (what a push
  changes) and :mod:`converter.repo.state` (``repo.json``); signatures in
  :mod:`converter.repo.signing`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer
from tuf.api.metadata import TOP_LEVEL_ROLE_NAMES, Metadata, Root, Snapshot, Targets, Timestamp

from agent.files import atomic_write, fsync_dir
from agent.protocol import DEFAULT_CHUNK_SIZE, Rollout
from converter.crash_points import crash_point
from converter.errors import BadInputError, RepositoryError
from converter.repo.signing import (
    RootKeysNeededError,
    check_root_keys_target,
    copy_metadata,
    load_signers,
    new_signer,
    now_utc,
    private_temp,
    sign_chain,
    sign_root,
)
from converter.repo.state import DEFAULT_EXPIRY, ExpiryDays, RepoState, parse_state
from converter.repo.targets import (
    PublishPlan,
    ReleaseChange,
    ReleaseFiles,
    SignedTarget,
    TargetUpload,
    model_releases,
    parse_targets,
    plan_release,
    plan_removal,
    plan_retarget,
    sha256_hex,
)

logger = logging.getLogger(__name__)

DEFAULT_EXPIRY_DAYS = DEFAULT_EXPIRY.to_json()
STATE_FILE = "repo.json"


@dataclass
class ReleaseResult:
    name: str
    version: int
    targets_version: int
    plan: PublishPlan
    removed_versions: list[int] = field(default_factory=list)
    unchanged: bool = False


def _state_bytes(state: RepoState) -> bytes:
    return json.dumps(state.to_json(), indent=1).encode()


class Repository:
    """A repository folder, loaded. Use :meth:`init` or :meth:`open`."""

    def __init__(self, root_dir: Path, state: RepoState) -> None:
        self.dir = root_dir
        self.state = state
        self.md_dir = root_dir / "metadata"
        self.targets_dir = root_dir / "targets"
        self.keys_dir = root_dir / "keys"
        self._signers: dict[str, list[Signer]] = {}
        # where the root keys are when they are kept offline (repo init --root-keys)
        self.root_keys_dir: Path | None = None
        self.root: Metadata[Root] = self._load_md("root", state.versions.root)
        self.targets: Metadata[Targets] = self._load_md("targets", state.versions.targets)
        self.snapshot: Metadata[Snapshot] = self._load_md("snapshot", state.versions.snapshot)
        self.timestamp: Metadata[Timestamp] = self._load_md("timestamp", None)
        self.catalog: dict[str, SignedTarget] = parse_targets(self.targets.signed)

    # -- creation and loading -------------------------------------------------------
    @classmethod
    def init(
        cls,
        root_dir: Path,
        *,
        keys: int = 1,
        threshold: int = 1,
        expiry_days: dict[str, int] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        root_keys: Path | None = None,
    ) -> Repository:
        """Create keys and version 1 of every role in an empty or new folder.

        ``root_keys``: write the root keys into that folder (``root_keys/root/``), not
        beside the online keys. Everything is made in temporary folders beside
        ``root_dir`` (and ``root_keys``) and renamed into place at the end: a failure
        leaves nothing behind."""
        if not 1 <= threshold <= keys <= 16:
            raise BadInputError("need 1 <= --threshold <= --keys <= 16")
        try:
            expiry = DEFAULT_EXPIRY.with_days(expiry_days or {})
        except ValueError as exc:
            raise BadInputError(str(exc)) from exc
        if root_dir.exists() and not root_dir.is_dir():
            raise BadInputError(f"{root_dir} exists and is not a folder; choose another path")
        if root_dir.exists() and any(root_dir.iterdir()):
            raise BadInputError(f"{root_dir} exists and is not empty; refusing to overwrite a repository")
        if root_keys is not None:
            check_root_keys_target(root_dir, root_keys)
        try:
            root_dir.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{root_dir.name}.", dir=root_dir.parent))
            keys_work = private_temp(root_keys) if root_keys is not None else None
        except OSError as exc:
            raise BadInputError(f"cannot create {root_dir} or {root_keys}: {exc.strerror}") from exc
        placed: list[Path] = []
        try:
            cls._init_into(
                work,
                keys=keys,
                threshold=threshold,
                expiry=expiry,
                chunk_size=chunk_size,
                root_keys=keys_work,
            )
            # the root keys first: a repository whose root keys are lost is lost
            for tmp, final in ((keys_work, root_keys), (work, root_dir)):
                if tmp is None or final is None:
                    continue
                if final.exists():
                    final.rmdir()  # empty, checked above
                os.rename(tmp, final)
                placed.append(final)
                fsync_dir(final.parent)  # the rename itself survives a power cut
        except BaseException:
            for folder in (work, keys_work, *placed):
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
            raise
        return cls.open(root_dir)

    @classmethod
    def _init_into(
        cls,
        root_dir: Path,
        *,
        keys: int,
        threshold: int,
        expiry: ExpiryDays,
        chunk_size: int,
        root_keys: Path | None,
    ) -> None:
        # root_dir (and root_keys) come from mkdtemp: empty and owner-only (0700) already
        for sub in ("metadata", "targets", "keys"):
            (root_dir / sub).mkdir(mode=0o700)
        now = now_utc()

        def until(role: str) -> datetime:
            return now + timedelta(days=expiry.of(role))

        root = Root(expires=until("root"), consistent_snapshot=True)
        signers: dict[str, list[Signer]] = {}
        for role in TOP_LEVEL_ROLE_NAMES:
            folder = (root_keys if role == "root" and root_keys is not None else root_dir / "keys") / role
            folder.mkdir(mode=0o700)
            signers[role] = []
            for _ in range(keys):
                signer = new_signer()
                root.add_key(signer.public_key, role)
                atomic_write(folder / f"{signer.public_key.keyid}.pem", signer.private_bytes)
                signers[role].append(signer)
            root.roles[role].threshold = threshold
        files = [
            sign_root(Metadata(root), signers["root"]),
            *sign_chain(
                signers,
                Metadata(Targets(expires=until("targets"))),
                Metadata(Snapshot(expires=until("snapshot"))),
                Metadata(Timestamp(expires=until("timestamp"))),
            ),
        ]
        for name, data in files:
            atomic_write(root_dir / "metadata" / name, data, 0o644)
        atomic_write(root_dir / "root.json", files[0][1], 0o644)
        state = RepoState(
            expiry,
            chunk_size,
            pending_metadata=tuple(name for name, _ in files),
            root_keys_offline=root_keys is not None,
        )
        atomic_write(root_dir / STATE_FILE, _state_bytes(state))

    @classmethod
    def open(cls, root_dir: Path) -> Repository:
        path = root_dir / STATE_FILE
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError as exc:
            raise BadInputError(
                f"{root_dir} is not a litefleet repository (no repo.json); "
                f"create one with `litefleet repo init {root_dir}`"
            ) from exc
        except (OSError, ValueError) as exc:
            raise RepositoryError(f"cannot read {path}: {exc}") from exc
        try:
            state = parse_state(doc)
        except ValueError as exc:
            raise RepositoryError(f"{path}: {exc}") from exc
        return cls(root_dir, state)

    def _load_md(self, role: str, version: int | None) -> Metadata[Any]:
        name = f"{version}.{role}.json" if version is not None else f"{role}.json"
        try:
            return Metadata.from_file(str(self.md_dir / name))
        except (OSError, ValueError) as exc:
            raise RepositoryError(f"cannot read {self.md_dir / name}: {exc}") from exc

    def use_root_keys(self, folder: Path | None) -> None:
        """Where the root keys are for this session (the offline folder; None: keys/root)."""
        self.root_keys_dir = folder
        self._signers.pop("root", None)

    def _role_keys_dir(self, role: str) -> Path:
        if role != "root":
            return self.keys_dir
        if self.root_keys_dir is not None:
            return self.root_keys_dir
        if self.state.root_keys_offline:
            raise RootKeysNeededError(
                f"the root keys of {self.dir} are kept offline (repo init --root-keys): "
                "give --root-keys DIR, the folder that holds them"
            )
        return self.keys_dir

    def signers(self, role: str) -> list[Signer]:
        """The private keys of ``role`` found in ``keys/<role>/`` (root: in the root keys'
        folder) that root lists."""
        if role not in self._signers:
            self._signers[role] = load_signers(self.root.signed, self._role_keys_dir(role), role)
        return self._signers[role]

    def _write_state(self, state: RepoState) -> None:
        atomic_write(self.dir / STATE_FILE, _state_bytes(state))
        self.state = state

    # -- queries --------------------------------------------------------------------------
    def model_releases(self, name: str) -> dict[int, Rollout]:
        return model_releases(self.catalog, name)

    def model_names(self) -> list[str]:
        """Every model ever published here, by name."""
        return sorted(self.state.latest)

    def next_version(self, name: str) -> int:
        return self.state.latest_version(name) + 1

    def current_metadata(self) -> list[tuple[str, bytes]]:
        """Every metadata file the broker should hold now, in publishing order."""
        v = self.state.versions
        names = [f"{i}.root.json" for i in range(1, v.root + 1)]
        names += [f"{v.targets}.targets.json", f"{v.snapshot}.snapshot.json", "timestamp.json"]
        return [(n, (self.md_dir / n).read_bytes()) for n in names]

    def retained_metadata_names(self) -> set[str]:
        """Metadata files that belong on the broker: every root, the current and
        previous targets and snapshot (for devices mid-refresh), the timestamp."""
        v = self.state.versions
        names = {n for n, _ in self.current_metadata()}
        if v.targets > 1:
            names.add(f"{v.targets - 1}.targets.json")
        if v.snapshot > 1:
            names.add(f"{v.snapshot - 1}.snapshot.json")
        return names

    def upload_for(self, path: str) -> TargetUpload:
        target = self.catalog[path]
        try:
            data = (self.targets_dir / target.sha256).read_bytes()
        except FileNotFoundError:
            data = b""
        if sha256_hex(data) != target.sha256:
            raise RepositoryError(
                f"the repository's copy of {path} ({self.targets_dir / target.sha256}) is missing "
                "or damaged; push that model file again"
            )
        return TargetUpload(path, target.sha256, data, target.chunks.chunk_size)

    def all_uploads(self) -> list[TargetUpload]:
        return [self.upload_for(p) for p in sorted(self.catalog)]

    # -- changes --------------------------------------------------------------------------
    def add_release(
        self,
        name: str,
        model: bytes,
        *,
        card: bytes | None = None,
        golden: bytes | None = None,
        version: int | None = None,
        rollout: Rollout | None = None,
    ) -> ReleaseResult:
        """Add (or re-target) a model version and sign new targets, snapshot and timestamp."""
        latest = self.state.latest_version(name)
        change = plan_release(
            self.catalog,
            name=name,
            files=ReleaseFiles(model, card, golden),
            latest=latest,
            version=version,
            rollout=rollout or Rollout(),
            chunk_size=self.state.chunk_size,
            now=now_utc().isoformat(),
        )
        return self._apply(change, latest={name: max(latest, change.version)})

    def retarget(self, name: str, version: int, rollout: Rollout) -> ReleaseResult:
        """Sign a new rollout rule for a version already in the repository (no upload)."""
        return self._apply(plan_retarget(self.catalog, name=name, version=version, rollout=rollout))

    def remove_release(self, name: str, version: int) -> ReleaseResult:
        """Take a version out of the signed targets (its number is never used again)."""
        return self._apply(plan_removal(self.catalog, name=name, version=version))

    def _apply(self, change: ReleaseChange, latest: dict[str, int] | None = None) -> ReleaseResult:
        if change.unchanged:
            return ReleaseResult(
                change.name, change.version, self.targets.signed.version, PublishPlan(), unchanged=True
            )
        targets: Metadata[Targets] = copy_metadata(self.targets)
        plan = PublishPlan(uploads=list(change.uploads))
        for gone in change.drop:
            del targets.signed.targets[gone.path]
            plan.clear_targets.append((gone.file, len(gone.chunks.hashes)))
        for target in change.put:
            targets.signed.targets[target.path] = target.to_target_file()
        self._commit(targets, plan, latest=latest or {})
        return ReleaseResult(
            change.name, change.version, self.targets.signed.version, plan, list(change.removed_versions)
        )

    def rotate(self, role: str, *, keys: int | None = None, threshold: int | None = None) -> PublishPlan:
        """Replace every key of ``role`` with new ones.

        Writes root version N+1 listing the new keys, signed by the current root
        keys (and, when root itself rotates, by the new root keys too), then signs
        new targets, snapshot and timestamp versions with the current keys.
        Devices follow the chain N.root.json -> N+1.root.json on their next
        refresh. The old private keys move to ``keys/retired/``: destroy them.
        """
        if role not in TOP_LEVEL_ROLE_NAMES:
            raise BadInputError(f"role must be one of {', '.join(sorted(TOP_LEVEL_ROLE_NAMES))}")
        old_root_signers = self.signers("root")
        root: Metadata[Root] = copy_metadata(self.root)
        current = root.signed.roles[role]
        n = keys or len(current.keyids)
        k = threshold or current.threshold
        if not 1 <= k <= n <= 16:
            raise BadInputError("need 1 <= --threshold <= --keys <= 16")
        old_ids = list(current.keyids)
        for keyid in old_ids:
            root.signed.revoke_key(keyid, role)
        new_keys = [new_signer() for _ in range(n)]
        for signer in new_keys:
            root.signed.add_key(signer.public_key, role)
        root.signed.roles[role].threshold = k
        root.signed.version += 1
        root.signed.expires = now_utc() + timedelta(days=self.state.expiry_days.root)
        new_signers: list[Signer] = list(new_keys) if role == "root" else []
        keys_dir = self._role_keys_dir(role)
        (keys_dir / role).mkdir(mode=0o700, parents=True, exist_ok=True)
        for key in new_keys:
            atomic_write(keys_dir / role / f"{key.public_key.keyid}.pem", key.private_bytes)
        self._publish_root(root, old_root_signers + new_signers)
        self._signers.pop(role, None)
        retired = keys_dir / "retired"
        retired.mkdir(mode=0o700, exist_ok=True)
        for keyid in old_ids:
            old = keys_dir / role / f"{keyid}.pem"
            if old.exists():
                os.replace(old, retired / f"{role}-{keyid}.pem")
        return self.resign()

    def _publish_root(self, root: Metadata[Root], signers: list[Signer]) -> None:
        """Sign root version N+1 and make it current (metadata, root.json, repo.json)."""
        name, data = sign_root(root, signers)
        atomic_write(self.md_dir / name, data, 0o644)
        atomic_write(self.dir / "root.json", data, 0o644)
        self._write_state(self.state.with_root(root.signed.version, [name]))
        self.root = root

    def resign_root(self) -> None:
        """Root version N+1 with the same keys and a fresh expiry (needs the root keys);
        devices take it by walking the root chain."""
        root: Metadata[Root] = copy_metadata(self.root)
        root.signed.version += 1
        root.signed.expires = now_utc() + timedelta(days=self.state.expiry_days.root)
        self._publish_root(root, self.signers("root"))

    def resign(self) -> PublishPlan:
        """New targets, snapshot and timestamp versions with fresh expiry dates."""
        plan = PublishPlan()
        self._commit(copy_metadata(self.targets), plan, latest={})
        return plan

    def _commit(self, targets: Metadata[Targets], plan: PublishPlan, latest: dict[str, int]) -> None:
        expiry = self.state.expiry_days
        now = now_utc()
        snapshot: Metadata[Snapshot] = copy_metadata(self.snapshot)
        timestamp: Metadata[Timestamp] = copy_metadata(self.timestamp)
        for md in (targets, snapshot, timestamp):
            md.signed.version += 1
            md.signed.expires = now + timedelta(days=expiry.of(md.signed.type))
        catalog = parse_targets(targets.signed)
        signers = {r: self.signers(r) for r in ("targets", "snapshot", "timestamp")}
        files = sign_chain(signers, targets, snapshot, timestamp)
        # write: target copies, versioned metadata, timestamp, then repo.json
        for up in plan.uploads:
            # content-addressed and checked by hash when read back (upload_for), so
            # no fsync of megabytes here: a power cut costs at most a re-push
            dest = self.targets_dir / up.sha256
            if not dest.exists() or sha256_hex(dest.read_bytes()) != up.sha256:
                atomic_write(dest, up.data, 0o644, durable=False)
        for name, data in files:
            atomic_write(self.md_dir / name, data, 0o644)
        # a crash here leaves new metadata files that repo.json does not name: nothing is
        # published, and the next change signs the same version numbers over them
        crash_point("repo-metadata-written")
        old = self.state.versions
        # devices mid-refresh may still ask for the previous versions: keep those, clear older
        if old.targets > 1:
            plan.clear_metadata.append(f"{old.targets - 1}.targets.json")
        if old.snapshot > 1:
            plan.clear_metadata.append(f"{old.snapshot - 1}.snapshot.json")
        plan.metadata = files
        self._write_state(
            self.state.with_signed(
                targets=targets.signed.version,
                snapshot=snapshot.signed.version,
                metadata=[n for n, _ in files],
                uploads=[up.path for up in plan.uploads],
                target_paths=catalog,
                latest=latest,
            )
        )
        self.targets, self.snapshot, self.timestamp, self.catalog = targets, snapshot, timestamp, catalog

    def pending_uploads(self, in_memory: list[TargetUpload] | None = None) -> list[TargetUpload]:
        """Targets not yet on the broker; those in ``in_memory`` are not read back."""
        have = {u.path: u for u in in_memory or ()}
        return [have.get(p) or self.upload_for(p) for p in self.state.pending_uploads if p in self.catalog]

    def mark_published(self) -> None:
        """Everything current is on the broker now."""
        self._write_state(self.state.published())
