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

:meth:`SiteUplink.report` is what the device's metrics say of it (``uplink`` in
docs/protocol.md 6.4): the site, the last word, outages seen and events held or
dropped since the agent started.
What the device publishes between the link's loss and the ``0`` reaching it is
lost: Mosquitto notices a reset link at once, a silent one after 1.5x the
bridge's keep-alive (15 s by default).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from agent.errors import TransportError
from agent.mqtt.transport import Message, Publisher

logger = logging.getLogger(__name__)

MAX_HELD_EVENTS = 1000


class SiteUplink:
    """The uplink state of one site, and the events held while it is down."""

    def __init__(
        self,
        publisher: Publisher,
        *,
        site: str = "",
        on_up: Callable[[], None] = lambda: None,
        max_held: int = MAX_HELD_EVENTS,
    ) -> None:
        self._publisher = publisher
        self.site = site
        self._on_up = on_up
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
                return
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
            if not up:
                self.outages += 1
                logger.warning("site uplink down (%s): holding metrics and events", msg.topic)
                return
            held = len(self._held)
            # in order, and before any newer event (send_event waits for the lock)
            while self._held:
                topic, payload = self._held[0]
                try:
                    self._publisher.publish(topic, payload, qos=1)
                except TransportError as exc:  # offline: the rest waits for the next 1
                    logger.info("site uplink up but %d events still held: %s", len(self._held), exc)
                    self._up = False
                    return
                self._held.popleft()
        logger.info("site uplink up again: %d held events sent, metrics resume", held)
        self._on_up()
