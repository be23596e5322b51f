"""Chunk downloads against an in-memory broker fake: windows, resume, bad data, timeouts."""

from __future__ import annotations

import errno
import hashlib
import threading
from pathlib import Path

import pytest

from agent.delivery.chunks import ChunkDownloader
from agent.errors import ModelRejectedError, StorageError, TransportError
from agent.mqtt.transport import Message
from agent.protocol import ChunkInfo, Topics, chunk_hashes, split_chunks

TOPICS = Topics()
TARGET = "models/m/1/abc.model.tflite"


class FakeBroker:
    """Retained chunks; answers each subscription at once (on another thread, as paho would)."""

    def __init__(self, chunks: dict[str, bytes]) -> None:
        self.retained = dict(chunks)
        self.connected = True
        self.open: set[str] = set()
        self.max_open = 0
        self.subscribed: list[str] = []
        self.requests = 0  # SUBSCRIBE and UNSUBSCRIBE packets

    def subscribe_many(self, filters, handler, qos: int = 1) -> None:  # type: ignore[no-untyped-def]
        self.requests += 1
        for f in filters:
            self.open.add(f)
            self.subscribed.append(f)
        self.max_open = max(self.max_open, len(self.open))
        for f in filters:
            if f in self.retained:
                msg = Message(topic=f, payload=self.retained[f], retain=True)
                threading.Thread(target=handler, args=(msg,)).start()

    def unsubscribe(self, *filters: str) -> None:
        self.requests += 1
        for f in filters:
            self.open.discard(f)


def make(data: bytes, size: int) -> tuple[ChunkInfo, FakeBroker]:
    info = ChunkInfo(size, tuple(chunk_hashes(data, size)))
    chunks = {TOPICS.chunk(TARGET, i): c for i, c in enumerate(split_chunks(data, size))}
    return info, FakeBroker(chunks)


def test_downloads_within_the_window(tmp_path: Path) -> None:
    data = bytes(range(256)) * 400  # 102400 bytes
    info, broker = make(data, 1000)
    progress: list[int] = []
    dl = ChunkDownloader(broker, TOPICS, window=4)
    stats = dl.download(
        TARGET, len(data), info, tmp_path / "out", progress=lambda done, total: progress.append(done)
    )
    assert (tmp_path / "out").read_bytes() == data
    assert broker.max_open <= 4 and not broker.open
    assert stats.chunks_received == 103 and stats.bytes_received == len(data)
    # chunks arrive in any order (one thread each); each was checked, so the file is
    assert stats.verified
    assert progress[-1] == len(data) and progress == sorted(progress)
    assert not (tmp_path / "out.part").exists()


def test_the_window_is_refilled_in_batches(tmp_path: Path) -> None:
    """One SUBSCRIBE and one UNSUBSCRIBE per half window, not per chunk: each is a packet,
    an acknowledgement and paho work on both sides (bench/bench_activation.py)."""
    data = bytes(range(256)) * 250  # 64 chunks of 1000
    info, broker = make(data, 1000)
    ChunkDownloader(broker, TOPICS, window=8).download(TARGET, len(data), info, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert broker.max_open <= 8 and not broker.open
    assert broker.requests <= 2 * (1 + (64 - 8) // 4) + 1  # 29; a chunk at a time took 128


class ReversingBroker(FakeBroker):
    """Answers each batch of subscriptions last-first, from one thread: chunks out of order."""

    def subscribe_many(self, filters, handler, qos: int = 1) -> None:  # type: ignore[no-untyped-def]
        msgs = [Message(topic=f, payload=self.retained[f], retain=True) for f in reversed(filters)]
        super().subscribe_many(filters, lambda m: None, qos)

        def deliver() -> None:
            for m in msgs:
                handler(m)

        threading.Thread(target=deliver).start()


def test_chunks_out_of_order_make_the_file(tmp_path: Path) -> None:
    data = hashlib.sha256(b"x").digest() * 1000  # 32 chunks of 1000
    info, plain = make(data, 1000)
    broker = ReversingBroker(plain.retained)
    stats = ChunkDownloader(broker, TOPICS, window=8).download(TARGET, len(data), info, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert stats.verified


def test_resume_keeps_verified_chunks(tmp_path: Path) -> None:
    data = b"".join(hashlib.sha256(bytes([i])).digest() * 40 for i in range(50))  # 64000 bytes
    info, broker = make(data, 1000)
    part = tmp_path / "out.part"
    # an earlier process got chunks 0-29 and half of chunk 30 (sparse file, like a kill)
    with open(part, "wb") as f:
        f.write(data[:30500])
        f.truncate(len(data))
    stats = ChunkDownloader(broker, TOPICS, window=8).download(TARGET, len(data), info, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert stats.chunks_present == 30
    assert stats.verified  # the 30 on disk were hashed before they were kept
    assert stats.bytes_received == len(data) - 30000
    assert all(int(t.rsplit("/", 1)[1]) >= 30 for t in broker.subscribed)


def test_a_part_file_longer_than_the_target_is_cut_to_its_signed_length(tmp_path: Path) -> None:
    """The caller trusts a download's chunks for the whole file: nothing may follow them."""
    data = b"".join(hashlib.sha256(bytes([i])).digest() * 40 for i in range(10))  # 12800 bytes
    info, broker = make(data, 1000)
    (tmp_path / "out.part").write_bytes(data + b"left over from something else")
    stats = ChunkDownloader(broker, TOPICS, window=8).download(TARGET, len(data), info, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert stats.verified and stats.chunks_present == 12


def test_a_flipped_byte_is_refused(tmp_path: Path) -> None:
    data = b"a" * 5000
    info, broker = make(data, 1000)
    t = TOPICS.chunk(TARGET, 2)
    broker.retained[t] = b"a" * 999 + b"b"
    with pytest.raises(ModelRejectedError) as exc:
        ChunkDownloader(broker, TOPICS).download(TARGET, len(data), info, tmp_path / "out")
    assert exc.value.reason == "chunk_hash"
    assert not (tmp_path / "out").exists()
    assert not broker.open  # nothing left subscribed


def test_endless_data_is_refused_before_hashing(tmp_path: Path) -> None:
    data = b"a" * 5000
    info, broker = make(data, 1000)
    broker.retained[TOPICS.chunk(TARGET, 4)] = b"a" * 1000 + b"more" * 10_000
    with pytest.raises(ModelRejectedError) as exc:
        ChunkDownloader(broker, TOPICS).download(TARGET, len(data), info, tmp_path / "out")
    assert exc.value.reason == "chunk_size" and "signed metadata says 1000" in str(exc.value)


def test_missing_chunks_are_asked_again_then_given_up(tmp_path: Path) -> None:
    data = b"a" * 3000
    info, broker = make(data, 1000)
    del broker.retained[TOPICS.chunk(TARGET, 1)]
    dl = ChunkDownloader(broker, TOPICS, chunk_timeout_s=0.2)
    with pytest.raises(TransportError, match="chunk 1 is not on the broker"):
        dl.download(TARGET, len(data), info, tmp_path / "out")
    assert broker.subscribed.count(TOPICS.chunk(TARGET, 1)) == 3


def test_disk_full_is_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"a" * 3000
    info, broker = make(data, 1000)

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.posix_fallocate", full)
    with pytest.raises(StorageError, match="No space left"):
        ChunkDownloader(broker, TOPICS).download(TARGET, len(data), info, tmp_path / "out")
    assert not broker.subscribed  # refused before a single chunk was asked for
