"""Fuzzing the delivery path: everything an attacker on the broker can put in front of the agent.

Each test feeds hostile input to the code that parses it on a device and
checks one property: the outcome is a result or one of the errors the daemon
loop handles (:class:`ModelRejectedError`, :class:`TransportError`,
:class:`StorageError`; :class:`ProtocolError` for signed-but-malformed
litefleet fields), never another exception.

- retained metadata (:class:`RetainedMetadata`) followed by the whole TUF
  refresh (:meth:`ModelUpdater.verified_targets`) over garbage, truncated,
  swapped and structurally mutated metadata files from a real repository;
- the signed litefleet fields a verified target carries (``parse_release``,
  ``parse_chunk_info``, :meth:`ModelUpdater.choose`);
- chunk framing (:class:`ChunkDownloader`) against a fake broker that answers
  each subscription from a script: good, short, long, flipped, empty,
  duplicate, foreign, lost chunks and dropped connections, with any length,
  chunk size and a leftover ``.part`` file; nothing unverified is ever written;
- topic names (``metadata_filename``, ``reply_allowed``).

CI runs a modest number of examples; ``HYPOTHESIS_PROFILE=soak`` (scripts/soak.sh)
runs thousands.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from tuf.api.metadata import TargetFile, Targets

from agent.activation.store import ModelStore
from agent.delivery.chunks import ChunkDownloader
from agent.delivery.metadata import MAX_FILES, MAX_METADATA_BYTES, MAX_TOTAL_BYTES, RetainedMetadata
from agent.delivery.updater import ModelUpdater
from agent.errors import ModelRejectedError, NoRepositoryError, StorageError, TransportError
from agent.mqtt.transport import Message
from agent.protocol import (
    ChunkInfo,
    ProtocolError,
    Topics,
    chunk_hashes,
    parse_chunk_info,
    parse_release,
    split_chunks,
)

TOPICS = Topics()
REAL_PWRITE = os.pwrite
SOAK = os.environ.get("HYPOTHESIS_PROFILE") == "soak"
# the errors the daemon's work loop catches and reports
DECLARED = (ModelRejectedError, NoRepositoryError, TransportError, StorageError)


def fuzz(examples: int) -> settings:
    """``examples`` in CI; under HYPOTHESIS_PROFILE=soak the profile's (much larger) count."""
    checks = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
    if SOAK:
        return settings(deadline=None, suppress_health_check=checks)
    return settings(max_examples=examples, deadline=None, suppress_health_check=checks)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)


# -- a real repository to mutate ------------------------------------------------------------


class RepoFiles:
    """The metadata of a real repository with two releases (so there are old files to replay)."""

    def __init__(self, root: Path) -> None:
        from converter.repo.repository import Repository

        repo = Repository.init(root / "repo")
        self.trusted_root = (root / "repo" / "root.json").read_bytes()
        self.old = dict(repo.current_metadata())
        repo.add_release("m", b"TFL3" * 100)
        repo.add_release("m", b"TFL3" * 120)
        self.files = dict(repo.current_metadata())
        self.names = sorted(self.files)


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory: pytest.TempPathFactory) -> RepoFiles:
    return RepoFiles(tmp_path_factory.mktemp("fuzzrepo"))


def mutate_json(doc: Any, data: st.DataObject, depth: int = 0) -> Any:
    """Replace, drop or add one thing somewhere in a JSON document."""
    if isinstance(doc, dict) and doc and depth < 6 and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(doc)))
        out = dict(doc)
        action = data.draw(st.sampled_from(["descend", "drop", "replace", "add"]))
        if action == "descend":
            out[key] = mutate_json(doc[key], data, depth + 1)
        elif action == "drop":
            del out[key]
        elif action == "replace":
            out[key] = data.draw(json_values)
        else:
            out[data.draw(st.text(max_size=8))] = data.draw(json_values)
        return out
    if isinstance(doc, list) and doc and depth < 6 and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(doc) - 1))
        out_l = list(doc)
        out_l[i] = mutate_json(doc[i], data, depth + 1)
        return out_l
    return data.draw(json_values)


def payloads(repo: RepoFiles, data: st.DataObject) -> bytes:
    kind = data.draw(
        st.sampled_from(
            ["genuine", "old", "other", "mutated", "truncated", "bitflip", "binary", "empty", "json"]
        )
    )
    name = data.draw(st.sampled_from(repo.names))
    genuine = repo.files[name]
    if kind == "genuine":
        return genuine
    if kind == "old":
        return data.draw(st.sampled_from(sorted(repo.old.values())))
    if kind == "other":
        return repo.files[data.draw(st.sampled_from(repo.names))]
    if kind == "mutated":
        doc = mutate_json(json.loads(genuine), data)
        try:
            return json.dumps(doc).encode()
        except ValueError:
            return genuine
    if kind == "truncated":
        return genuine[: data.draw(st.integers(0, len(genuine)))]
    if kind == "bitflip":
        i = data.draw(st.integers(0, len(genuine) - 1))
        return genuine[:i] + bytes([genuine[i] ^ (1 << data.draw(st.integers(0, 7)))]) + genuine[i + 1 :]
    if kind == "binary":
        return data.draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(data.draw(json_values)).encode()
    return b""


file_names = st.sampled_from(
    [
        "timestamp.json",
        "1.root.json",
        "2.root.json",
        "3.root.json",
        "1.snapshot.json",
        "2.snapshot.json",
        "3.snapshot.json",
        "1.targets.json",
        "2.targets.json",
        "3.targets.json",
        "4.targets.json",
        "root.json",
        "snapshot.json",
        "targets.json",
        "0.root.json",
        "-1.root.json",
        "99999999999999999999.root.json",
    ]
) | st.text(max_size=20)


class NoBroker:
    """The updater's subscriber, never used by ``verified_targets``."""

    connected = True

    def subscribe_many(self, filters: list[str], handler: Any, qos: int = 1) -> None:
        raise AssertionError("verified_targets must not subscribe")

    def unsubscribe(self, *filters: str) -> None:
        raise AssertionError("verified_targets must not unsubscribe")


@fuzz(120)
@given(data=st.data(), keep_cache=st.booleans())
def test_tuf_refresh_over_hostile_retained_metadata(
    repo_files: RepoFiles, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, keep_cache: bool
) -> None:
    """Garbage in any retained metadata topic ends in a declared refusal or a
    verified repository, never another exception; what verifies is the genuine
    repository (never older, never something else)."""
    cache = RetainedMetadata(TOPICS)
    if data.draw(st.booleans()):
        for name, payload in repo_files.files.items():
            cache.handle(Message(topic=TOPICS.metadata(name), payload=payload, retain=True))
    for _ in range(data.draw(st.integers(1, 6))):
        name = data.draw(file_names)
        topic = data.draw(
            st.sampled_from(
                [
                    TOPICS.metadata(name),
                    f"{TOPICS.base}/repo/metadata/{name}/x",
                    f"{TOPICS.base}/repo/metadata/",
                    name,
                ]
            )
        )
        cache.handle(Message(topic=topic, payload=payloads(repo_files, data), retain=True))
    state = tmp_path_factory.mktemp("st")
    store = ModelStore(state)
    if keep_cache:  # a device that already trusts the older repository
        for name in ("timestamp.json",):
            (store.tuf / name).write_bytes(repo_files.old[name])
    updater = ModelUpdater(
        device_id="pi-1",
        groups=(),
        trusted_root=repo_files.trusted_root,
        client=NoBroker(),
        topics=TOPICS,
        store=store,
        cache=cache,
    )
    try:
        _, targets = updater.verified_targets()
    except DECLARED:
        return
    # verified: it is exactly the genuine newest targets metadata
    genuine = json.loads(
        repo_files.files[
            max(
                (n for n in repo_files.names if n.endswith(".targets.json")),
                key=lambda n: int(n.split(".")[0]),
            )
        ]
    )
    assert targets.version == genuine["signed"]["version"]
    assert sorted(targets.targets) == sorted(genuine["signed"]["targets"])


@fuzz(200)
@given(names=st.lists(file_names, max_size=40), sizes=st.lists(st.integers(0, 2000), max_size=40))
def test_retained_metadata_handle_never_raises(names: list[str], sizes: list[int]) -> None:
    seen: list[str] = []
    cache = RetainedMetadata(TOPICS, on_change=seen.append)
    for name, size in zip(names, sizes, strict=False):
        cache.handle(Message(topic=TOPICS.metadata(name), payload=b"x" * size, retain=True))
    assert len(cache.names()) <= MAX_FILES
    assert all(n.endswith(".json") and "/" not in n for n in cache.names())
    assert all(cache.get(n) for n in cache.names())  # deleted files are gone, not empty


