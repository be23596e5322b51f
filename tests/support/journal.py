"""A stand-in for journald: a unix datagram socket the test binds, and a strict parser of
systemd's native journal protocol (``KEY=value`` lines, or ``KEY``, a 64-bit little-endian
length, the bytes and a newline). Point a process at it with ``$JOURNAL_STREAM`` (its
stderr's ``device:inode``) and ``$LITEFLEET_JOURNAL_SOCKET`` (see :mod:`agent.logs`)."""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path


class FakeJournal:
    """A unix datagram socket standing in for /run/systemd/journal/socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.entries: list[dict[str, str]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return
            entry = parse_entry(data)
            with self._cond:
                self.entries.append(entry)
                self._cond.notify_all()

    def wait_for(self, timeout_s: float = 60.0, **match: str) -> dict[str, str]:
        def found() -> dict[str, str] | None:
            return next((e for e in self.entries if all(e.get(k) == v for k, v in match.items())), None)

        with self._cond:
            assert self._cond.wait_for(lambda: found() is not None, timeout_s), (match, self.entries[-5:])
            entry = found()
            assert entry is not None
            return entry

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join()


def parse_entry(data: bytes) -> dict[str, str]:
    """systemd's native protocol, strictly: KEY=value lines, or KEY, u64 length, bytes, newline."""
    out: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = nl + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            value = data[nl + 9 : nl + 9 + size]
            assert data[nl + 9 + size : nl + 10 + size] == b"\n", "binary field not ended by a newline"
            i = nl + 10 + size
        name = key.decode()
        assert name and name.replace("_", "").isalnum() and name.isupper() and not name[0].isdigit(), name
        out[name] = value.decode()
    return out
