"""Log lines an operator can grep and a journal can index (shared by the agent and the host CLI).

An event is logged as a short message plus fields, never as a Python repr::

    logger.info("activated", extra=fields(event="activated", model="digits", version=3))

and comes out, by where the output goes and what was asked for, as

* text (the default): ``2026-05-01 12:00:00,123 INFO agent.x: activated model=digits
  version=3`` (an ``event`` field equal to the message is not repeated);
* JSON lines (``--log-format json``, ``log_format = "json"``): ``{"ts": ..., "level":
  "info", "logger": "agent.x", "message": "activated", "event": "activated", ...}``;
* a native journald entry when stderr is the journal (systemd sets ``$JOURNAL_STREAM``
  to stderr's ``device:inode``): ``MESSAGE``, ``PRIORITY``, ``SYSLOG_IDENTIFIER`` and
  each field as ``LITEFLEET_<KEY>`` (``LITEFLEET_EVENT``, ``LITEFLEET_MODEL``,
  ``LITEFLEET_VERSION``, ``LITEFLEET_REASON``, ...), so ``journalctl
  LITEFLEET_EVENT=rolled_back`` finds every rollback.

Guarantees:

* one record is one line in text and JSON (a value's newlines are escaped; a
  traceback, with ``--debug`` only, follows its line); values with spaces, quotes or
  ``=`` are JSON-quoted, so ``key=value`` pairs split unambiguously;
* :class:`JournalHandler` never raises and loses nothing: an entry the socket
  refuses (no journald, too big) is written to stderr as a text line instead;
* :func:`native_stderr_logged` keeps what native code (LiteRT's C++ runtime) prints
  on file descriptor 2 out of the logs at ``info``: it is re-logged at debug
  (lines that do not start with ``INFO:`` at warning), with the program's own log
  handlers held meanwhile so that none of their lines is caught instead.

Threads: handlers are ``logging.Handler`` objects (their lock serialises ``emit``);
:func:`native_stderr_logged` holds a module lock, so captures never overlap.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

FIELDS_ATTR = "litefleet_fields"
FIELD_PREFIX = "LITEFLEET_"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
# where the journal socket is looked for instead (tests, containers with it elsewhere)
JOURNAL_SOCKET_ENV = "LITEFLEET_JOURNAL_SOCKET"
FORMATS = ("text", "json")
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


# -- pure formatting ------------------------------------------------------------------------
def fields(**values: Any) -> dict[str, dict[str, Any]]:
    """``extra=`` for a logging call: the fields of this record (None values left out)."""
    return {FIELDS_ATTR: {k: v for k, v in values.items() if v is not None}}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    found = getattr(record, FIELDS_ATTR, None)
    return dict(found) if isinstance(found, Mapping) else {}


def plain(value: Any) -> Any:
    """A JSON-able value: enums by their value, sequences as lists, others as text."""
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    return str(value)


def format_value(value: Any) -> str:
    """One ``key=value`` value: bare when it is one plain word, JSON-quoted otherwise."""
    v = plain(value)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list | dict):
        return json.dumps(v, separators=(",", ":"))
    text = str(v)
    if not text or any(c.isspace() or c in '"=\\' or not c.isprintable() for c in text):
        return json.dumps(text)
    return text


def format_kv(values: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={format_value(value)}" for key, value in values.items())


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (between two levels: the more severe one)."""
    for level in sorted(_PRIORITY):
        if levelno <= level:
            return _PRIORITY[level]
    return 2


def journal_field(key: str) -> str:
    """``LITEFLEET_<KEY>``: upper case, ``A-Z 0-9 _`` only, at most 64 characters."""
    name = "".join(c if c.isascii() and c.isalnum() else "_" for c in key.upper()).strip("_")
    return (FIELD_PREFIX + (name or "FIELD"))[:64]


def journal_entry(values: Mapping[str, Any]) -> bytes:
    """systemd's native protocol: ``KEY=value`` lines; a value with a newline as ``KEY``,
    its length (64-bit little endian), the bytes and a newline."""
    out = bytearray()
    for key, value in values.items():
        data = str(value).encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


