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
* events are held in memory, in order, at most ``max_held`` (the oldest dropped
  first, counted in :attr:`SiteUplink.events_dropped`) and published, in order and
  before any newer event, when it reads ``1``. Events are best effort as before: an
  agent restart loses the held ones.

No ``site``, no word read yet, or a cleared message: the uplink counts as up.

What the device published between the link's loss and the ``0`` reaching it went
to a bridge that was already cut: the site broker acknowledged it, its clean bridge
session dropped it. Mosquitto notices a reset link at once, a silent one only after
1.5x the bridge's keep-alive (15 s by default, at most 30 s: ``broker
--uplink-keepalive-s``). So a device of a site sends again, once the uplink is back,
what its site broker acknowledged in the ``RESEND_S`` (60 s) before the ``0``: metrics
kept on disk that long (``keep_acked_s`` and ``rewind`` of
:class:`agent.telemetry.metrics_queue.MetricsQueue`, asked for through ``on_down``),
events in memory. Some of them reached central before the cut: consumers drop the
repeats (``seq``; ``boot`` and ``seq`` for events), as after any QoS 1 redelivery.

:meth:`SiteUplink.report` is what the device's metrics say of it (``uplink`` in
docs/protocol.md 6.4): the site, the last word, outages seen and events held or
dropped since the agent started.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from agent.errors import TransportError
from agent.mqtt.transport import Message, Publisher

logger = logging.getLogger(__name__)

MAX_HELD_EVENTS = 1000
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
    ) -> None:
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
        """Publish now, or hold until the uplink is back."""
        with self._lock:
            if self._up:
                self._publisher.publish(topic, payload, qos=1)
                self._remember(topic, payload)
                return
            self._hold(topic, payload)

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
            if up == self._up:
                return
            self._up = up
            if up:
                sent = self._send_held()
            else:
                self.outages += 1
                again = self._hold_recent()
        if not up:
            logger.warning(
                "site uplink down (%s): holding metrics and events; %d events of the last %g s go again",
                msg.topic,
                again,
                self._resend_s,
            )
            self._on_down()
            return
        if sent is not None:
            logger.info("site uplink up again: %d held events sent, metrics resume", sent)
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
        many, or None when the broker went away meanwhile (the rest waits for the next 1)."""
        sent = 0
        while self._held:
            topic, payload = self._held[0]
            try:
                self._publisher.publish(topic, payload, qos=1)
            except TransportError as exc:
                logger.info("site uplink up but %d events still held: %s", len(self._held), exc)
                self._up = False
                return None
            self._held.popleft()
            self._remember(topic, payload)
            sent += 1
        return sent