def test_retained_metadata_memory_is_bounded_under_a_flood(monkeypatch: pytest.MonkeyPatch) -> None:
    """Junk files under fresh names, each below the per-file limit: the cache keeps at
    most MAX_FILES of them and at most MAX_TOTAL_BYTES in all. (Before the total bound,
    256 junk files of 4 MB -- what a broker's packet limit allows -- held 1 GB.)"""
    monkeypatch.setattr(logging.getLogger("agent.delivery.metadata"), "disabled", True)  # 1 line per drop
    cache = RetainedMetadata(TOPICS)
    big = b"j" * 4_000_000
    for i in range(1_000):
        cache.handle(Message(topic=TOPICS.metadata(f"{i}.junk.json"), payload=big, retain=True))
    assert sum(len(cache.get(n) or b"") for n in cache.names()) <= MAX_TOTAL_BYTES
    # a real file still fits once the host's push cleared the junk (zero-length retained messages)
    for n in cache.names():
        cache.handle(Message(topic=TOPICS.metadata(n), payload=b"", retain=True))
    cache.handle(Message(topic=TOPICS.metadata("timestamp.json"), payload=b"{}", retain=True))
    assert cache.names() == ["timestamp.json"]

    # measured: distinct payloads (as paho hands over), 60 MB of flood, memory held stays bounded
    cache = RetainedMetadata(TOPICS)
    tracemalloc.start()
    try:
        for i in range(300):
            junk = bytes([i % 256]) * 200_000
            cache.handle(Message(topic=TOPICS.metadata(f"{i}.junk.json"), payload=junk))
        too_big = b"x" * (MAX_METADATA_BYTES + 1)
        cache.handle(Message(topic=TOPICS.metadata("timestamp.json"), payload=too_big))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(cache.names()) <= MAX_FILES and cache.get("timestamp.json") is None
    assert peak < MAX_TOTAL_BYTES + MAX_METADATA_BYTES + 1_000_000, peak


# -- the signed litefleet fields ---------------------------------------------------------------


def custom_fields(data: st.DataObject) -> Any:
    base = {
        "litefleet": {
            "kind": "model",
            "name": "m",
            "version": 3,
            "rollout": {"target": "all", "canary_pct": 100},
            "card": "models/m/3/card.json",
            "golden": "models/m/3/golden.npz",
            "chunk_size": 4,
            "chunks": [hashlib.sha256(b"TFL3").hexdigest()],
        }
    }
    if data.draw(st.booleans()):
        return mutate_json(base, data)
    return data.draw(json_values)


@fuzz(300)
@given(
    data=st.data(),
    path=st.sampled_from(["models/m/3/model.tflite", "models/m/3/card.json", "x"]) | st.text(max_size=30),
    length=st.integers(-5, 2**40),
)
def test_signed_litefleet_fields(data: st.DataObject, path: str, length: int) -> None:
    """A targets key holder's malformed custom fields are a ProtocolError (the release
    is ignored, the device logs it), never a crash of the refresh."""
    custom = custom_fields(data)
    with contextlib.suppress(ProtocolError):
        parse_release(path, custom)
    try:
        info = parse_chunk_info(custom, length)
    except ProtocolError:
        return
    assert info.chunk_size >= 1 and all(len(h) == 64 for h in info.hashes)