# -- formatters and handlers ------------------------------------------------------------------
class TextFormatter(logging.Formatter):
    """``<prefix>: message key=value ...``; the prefix is the format given (time, level, name)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        values = record_fields(record)
        if values.get("event") == record.getMessage():  # "activated event=activated" says it twice
            del values["event"]
        extra = format_kv(values)
        if not extra:
            return line
        head, sep, tail = line.partition("\n")  # a traceback follows the line, not the fields
        return f"{head} {extra}{sep}{tail}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the fields, and exc (a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record_fields(record).items():
            doc.setdefault(key, plain(value))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def stderr_is_journal(env: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """True when ``$JOURNAL_STREAM`` names ``fd``'s device and inode (systemd's rule)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalHandler(logging.Handler):
    """Each record as one native journal entry; ``static`` fields go into every entry."""

    def __init__(
        self, identifier: str, *, static: Mapping[str, Any] | None = None, address: str = JOURNAL_SOCKET
    ) -> None:
        super().__init__()
        self.identifier = identifier
        self.static = {journal_field(k): plain(v) for k, v in (static or {}).items() if v is not None}
        self.address = address
        self._sock: socket.socket | None = None
        self.fallback = logging.StreamHandler(sys.stderr)
        self.fallback.setFormatter(TextFormatter("%(levelname)s %(name)s: %(message)s"))

    def entry(self, record: logging.LogRecord) -> dict[str, Any]:
        values: dict[str, Any] = {
            "MESSAGE": self.format(record),
            "PRIORITY": priority(record.levelno),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LITEFLEET_LOGGER": record.name,
            **self.static,
        }
        for key, value in record_fields(record).items():
            v = plain(value)
            values[journal_field(key)] = format_value(v) if isinstance(v, list | dict | bool) else v
        return values

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = journal_entry(self.entry(record))
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, self.address)
        except OSError:
            # journald gone or the entry too big for a datagram: the line still gets out
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            self.fallback.handle(record)
        except Exception:  # logging's rule: a bad record never takes the program down
            self.handleError(record)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        super().close()


def make_handler(
    identifier: str,
    *,
    fmt: str = "text",
    text_format: str = "%(asctime)s %(levelname)s %(name)s: %(message)s",
    static: Mapping[str, Any] | None = None,
    stream: TextIO | None = None,
    env: Mapping[str, str] | None = None,
) -> logging.Handler:
    """The handler for this process: the journal when stderr is the journal, else text or
    JSON lines on ``stream`` (stderr)."""
    env = os.environ if env is None else env
    if stream is None and stderr_is_journal(env):
        handler: logging.Handler = JournalHandler(
            identifier, static=static, address=env.get(JOURNAL_SOCKET_ENV) or JOURNAL_SOCKET
        )
        # journald adds the time and the priority; the logger name stays useful, and the
        # fields stay in the message too: `journalctl -u` shows MESSAGE only
        handler.setFormatter(TextFormatter("%(name)s: %(message)s"))
        return handler
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(text_format))
    return handler


def configure(identifier: str, level: int, **options: Any) -> logging.Handler:
    """Install :func:`make_handler`'s handler on the root logger (replacing one an earlier
    call installed; handlers of others, such as pytest's, stay) and set ``level``."""
    if options.get("fmt", "text") not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_litefleet", False):
            root.removeHandler(old)
            old.close()
    handler = make_handler(identifier, **options)
    handler._litefleet = True  # type: ignore[attr-defined]
    # the level on the handler too: a filter that relabels a record to a lower level after
    # the logger's own check (paho's "Client is not connected", ERROR -> DEBUG) is still
    # held back here, where the record's final level is compared
    handler.setLevel(level)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


# -- native output ---------------------------------------------------------------------------
_capture_lock = threading.Lock()


@contextlib.contextmanager
def native_stderr_logged(log: logging.Logger) -> Iterator[None]:
    """Send what native code writes on fd 2 meanwhile to ``log`` instead of the console.

    LiteRT prints ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` from C++ the
    first time a process allocates an interpreter's tensors: once in the agent and once
    in each check process. ``invoke()`` and predictions never pass through here. Measured
    (bench/bench_load.py, 2-vCPU VM): ~70 µs added per model load, once per activation;
    ``invoke()`` on the interpreter made this way 1.00-1.01x of a bare one.
    """
    captured: list[str] = []
    try:
        with _capture_lock, contextlib.ExitStack() as stack:
            try:
                scratch = stack.enter_context(tempfile.TemporaryFile())
                saved = os.dup(2)
            except OSError:  # no temporary folder, no fd 2: the output goes where it went
                yield
                return
            try:
                held = _redirected(scratch.fileno())
            except BaseException:
                os.close(saved)
                raise
            try:
                yield
            finally:
                _restored(saved, held)
                scratch.seek(0)
                captured.append(scratch.read(65536).decode("utf-8", "replace"))
    finally:  # also when loading failed: what the runtime said is part of why
        for line in "".join(captured).splitlines():
            if line.strip():
                log.log(logging.DEBUG if line.startswith("INFO:") else logging.WARNING, "%s", line.strip())


def _redirected(target: int) -> list[logging.Handler]:
    """fd 2 -> ``target``, with the program's own log handlers held (their lines must not
    land in the capture); :func:`_restored` undoes both."""
    held = list(logging.getLogger().handlers)
    for h in held:
        h.acquire()
    try:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(target, 2)
    except BaseException:
        for h in reversed(held):
            h.release()
        raise
    return held


def _restored(saved: int, held: list[logging.Handler]) -> None:
    try:
        os.dup2(saved, 2)
    finally:
        os.close(saved)
        for h in reversed(held):
            h.release()


def event_level(kind: str, fields: dict[str, Any]) -> int:
    """How loud an event is in the log: refusals, rollbacks and anything carrying a
    ``warning`` field at warning, download progress at debug, the rest at info."""
    if kind in ("rejected", "rolled_back") or fields.get("warning"):
        return logging.WARNING
    if kind == "downloading":
        return logging.DEBUG
    return logging.INFO
