"""Log records into journald with their fields: systemd's native journal protocol (no dependency).

A service's stderr reaches the journal as plain lines; an operator who wants every
activation of one model, or every rejection on one device, needs fields to match on
(``journalctl -u litefleet-agent LITEFLEET_EVENT=rolled_back``). :class:`JournalHandler`
sends each record as one journal entry over ``/run/systemd/journal/socket``.

Guarantees:

- it is used only when stderr *is* the journal: ``$JOURNAL_STREAM`` names stderr's device
  and inode (systemd sets it for a service whose output goes to journald), so a terminal,
  Termux or a pipe keeps plain text lines (:func:`handler_for_stderr`);
- each entry carries ``MESSAGE``, ``PRIORITY`` (syslog level), ``SYSLOG_IDENTIFIER``,
  ``LOGGER``, ``THREAD_NAME``, ``CODE_FILE``/``CODE_LINE``/``CODE_FUNC``, the handler's
  static fields (the device id: ``LITEFLEET_DEVICE_ID``), and every key of the record's
  ``litefleet_fields`` mapping (``extra={"litefleet_fields": {...}}``) as ``LITEFLEET_<KEY>``;
- it never raises and loses nothing: an entry the socket refuses is written to stderr as
  a plain line instead.

Thread-safe (``logging.Handler``'s lock serialises :meth:`JournalHandler.emit`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping
from typing import Any

JOURNAL_SOCKET = "/run/systemd/journal/socket"
FIELD_PREFIX = "LITEFLEET_"

# syslog priorities of logging's levels
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (a custom level takes the next standard one up)."""
    for level in sorted(_PRIORITY):
        if levelno <= level:
            return _PRIORITY[level]
    return 2


def field_name(key: str) -> str:
    """A journal field name for ``key``: upper case, ``[A-Z0-9_]`` only, never starting with
    ``_`` or a digit (journald drops such fields), at most 64 characters."""
    name = re.sub(r"[^A-Z0-9_]", "_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = f"F{name}"
    return name[:64]


def encode_entry(fields: Mapping[str, object]) -> bytes:
    """One entry in the native protocol: ``KEY=value`` lines, or for a value holding a
    newline ``KEY``, its length as 64-bit little endian, the bytes, a newline."""
    out = bytearray()
    for key, value in fields.items():
        data = str(value).encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def stderr_is_journal(env: Mapping[str, str] | None = None) -> bool:
    """True when ``$JOURNAL_STREAM`` (``DEVICE:INODE``) is stderr's."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalHandler(logging.Handler):
    """Sends records to journald; ``static`` fields go into every entry."""

    def __init__(
        self,
        *,
        identifier: str = "litefleet-agent",
        static: Mapping[str, object] | None = None,
        address: str = JOURNAL_SOCKET,
    ) -> None:
        super().__init__()
        self.identifier = identifier
        self.static = {FIELD_PREFIX + field_name(k): v for k, v in (static or {}).items()}
        self.address = address
        self._sock: socket.socket | None = None

    def entry(self, record: logging.LogRecord) -> dict[str, object]:
        fields: dict[str, object] = {
            "MESSAGE": self.format(record),
            "PRIORITY": priority(record.levelno),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "THREAD_NAME": record.threadName or "",
            "CODE_FILE": record.pathname,
            "CODE_LINE": record.lineno,
            "CODE_FUNC": record.funcName,
            **self.static,
        }
        extra: Any = getattr(record, "litefleet_fields", None)
        if isinstance(extra, Mapping):
            for key, value in extra.items():
                if value is not None:
                    fields[FIELD_PREFIX + field_name(str(key))] = value
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = encode_entry(self.entry(record))
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, self.address)
        except OSError:
            # too big for a datagram, journald gone: the line still reaches the log
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(self.format(record) + "\n")
        except Exception:  # a bad record must not take the agent down (logging's own rule)
            self.handleError(record)

    def close(self) -> None:
        self.acquire()
        try:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        finally:
            self.release()
        super().close()


def handler_for_stderr(static: Mapping[str, object] | None = None) -> logging.Handler:
    """A :class:`JournalHandler` when stderr is the journal, else a plain stderr handler with
    the time and level in each line (journald adds its own)."""
    if stderr_is_journal():
        handler: logging.Handler = JournalHandler(static=static)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        return handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler
