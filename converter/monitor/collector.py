"""The fleet monitor's collector: device messages from the broker into the live view and SQLite.

Threads and what they do:

- **paho's network thread** runs :meth:`Collector._on_message` only: it stamps
  the arrival time and puts the raw message on a bounded queue. If the queue
  stays full for ``put_timeout_s`` (the database cannot keep up) the message
  is dropped and counted (``litefleet_monitor_dropped_total``); blocking
  longer would stall paho's keep-alive.
- **the writer thread** (:meth:`Collector._write_loop`) takes whatever is
  queued (up to ``batch_max``), parses it (pure,
  :mod:`converter.monitor.payloads`), updates the live view and writes the
  batch in one SQLite transaction; it also prunes old rows every
  ``prune_interval_s``. It is the only thread that writes the database.
- any other thread (HTTP requests, the CLI's summary line) reads
  :meth:`Collector.snapshot`.

Subscriptions: ``state`` is always an ordinary subscription, because every
collector needs the whole fleet's state and the state is retained (brokers
differ on retained messages for shared subscriptions: the MQTT 5 spec says
they are not sent, Mosquitto 2.0 sends them; see ``docs/monitor.md``).
``events`` and ``metrics`` use ``$share/<group>/...`` when a share group is
given, so collectors with the same group split them message by message.
The host side's retained topics are ordinary subscriptions too (every collector
shows them whole): the rollout records (``rollouts/+``), the repository metadata
(``repo/metadata/+``, for its expiry dates) and the sites' status and bridge link
(``sites/+/status``, ``sites/+/bridge``). The
state is read at :data:`agent.mqtt.client.RETAINED_READ_QOS` (0): a stock
Mosquitto drops retained QoS 1 messages beyond 1,020 per subscriber.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.errors import StorageError
from agent.mqtt.client import RETAINED_READ_QOS, ConnectionSettings, MqttClient
from agent.mqtt.transport import Message
from agent.protocol import Topics
from converter.errors import BadInputError
from converter.monitor.live import FleetLive, FleetSnapshot
from converter.monitor.payloads import EventRecord, Malformed, StateRecord, after_will, parse_message
from converter.monitor.rollouts import RolloutCleared, RolloutView, parse_rollout
from converter.monitor.store import MonitorStore, Received

logger = logging.getLogger(__name__)

DAY_S = 86400.0
_STOP = object()


@dataclass(frozen=True)
class CollectorConfig:
    share_group: str | None = None
    retention_days: float = 30.0
    prune_interval_s: float = 3600.0
    batch_max: int = 5000
    queue_max: int = 200_000
    put_timeout_s: float = 5.0


def check_share_group(group: str) -> str:
    """A shared subscription group name: non-empty, no ``/``, ``+``, ``#``."""
    if not group or any(c in group for c in "/+#") or len(group) > 64:
        raise BadInputError(f"--share {group!r}: a group name is 1-64 characters without / + #")
    return group


def shared_filter(group: str | None, topic_filter: str) -> str:
    return f"$share/{group}/{topic_filter}" if group else topic_filter


def retention_cutoff(now: float, retention_days: float) -> float | None:
    return now - retention_days * DAY_S if retention_days > 0 else None


class Collector:
    """Subscribes, queues, parses, stores. :meth:`start`, then :meth:`stop` once."""

    def __init__(
        self,
        client: MqttClient,
        topics: Topics,
        store: MonitorStore,
        config: CollectorConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.topics = topics
        self.store = store
        self.config = config
        self._clock = clock
        self.live = FleetLive(started=clock())
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.queue_max)
        self._dropped = 0  # written by paho's thread only
        self._writer: threading.Thread | None = None
        self._next_prune = 0.0

    # -- lifecycle ------------------------------------------------------------------------
    def subscribe(self) -> None:
        """Register the subscriptions (made now if connected, and after every reconnect)."""
        t = self.topics
        self.client.subscribe(t.devices_filter("state"), self._on_message, qos=RETAINED_READ_QOS)
        group = self.config.share_group
        for leaf in ("events", "metrics"):
            self.client.subscribe(shared_filter(group, t.devices_filter(leaf)), self._on_message, qos=1)
        for host_filter in (
            t.rollouts_filter,
            t.metadata_filter,
            t.site("+", "status"),
            t.site("+", "bridge"),
        ):
            self.client.subscribe(host_filter, self._on_message, qos=1)

    def start(self, connect_timeout_s: float = 10.0) -> None:
        self._writer = threading.Thread(target=self._write_loop, name="monitor-writer", daemon=True)
        self._writer.start()
        self.subscribe()
        self.client.connect(connect_timeout_s)  # raises TransportError; then call stop()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Disconnect, write what is queued, close the database (safe to call twice)."""
        self.client.stop()
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join(timeout_s)
            if self._writer.is_alive():
                logger.warning("the monitor's writer did not finish within %.0f s", timeout_s)
            self._writer = None
        self.store.close()

    def snapshot(self) -> FleetSnapshot:
        return self.live.snapshot(
            self._clock(),
            queue_depth=self._queue.qsize(),
            dropped=self._dropped,
            broker_connected=self.client.connected,
        )

    def wait_idle(self, timeout_s: float) -> bool:
        """True once everything received so far is written (for tests and shutdown)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return self._queue.unfinished_tasks == 0

    # -- paho's thread ----------------------------------------------------------------------
    def _on_message(self, message: Message) -> None:
        try:
            self._queue.put((message, self._clock()), timeout=self.config.put_timeout_s)
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                logger.warning("the monitor's queue is full: %d messages dropped so far", self._dropped)

    # -- the writer thread ------------------------------------------------------------------
    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._maybe_prune()
                continue
            items = [first]
            while len(items) < self.config.batch_max:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if any(i is _STOP for i in items):
                stopping = True
                items = [i for i in items if i is not _STOP]
            try:
                self._write(items)
            finally:
                for _ in range(len(items) + (1 if stopping else 0)):
                    self._queue.task_done()
            self._maybe_prune()

    def _write(self, items: list[tuple[Message, float]]) -> None:
        if not items:
            return
        parsed: list[tuple[Received, bool]] = []
        rollouts: list[tuple[RolloutView | RolloutCleared | Malformed, float]] = []
        states: dict[str, StateRecord] = {}  # this batch's, not yet in the live view
        for message, received in items:
            where = self.topics.device_of(message.topic)
            if where is None:
                self._apply_host(message, received, rollouts)
                continue
            p = parse_message(where[1], where[0], message.payload)
            if isinstance(p, Malformed):
                logger.debug("ignored %s from %s: %s", p.kind, p.device_id, p.reason)
            elif isinstance(p, StateRecord):
                if p.will:
                    p = after_will(self._known_state(p.device_id, states), p)
                states[p.device_id] = p
            parsed.append((Received(p, received), message.retain))
        self.live.apply(parsed)
        self.live.apply_rollouts(r for r, _ in rollouts)
        batch = [r for r, _ in parsed]
        batch += [Received(r, when) for r, when in rollouts if isinstance(r, RolloutView)]
        cutoff = retention_cutoff(self._clock(), self.config.retention_days)
        try:
            result = self.store.write(batch, cutoff_ts=cutoff)
        except StorageError as exc:
            self.live.count_write_error()
            # the alert rules count events: better counted twice later than never
            self.live.count_events(r.parsed for r in batch if isinstance(r.parsed, EventRecord))
            logger.error("%s; %d messages not stored", exc, len(batch))
            return
        self.live.count_written(result)
        self.live.count_events(result.new_events)

    def _apply_host(
        self,
        message: Message,
        received: float,
        rollouts: list[tuple[RolloutView | RolloutCleared | Malformed, float]],
    ) -> None:
        """A host-side retained message: a rollout record, repository metadata or a site's."""
        t = self.topics
        name = t.metadata_filename(message.topic)
        if name is not None:
            self.live.apply_metadata(name, message.payload)
            return
        head = f"{t.base}/"
        parts = message.topic[len(head) :].split("/") if message.topic.startswith(head) else []
        if len(parts) == 2 and parts[0] == "rollouts" and parts[1]:
            record = parse_rollout(parts[1], message.payload)
            if isinstance(record, Malformed):
                logger.debug("ignored the rollout record of %s: %s", record.device_id, record.reason)
            rollouts.append((record, received))
        elif len(parts) == 3 and parts[0] == "sites" and parts[1]:
            self.live.apply_site(parts[1], parts[2], message.payload)

    def _known_state(self, device_id: str, batch: dict[str, StateRecord]) -> StateRecord | None:
        """What the monitor knew of the device before its will: this batch, the live view,
        else the database (a will that is the first message after the monitor started)."""
        known = batch.get(device_id) or self.live.state_of(device_id)
        if known is not None:
            return known
        try:
            return self.store.last_state(device_id)
        except StorageError as exc:
            logger.error("%s", exc)
            return None

    def _maybe_prune(self) -> None:
        now = self._clock()
        if now < self._next_prune:
            return
        self._next_prune = now + self.config.prune_interval_s
        cutoff = retention_cutoff(now, self.config.retention_days)
        if cutoff is None:
            return
        try:
            self.store.prune(cutoff)
        except StorageError as exc:
            logger.error("%s", exc)


def make_client(settings: ConnectionSettings) -> MqttClient:
    return MqttClient(settings)
