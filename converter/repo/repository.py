"""The model repository: TUF metadata, signing keys and target files on the host.

Layout of a repository folder ``DIR``::

    DIR/root.json              the root a device is given as ``trusted_root``
    DIR/repo.json              repository state: current versions, settings, pending publishes
    DIR/keys/<role>/<keyid>.pem  private keys (owner-only; DIR/keys is 0700)
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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import (
    TOP_LEVEL_ROLE_NAMES,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from agent.files import atomic_write, fsync_dir
from agent.protocol import (
    CARD_FILE,
    CUSTOM_KEY,
    DEFAULT_CHUNK_SIZE,
    GOLDEN_FILE,
    MODEL_FILE,
    NAME_RE,
    Rollout,
    chunk_hashes,
    consistent_target_file,
    target_path,
)
from converter.errors import BadInputError, RepositoryError

logger = logging.getLogger(__name__)

REPO_FORMAT = 1
DEFAULT_EXPIRY_DAYS = {"root": 365, "targets": 90, "snapshot": 30, "timestamp": 14}
_SERIALIZER = JSONSerializer(compact=True)


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


@dataclass
class ReleaseResult:
    name: str
    version: int
    targets_version: int
    plan: PublishPlan
    removed_versions: list[int]
    unchanged: bool = False


def versions_to_keep(releases: dict[int, Rollout]) -> set[int]:
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


class Repository:
    """A repository folder, loaded. Use :meth:`init` or :meth:`open`."""

    def __init__(self, root_dir: Path, state: dict[str, Any]) -> None:
        self.dir = root_dir
        self.state = state
        self.md_dir = root_dir / "metadata"
        self.targets_dir = root_dir / "targets"
        self.keys_dir = root_dir / "keys"
        self._signers: dict[str, list[Signer]] = {}
        self.root = self._load_md("root", state["versions"]["root"])
        self.targets = self._load_md("targets", state["versions"]["targets"])
        self.snapshot = self._load_md("snapshot", state["versions"]["snapshot"])
        self.timestamp = self._load_md("timestamp", None)

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
    ) -> Repository:
        """Create keys and version 1 of every role in an empty or new folder.

        Everything is made in a temporary folder beside ``root_dir`` and renamed
        into place at the end: a failure leaves nothing behind."""
        if not 1 <= threshold <= keys <= 16:
            raise BadInputError("need 1 <= --threshold <= --keys <= 16")
        if root_dir.exists() and not root_dir.is_dir():
            raise BadInputError(f"{root_dir} exists and is not a folder; choose another path")
        if root_dir.exists() and any(root_dir.iterdir()):
            raise BadInputError(f"{root_dir} exists and is not empty; refusing to overwrite a repository")
        try:
            root_dir.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{root_dir.name}.", dir=root_dir.parent))
        except OSError as exc:
            raise BadInputError(f"cannot create {root_dir}: {exc.strerror}") from exc
        try:
            cls._init_into(
                work, keys=keys, threshold=threshold, expiry_days=expiry_days, chunk_size=chunk_size
            )
            if root_dir.exists():
                root_dir.rmdir()  # empty, checked above
            os.rename(work, root_dir)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        fsync_dir(root_dir.parent)  # the rename itself survives a power cut
        return cls.open(root_dir)

    @classmethod
    def _init_into(
        cls, root_dir: Path, *, keys: int, threshold: int, expiry_days: dict[str, int] | None, chunk_size: int
    ) -> None:
        # root_dir comes from mkdtemp: empty and owner-only (0700) already
        expiry = {**DEFAULT_EXPIRY_DAYS, **(expiry_days or {})}
        for sub in ("metadata", "targets", "keys"):
            (root_dir / sub).mkdir(mode=0o700)
        root = Root(expires=_now() + timedelta(days=expiry["root"]), consistent_snapshot=True)
        signers: dict[str, list[Signer]] = {}
        for role in TOP_LEVEL_ROLE_NAMES:
            (root_dir / "keys" / role).mkdir(mode=0o700)
            signers[role] = []
            for _ in range(keys):
                signer = CryptoSigner.generate_ed25519()
                key = signer.public_key
                root.add_key(key, role)
                atomic_write(root_dir / "keys" / role / f"{key.keyid}.pem", signer.private_bytes)
                signers[role].append(signer)
            root.roles[role].threshold = threshold
        state: dict[str, Any] = {
            "format": REPO_FORMAT,
            "expiry_days": expiry,
            "chunk_size": chunk_size,
            "versions": {"root": 1, "targets": 1, "snapshot": 1},
            "models": {},
            "pending_uploads": [],
            "published_metadata": [],
        }
        md_root: Metadata[Root] = Metadata(root)

        def until(role: str) -> datetime:
            return _now() + timedelta(days=expiry[role])

        md_targets: Metadata[Targets] = Metadata(Targets(expires=until("targets")))
        md_snapshot: Metadata[Snapshot] = Metadata(Snapshot(expires=until("snapshot")))
        md_timestamp: Metadata[Timestamp] = Metadata(Timestamp(expires=until("timestamp")))
        files = cls._sign_chain(signers, md_root, md_targets, md_snapshot, md_timestamp, sign_root=True)
        for name, data in files:
            atomic_write(root_dir / "metadata" / name, data, 0o644)
        atomic_write(root_dir / "root.json", files[0][1], 0o644)
        state["pending_metadata"] = [name for name, _ in files]
        atomic_write(root_dir / "repo.json", json.dumps(state, indent=1).encode())

    @classmethod
    def open(cls, root_dir: Path) -> Repository:
        path = root_dir / "repo.json"
        try:
            state = json.loads(path.read_bytes())
        except FileNotFoundError as exc:
            raise BadInputError(
                f"{root_dir} is not a litefleet repository (no repo.json); "
                f"create one with `litefleet repo init {root_dir}`"
            ) from exc
        except (OSError, ValueError) as exc:
            raise RepositoryError(f"cannot read {path}: {exc}") from exc
        if state.get("format") != REPO_FORMAT:
            raise RepositoryError(f"{path}: unknown repository format {state.get('format')!r}")
        return cls(root_dir, state)

    def _load_md(self, role: str, version: int | None) -> Metadata[Any]:
        name = f"{version}.{role}.json" if version is not None else f"{role}.json"
        try:
            return Metadata.from_file(str(self.md_dir / name))
        except (OSError, ValueError) as exc:
            raise RepositoryError(f"cannot read {self.md_dir / name}: {exc}") from exc

    def signers(self, role: str) -> list[Signer]:
        """The private keys of ``role`` found in ``keys/<role>/`` that root lists."""
        if role not in self._signers:
            found: list[Signer] = []
            role_keys = self.root.signed.roles[role].keyids
            for keyid in role_keys:
                pem = self.keys_dir / role / f"{keyid}.pem"
                if pem.exists():
                    key = self.root.signed.keys[keyid]
                    found.append(CryptoSigner.from_priv_key_uri(f"file2:{pem}", key))
            if len(found) < self.root.signed.roles[role].threshold:
                raise RepositoryError(
                    f"only {len(found)} of the {self.root.signed.roles[role].threshold} {role} keys "
                    f"needed are in {self.keys_dir / role}"
                )
            self._signers[role] = found
        return self._signers[role]

    @staticmethod
    def _sign_chain(
        signers: dict[str, list[Signer]],
        root: Metadata[Root] | None,
        targets: Metadata[Targets],
        snapshot: Metadata[Snapshot],
        timestamp: Metadata[Timestamp],
        *,
        sign_root: bool,
    ) -> list[tuple[str, bytes]]:
        """Sign targets -> snapshot -> timestamp (and root), linking each to the
        one below with version, length and hash. Returns (file name, bytes) in
        publishing order: root, targets, snapshot, timestamp."""
        out: list[tuple[str, bytes]] = []
        if root is not None and sign_root:
            root.signatures.clear()
            for s in signers["root"]:
                root.sign(s, append=True)
            out.append((f"{root.signed.version}.root.json", root.to_bytes(_SERIALIZER)))
        targets.signatures.clear()
        for s in signers["targets"]:
            targets.sign(s, append=True)
        t_bytes = targets.to_bytes(_SERIALIZER)
        out.append((f"{targets.signed.version}.targets.json", t_bytes))
        snapshot.signed.meta["targets.json"] = MetaFile.from_data(targets.signed.version, t_bytes, ["sha256"])
        snapshot.signatures.clear()
        for s in signers["snapshot"]:
            snapshot.sign(s, append=True)
        s_bytes = snapshot.to_bytes(_SERIALIZER)
        out.append((f"{snapshot.signed.version}.snapshot.json", s_bytes))
        timestamp.signed.snapshot_meta = MetaFile.from_data(snapshot.signed.version, s_bytes, ["sha256"])
        timestamp.signatures.clear()
        for s in signers["timestamp"]:
            timestamp.sign(s, append=True)
        out.append(("timestamp.json", timestamp.to_bytes(_SERIALIZER)))
        return out

    # -- queries --------------------------------------------------------------------------
    def model_releases(self, name: str) -> dict[int, Rollout]:
        out: dict[int, Rollout] = {}
        for _path, tf in self.targets.signed.targets.items():
            lf = (tf.unrecognized_fields.get("custom") or {}).get(CUSTOM_KEY) or {}
            if lf.get("kind") == "model" and lf.get("name") == name:
                ro = lf.get("rollout") or {}
                out[int(lf["version"])] = Rollout(ro.get("target", "all"), int(ro.get("canary_pct", 100)))
        return out

    def next_version(self, name: str) -> int:
        return int(self.state["models"].get(name, {}).get("latest", 0)) + 1

    def current_metadata(self) -> list[tuple[str, bytes]]:
        """Every metadata file the broker should hold now, in publishing order."""
        v = self.state["versions"]
        names = [f"{i}.root.json" for i in range(1, v["root"] + 1)]
        names += [f"{v['targets']}.targets.json", f"{v['snapshot']}.snapshot.json", "timestamp.json"]
        return [(n, (self.md_dir / n).read_bytes()) for n in names]

    def retained_metadata_names(self) -> set[str]:
        """Metadata files that belong on the broker: every root, the current and
        previous targets and snapshot (for devices mid-refresh), the timestamp."""
        v = self.state["versions"]
        names = {n for n, _ in self.current_metadata()}
        if v["targets"] > 1:
            names.add(f"{v['targets'] - 1}.targets.json")
        if v["snapshot"] > 1:
            names.add(f"{v['snapshot'] - 1}.snapshot.json")
        return names

    def upload_for(self, path: str) -> TargetUpload:
        tf = self.targets.signed.targets[path]
        sha = tf.hashes["sha256"]
        try:
            data = (self.targets_dir / sha).read_bytes()
        except FileNotFoundError:
            data = b""
        if _sha256(data) != sha:
            raise RepositoryError(
                f"the repository's copy of {path} ({self.targets_dir / sha}) is missing "
                "or damaged; push that model file again"
            )
        lf = tf.unrecognized_fields["custom"][CUSTOM_KEY]
        return TargetUpload(path, sha, data, int(lf["chunk_size"]))

    def all_uploads(self) -> list[TargetUpload]:
        return [self.upload_for(p) for p in sorted(self.targets.signed.targets)]

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
        if not NAME_RE.match(name):
            raise BadInputError(
                f"model name {name!r} must be 1-63 lowercase letters, digits, '.', '_' or '-'"
            )
        rollout = rollout or Rollout()
        releases = self.model_releases(name)
        latest = int(self.state["models"].get(name, {}).get("latest", 0))
        if version is None:
            version = latest + 1
        elif version < 1:
            raise BadInputError("--version must be at least 1")
        model_tpath = target_path(name, version, MODEL_FILE)
        existing = self.targets.signed.targets.get(model_tpath)
        if existing is not None and existing.hashes["sha256"] != _sha256(model):
            raise BadInputError(
                f"{name} version {version} exists with a different model file; push a new version"
            )
        if existing is None and version <= latest and version not in releases:
            raise BadInputError(
                f"{name} version {version} was published before and removed; versions never go back "
                f"(devices would refuse it): use --version {latest + 1} or leave --version out"
            )
        chunk_size = int(self.state["chunk_size"])
        files: dict[str, bytes] = {MODEL_FILE: model}
        if card is not None:
            files[CARD_FILE] = card
        if golden is not None:
            files[GOLDEN_FILE] = golden
        new_targets: dict[str, TargetFile] = {}
        for fname, data in files.items():
            tpath = target_path(name, version, fname)
            tf = TargetFile.from_data(tpath, data, ["sha256"])
            lf: dict[str, Any] = {
                "kind": fname.split(".")[0],
                "chunk_size": chunk_size,
                "chunks": chunk_hashes(data, chunk_size),
            }
            if fname == MODEL_FILE:
                lf = {
                    "kind": "model",
                    "name": name,
                    "version": version,
                    "rollout": rollout.to_dict(),
                    "published": _now().isoformat(),
                    **lf,
                }
                if card is not None:
                    lf["card"] = target_path(name, version, CARD_FILE)
                if golden is not None:
                    lf["golden"] = target_path(name, version, GOLDEN_FILE)
            tf.unrecognized_fields["custom"] = {CUSTOM_KEY: lf}
            new_targets[tpath] = tf
        # a re-push of the same version may only change the rollout
        if existing is not None:
            for tpath, tf in new_targets.items():
                old = self.targets.signed.targets.get(tpath)
                if tpath != model_tpath and (old is None or old.hashes != tf.hashes):
                    what = tpath.rsplit("/", 1)[1]
                    raise BadInputError(f"{name} version {version} exists with a different {what}")
            old_lf = existing.unrecognized_fields["custom"][CUSTOM_KEY]
            if old_lf.get("rollout") == rollout.to_dict():
                return ReleaseResult(
                    name, version, self.targets.signed.version, PublishPlan(), [], unchanged=True
                )
            new_lf = dict(old_lf, rollout=rollout.to_dict())
            new_targets = {
                model_tpath: TargetFile(
                    existing.length, dict(existing.hashes), model_tpath, {"custom": {CUSTOM_KEY: new_lf}}
                )
            }
        # decide what stays
        releases[version] = rollout
        keep = versions_to_keep(releases)
        removed = sorted(set(releases) - keep)
        targets: Metadata[Targets] = Metadata.from_bytes(self.targets.to_bytes(_SERIALIZER))
        plan = PublishPlan()
        for tpath in list(targets.signed.targets):
            parts = tpath.split("/")
            if len(parts) == 4 and parts[1] == name and int(parts[2]) in removed:
                old = targets.signed.targets.pop(tpath)
                lf_old = old.unrecognized_fields["custom"][CUSTOM_KEY]
                plan.clear_targets.append(
                    (consistent_target_file(tpath, old.hashes["sha256"]), len(lf_old["chunks"]))
                )
        for tpath, tf in new_targets.items():
            targets.signed.targets[tpath] = tf
            if tpath != model_tpath or existing is None:
                sha = tf.hashes["sha256"]
                fname = tpath.rsplit("/", 1)[1]
                plan.uploads.append(TargetUpload(tpath, sha, files[fname], chunk_size))
        if existing is None:
            plan.uploads.insert(
                0, plan.uploads.pop(next(i for i, u in enumerate(plan.uploads) if u.path == model_tpath))
            )
        self._commit(targets, plan, model_state={name: {"latest": max(latest, version)}})
        return ReleaseResult(name, version, self.targets.signed.version, plan, removed)

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
        root: Metadata[Root] = Metadata.from_bytes(self.root.to_bytes(_SERIALIZER))
        current = root.signed.roles[role]
        n = keys or len(current.keyids)
        k = threshold or current.threshold
        if not 1 <= k <= n <= 16:
            raise BadInputError("need 1 <= --threshold <= --keys <= 16")
        old_ids = list(current.keyids)
        for keyid in old_ids:
            root.signed.revoke_key(keyid, role)
        new_signers: list[Signer] = []
        new_keys: list[CryptoSigner] = []
        for _ in range(n):
            signer = CryptoSigner.generate_ed25519()
            new_keys.append(signer)
            root.signed.add_key(signer.public_key, role)
            new_signers.append(signer)
        root.signed.roles[role].threshold = k
        root.signed.version += 1
        root.signed.expires = _now() + timedelta(days=self.state["expiry_days"]["root"])
        root.signatures.clear()
        for s in old_root_signers + (new_signers if role == "root" else []):
            root.sign(s, append=True)
        data = root.to_bytes(_SERIALIZER)
        for key in new_keys:
            atomic_write(self.keys_dir / role / f"{key.public_key.keyid}.pem", key.private_bytes)
        name = f"{root.signed.version}.root.json"
        atomic_write(self.md_dir / name, data, 0o644)
        atomic_write(self.dir / "root.json", data, 0o644)
        state = json.loads(json.dumps(self.state))
        state["versions"]["root"] = root.signed.version
        state["pending_metadata"] = sorted(set(state.get("pending_metadata", [])) | {name})
        atomic_write(self.dir / "repo.json", json.dumps(state, indent=1).encode())
        self.state, self.root = state, root
        self._signers.pop(role, None)
        retired = self.keys_dir / "retired"
        retired.mkdir(mode=0o700, exist_ok=True)
        for keyid in old_ids:
            old = self.keys_dir / role / f"{keyid}.pem"
            if old.exists():
                os.replace(old, retired / f"{role}-{keyid}.pem")
        return self.resign()

    def resign(self) -> PublishPlan:
        """New targets, snapshot and timestamp versions with fresh expiry dates."""
        targets: Metadata[Targets] = Metadata.from_bytes(self.targets.to_bytes(_SERIALIZER))
        plan = PublishPlan()
        self._commit(targets, plan, model_state={})
        return plan

    def _commit(
        self, targets: Metadata[Targets], plan: PublishPlan, model_state: dict[str, dict[str, int]]
    ) -> None:
        expiry = self.state["expiry_days"]
        now = _now()
        targets.signed.version += 1
        targets.signed.expires = now + timedelta(days=expiry["targets"])
        snapshot: Metadata[Snapshot] = Metadata.from_bytes(self.snapshot.to_bytes(_SERIALIZER))
        snapshot.signed.version += 1
        snapshot.signed.expires = now + timedelta(days=expiry["snapshot"])
        timestamp: Metadata[Timestamp] = Metadata.from_bytes(self.timestamp.to_bytes(_SERIALIZER))
        timestamp.signed.version += 1
        timestamp.signed.expires = now + timedelta(days=expiry["timestamp"])
        signers = {r: self.signers(r) for r in ("targets", "snapshot", "timestamp")}
        files = self._sign_chain(signers, None, targets, snapshot, timestamp, sign_root=False)
        # write: target copies, versioned metadata, timestamp, then repo.json
        for up in plan.uploads:
            # content-addressed and checked by hash when read back (upload_for), so
            # no fsync of megabytes here: a power cut costs at most a re-push
            dest = self.targets_dir / up.sha256
            if not dest.exists() or _sha256(dest.read_bytes()) != up.sha256:
                atomic_write(dest, up.data, 0o644, durable=False)
        for name, data in files:
            atomic_write(self.md_dir / name, data, 0o644)
        old_t, old_s = self.state["versions"]["targets"], self.state["versions"]["snapshot"]
        # devices mid-refresh may still ask for the previous versions: keep those, clear older
        if old_t > 1:
            plan.clear_metadata.append(f"{old_t - 1}.targets.json")
        if old_s > 1:
            plan.clear_metadata.append(f"{old_s - 1}.snapshot.json")
        plan.metadata = files
        state = json.loads(json.dumps(self.state))
        state["versions"]["targets"] = targets.signed.version
        state["versions"]["snapshot"] = snapshot.signed.version
        for name, st in model_state.items():
            state["models"].setdefault(name, {}).update(st)
        pending = {p for p in state.get("pending_uploads", [])}
        pending.update(up.path for up in plan.uploads)
        state["pending_uploads"] = sorted(p for p in pending if p in targets.signed.targets)
        state["pending_metadata"] = sorted(set(state.get("pending_metadata", [])) | {n for n, _ in files})
        atomic_write(self.dir / "repo.json", json.dumps(state, indent=1).encode())
        self.state = state
        self.targets, self.snapshot, self.timestamp = targets, snapshot, timestamp

    def pending_uploads(self, in_memory: list[TargetUpload] = ()) -> list[TargetUpload]:  # type: ignore[assignment]
        """Targets not yet on the broker; those in ``in_memory`` are not read back."""
        have = {u.path: u for u in in_memory}
        return [
            have.get(p) or self.upload_for(p)
            for p in self.state.get("pending_uploads", [])
            if p in self.targets.signed.targets
        ]

    def mark_published(self) -> None:
        """Everything current is on the broker now."""
        self.state["pending_uploads"] = []
        self.state["pending_metadata"] = []
        atomic_write(self.dir / "repo.json", json.dumps(self.state, indent=1).encode())
