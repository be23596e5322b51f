"""The rollout controller: feeds the fleet's messages to rollouts and carries out their steps.

Pieces, from pure to I/O:

- :class:`RolloutDriver` drives one rollout: each :meth:`RolloutDriver.step` finishes a
  step under way (:class:`~converter.rollout.signer.StepSigner`), applies an operator's
  request, evaluates the gates over the :class:`~converter.rollout.observe.FleetObserver`'s
  window, decides (:func:`~converter.rollout.decide.decide`), records, and publishes the
  retained rollout record. Every change of state is written to the store *before* it is
  acted on;
- :class:`MessageFeed` hands device messages from paho's thread to the controller's
  thread through a bounded queue;
- :func:`run_drivers` is the loop both the foreground command and the service run.

Threads: paho's network thread only runs :meth:`MessageFeed._handle` (a queue put); the
thread that calls :func:`run_drivers` owns every driver, observer, record and the store.

Guarantees:

* a driver never decides while a step is under way, and finishes a step found on start
  before anything else (a resumed controller continues where the killed one was);
* the retained record on ``<prefix>/v1/rollouts/<name>`` is republished on every change of
  state, wave or verdict, and at most every ``publish_every_s`` while values move; a
  broker that is away delays it, never the rollout's decisions;
* a broker that is away during a step leaves the intent in place: the step is retried at
  the next tick (signing is idempotent, publishing retained messages too).
"""

from __future__ import annotations

import json
import logging
import queue
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import LitefleetError, StorageError, TransportError
from agent.mqtt.client import RETAINED_READ_QOS, MqttClient
from agent.mqtt.transport import Message
from agent.protocol import Topics
from converter.crash_points import crash_point
from converter.monitor.payloads import Parsed, parse_message
from converter.monitor.sketches import parse_baseline
from converter.rollout.decide import ActionKind, decide, with_action, with_observation, with_request
from converter.rollout.gates import GateResult, evaluate
from converter.rollout.observe import FleetObserver
from converter.rollout.record import RolloutRecord, RolloutState, StepKind
from converter.rollout.signer import StepSigner
from converter.rollout.store import RolloutStore

logger = logging.getLogger(__name__)

WATCHED = (RolloutState.BAKING, RolloutState.PAUSED, RolloutState.HOLDING)
UpdateFn = Callable[[RolloutRecord, tuple[GateResult, ...]], None]


@dataclass(frozen=True)
class ControllerSettings:
    tick_s: float = 1.0
    # the retained record while only gate values move, and the record file likewise
    publish_every_s: float = 5.0
    save_every_s: float = 5.0
    max_pending: int = 100_000
    # before signing the first wave, wait (at most this long) until every device it selects
    # has reported metrics on the previous version: the controls' and each canary's own
    # "before" (agents report every metrics_interval_s, 10 s by default)
    warmup_s: float = 15.0
    # latency is counted from this fraction of the bake on (after the wave's start, or after
    # this controller's start when it resumed a wave): the canaries' first requests come
    # while they (and, on a shared host, their neighbours) load and check the new version.
    # Measured with 20 agents on 2 cores: a second wave's canary/control p99 ratio of two
    # equal models read 8, 2, 3.1, 3.6 in its first 8 s, counted from the start
    latency_settle_bakes: float = 0.25