@fuzz(100)
@given(data=st.data())
def test_choose_over_arbitrary_signed_targets(
    data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """What ``choose`` does with a verified targets role holding arbitrary custom fields."""
    targets = Targets(version=2)
    for i in range(data.draw(st.integers(0, 5))):
        path = data.draw(
            st.sampled_from([f"models/m/{i + 1}/model.tflite", f"models/m/{i + 1}/card.json"])
            | st.text(min_size=1, max_size=20)
        )
        tf = TargetFile(
            length=4,
            hashes={"sha256": hashlib.sha256(b"TFL3").hexdigest()},
            path=path,
            unrecognized_fields={"custom": custom_fields(data)},
        )
        targets.targets[path] = tf
    updater = ModelUpdater(
        device_id="pi-1",
        groups=("g",),
        trusted_root=b"{}",
        client=NoBroker(),
        topics=TOPICS,
        store=ModelStore(tmp_path_factory.mktemp("choose")),
        cache=RetainedMetadata(TOPICS),
    )
    chosen, _ = updater.choose(targets)
    for name, rel in chosen.items():
        assert rel.name == name and rel.model_path in targets.targets


class AnyChunk:
    """A broker that holds, for every chunk topic asked for, the bytes ``TFL3`` cut to the
    signed chunk (so downloads of the fuzzed targets can finish and reach installation)."""

    connected = True

    def __init__(self, body: bytes) -> None:
        self.body = body

    def subscribe_many(self, filters: list[str], handler: Any, qos: int = 1) -> None:
        for f in filters:
            handler(Message(topic=f, payload=self.body, retain=True))

    def unsubscribe(self, *filters: str) -> None:
        pass


hash_values = st.sampled_from(
    [hashlib.sha256(b"TFL3").hexdigest(), "../../escaped", "/tmp/abs", "", "A" * 64, ".", "x/y"]
) | st.text(max_size=70)


@fuzz(100)
@given(data=st.data())
def test_refresh_over_arbitrary_signed_targets(
    data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Everything after verification (choice, downloads, installation) over a signed
    targets role with arbitrary litefleet fields, hash names and hash values: a result or a
    declared error, and nothing is written outside the state folder."""
    from agent.activation.decisions import DeviceState

    targets = Targets(version=2)
    tfl = hashlib.sha256(b"TFL3").hexdigest()
    for _ in range(data.draw(st.integers(1, 4))):
        version = data.draw(st.integers(1, 3))
        folder = f"models/m/{version}/"
        kind = data.draw(st.sampled_from(["model", "model", "card", "golden"]))
        path = folder + {"model": "model.tflite", "card": "card.json", "golden": "golden.npz"}[kind]
        lf: dict[str, Any] = {"kind": kind, "chunk_size": 4, "chunks": [tfl]}
        if kind == "model":
            lf.update(name="m", version=version, rollout={"target": "all", "canary_pct": 100})
            for extra in ("card", "golden"):
                if data.draw(st.booleans()):
                    lf[extra] = data.draw(
                        st.sampled_from(
                            [folder + f"{extra}.json", folder + "../../x", folder + f"{extra}.npz"]
                        )
                    )
        custom: Any = {"litefleet": lf}
        if data.draw(st.integers(0, 3)) == 0:
            custom = mutate_json(custom, data)
        if data.draw(st.integers(0, 5)) == 0:
            path = data.draw(st.text(min_size=1, max_size=12))
        sha = tfl if data.draw(st.booleans()) else data.draw(hash_values)
        hashes = data.draw(st.sampled_from([{"sha256": sha}, {"sha512": "ab"}, {"sha256": sha, "md5": "x"}]))
        try:
            tf = TargetFile(
                length=data.draw(st.sampled_from([4, 4, 4, 0, 3, 5])),
                hashes=hashes,
                path=path,
                unrecognized_fields={"custom": custom},
            )
        except (ValueError, TypeError):
            continue  # python-tuf refuses to build it: it would not deserialize either
        targets.targets[path] = tf
    root = tmp_path_factory.mktemp("refresh")
    state_dir = root / "a" / "b" / "state"
    store = ModelStore(state_dir)
    updater = ModelUpdater(
        device_id="pi-1",
        groups=(),
        trusted_root=b"{}",
        client=AnyChunk(b"TFL3"),
        topics=TOPICS,
        store=store,
        cache=RetainedMetadata(TOPICS),
    )

    class FakeTuf:
        def find_cached_target(self, info: Any, path: str) -> str | None:
            return None

    updater.verified_targets = lambda: (FakeTuf(), targets)  # type: ignore[method-assign,assignment,return-value]
    updater.downloader._chunk_timeout_s = 0.0
    try:
        result = updater.refresh(DeviceState.empty())
        reasons = sorted(f.reason for f in result.failures.values())
        event(f"candidates {len(result.candidates)}, failures {reasons}")
    except DECLARED as exc:
        event(type(exc).__name__)
        result = None
    outside = [p for p in root.rglob("*") if p.is_file() and state_dir not in p.parents]
    assert outside == [], outside
    if result is not None:
        for cand in result.candidates:
            assert cand.files["model"].read_bytes().startswith(b"TFL3"[:1])


# -- chunk framing ----------------------------------------------------------------------------------

ACTIONS = [
    "good",
    "good",
    "good",
    "short",
    "long",
    "flip",
    "empty",
    "dup",
    "foreign",
    "stale",
    "lost",
    "disconnect",
]


class ScriptedBroker:
    """Answers each chunk subscription according to a script of actions (one per
    subscription, cycling), synchronously on the caller's thread (the downloader
    only queues on its handler, as it does on paho's thread)."""

    def __init__(self, chunks: dict[str, bytes], script: list[str], data: st.DataObject) -> None:
        self.chunks = chunks
        self.script = script
        self.data = data
        self.step = 0
        self.open: dict[str, Any] = {}
        self.bad_delivered: set[str] = set()  # topics that got a wrong payload while open
        # unsubscribed topics: MQTT delivers nothing else (a message for a topic never
        # subscribed cannot arrive), but a copy in flight may still come after UNSUBSCRIBE
        self.closed: set[str] = set()
        self._down = 0

    @property
    def connected(self) -> bool:
        if self._down:
            self._down -= 1
            if not self._down:  # reconnected: the client re-subscribes everything open
                for f, handler in list(self.open.items()):
                    self._answer(f, handler, "good")
            return False
        return True

    def subscribe_many(self, filters: list[str], handler: Any, qos: int = 1) -> None:
        for f in filters:
            self.open[f] = handler
        for f in filters:
            # the script, then good answers (so a download can always finish)
            action = self.script[self.step] if self.step < len(self.script) else "good"
            self.step += 1
            self._answer(f, handler, action)

    def unsubscribe(self, *filters: str) -> None:
        for f in filters:
            if self.open.pop(f, None) is not None:
                self.closed.add(f)

    def _answer(self, f: str, handler: Any, action: str) -> None:
        good = self.chunks.get(f)
        if good is None:
            return
        if action == "short" and len(good) <= 1:
            action = "empty"  # one byte less than one byte is a deletion: see "empty"
        if action in ("good", "dup"):
            handler(Message(topic=f, payload=good, retain=True))
            if action == "dup":
                handler(Message(topic=f, payload=good, retain=True))
        elif action == "short":
            self.bad_delivered.add(f)
            handler(Message(topic=f, payload=good[:-1], retain=True))
        elif action == "long":
            self.bad_delivered.add(f)
            handler(Message(topic=f, payload=good + b"\0", retain=True))
        elif action == "flip" and good:
            self.bad_delivered.add(f)
            i = self.data.draw(st.integers(0, len(good) - 1))
            handler(Message(topic=f, payload=good[:i] + bytes([good[i] ^ 1]) + good[i + 1 :], retain=True))
        elif action == "empty":  # a deleted retained chunk: wait for a republish
            handler(Message(topic=f, payload=b"", retain=True))
            handler(Message(topic=f, payload=good, retain=True))
        elif action == "foreign":
            handler(Message(topic=f"{f}/x", payload=b"junk"))
            handler(Message(topic=self.data.draw(st.text(max_size=10)), payload=b"junk"))
            handler(Message(topic=f, payload=good, retain=True))
        elif action == "stale":  # a late copy (other bytes) of a chunk no longer asked for
            late = sorted(self.closed - set(self.open))
            if late:
                other = self.data.draw(st.sampled_from(late))
                handler(Message(topic=other, payload=b"\xff" * 3, retain=True))
            handler(Message(topic=f, payload=good, retain=True))
        elif action == "disconnect":
            self._down = 1
        # "lost": nothing arrives; the downloader asks again after its chunk timeout


@fuzz(60)
@given(
    data=st.data(),
    length=st.integers(1, 3000),
    pieces=st.integers(1, 24),
    script=st.lists(st.sampled_from(ACTIONS), max_size=12),
    leftover=st.binary(max_size=400),
    resume=st.booleans(),
)
def test_chunk_framing(
    tmp_path_factory: pytest.TempPathFactory,
    data: st.DataObject,
    length: int,
    pieces: int,
    script: list[str],
    leftover: bytes,
    resume: bool,
) -> None:
    """Whatever the broker sends, the download ends whole and exact, or refused with
    chunk_size/chunk_hash, or as a transport problem; every byte written to disk was
    part of a chunk whose signed hash matched."""
    assume(script.count("lost") <= 2)
    content = data.draw(st.binary(min_size=length, max_size=length))
    size = max(1, -(-length // pieces))
    info = ChunkInfo(size, tuple(chunk_hashes(content, size)))
    target = "models/m/1/" + hashlib.sha256(content).hexdigest() + ".model.tflite"
    chunks = {TOPICS.chunk(target, i): c for i, c in enumerate(split_chunks(content, size))}
    broker = ScriptedBroker(chunks, script, data)
    folder = tmp_path_factory.mktemp("dl")
    dest = folder / "out"
    if resume:  # what an interrupted download left (never longer than the target)
        dest.with_name("out.part").write_bytes(leftover[:length])
    writes: list[tuple[int, bytes]] = []

    def recording_pwrite(fd: int, buf: bytes, offset: int) -> int:
        writes.append((offset, bytes(buf)))
        return REAL_PWRITE(fd, buf, offset)

    dl = ChunkDownloader(broker, TOPICS, window=data.draw(st.integers(1, 8)), chunk_timeout_s=0.0)
    try:
        # patched per example (a function-scoped monkeypatch would stack one wrapper per example)
        with mock.patch("agent.delivery.chunks.os.pwrite", recording_pwrite):
            stats = dl.download(target, length, info, dest)
    except ModelRejectedError as exc:
        assert exc.reason in ("chunk_size", "chunk_hash"), exc
        assert broker.bad_delivered, "refused although nothing bad arrived"
        assert not dest.exists()
    except TransportError:
        assert "lost" in script or "disconnect" in script
        assert not dest.exists()
    else:
        assert dest.read_bytes() == content
        assert stats.chunks_present + stats.chunks_received == len(info.hashes)
    for offset, buf in writes:
        assert offset % size == 0
        assert hashlib.sha256(buf).hexdigest() == info.hashes[offset // size], "unverified bytes written"
    assert not broker.open, "subscriptions left open"


# -- topics -------------------------------------------------------------------------------------------


@fuzz(300)
@given(
    topic=st.text(max_size=80) | st.builds(lambda s: f"litefleet/v1/replies/{s}", st.text(max_size=40)),
    device=st.sampled_from(["pi-1", "a", "x" * 64]),
)
def test_topic_parsers_never_raise(topic: str, device: str) -> None:
    name = TOPICS.metadata_filename(topic)
    assert name is None or "/" not in name
    if TOPICS.reply_allowed(device, topic):
        rest = topic[len(f"{TOPICS.base}/replies/") :].split("/")
        assert rest[1] == device and "+" not in topic and "#" not in topic


def _iter_files(root: Path) -> Iterator[Path]:
    yield from (p for p in root.rglob("*") if p.is_file())


def test_a_refused_refresh_leaves_the_trusted_cache_untouched(repo_files: RepoFiles, tmp_path: Path) -> None:
    """A refresh over forged files changes nothing the device trusts: the cached
    metadata after a refused refresh is byte for byte what it was."""
    store = ModelStore(tmp_path)
    cache = RetainedMetadata(TOPICS)
    for name, payload in repo_files.files.items():
        cache.handle(Message(topic=TOPICS.metadata(name), payload=payload, retain=True))
    updater = ModelUpdater(
        device_id="pi-1",
        groups=(),
        trusted_root=repo_files.trusted_root,
        client=NoBroker(),
        topics=TOPICS,
        store=store,
        cache=cache,
    )
    updater.verified_targets()
    before = {p.name: p.read_bytes() for p in _iter_files(store.tuf)}
    forged = copy.deepcopy(json.loads(repo_files.files["timestamp.json"]))
    forged["signed"]["version"] += 1
    cache.handle(Message(topic=TOPICS.metadata("timestamp.json"), payload=json.dumps(forged).encode()))
    with pytest.raises(ModelRejectedError) as exc:
        updater.verified_targets()
    assert exc.value.reason == "bad_signature"
    assert {p.name: p.read_bytes() for p in _iter_files(store.tuf)} == before
