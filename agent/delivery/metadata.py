"""TUF metadata over retained MQTT messages.

:class:`RetainedMetadata` keeps the payload of every retained message under
``<prefix>/v1/repo/metadata/+`` in memory (a few small files), filled by one
wildcard subscription that lives as long as the connection. A zero-length
retained message deletes the file, as it deletes the retained message.

:class:`MqttMetadataFetcher` is python-tuf's ``FetcherInterface`` over that
cache. A file that is not there answers HTTP 404 at once: together with the
client's sync barrier this is MQTT's missing "not found", so probing for
``N+1.root.json`` on every refresh costs nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

from tuf.api.exceptions import DownloadHTTPError, DownloadLengthMismatchError

from agent.delivery.tuf_client import FetcherInterface
from agent.mqtt.transport import Message
from agent.protocol import Topics

logger = logging.getLogger(__name__)

METADATA_URL = "mqtt://repo/metadata/"
# the largest metadata file accepted at all (python-tuf's own default for targets)
MAX_METADATA_BYTES = 5_000_000
# files kept at most; a flood of junk file names must not grow memory without end
MAX_FILES = 256
# bytes kept at most, all files together (MAX_FILES * MAX_METADATA_BYTES would be 1.3 GB:
# junk files of a few MB each could exhaust a small device's memory). A real repository
# holds a few small files; junk that fills this only delays updates until the host's next
# push clears it.
MAX_TOTAL_BYTES = 16_000_000


class RetainedMetadata:
    """Thread-safe map of metadata file name -> bytes, fed from paho's thread."""

    def __init__(self, topics: Topics, on_change: Callable[[str], None] | None = None) -> None:
        self._topics = topics
        self._files: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._on_change = on_change
        self._total = 0  # sum of the payload sizes in _files
        self.dropped = 0

    def handle(self, message: Message) -> None:
        """paho thread: store or delete one file; never raises."""
        name = self._topics.metadata_filename(message.topic)
        if name is None or not name.endswith(".json"):
            self.dropped += 1
            return
        with self._lock:
            old = self._files.get(name)
            if not message.payload:
                changed = self._files.pop(name, None) is not None
                self._total -= len(old or b"")
            elif (
                len(message.payload) > MAX_METADATA_BYTES
                or (name not in self._files and len(self._files) >= MAX_FILES)
                or self._total - len(old or b"") + len(message.payload) > MAX_TOTAL_BYTES
            ):
                self.dropped += 1
                logger.warning("ignored metadata file %s (%d bytes)", name[:80], len(message.payload))
                return
            else:
                changed = old != message.payload
                self._files[name] = message.payload
                self._total += len(message.payload) - len(old or b"")
        if changed and self._on_change is not None:
            self._on_change(name)

    def get(self, name: str) -> bytes | None:
        with self._lock:
            return self._files.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._files)


class MqttMetadataFetcher(FetcherInterface):
    """Serves ``mqtt://repo/metadata/<file>`` URLs from :class:`RetainedMetadata`."""

    def __init__(self, cache: RetainedMetadata) -> None:
        self._cache = cache

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(METADATA_URL):
            raise DownloadHTTPError(f"not a metadata URL: {url}", 404)
        name = url[len(METADATA_URL) :]
        data = self._cache.get(name)
        if data is None:
            raise DownloadHTTPError(f"{name} is not on the broker", 404)
        return iter((data,))

    def download_bytes(self, url: str, max_length: int) -> bytes:
        # the base class would stream into a temp file; these are small and in memory
        data = b"".join(self.fetch(url))
        if len(data) > max_length:
            raise DownloadLengthMismatchError(
                f"{url[len(METADATA_URL) :]} is {len(data)} bytes, more than the {max_length} allowed"
            )
        return data
