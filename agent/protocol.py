"""The wire protocol shared by the host and the device: topics, target names, rollout rules.

Everything here is pure: no sockets, files or clocks. ``docs/protocol.md``
describes the same things for implementers in other languages; keep the two
in step.

Model files are TUF targets named ``models/<name>/<version>/<file>``. The
model's target carries, in its signed ``custom`` field, the rollout rule that
says which devices should run it, and every target carries the SHA-256 of
each of its chunks, so a device can check a chunk the moment it arrives.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = "v1"
DEFAULT_PREFIX = "litefleet"
# 256 KiB: far below any broker's packet limit (Mosquitto 2.1: 2 MB by default)
# and, measured here, as fast on loopback as larger chunks.
DEFAULT_CHUNK_SIZE = 256 * 1024
MAX_CHUNK_SIZE = 1024 * 1024
MODEL_FILE = "model.tflite"
CARD_FILE = "card.json"
GOLDEN_FILE = "golden.npz"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# a site broker's name (docs/sites.md): a level of its topics and of its identities' names
SITE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
CUSTOM_KEY = "litefleet"


class ProtocolError(ValueError):
    """Signed data that is well-formed TUF but not a valid litefleet target."""


# -- topics -------------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    """Every topic name, derived from the configurable prefix."""

    prefix: str = DEFAULT_PREFIX

    @property
    def base(self) -> str:
        return f"{self.prefix}/{PROTOCOL_VERSION}"

    def metadata(self, filename: str) -> str:
        return f"{self.base}/repo/metadata/{filename}"

    @property
    def metadata_filter(self) -> str:
        return f"{self.base}/repo/metadata/+"

    def metadata_filename(self, topic: str) -> str | None:
        head = f"{self.base}/repo/metadata/"
        if topic.startswith(head) and "/" not in topic[len(head) :]:
            return topic[len(head) :]
        return None

    def chunk(self, target_file: str, index: int) -> str:
        return f"{self.base}/repo/targets/{target_file}/{index}"

    def device(self, device_id: str, leaf: str) -> str:
        return f"{self.base}/devices/{device_id}/{leaf}"

    def state(self, device_id: str) -> str:
        return self.device(device_id, "state")

    def events(self, device_id: str) -> str:
        return self.device(device_id, "events")

    def metrics(self, device_id: str) -> str:
        return self.device(device_id, "metrics")

    def infer(self, device_id: str) -> str:
        return self.device(device_id, "infer")

    def devices_filter(self, leaf: str) -> str:
        return f"{self.base}/devices/+/{leaf}"

    def device_outbound(self, device_id: str) -> tuple[str, ...]:
        """The topics a device publishes about itself (its replies aside: :meth:`reply_filter`).
        Every per-device topic is here or in :meth:`device_inbound`; the secure broker's
        ACL is built from these two lists."""
        return (self.state(device_id), self.events(device_id), self.metrics(device_id))

    def device_inbound(self, device_id: str) -> tuple[str, ...]:
        """The topics others publish on for a device to read."""
        return (self.infer(device_id),)

    def device_filter(self, device_id: str) -> str:
        """Every topic of one device."""
        return f"{self.base}/devices/{device_id}/#"

    @property
    def repo_filter(self) -> str:
        """Every repository topic: metadata and target chunks."""
        return f"{self.base}/repo/#"

    def device_of(self, topic: str) -> tuple[str, str] | None:
        """``(device_id, leaf)`` of a device topic, or None."""
        head = f"{self.base}/devices/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if len(parts) != 2 or not parts[0]:
            return None
        return parts[0], parts[1]

    def rollout(self, model_name: str) -> str:
        """The retained record of the rollout of ``model_name`` (the host's rollout
        controller writes it; monitors read it)."""
        return f"{self.base}/rollouts/{model_name}"

    @property
    def rollouts_filter(self) -> str:
        """Every rollout record."""
        return f"{self.base}/rollouts/+"

    def reply(self, client_id: str, device_id: str) -> str:
        """Where a requester (``client_id``) asks ``device_id`` to answer an inference
        request; it subscribes to ``replies/<client_id>/#``."""
        return f"{self.base}/replies/{client_id}/{device_id}"

    def reply_filter(self, device_id: str) -> str:
        """Every topic :meth:`reply_allowed` lets ``device_id`` answer on."""
        return f"{self.reply('+', device_id)}/#"

    @property
    def replies_filter(self) -> str:
        """Every reply of every device."""
        return f"{self.base}/replies/#"

    # -- sites (docs/sites.md): a site broker bridged to the central one ------------------
    def site(self, name: str, leaf: str) -> str:
        """A site's own topic: ``bridge`` (Mosquitto's link notification, retained ``1``/``0``),
        ``status`` (the site supervisor's retained JSON), ``ping`` (its watchdog, site only)."""
        return f"{self.base}/sites/{name}/{leaf}"

    def site_filter(self, name: str) -> str:
        """Every topic of one site."""
        return f"{self.base}/sites/{name}/#"

    @property
    def sites_filter(self) -> str:
        """Every topic of every site."""
        return f"{self.base}/sites/#"

    def reply_allowed(self, device_id: str, topic: str) -> bool:
        """Whether a request's response topic is one this device may answer on:
        ``<base>/replies/<requester>/<device_id>[/...]``, no wildcards. The secure
        broker's ACL enforces the same rule; checking first saves a refused publish."""
        if "+" in topic or "#" in topic:
            return False
        head = f"{self.base}/replies/"
        if not topic.startswith(head):
            return False
        parts = topic[len(head) :].split("/")
        return len(parts) >= 2 and bool(parts[0]) and parts[1] == device_id


# -- target names ----------------------------------------------------------------


def target_path(name: str, version: int, filename: str) -> str:
    return f"models/{name}/{version}/{filename}"


def consistent_target_file(path: str, sha256: str) -> str:
    """The name of a target in a consistent-snapshot repository (as python-tuf
    requests it): ``dir/<sha256>.<basename>``."""
    dirname, sep, basename = path.rpartition("/")
    return f"{dirname}{sep}{sha256}.{basename}"


def chunk_count(length: int, chunk_size: int) -> int:
    return max(1, -(-length // chunk_size))


def split_chunks(data: bytes, chunk_size: int) -> list[bytes]:
    if not data:
        return [b""]
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]


def chunk_hashes(data: bytes, chunk_size: int) -> list[str]:
    view = memoryview(data)  # slices of a memoryview are not copies
    if not data:
        return [hashlib.sha256(b"").hexdigest()]
    return [hashlib.sha256(view[i : i + chunk_size]).hexdigest() for i in range(0, len(data), chunk_size)]


# -- rollout rules -------------------------------------------------------------------


MAX_SHADOW_K = 1_000_000


@dataclass(frozen=True)
class Rollout:
    """Which devices should run a model version.

    ``target`` is ``all``, ``group:<G>`` or ``device:<ID>``; of the devices it
    selects, those whose canary bucket is below ``canary_pct`` take part.
    ``shadow_k`` (0: none; else 2..:data:`MAX_SHADOW_K`) asks a device that
    activates this version to run its previous version too on 1 in ``k`` live
    calls and report how often the two agree (docs/protocol.md, section 4.1).
    """

    target: str = "all"
    # whole percent: canonical JSON, which TUF signs, has no floats
    canary_pct: int = 100
    shadow_k: int = 0

    def __post_init__(self) -> None:
        kind, _, value = self.target.partition(":")
        if not (self.target == "all" or (kind in ("group", "device") and value)):
            raise ProtocolError(f"rollout target must be all, group:G or device:ID, not {self.target!r}")
        if (
            isinstance(self.canary_pct, bool)
            or not isinstance(self.canary_pct, int)
            or not 0 < self.canary_pct <= 100
        ):
            raise ProtocolError(f"canary percentage must be in (0, 100], not {self.canary_pct}")
        if shadow_k_of(self.shadow_k) != self.shadow_k:
            raise ProtocolError(f"shadow_k must be 0 (none) or in 2..{MAX_SHADOW_K}, not {self.shadow_k!r}")

    def selects(self, device_id: str, groups: Iterable[str], model_name: str) -> bool:
        kind, _, value = self.target.partition(":")
        if kind == "group" and value not in set(groups):
            return False
        if kind == "device" and value != device_id:
            return False
        return canary_bucket(device_id, model_name) < self.canary_pct

    def to_dict(self) -> dict[str, Any]:
        # without a shadow the signed rule is byte for byte what older hosts signed
        rule: dict[str, Any] = {"target": self.target, "canary_pct": self.canary_pct}
        if self.shadow_k:
            rule["shadow_k"] = self.shadow_k
        return rule


def shadow_k_of(value: object) -> int:
    """A signed rule's ``shadow_k`` as a device reads it: an integer in 2..:data:`MAX_SHADOW_K`,
    else 0 (absent, 0, 1, negative, too large, not an integer: no shadow). Never raises: a
    malformed shadow request turns shadowing off, it never refuses the release."""
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= MAX_SHADOW_K:
        return 0
    return value


def canary_bucket(device_id: str, model_name: str) -> float:
    """A stable number in [0, 100) for this device and model name.

    ``sha256("<model_name>/<device_id>")``, first 8 bytes big-endian, modulo
    10000, divided by 100. It does not depend on the version, so raising a
    canary from 10 % to 50 % keeps the first 10 % in, and a device stays in the
    same bucket for every version of a model.
    """
    digest = hashlib.sha256(f"{model_name}/{device_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") % 10000) / 100.0


