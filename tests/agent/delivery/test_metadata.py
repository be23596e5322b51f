"""TUF metadata from retained messages: the cache and the fetcher's 'not found'."""

from __future__ import annotations

import pytest
from tuf.api.exceptions import DownloadHTTPError, DownloadLengthMismatchError

from agent.delivery.metadata import MAX_FILES, METADATA_URL, MqttMetadataFetcher, RetainedMetadata
from agent.mqtt.transport import Message
from agent.protocol import Topics

T = Topics()


def msg(name: str, payload: bytes) -> Message:
    return Message(topic=T.metadata(name), payload=payload, retain=True)


def test_cache_stores_replaces_and_deletes() -> None:
    changes: list[str] = []
    cache = RetainedMetadata(T, on_change=changes.append)
    cache.handle(msg("timestamp.json", b"1"))
    cache.handle(msg("timestamp.json", b"1"))  # same bytes: no change
    cache.handle(msg("timestamp.json", b"2"))
    cache.handle(msg("timestamp.json", b""))  # a cleared retained message
    assert changes == ["timestamp.json"] * 3
    assert cache.get("timestamp.json") is None


def test_cache_ignores_what_is_not_metadata_and_stays_bounded() -> None:
    cache = RetainedMetadata(T)
    cache.handle(Message(topic="litefleet/v1/repo/metadata/a/b.json", payload=b"x"))
    cache.handle(msg("notes.txt", b"x"))
    cache.handle(msg("huge.json", b" " * 6_000_000))
    assert cache.names() == [] and cache.dropped == 3
    for i in range(MAX_FILES + 50):
        cache.handle(msg(f"{i}.junk.json", b"x"))
    assert len(cache.names()) == MAX_FILES


def test_fetcher_answers_404_at_once_for_missing_files() -> None:
    cache = RetainedMetadata(T)
    cache.handle(msg("1.root.json", b"root"))
    fetcher = MqttMetadataFetcher(cache)
    assert fetcher.download_bytes(METADATA_URL + "1.root.json", 100) == b"root"
    with pytest.raises(DownloadHTTPError) as exc:
        fetcher.download_bytes(METADATA_URL + "2.root.json", 100)
    assert exc.value.status_code == 404
    with pytest.raises(DownloadLengthMismatchError):
        fetcher.download_bytes(METADATA_URL + "1.root.json", 2)
