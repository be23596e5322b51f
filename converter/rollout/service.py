"""One controller process: an MQTT connection, the message feed, and the rollouts it drives.

:class:`Controller` is what ``litefleet rollout start`` (one rollout, in the foreground)
and ``litefleet rollout service`` (every rollout started with ``--detach``) run. It holds
each driven rollout's driver lock (:meth:`converter.rollout.store.RolloutStore.try_lock`)
for as long as it drives it.

Guarantees:

* the message feed subscribes before the client connects, so a persistent session's
  queued events (kept by the broker while a killed controller was away) reach the
  rollouts;
* a rollout is driven by at most one process (the driver lock); the service adopts a
  detached rollout only when nobody else holds it, and lets go when it ends (within the
  controller's tick);
* a step that fails for the repository's sake (a damaged repository, a key missing) stops
  only that rollout in the service (logged, retried at the next scan); in the foreground
  it is the command's error.

Threads: as :mod:`converter.rollout.controller`: everything here runs on the thread that
calls :meth:`Controller.run`, paho's thread only queues messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from agent.errors import LitefleetError, TransportError
from agent.mqtt.client import MqttClient
from agent.protocol import Topics
from converter.monitor.payloads import Parsed, StateCleared, StateRecord
from converter.repo.publish import RepoPublisher
from converter.rollout.controller import (
    ControllerSettings,
    MessageFeed,
    RolloutDriver,
    UpdateFn,
    record_publisher,
    run_drivers,
)
from converter.rollout.record import RolloutRecord
from converter.rollout.selection import KnownDevice
from converter.rollout.signer import StepSigner
from converter.rollout.store import DriverLock, RolloutStore

logger = logging.getLogger(__name__)

SCAN_EVERY_S = 5.0


class Controller:
    """Drives rollouts over one MQTT connection. Construct it before ``client.connect()``."""

    def __init__(
        self,
        repo_dir: Path,
        client: MqttClient,
        topics: Topics,
        *,
        settings: ControllerSettings | None = None,
        on_update: UpdateFn | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.repo_dir = repo_dir
        self.client = client
        self.topics = topics
        self.settings = settings or ControllerSettings()
        self.store = RolloutStore(repo_dir)
        self.feed = MessageFeed(client, topics, self.settings.max_pending)
        self.signer = StepSigner(repo_dir, self.store, lambda: RepoPublisher(client, topics), clock)
        self._clock = clock
        self._on_update = on_update
        self.drivers: dict[str, RolloutDriver] = {}
        self._locks: dict[str, DriverLock] = {}
        self._early: list[Parsed] = []
        self._devices: dict[str, KnownDevice] = {}

    def known_devices(self, timeout_s: float = 10.0) -> list[KnownDevice]:
        """Every device whose retained state the broker holds (after the sync barrier)."""
        self.client.sync()
        if not self.client.wait_synced(timeout_s):
            raise TransportError("the broker did not answer the device state subscription")
        for msg in self.feed.drain(0.0):
            self._early.append(msg)
            if isinstance(msg, StateRecord):
                self._devices[msg.device_id] = KnownDevice(msg.device_id, msg.groups)
            elif isinstance(msg, StateCleared):
                self._devices.pop(msg.device_id, None)
        return sorted(self._devices.values(), key=lambda d: d.device_id)

    def adopt(self, record: RolloutRecord, lock: DriverLock) -> RolloutDriver:
        """Drive ``record`` from now on (its lock is ours until it ends or we stop)."""
        driver = RolloutDriver(
            record,
            store=self.store,
            signer=self.signer,
            publish=record_publisher(self.client, self.topics),
            clock=self._clock,
            settings=self.settings,
            on_update=self._on_update,
        )
        for msg in self._early:
            driver.feed(msg)
        self.drivers[record.name] = driver
        self._locks[record.name] = lock
        return driver

    def release(self, name: str) -> None:
        self.drivers.pop(name, None)
        lock = self._locks.pop(name, None)
        if lock is not None:
            lock.release()

    def release_all(self) -> None:
        for name in list(self.drivers):
            self.release(name)

    def run(
        self,
        until: Callable[[], bool],
        between: Callable[[], None] | None = None,
        on_error: Callable[[str, LitefleetError], None] | None = None,
    ) -> None:
        run_drivers(
            self.drivers, self.feed, until=until, settings=self.settings, between=between, on_error=on_error
        )


class RolloutService:
    """``litefleet rollout service``: adopt every detached rollout nobody drives, drive it to its end."""

    def __init__(self, controller: Controller, *, scan_every_s: float = SCAN_EVERY_S) -> None:
        self.controller = controller
        self.scan_every_s = scan_every_s
        self._next_scan = 0.0
        self._failed: dict[str, str] = {}

    def release_finished(self) -> None:
        """Let go of every rollout that ended (its lock too: a new ``rollout start`` of the
        same model may begin at once)."""
        c = self.controller
        for name, driver in list(c.drivers.items()):
            if driver.record.state.terminal:
                logger.info("rollout %s v%s %s", name, driver.record.version, driver.record.state)
                c.release(name)

    def scan(self) -> list[str]:
        """Adopt detached rollouts that are not finished and not driven; drop finished ones."""
        c = self.controller
        self.release_finished()
        adopted = []
        for name in c.store.names():
            if name in c.drivers:
                continue
            try:
                record = c.store.load(name)
            except LitefleetError as exc:
                self._log_once(name, str(exc))
                continue
            if record is None or not record.detached or record.state.terminal:
                continue
            lock = c.store.try_lock(name)
            if lock is None:
                continue
            c.adopt(record, lock)
            adopted.append(name)
            logger.info("driving rollout %s v%s (%s)", name, record.version, record.state)
        return adopted

    def _log_once(self, name: str, message: str) -> None:
        if self._failed.get(name) != message:
            self._failed[name] = message
            logger.error("rollout %s: %s", name, message)

    def between(self) -> None:
        # every tick: a rollout that ended (an abort applied, the last wave signed) does not
        # keep its lock until the next scan (`rollout start` of the model refused meanwhile)
        self.release_finished()
        now = time.monotonic()
        if now >= self._next_scan:
            self._next_scan = now + self.scan_every_s
            self.scan()

    def on_error(self, name: str, exc: LitefleetError) -> None:
        """A step failed for the repository's sake: let that rollout go (its intent stays
        recorded; the next scan tries it again)."""
        self._log_once(name, str(exc))
        self.controller.release(name)

    def run(self, until: Callable[[], bool], tick: Callable[[], None] | None = None) -> None:
        def between() -> None:
            self.between()
            if tick is not None:
                tick()

        self.scan()
        self.controller.run(until, between, self.on_error)