# -- the signed custom fields -------------------------------------------------------------


@dataclass(frozen=True)
class ChunkInfo:
    """How a target file is cut into retained messages."""

    chunk_size: int
    hashes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"chunk_size": self.chunk_size, "chunks": list(self.hashes)}


@dataclass(frozen=True)
class ModelRelease:
    """One model version as the signed targets metadata describes it."""

    name: str
    version: int
    model_path: str
    rollout: Rollout
    card_path: str | None = None
    golden_path: str | None = None

    def selects(self, device_id: str, groups: Iterable[str]) -> bool:
        return self.rollout.selects(device_id, groups, self.name)


def parse_chunk_info(custom: Mapping[str, Any], length: int) -> ChunkInfo:
    """Read and check a target's chunk list against its signed length."""
    try:
        lf = custom[CUSTOM_KEY]
        size = int(lf["chunk_size"])
        hashes = tuple(str(h) for h in lf["chunks"])
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(1e999)
        raise ProtocolError(f"target has no valid chunk list: {exc}") from exc
    if not 1 <= size <= MAX_CHUNK_SIZE:
        raise ProtocolError(f"chunk size {size} outside 1..{MAX_CHUNK_SIZE}")
    if len(hashes) != chunk_count(length, size):
        raise ProtocolError(f"{len(hashes)} chunk hashes for {length} bytes in chunks of {size}")
    if not all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes):
        raise ProtocolError("chunk hashes must be lowercase hex SHA-256")
    return ChunkInfo(size, hashes)


def parse_release(path: str, custom: Mapping[str, Any]) -> ModelRelease | None:
    """The release a model target describes, None for targets that are not
    models (cards, golden vectors), ProtocolError for malformed ones."""
    # signed JSON may hold anything here: a list, a string, a number
    lf = custom.get(CUSTOM_KEY) if isinstance(custom, Mapping) else None
    if not isinstance(lf, Mapping) or lf.get("kind") != "model":
        return None
    try:
        name = str(lf["name"])
        version = int(lf["version"])
        ro = lf.get("rollout") or {}
        # only the keys this version knows are read; shadow_k is optional and never fatal
        rollout = Rollout(
            str(ro.get("target", "all")), ro.get("canary_pct", 100), shadow_k_of(ro.get("shadow_k"))
        )
        card = lf.get("card")
        golden = lf.get("golden")
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise ProtocolError(f"model target {path}: {exc}") from exc
    if not NAME_RE.match(name) or version < 1:
        raise ProtocolError(f"model target {path}: bad name {name!r} or version {version}")
    if path != target_path(name, version, MODEL_FILE):
        raise ProtocolError(f"model target {path} does not match its name and version")
    for extra in (card, golden):
        folder = f"models/{name}/{version}/"
        if extra is not None and not (isinstance(extra, str) and extra.startswith(folder)):
            raise ProtocolError(f"model target {path}: card/golden path {extra!r} outside its folder")
    return ModelRelease(name, version, path, rollout, card, golden)


def choose_releases(
    releases: Iterable[ModelRelease], device_id: str, groups: Iterable[str]
) -> dict[str, ModelRelease]:
    """For each model name, the newest version whose rollout selects this device."""
    groups = tuple(groups)
    chosen: dict[str, ModelRelease] = {}
    for rel in releases:
        if rel.selects(device_id, groups):
            best = chosen.get(rel.name)
            if best is None or rel.version > best.version:
                chosen[rel.name] = rel
    return chosen
