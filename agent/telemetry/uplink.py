"""Whether what the device says about itself reaches central: its site's uplink.

A device behind a site broker (docs/sites.md) publishes to that broker, which
acknowledges at once and forwards over its bridge to central only while the bridge
is up: the bridge's session is clean, so what arrives while it is down never
reaches central. The site broker publishes the bridge's state, retained, on
``<prefix>/v1/sites/<site>/bridge`` (Mosquitto's notification: ``1`` up, ``0``
down). An agent configured with ``site`` reads it (:meth:`SiteUplink.handle`).

Guarantees, while the last word read is ``0``:

* the metrics queue is not drained (:meth:`SiteUplink.may_send` for
  :class:`agent.telemetry.metrics_queue.QueueSender`): metrics stay on disk,
  numbered and bounded, as while the device is offline, and go when it reads ``1``;
* events are held, in order, at most ``max_held`` (the oldest dropped
  first, counted in :attr:`SiteUplink.events_dropped`) and published, in order and
  before any newer event, when it reads ``1``. With ``path`` (the agent's state
  folder) they are also written to a file at each change (replaced atomically, and
  fsynced while anything is held), so an agent restart keeps them: the next run holds
  its own behind them until its site broker's first word (at most ``FIRST_WORD_S``:
  a word that never comes, a site broker that does not say it, must not keep them
  forever), and sends them all, in order, once that word is ``1``.

No ``site``, no word read yet, or a cleared message: the uplink counts as up.

Any device, with a site or not: an event made while it is not connected (the
publisher raises :class:`agent.errors.TransportError`; a rollback decided at
start-up comes before the first connection) is held the same way and goes, in
order, from :meth:`SiteUplink.on_connected`.

What the device published between the link's loss and the ``0`` reaching it went
to a bridge that was already cut: the site broker acknowledged it, its clean bridge
session dropped it. Mosquitto notices a reset link at once, a silent one only after
1.5x the bridge's keep-alive (15 s by default, at most 30 s: ``broker
--uplink-keepalive-s``). So a device of a site sends again, once the uplink is back,
what its site broker acknowledged in the ``RESEND_S`` (60 s) before the ``0``: metrics
kept on disk that long (``keep_acked_s`` and ``rewind`` of
:class:`agent.telemetry.metrics_queue.MetricsQueue`, asked for through ``on_down``),
events in memory (and in the file: the next run in the same boot of the machine keeps
their times, the monotonic clock's; after a reboot they are held at once, to go again).
Some of them reached central before the cut: consumers drop the repeats (``seq``;
``boot`` and ``seq`` for events), as after any QoS 1 redelivery.

:meth:`SiteUplink.report` is what the device's metrics say of it (``uplink`` in
docs/protocol.md 6.4): the site, the last word, outages seen and events held or
dropped since the agent started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import TransportError
from agent.mqtt.transport import Message, Publisher
from agent.telemetry.metrics_queue import machine_boot_id

logger = logging.getLogger(__name__)

MAX_HELD_EVENTS = 1000
FILE_NAME = "uplink-events.json"
# how long an earlier run's held events wait for the site broker's first word
FIRST_WORD_S = 30.0
# sent again after a "0": what the site broker acknowledged this long before it. Covers
# 1.5x the bridge's keep-alive (at most 30 s) plus the notification's trip, with margin
RESEND_S = 60.0


class SiteUplink:
    """The uplink state of one site, and the events held while it is down."""

    def __init__(
        self,
        publisher: Publisher,
        *,
        site: str = "",
        on_up: Callable[[], None] = lambda: None,
        on_down: Callable[[], None] = lambda: None,
        max_held: int = MAX_HELD_EVENTS,
        resend_s: float = RESEND_S,
        clock: Callable[[], float] = time.monotonic,
        path: Path | None = None,
        clock_id: str | None = None,
    ) -> None:
        """``path``: the file that keeps held and recent events across restarts (None:
        memory only); ``clock_id`` names ``clock``'s epoch (the boot id for the default)."""
        self._publisher = publisher
        self.site = site
        self._on_up = on_up
        self._on_down = on_down
        self._resend_s = resend_s
        self._clock = clock
        # events sent in the last resend_s (a device with a site): (when, topic, payload)
        self._recent: deque[tuple[float, str, bytes]] = deque(maxlen=max_held)
        self._lock = threading.Lock()
        self._up = True
        self._held: deque[tuple[str, bytes]] = deque(maxlen=max_held)
        self.events_dropped = 0
        self.outages = 0
        self._word_read = False  # until then (or FIRST_WORD_S) an earlier run's held events wait
        self._started = clock()
        self._path = path
        self._saved: str | None = None  # the file's text as last written
        self._clock_id = clock_id if clock_id is not None or path is None else machine_boot_id()
        if path is not None:
            self._load(path)

    @property
    def up(self) -> bool:
        return self._up

    def may_send(self) -> bool:
        return self._up

    def report(self) -> dict[str, Any] | None:
        """The ``uplink`` of a metrics message; None for a device without a site."""
        if not self.site:
            return None
        with self._lock:
            return {
                "site": self.site,
                "up": self._up,
                "outages": self.outages,
                "events_held": len(self._held),
                "events_dropped": self.events_dropped,
            }

    def send_event(self, topic: str, payload: bytes) -> None:
        """Publish now, after whatever is still held; or hold it: while the uplink is down,
        while the device is not connected (until :meth:`on_connected`), and while an
        earlier run's held events wait for the site broker's first word."""
        with self._lock:
            try:
                if self._may_flush():
                    self._send_held()
                if self._up and not self._held:
                    try:
                        self._publisher.publish(topic, payload, qos=1)
                    except TransportError:  # not connected: the next connection sends it
                        self._hold(topic, payload)
                    else:
                        self._remember(topic, payload)
                else:
                    self._hold(topic, payload)
            finally:
                self._save()

    def on_connected(self) -> None:
        """A new connection to the broker (paho's network thread): what was held while
        not connected goes, in order (an agent's start-up events among them: a rollback
        after a crash loop is decided before the first connection)."""
        with self._lock:
            if self._may_flush():
                self._send_held()
                self._save()

    def _may_flush(self) -> bool:
        """Under the lock: whether what is held may go now. A device of a site waits for
        its site broker's first word (at most FIRST_WORD_S) before an earlier run's."""
        if not (self._up and self._held):
            return False
        if not self.site or self._word_read:
            return True
        return self._clock() - self._started >= FIRST_WORD_S

    def _remember(self, topic: str, payload: bytes) -> None:
        """Under the lock: an event the site broker took, kept resend_s (a device of a site)."""
        if self.site:
            now = self._clock()
            while self._recent and self._recent[0][0] < now - self._resend_s:
                self._recent.popleft()
            self._recent.append((now, topic, payload))

    def _hold(self, topic: str, payload: bytes) -> None:
        if len(self._held) == self._held.maxlen:
            self.events_dropped += 1
        self._held.append((topic, payload))

    def handle(self, msg: Message) -> None:
        """The site broker's retained ``1``/``0`` (on paho's network thread)."""
        word = msg.payload.strip()
        if word not in (b"", b"0", b"1"):
            logger.debug("ignoring uplink state %r on %s", msg.payload[:20], msg.topic)
            return
        up = word != b"0"
        with self._lock:
            self._word_read = True
            changed = up != self._up
            if not changed and not (up and self._held):  # held at up: not sent yet
                return
            self._up = up
            if up:
                sent = self._send_held()
            else:
                self.outages += 1
                again = self._hold_recent()
            self._save()
        if not up:
            logger.warning(
                "site uplink down (%s): holding metrics and events; %d events of the last %g s go again",
                msg.topic,
                again,
                self._resend_s,
            )
            self._on_down()
            return
        if changed:
            held = f"{sent} held events sent" if sent is not None else "held events wait for the connection"
            logger.info("site uplink up again: %s, metrics resume", held)
            self._on_up()

    def _hold_recent(self) -> int:
        """Under the lock: what the cut bridge may have dropped is held again, before what is
        held already (in order); how many events."""
        since = self._clock() - self._resend_s
        again = [(t, p) for when, t, p in self._recent if when >= since]
        self._recent.clear()
        held = list(self._held)
        self._held.clear()
        for topic, payload in again + held:
            self._hold(topic, payload)
        return len(again)

    def _send_held(self) -> int | None:
        """Under the lock, so that no newer event goes first: send what is held, in order; how
        many, or None when the broker went away meanwhile (the rest waits for the next
        connection)."""
        sent = 0
        while self._held:
            topic, payload = self._held[0]
            try:
                self._publisher.publish(topic, payload, qos=1)
            except TransportError as exc:
                logger.info("%d events still held: %s", len(self._held), exc)
                return None
            self._held.popleft()
            self._remember(topic, payload)
            sent += 1
        return sent

    # -- the file ---------------------------------------------------------------------------
    def _save(self) -> None:
        """Under the lock: held and recent events to the file (replaced atomically)."""
        if self._path is None:
            return
        doc = {
            "clock_id": self._clock_id,
            "held": [[t, p.decode("utf-8", "replace")] for t, p in self._held],
            "recent": [[w, t, p.decode("utf-8", "replace")] for w, t, p in self._recent],
        }
        text = json.dumps(doc)
        if text == self._saved:  # a device without a site, connected: nothing to keep, no write
            return
        tmp = self._path.with_name(self._path.name + ".tmp")
        try:
            with open(tmp, "w") as fh:
                fh.write(text)
                if self._held:  # what only this file has: on disk before the rename
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, self._path)
            self._saved = text
        except OSError as exc:  # events are best effort: the agent goes on
            logger.warning("cannot keep held events in %s: %s", self._path, exc)

    def _load(self, path: Path) -> None:
        """An earlier run's events: held ones stay held; recent ones keep their times on the
        same clock, else they are held at once (sent again: repeats, never a loss)."""
        try:
            doc = json.loads(path.read_text())
            held = [(str(t), str(p).encode()) for t, p in doc["held"]]
            recent = [(float(w), str(t), str(p).encode()) for w, t, p in doc["recent"]]
            same_clock = bool(self._clock_id) and doc.get("clock_id") == self._clock_id
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
            logger.warning("held events in %s are unreadable (%s); moved to %s", path, exc, aside.name)
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            return
        for topic, payload in ([] if same_clock else [(t, p) for _, t, p in recent]) + held:
            self._hold(topic, payload)
        if same_clock:
            self._recent.extend(recent)
        if self._held:
            logger.info("%d events an earlier run held wait to be sent", len(self._held))
