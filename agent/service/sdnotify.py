"""systemd's notify protocol, implemented here (no dependency).

A service with ``Type=notify`` tells systemd it is ready, what it is doing
and that it is alive by sending datagrams like ``READY=1`` to the
``AF_UNIX`` socket named in ``$NOTIFY_SOCKET`` (a path, or an abstract name
written with a leading ``@``). ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, when
set, naming this process) say how often ``WATCHDOG=1`` must come.

:class:`Notifier` guarantees:

- **No systemd, no effect.** Without ``$NOTIFY_SOCKET`` (a terminal, Termux
  on Android, an app embedding the agent) every method is a no-op; so is a
  watchdog without ``$WATCHDOG_USEC``.
- **Never raises.** A failed send is logged at debug level and reported by
  the method's return value; the agent goes on.
- ``watchdog()`` may be called as often as convenient: it sends at most once
  per ``watchdog_interval_s / 2``, so it can sit in a loop that ticks every
  second whatever ``WatchdogSec=`` says.
- **A live loop may start slowly.** Until ``ready()``, ``watchdog()`` also
  sends ``EXTEND_TIMEOUT_USEC`` (``start_extension_s``, every third of it), so
  an agent that is alive but still waiting for its broker is not killed by
  ``TimeoutStartSec=`` (it serves local inference meanwhile), while one whose
  loop stopped is, ``start_extension_s`` after its last tick. (systemd arms the
  watchdog itself only once start-up is complete.)

The daemon calls: ``ready()`` once its installed models are loaded and its
REST API listens (broker or not), ``status(text)`` on every change after that,
``watchdog()`` from its work loop, ``stopping()`` on shutdown.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger(__name__)


def socket_address(value: str) -> str | bytes | None:
    """The address to send to for a ``$NOTIFY_SOCKET`` value (None when unusable)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # systemd also allows vsock:..., which an agent on a Pi never sees


def watchdog_interval_s(env: Mapping[str, str], pid: int) -> float | None:
    """The watchdog period from ``$WATCHDOG_USEC`` when it is meant for ``pid``."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 1e6


def format_message(**fields: str | int) -> bytes:
    """``KEY=value`` lines; newlines inside a value are flattened (one line each)."""
    return "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items()).encode()


class Notifier:
    """Talks to systemd when it is there. Thread-safe."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        pid: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        unset_environment: bool = False,
        start_extension_s: float = 30.0,
    ) -> None:
        env = os.environ if env is None else env
        self._address = socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval_s = watchdog_interval_s(env, os.getpid() if pid is None else pid)
        self._clock = clock
        self._last_watchdog: float | None = None
        self.start_extension_s = start_extension_s
        self._ready_sent = False
        self._last_extension: float | None = None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        if unset_environment and env is os.environ:
            # children (e.g. the candidate-check process) must not talk for us
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(key, None)

    @property
    def enabled(self) -> bool:
        """True when systemd is listening."""
        return self._address is not None

    def _send(self, message: bytes) -> bool:
        if self._address is None:
            return False
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(message, self._address)
                return True
            except OSError as exc:
                logger.debug("sd_notify %r failed: %s", message[:40], exc)
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                return False

    def notify(self, **fields: str | int) -> bool:
        """Send arbitrary ``KEY=value`` fields (``notify(READY=1, STATUS="...")``)."""
        return self._send(format_message(**fields))

    def ready(self, status: str | None = None) -> bool:
        """Start-up is complete (``READY=1``), with an optional status line."""
        fields: dict[str, str | int] = {"READY": 1, "MAINPID": os.getpid()}
        if status:
            fields["STATUS"] = status
        self._ready_sent = True
        return self.notify(**fields)

    def status(self, text: str) -> bool:
        """The one-line status ``systemctl status`` shows."""
        return self.notify(STATUS=text)

    def watchdog(self, *, force: bool = False) -> bool:
        """Feed the watchdog (``WATCHDOG=1``), at most once per half interval; before
        ``ready()``, extend the start timeout. True when ``WATCHDOG=1`` was sent."""
        if self._address is None:
            return False
        now = self._clock()
        if (
            not self._ready_sent
            and self.start_extension_s > 0
            and (self._last_extension is None or now - self._last_extension >= self.start_extension_s / 3)
            and self.extend_timeout(self.start_extension_s)
        ):
            self._last_extension = now
        if self.watchdog_interval_s is None:
            return False
        if (
            not force
            and self._last_watchdog is not None
            and now - self._last_watchdog < self.watchdog_interval_s / 2
        ):
            return False
        sent = self.notify(WATCHDOG=1)
        if sent:
            self._last_watchdog = now
        return sent

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more to finish starting (or stopping)."""
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    def stopping(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"STOPPING": 1}
        if status:
            fields["STATUS"] = status
        return self.notify(**fields)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def status_line(
    summary: Mapping[str, Mapping[str, Any]],
    busy: str | None,
    connected: bool,
    broker: object,
    error: str | None,
) -> str:
    """The one line ``systemctl status`` shows (``STATUS=``): what is served (name -> its
    summary with ``version``), what the agent is busy with, the broker, the last error."""
    served = ", ".join(f"{name} v{info['version']}" for name, info in summary.items())
    parts = [f"serving {served}" if served else "idle (no model yet)"]
    if busy:
        parts.append(busy)
    parts.append(f"{'connected to' if connected else 'waiting for the broker'} {broker}")
    if error:
        parts.append(error)
    return "; ".join(parts)