class MessageFeed:
    """Device state, events and metrics, from paho's thread to the controller's."""

    def __init__(self, client: MqttClient, topics: Topics, max_pending: int = 100_000) -> None:
        self.topics = topics
        self._queue: queue.Queue[tuple[str, str, bytes]] = queue.Queue(max_pending)
        self.dropped = 0
        # states at RETAINED_READ_QOS (0): retained, the newest is the one that counts, and
        # a reconnect's re-subscribe brings them all again. At QoS 1 Mosquitto sent only an
        # in-flight window of them before the sync barrier that says "every device known"
        # (docs/protocol.md 3.3): 50 of 150 (tests/converter/rollout/test_cli.py), and fewer
        # when events the session kept took the slots first: a rollout of 20 real agents
        # knew 13 and refused its first wave (a CI run).
        # events at QoS 1: a persistent session keeps them while the controller is away;
        # metrics at QoS 0: cumulative counters, the next message makes up for a lost one
        client.subscribe(topics.devices_filter("state"), self._handle, RETAINED_READ_QOS)
        client.subscribe(topics.devices_filter("events"), self._handle, 1)
        client.subscribe(topics.devices_filter("metrics"), self._handle, 0)

    def _handle(self, msg: Message) -> None:  # paho thread: only queue it
        dev = self.topics.device_of(msg.topic)
        if dev is None:
            return
        try:
            self._queue.put_nowait((dev[1], dev[0], msg.payload))
        except queue.Full:
            self.dropped += 1

    def drain(self, timeout_s: float) -> list[Parsed]:
        """Every message queued, parsed; waits up to ``timeout_s`` for the first."""
        out: list[Parsed] = []
        try:
            item = self._queue.get(timeout=timeout_s) if timeout_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            return out
        while True:
            leaf, device_id, payload = item
            out.append(parse_message(leaf, device_id, payload))
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return out


def _progress_key(record: RolloutRecord) -> tuple[Any, ...]:
    cur = record.current
    verdicts = tuple(sorted((k, v.get("verdict")) for k, v in (cur.gates if cur else {}).items()))
    return (record.state, record.wave, record.intent, verdicts, record.reason)


