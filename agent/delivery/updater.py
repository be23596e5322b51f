"""The pull side: verify the repository's signed metadata and fetch what this device should run.

One :meth:`ModelUpdater.refresh`:

1. waits for the MQTT sync barrier (all retained metadata is in the cache);
2. runs python-tuf's client workflow (root chain, timestamp, snapshot,
   targets: signatures, thresholds, versions, expiry, lengths and hashes)
   over :class:`agent.delivery.metadata.MqttMetadataFetcher`;
3. reads the verified targets, chooses for each model name the newest version
   whose signed rollout rule selects this device (:mod:`agent.protocol`);
4. downloads the model, its card and golden vectors as verified chunks and
   installs them in the store, returning them as :class:`Candidate` objects.

It never changes what is active: that is :mod:`agent.activation.manager`'s job.
Failures come out as :class:`agent.errors.ModelRejectedError` with a
:class:`agent.reasons.Reason`, or :class:`agent.errors.TransportError`; a broker
without any repository yet is :class:`agent.errors.NoRepositoryError`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, TargetFile, Targets

from agent.activation.decisions import Candidate, DeviceState, Installed, Plan, plan_release
from agent.activation.store import ModelStore
from agent.delivery.chunks import ChunkDownloader, DownloadStats
from agent.delivery.metadata import METADATA_URL, MqttMetadataFetcher, RetainedMetadata
from agent.delivery.tuf_client import Updater
from agent.errors import ModelRejectedError, NoRepositoryError, StorageError, TransportError
from agent.mqtt.transport import Subscriber
from agent.protocol import (
    ModelRelease,
    ProtocolError,
    Topics,
    choose_releases,
    consistent_target_file,
    parse_chunk_info,
    parse_release,
)
from agent.reasons import Reason, SkipReason

logger = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"[0-9a-f]{64}")

# python-tuf's verdict on metadata -> the reason reported in events and state (first match)
_TUF_REASONS: tuple[tuple[type[Exception], Reason], ...] = (
    (tuf_errors.UnsignedMetadataError, Reason.BAD_SIGNATURE),
    (tuf_errors.BadVersionNumberError, Reason.ROLLBACK),
    (tuf_errors.ExpiredMetadataError, Reason.EXPIRED),
    (tuf_errors.LengthOrHashMismatchError, Reason.MISMATCH),
    (tuf_errors.DownloadLengthMismatchError, Reason.TOO_LARGE),
)


def signed_sha256(info: TargetFile) -> str:
    """A target's SHA-256 as its signed metadata gives it. It names files under
    ``downloads/``, so anything but 64 lowercase hex digits (a missing hash, ``""``,
    ``../x``) is an invalid target, never a path."""
    sha = info.hashes.get("sha256")
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
        raise ModelRejectedError(Reason.INVALID_TARGET, f"{info.path[:80]} has no valid signed SHA-256")
    return sha


def tuf_reason(exc: Exception) -> Reason:
    """The reason for python-tuf refusing metadata (any other RepositoryError: invalid)."""
    for cls, reason in _TUF_REASONS:
        if isinstance(exc, cls):
            return reason
    return Reason.INVALID_METADATA


@dataclass(frozen=True)
class Failure:
    """A release that failed before it could be installed (download, size, malformed)."""

    reason: Reason
    message: str
    version: int
    sha256: str


@dataclass
class RefreshResult:
    chosen: dict[str, ModelRelease] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)
    # per model name
    failures: dict[str, Failure] = field(default_factory=dict)


EventFn = Callable[..., None]


class ModelUpdater:
    def __init__(
        self,
        *,
        device_id: str,
        groups: tuple[str, ...],
        trusted_root: bytes,
        client: Subscriber,
        topics: Topics,
        store: ModelStore,
        cache: RetainedMetadata,
        window: int = 8,
        max_model_bytes: int = 512 * 1024 * 1024,
        event: EventFn | None = None,
        tick: Callable[[], None] | None = None,
        sync_timeout_s: float = 10.0,
        wait_synced: Callable[[float], bool] | None = None,
        cpu_gate: AbstractContextManager[Any] | None = None,
    ) -> None:
        self.device_id = device_id
        self.groups = groups
        self._trusted_root = trusted_root
        self._client = client
        self._topics = topics
        self._store = store
        self._cache = cache
        self._fetcher = MqttMetadataFetcher(cache)
        self._max_model_bytes = max_model_bytes
        self._event = event or (lambda kind, **kw: None)
        self._tick = tick or (lambda: None)
        self._sync_timeout_s = sync_timeout_s
        self._wait_synced = wait_synced or (lambda t: True)
        self._cpu_gate = cpu_gate or contextlib.nullcontext()  # around the TUF workflow
        self.downloader = ChunkDownloader(client, topics, window=window, tick=self._tick)
        # version of the targets metadata last verified (shown in the device's state)
        self.repo_version: int | None = None
        self._skipped: set[tuple[str, int]] = set()

    # -- step 2 and 3 ----------------------------------------------------------------
    def verified_targets(self) -> tuple[Updater, Targets]:
        """Run the TUF client workflow; raise ModelRejectedError with a reason."""
        if not self._wait_synced(self._sync_timeout_s):
            raise TransportError("not connected to the broker (no metadata sync)")
        if self._cache.get("timestamp.json") is None:
            raise NoRepositoryError("the broker holds no repository metadata yet")
        updater = Updater(
            metadata_dir=str(self._store.tuf),
            metadata_base_url=METADATA_URL,
            target_dir=str(self._store.downloads),
            fetcher=self._fetcher,
            bootstrap=self._trusted_root,
        )
        try:
            with self._cpu_gate:
                updater.refresh()
        except tuf_errors.DownloadLengthMismatchError as exc:
            raise ModelRejectedError(Reason.TOO_LARGE, f"repository metadata refused: {exc}") from exc
        except tuf_errors.DownloadError as exc:
            raise ModelRejectedError(
                Reason.MISSING_METADATA, f"repository metadata incomplete: {exc}"
            ) from exc
        except tuf_errors.RepositoryError as exc:
            raise ModelRejectedError(tuf_reason(exc), f"repository metadata refused: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"cannot store metadata in {self._store.tuf}: {exc}") from exc
        # the targets python-tuf just verified and cached (read back through the
        # public Metadata API rather than the updater's private trusted set)
        targets = Metadata[Targets].from_file(str(self._store.tuf / "targets.json")).signed
        self.repo_version = targets.version
        return updater, targets

    def choose(self, targets: Targets) -> tuple[dict[str, ModelRelease], list[str]]:
        """The release of each model name for this device, and the problems of
        signed targets that are not valid litefleet releases."""
        releases: list[ModelRelease] = []
        problems: list[str] = []
        for path, tf in targets.targets.items():
            try:
                rel = parse_release(path, tf.custom or {})
            except ProtocolError as exc:
                problems.append(str(exc))
                continue
            if rel is not None:
                releases.append(rel)
        chosen = choose_releases(releases, self.device_id, self.groups)
        newest: dict[str, ModelRelease] = {}
        for rel in releases:
            if rel.name not in newest or rel.version > newest[rel.name].version:
                newest[rel.name] = rel
        for name, rel in newest.items():
            mine = chosen.get(name)
            key = (name, rel.version)
            if (mine is None or mine.version < rel.version) and key not in self._skipped:
                self._skipped.add(key)
                self._event(
                    "skipped",
                    model=name,
                    version=rel.version,
                    reason=SkipReason.OTHER_TARGET,
                    message=f"v{rel.version} is for {rel.rollout.target}"
                    + (f" (canary {rel.rollout.canary_pct}%)" if rel.rollout.canary_pct < 100 else ""),
                )
        return chosen, problems

    # -- the whole refresh ---------------------------------------------------------------
    def refresh(self, state: DeviceState, should_stop: Callable[[], bool] = lambda: False) -> RefreshResult:
        updater, targets = self.verified_targets()
        chosen, problems = self.choose(targets)
        for p in problems:
            logger.warning("ignoring a signed target: %s", p)
        result = RefreshResult(chosen=chosen)
        wanted = {
            str(targets.targets[p].hashes.get("sha256"))
            for rel in chosen.values()
            for p in (rel.model_path, rel.card_path, rel.golden_path)
            if p is not None and p in targets.targets
        }
        self._store.prune_downloads(wanted)
        for name, rel in sorted(chosen.items()):
            info = targets.targets[rel.model_path]
            try:
                sha = signed_sha256(info)
            except ModelRejectedError as exc:
                result.failures[name] = Failure(
                    exc.reason, str(exc), rel.version, str(info.hashes.get("sha256"))
                )
                continue
            plan = plan_release(state.get(name), rel.version, sha)
            logger.debug("model %s: signed v%s for this device, plan %s", name, rel.version, plan.value)
            if plan is not Plan.INSTALL:
                continue
            try:
                result.candidates.append(self._fetch_release(updater, targets, rel, should_stop))
            except (ModelRejectedError, StorageError) as exc:
                reason = exc.reason if isinstance(exc, ModelRejectedError) else Reason.STORAGE
                result.failures[name] = Failure(reason, str(exc), rel.version, sha)
        return result

    def _fetch_release(
        self, updater: Updater, targets: Targets, rel: ModelRelease, should_stop: Callable[[], bool]
    ) -> Candidate:
        roles = {"model": rel.model_path, "card": rel.card_path, "golden": rel.golden_path}
        infos: dict[str, TargetFile] = {}
        for role, path in roles.items():
            if path is None:
                continue
            info = targets.targets.get(path)
            if info is None:
                raise ModelRejectedError(Reason.MISSING_TARGET, f"{path} is referenced but not signed")
            infos[role] = info
        total = sum(i.length for i in infos.values())
        if total > self._max_model_bytes:
            raise ModelRejectedError(
                Reason.TOO_LARGE,
                f"{rel.name} v{rel.version} is {total} bytes, more than max_model_bytes "
                f"({self._max_model_bytes})",
            )
        installed = Installed(rel.version, infos["model"].hashes["sha256"])
        if self._store.is_installed(rel.name, rel.version):
            have = self._store.files(rel.name, rel.version)
            if all(updater.find_cached_target(infos[r], str(have[r])) for r in infos if r in have) and set(
                have
            ) == set(infos):
                return Candidate(rel, installed, have)
        files: dict[str, Path] = {}
        received = present = 0
        for role, info in infos.items():
            files[role], stats = self._download(info, rel, role, should_stop)
            received += stats.bytes_received
            present += stats.chunks_present
        # bytes_received: what this process took off the wire for this release;
        # chunks_present: verified chunks it found on disk (a resumed download)
        self._event(
            "verified",
            model=rel.name,
            version=rel.version,
            sha256=installed.sha256,
            bytes=total,
            bytes_received=received,
            chunks_present=present,
        )
        self._store.install(rel.name, rel.version, files)
        return Candidate(rel, installed, self._store.files(rel.name, rel.version))

    def _download(
        self, info: TargetFile, rel: ModelRelease, role: str, should_stop: Callable[[], bool]
    ) -> tuple[Path, DownloadStats]:
        sha = signed_sha256(info)
        dest = self._store.download_path(sha)
        try:
            chunks = parse_chunk_info(info.custom or {}, info.length)
        except ProtocolError as exc:
            raise ModelRejectedError(Reason.INVALID_TARGET, f"{info.path}: {exc}") from exc
        target_file = consistent_target_file(info.path, sha)
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if role == "model" and (now - last[0] >= 1.0 or done == total):
                last[0] = now
                self._event(
                    "downloading",
                    model=rel.name,
                    version=rel.version,
                    bytes=done,
                    total=total,
                    progress=round(done / total, 3) if total else 1.0,
                )

        stats = DownloadStats()
        try:
            if not dest.exists():
                stats = self.downloader.download(
                    target_file, info.length, chunks, dest, progress=progress, should_stop=should_stop
                )
            # a download verified every chunk against the signed chunk list, which covers the
            # whole signed length: reading the file back to hash it again cost 3.5-4.3 ms for a
            # 4 MB model with 10-100 agents (bench/bench_activation.py). A file that was
            # already there, or a target signed with more hashes than SHA-256, goes through
            # python-tuf's check
            if not stats.verified or set(info.hashes) != {"sha256"}:
                with open(dest, "rb") as f:
                    info.verify_length_and_hashes(f)
        except tuf_errors.LengthOrHashMismatchError as exc:
            self._store.discard_download(sha)
            raise ModelRejectedError(Reason.HASH, f"{info.path}: {exc}") from exc
        except ModelRejectedError:
            self._store.discard_download(sha)
            raise
        except StorageError:
            self._store.discard_download(sha)
            raise
        return dest, stats


def read_trusted_root(path: Path) -> bytes:
    """The root metadata a device trusts; checked to be TUF root metadata."""
    from agent.errors import ConfigError

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read trusted_root {path}: {exc.strerror}") from exc
    try:
        md: Any = Metadata.from_bytes(data)
    except Exception as exc:  # python-tuf raises DeserializationError and friends
        raise ConfigError(f"trusted_root {path} is not TUF metadata: {exc}") from exc
    if md.signed.type != "root":
        raise ConfigError(f"trusted_root {path} is {md.signed.type} metadata, not root")
    return data
