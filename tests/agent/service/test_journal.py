"""agent.service.journal: entries in journald's native protocol, read back as journald reads them.

A real ``AF_UNIX`` datagram socket stands in for ``/run/systemd/journal/socket``; the parser
below follows the protocol's documented format (``KEY=value`` lines, or ``KEY``, a 64-bit
little-endian length, the bytes, a newline). The real journald is tested in tests/systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.service.journal import (
    JournalHandler,
    encode_entry,
    field_name,
    handler_for_stderr,
    priority,
    stderr_is_journal,
)


def parse_entry(data: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            fields[line.decode()] = data[nl + 9 : nl + 9 + size].decode()
            assert data[nl + 9 + size : nl + 10 + size] == b"\n"
            i = nl + 10 + size
    return fields


@pytest.fixture
def journal_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_field_names_follow_journald_rules() -> None:
    assert field_name("device_id") == "DEVICE_ID"
    assert field_name("to-version") == "TO_VERSION"
    assert field_name("_private") == "PRIVATE"
    assert field_name("3d") == "F3D"
    assert len(field_name("x" * 100)) == 64


def test_encoding_round_trips_plain_and_multiline_values() -> None:
    entry = {"MESSAGE": "two\nlines", "PRIORITY": 6, "LITEFLEET_MODEL": "digits=v1"}
    assert parse_entry(encode_entry(entry)) == {
        "MESSAGE": "two\nlines",
        "PRIORITY": "6",
        "LITEFLEET_MODEL": "digits=v1",
    }


def test_levels_map_to_syslog_priorities() -> None:
    assert [priority(lvl) for lvl in (10, 20, 25, 30, 40, 50)] == [7, 6, 4, 4, 3, 2]


def test_a_record_becomes_one_entry_with_its_fields(journal_socket: tuple[socket.socket, str]) -> None:
    sock, path = journal_socket
    handler = JournalHandler(static={"device_id": "pi-7"}, address=path)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    log = logging.getLogger("test.journal")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning(
            "rolled_back model=digits",
            extra={
                "litefleet_fields": {
                    "event": "rolled_back",
                    "model": "digits",
                    "version": 3,
                    "to_version": None,
                }
            },
        )
    finally:
        log.removeHandler(handler)
        handler.close()
    got = parse_entry(sock.recv(65536))
    assert got["MESSAGE"] == "test.journal: rolled_back model=digits"
    assert got["PRIORITY"] == "4" and got["SYSLOG_IDENTIFIER"] == "litefleet-agent"
    assert got["LOGGER"] == "test.journal" and got["CODE_FUNC"].startswith("test_a_record")
    assert (got["LITEFLEET_DEVICE_ID"], got["LITEFLEET_EVENT"], got["LITEFLEET_MODEL"]) == (
        "pi-7",
        "rolled_back",
        "digits",
    )
    assert got["LITEFLEET_VERSION"] == "3" and "LITEFLEET_TO_VERSION" not in got


def test_an_entry_the_socket_refuses_still_reaches_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = JournalHandler(address=str(tmp_path / "no-journald-here"))
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.emit(logging.LogRecord("x", logging.ERROR, __file__, 1, "lost? no", None, None))
    assert "lost? no" in capsys.readouterr().err


_PROBE = """
import sys
from agent.service.journal import handler_for_stderr, stderr_is_journal
print(stderr_is_journal(), type(handler_for_stderr()).__name__)
"""


def test_the_journal_is_used_only_when_stderr_is_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    with open(tmp_path / "stderr", "w") as err:
        st = os.fstat(err.fileno())
        for stream, expected in (
            (f"{st.st_dev}:{st.st_ino}", "True JournalHandler"),
            ("1:2", "False StreamHandler"),
        ):
            out = subprocess.run(
                [sys.executable, "-c", _PROBE],
                env={**env, "JOURNAL_STREAM": stream},
                stderr=err,
                capture_output=False,
                stdout=subprocess.PIPE,
                text=True,
                check=True,
            ).stdout.strip()
            assert out == expected
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert not stderr_is_journal({})
    assert type(handler_for_stderr()).__name__ == "StreamHandler"