class RolloutDriver:
    """Drives one rollout. Owned by the controller's thread."""

    def __init__(
        self,
        record: RolloutRecord,
        *,
        store: RolloutStore,
        signer: StepSigner,
        publish: Callable[[str, bytes], None] | None = None,
        clock: Callable[[], float] = time.time,
        settings: ControllerSettings | None = None,
        on_update: UpdateFn | None = None,
    ) -> None:
        self.record = record
        self.store = store
        self.signer = signer
        self._publish = publish
        self._clock = clock
        self.settings = settings or ControllerSettings()
        self._on_update = on_update
        self.observer = FleetObserver(record.name, record.version, record.previous, record.spec.target)
        self.observer.seed(dict(record.self_before), dict(record.ignored))
        self.baseline = parse_baseline(record.baseline)[0] if record.baseline is not None else None
        self.results: tuple[GateResult, ...] = ()
        self._window: float | None = None
        self._saved_at = self._published_at = 0.0
        self._published_key: tuple[Any, ...] | None = None
        self._wire_dirty = True
        self._adopted = clock()

    # -- messages ----------------------------------------------------------------------------
    def feed(self, msg: Parsed) -> None:
        self.observer.on_message(msg)

    # -- one tick ------------------------------------------------------------------------------
    def step(self) -> RolloutRecord:
        now = self._clock()
        if self.record.intent is not None and self._ready_to_sign(now):
            self._carry_out()
        self._apply_request(now)
        if self.record.intent is not None and self._ready_to_sign(now):
            self._carry_out()
        if self.record.state in WATCHED:
            self._judge(now)
        self._maybe_publish(now)
        if self.record.state.terminal:
            self.store.drop_files(self.record.name)
        return self.record

    def _ready_to_sign(self, now: float) -> bool:
        """False while the first wave waits for its devices' first metrics (bounded)."""
        intent = self.record.intent
        if intent is None or intent.kind is not StepKind.SIGN_WAVE or intent.wave != 0 or self.record.steps:
            return True
        if now - self._adopted >= self.settings.warmup_s:
            return True
        chosen = self.observer.selected(self.record.spec.rule(0))
        return all(self.observer.reported(d, self.observer.previous) for d in chosen)

    def _save(self, record: RolloutRecord) -> None:
        self.store.save(record)
        self.record = record
        self._saved_at = self._clock()
        self._wire_dirty = True

    def _carry_out(self) -> None:
        try:
            done = self.signer.carry_out(self.record)
        except TransportError as exc:
            logger.warning(
                "rollout %s: the broker did not take the step yet (%s); retrying", self.record.name, exc
            )
            return
        self._save(done)
        crash_point("rollout-recorded")
        if done.state.terminal:
            self.store.archive(done)
        self._notify()

    def _apply_request(self, now: float) -> None:
        request = self.store.request(self.record.name)
        if request is None or self.record.intent is not None:
            return
        changed = with_request(self.record, request, now)
        if changed is not self.record:
            self._save(changed)
            logger.info("rollout %s: %s by the operator", self.record.name, request)
        self.store.clear_request(self.record.name)
        self._notify()

    def _judge(self, now: float) -> None:
        record = self.record
        if record.wave_started != self._window:
            self.observer.start_window()
            self._window = record.wave_started
        # a controller that (re)starts in the middle of a wave settles too: the canaries
        # it first sees may have switched a moment before it started
        window_start = max(record.wave_started or now, self._adopted)
        if now - window_start >= record.spec.bake_s * self.settings.latency_settle_bakes:
            self.observer.start_latency_window()
        evidence, devices = self.observer.evidence(record.spec.rule(record.wave), self.baseline)
        self.results = evaluate(evidence, record.spec.gates, record.spec.min_samples)
        observed = with_observation(
            record,
            self.results,
            devices,
            now,
            self_before=self.observer.self_before,
            ignored=dict(self.observer.ignored),
        )
        action = decide(observed, self.results, now)
        if action.kind is ActionKind.OBSERVE:
            self.record = observed
            if now - self._saved_at >= self.settings.save_every_s:
                self._save(observed)
            self._notify()
            return
        logger.info("rollout %s wave %d: %s %s", record.name, record.wave, action.kind, action.reason or "")
        self._save(with_action(observed, action, now))
        self._notify()
        if self.record.intent is not None:
            self._carry_out()

    def _notify(self) -> None:
        if self._on_update is not None:
            self._on_update(self.record, self.results)

    def _maybe_publish(self, now: float) -> None:
        if self._publish is None:
            return
        key = _progress_key(self.record)
        due = now - self._published_at >= self.settings.publish_every_s
        if key == self._published_key and not (due and self._wire_dirty):
            return
        try:
            self._publish(self.record.name, json.dumps(self.record.to_wire(), sort_keys=True).encode())
        except TransportError as exc:
            logger.debug("rollout record not published: %s", exc)
            return
        self._published_key, self._published_at, self._wire_dirty = key, now, False

    def touch(self) -> None:
        """Gate values moved: the next publish may send them."""
        self._wire_dirty = True


def record_publisher(client: MqttClient, topics: Topics) -> Callable[[str, bytes], None]:
    def publish(name: str, payload: bytes) -> None:
        client.publish(topics.rollout(name), payload, qos=1, retain=True)

    return publish


def run_drivers(
    drivers: Mapping[str, RolloutDriver],
    feed: MessageFeed,
    *,
    until: Callable[[], bool],
    settings: ControllerSettings | None = None,
    between: Callable[[], None] | None = None,
    on_error: Callable[[str, LitefleetError], None] | None = None,
) -> None:
    """Feed messages and step every driver each tick until ``until()``. A driver's
    :class:`~agent.errors.LitefleetError` goes to ``on_error`` (None: it is raised)."""
    tick = (settings or ControllerSettings()).tick_s
    next_tick = time.monotonic()
    while not until():
        for msg in feed.drain(max(0.0, next_tick - time.monotonic())):
            for driver in list(drivers.values()):
                driver.feed(msg)
                driver.touch()
        if time.monotonic() < next_tick:
            continue
        next_tick = time.monotonic() + tick
        for name, driver in list(drivers.items()):
            try:
                driver.step()
            except StorageError as exc:  # a full or read-only disk: try again next tick
                logger.error("rollout %s: %s", name, exc)
            except LitefleetError as exc:
                if on_error is None:
                    raise
                on_error(name, exc)
        if between is not None:
            between()
