"""The agent daemon: wires the pieces together and runs the work loop.

Threads and what runs on them:

* paho's network thread: copies messages into queues, publishes the
  ``online`` state after each connect. Nothing slow.
* the main thread (:meth:`Agent.run`): refreshes metadata, downloads,
  checks and activates models, judges models on trial, sends metrics, feeds
  the systemd watchdog. Only this thread changes the state file.
* REST server threads and the MQTT inference worker: read the registry and
  run inference; they never change state.

The loop catches only :class:`agent.errors.LitefleetError` subclasses;
anything else is a bug and ends the process (systemd restarts it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from agent import __version__
from agent.activation.check import Isolation
from agent.activation.manager import ModelManager
from agent.activation.shadowing import ShadowManager
from agent.activation.store import ModelStore, StateFile
from agent.delivery.metadata import RetainedMetadata
from agent.delivery.updater import ModelUpdater, read_trusted_root
from agent.errors import (
    ConfigError,
    ModelRejectedError,
    NoRepositoryError,
    StorageError,
    TransportError,
)
from agent.logs import event_level
from agent.logs import fields as log_fields
from agent.mqtt.client import RETAINED_READ_QOS, MqttClient
from agent.mqtt.network import SharedNetwork
from agent.mqtt.transport import Message
from agent.protocol import Topics
from agent.reasons import PERMANENT, Reason
from agent.service.config import AgentConfig
from agent.service.connection import connection_settings
from agent.service.memory import release_free_memory, tune_allocator
from agent.service.sdnotify import Notifier, status_line
from agent.service.work import RefreshOutcome, Work, coalesce, retry_after
from agent.serving.mqtt_requests import InferWorker
from agent.serving.registry import ModelRegistry
from agent.serving.rest import RestServer
from agent.serving.runtime import resolve_runtime
from agent.serving.stats import ApiCounters, StatsSnapshot
from agent.state_message import (
    DeviceStatus,
    Served,
    served,
    standing_model,
    state_document,
    will_document,
)
from agent.telemetry.metrics import DeviceProbe, MetricsRecorder, MetricsReporter
from agent.telemetry.metrics_queue import MetricsQueue, QueueSender
from agent.telemetry.uplink import FILE_NAME as UPLINK_FILE
from agent.telemetry.uplink import RESEND_S, SiteUplink

logger = logging.getLogger(__name__)


class Agent:
    """One device agent. ``start()`` then ``run()`` (blocking), or ``start()`` and
    ``stop()`` around an embedding application's own loop."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        notifier: Any = None,
        clock: Callable[[], float] = time.monotonic,
        network: SharedNetwork | None = None,
        isolate_checks: bool = True,
        cpu_gate: AbstractContextManager[Any] | None = None,
        tick_s: float = 1.0,
    ) -> None:
        """``network``, ``isolate_checks=False``, ``cpu_gate`` and ``tick_s``: a simulated
        device of :mod:`agent.service.simulate` (its connection on a shared network thread, its
        candidate checks in-process, as where no child process can be forked, its CPU-heavy steps
        taken under a gate the devices of the process share, a longer idle wait)."""
        self._cpu_gate = cpu_gate or contextlib.nullcontext()
        tune_allocator()  # the download's chunk-sized buffers stay in the heap (memory.py)
        self.cfg = cfg
        self.topics = Topics(cfg.topic_prefix)
        self.registry = ModelRegistry()
        self._clock = clock
        self._notifier = notifier
        self._work: queue.Queue[Work] = queue.Queue()
        self._stop = threading.Event()
        # set by a signal handler: a plain attribute, because a handler must take no lock
        # (the main thread it interrupts may hold the queue's or the logging's)
        self._signalled: int | None = None
        self.status = DeviceStatus.STARTING
        self.error: str | None = None
        self._last_reported: tuple[str, str] | None = None
        # metadata changes seen on paho's thread, and how many the last refresh covered
        self._meta_changes = 0
        self._seen_changes = -1
        # events carry (boot, seq): QoS 1 is at-least-once, consumers drop repeats
        self.boot_id = uuid.uuid4().hex[:12]
        self._event_seq = 0
        self.started_at = time.time()
        self.ready_at: float | None = None
        self._notified_status = ""
        self._last_served = Served(0, None)
        self._shutting_down = False
        self._stopped_as_asked = False  # the loop ended on stop(), not on an exception
        self.tick_s = tick_s  # the loop's longest wait (watchdog, trial deadlines)

        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = ModelStore(cfg.state_dir)
        trusted_root = read_trusted_root(cfg.trusted_root)
        # the previous versions a rollout asks to run as shadows; its thread starts with the first
        self.shadows = ShadowManager(
            registry=self.registry,
            store=self.store,
            max_bytes=cfg.shadow_max_bytes,
            threads=cfg.threads,
            runtime=cfg.runtime,
        )
        self.cache = RetainedMetadata(self.topics, on_change=self._on_metadata_change)
        self.manager = ModelManager(
            store=self.store,
            state_file=StateFile(cfg.state_dir / "state.json"),
            registry=self.registry,
            threads=cfg.threads,
            runtime=cfg.runtime,
            max_crash_restarts=cfg.max_crash_restarts,
            probation_inferences=cfg.probation_inferences,
            probation_s=cfg.probation_s,
            check_timeout_s=cfg.check_timeout_s,
            isolation=Isolation(cfg.check_isolation) if isolate_checks else Isolation.NONE,
            event=self.event,
            clock=clock,
            tick=self._tick,  # a candidate's check may take seconds: the loop is alive meanwhile
            shadows=self.shadows,
        )
        # the will (set in start) holds nothing an activation changes: it is never renewed
        self.client = MqttClient(connection_settings(cfg, b""), network=network)
        self.updater = ModelUpdater(
            device_id=cfg.device_id,
            groups=cfg.groups,
            trusted_root=trusted_root,
            client=self.client,
            topics=self.topics,
            store=self.store,
            cache=self.cache,
            window=cfg.download_window,
            max_model_bytes=cfg.max_model_bytes,
            event=self.event,
            tick=self._tick,
            wait_synced=self._wait_synced,
            cpu_gate=self._cpu_gate,
        )
        # the service face: REST, MQTT inference, metrics through the on-disk queue
        self.counters = ApiCounters()
        self.rest = RestServer.from_config(cfg, self.registry, counters=self.counters)
        self.infer = InferWorker(
            self.registry, self.client, counters=self.counters, max_payload_bytes=cfg.http_max_body_bytes
        )
        # behind a site broker, what it is told about its uplink holds metrics and events, and
        # what the broker acknowledged just before an outage goes again (telemetry/uplink.py)
        self.metrics_queue = MetricsQueue.in_state_dir(
            cfg.state_dir, max_rows=cfg.metrics_queue_max_rows, keep_acked_s=RESEND_S if cfg.site else 0.0
        )
        self.uplink = SiteUplink(
            self.client,
            site=cfg.site,
            on_up=lambda: self.sender.wake(),
            on_down=lambda: self.sender.rewind(),
            path=cfg.state_dir / UPLINK_FILE,
        )
        # woken when a message is queued and on each connect; its own look every 30 s is a
        # safety net (every 1 s it cost 0.3-2 ms per second per idle agent, 100 agents on
        # this 2-core VM: 3-20 % of a core, issue 11)
        self.sender = QueueSender(self.metrics_queue, self.client, idle_s=30.0, may_send=self.uplink.may_send)
        self.reporter = MetricsReporter(
            device_id=cfg.device_id,
            topic=self.topics.metrics(cfg.device_id),
            recorder=MetricsRecorder(self.registry, counters=self.counters),
            probe=DeviceProbe(cfg.state_dir),
            queue=self.metrics_queue,
            agent_version=__version__,
            boot=self.boot_id,
            on_queued=self.sender.wake,
            uplink=self.uplink.report,
        )
        self._notifier = notifier if notifier is not None else Notifier()

    # -- events and state ------------------------------------------------------------
    def event(self, kind: str, **fields: Any) -> None:
        """Publish an event, or hold it while not connected or while a site's uplink is
        down (:mod:`agent.telemetry.uplink`)."""
        self._event_seq += 1
        payload = {
            "ts": round(time.time(), 3),
            "device_id": self.cfg.device_id,
            "event": kind,
            "seq": self._event_seq,
            "boot": self.boot_id,
            **fields,
        }
        logger.log(event_level(kind, fields), "%s", kind, extra=log_fields(event=kind, **fields))
        if kind == "downloading":
            self._set_status(DeviceStatus.DOWNLOADING)
        with contextlib.suppress(TransportError):
            self.uplink.send_event(self.topics.events(self.cfg.device_id), json.dumps(payload).encode())

    def _snapshots(self) -> dict[str, StatsSnapshot]:
        return {name: m.runner.stats.snapshot() for name, m in self.registry.snapshot().items()}

    def _served(self) -> Served:
        return served(standing_model(self.manager.summary()), self._snapshots())

    def _state_payload(self, *, online: bool) -> bytes:
        doc = state_document(
            device_id=self.cfg.device_id,
            online=online,
            status=self.status,
            error=self.error,
            models=self.manager.summary(),
            snapshots=self._snapshots(),
            groups=self.cfg.groups,
            repo_version=self.updater.repo_version,
            agent_version=__version__,
            boot=self.boot_id,
            ts=time.time(),
            site=self.cfg.site,
            refused=self.manager.refusals(),
        )
        return json.dumps(doc).encode()

    def _will_payload(self) -> bytes:
        """The will for the next connection (asked before each connect, docs/protocol.md 6.1)."""
        doc = will_document(device_id=self.cfg.device_id, boot=self.boot_id, ts=time.time())
        return json.dumps(doc).encode()

    def publish_state(self) -> None:
        with contextlib.suppress(TransportError):
            self.client.publish(
                self.topics.state(self.cfg.device_id), self._state_payload(online=True), qos=1, retain=True
            )

    def _set_status(
        self, status: DeviceStatus, error: str | None = None, *, keep_error: bool = False
    ) -> bool:
        """Set status (and error); publish the state if either changed. True if it published."""
        changed = status != self.status or (not keep_error and error != self.error)
        self.status = status
        if not keep_error:
            self.error = error
        if changed:
            self.publish_state()
        return changed

    # -- paho thread -------------------------------------------------------------------
    def _on_metadata_change(self, name: str) -> None:
        if name == "timestamp.json" or name.endswith(".root.json"):
            self._meta_changes += 1
            self._work.put(Work.REFRESH)

    def _on_connected(self) -> None:
        if self._shutting_down:
            return
        self.publish_state()
        self.uplink.on_connected()  # events made while not connected (start-up's too)
        self._work.put(Work.WAKE)  # readiness may be due now: don't wait for the next tick
        self.sender.wake()  # replay what was queued while offline

    def _on_infer(self, message: Message) -> None:
        # paho thread: only queue. Answer only where this device may publish.
        if message.response_topic and not self.topics.reply_allowed(
            self.cfg.device_id, message.response_topic
        ):
            logger.debug("inference request with response topic %.80s refused", message.response_topic)
            return
        self.infer.submit(message)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Load active models, connect, start serving. Returns at once."""
        runtime = resolve_runtime(self.cfg.runtime)
        logger.info(
            "starting",
            extra=log_fields(
                agent_version=__version__,
                device_id=self.cfg.device_id,
                runtime=runtime.name,
                runtime_version=runtime.version,
            ),
        )
        self.manager.start()
        self.status = self._serving_status()
        if self.manager.last_error:
            self.error = ": ".join(self.manager.last_error)
        self.client.set_will(self._will_payload)
        self.client.add_connect_listener(self._on_connected)
        self.client.subscribe(self.topics.metadata_filter, self.cache.handle, qos=RETAINED_READ_QOS)
        self.client.subscribe(self.topics.infer(self.cfg.device_id), self._on_infer, qos=0)
        if self.cfg.site:
            bridge = self.topics.site(self.cfg.site, "bridge")
            self.client.subscribe(bridge, self.uplink.handle, qos=RETAINED_READ_QOS)
        if self.rest is not None:
            try:
                self.rest.start()
            except OSError as exc:
                raise ConfigError(f"cannot serve the REST API on {self.cfg.http}: {exc.strerror}") from exc
        self.infer.start()
        self.sender.start()
        self.client.start()
        self._work.put(Work.REFRESH_NOW)

    def stop(self) -> None:
        self._stop.set()
        self._work.put(Work.STOP)

    def shutdown(self) -> None:
        """Say goodbye on the broker (retained state: offline), stop serving, disconnect."""
        self._notifier.stopping("stopping")
        self._shutting_down = True  # a reconnect from now on must not announce "online"
        # a reconnect may be under way (a lost connection): let it finish, or the goodbye
        # would be lost and the retained state would stay "online"
        self.client.wait_connected(3.0)
        with contextlib.suppress(TransportError):  # client.stop() waits (bounded) for its PUBACK
            self.client.publish(
                self.topics.state(self.cfg.device_id), self._state_payload(online=False), qos=1, retain=True
            )
        if self.rest is not None:
            self.rest.stop()
        self.infer.stop()
        self.shadows.close()
        self.sender.stop()
        self.client.stop()
        self.metrics_queue.close()
        if self._stopped_as_asked:
            try:
                self.manager.record_clean_stop()
            except StorageError as exc:
                logger.warning("could not record the clean stop (the next start counts as a crash): %s", exc)

    def _wait_synced(self, timeout_s: float) -> bool:
        synced = self.client.wait_synced(timeout_s)
        if synced:
            # this refresh reads the cache as it is now: it covers every change so far
            self._seen_changes = self._meta_changes
        return synced

    def _tick(self) -> None:
        """Called from the work loop and from inside long downloads: feeds the watchdog."""
        self._notifier.watchdog()

    def _should_stop(self) -> bool:
        return self._stop.is_set() or self._signalled is not None

    def stop_from_signal(self, signum: int) -> None:
        """Ask the work loop to stop, from a signal handler: no lock, no logging (the loop
        notices within its 1 s tick and logs it)."""
        self._signalled = signum

    def run(self) -> None:
        """The work loop; returns after :meth:`stop`."""
        # start() queued the first refresh
        next_refresh = self._clock() + self.cfg.refresh_interval_s
        next_metrics = self._clock() + self.cfg.metrics_interval_s
        fails = 0
        self._maybe_ready()  # before the first refresh, which may wait for the broker
        while not self._should_stop():
            now = self._clock()
            timeout = max(0.0, min(next_refresh - now, next_metrics - now, self.tick_s))
            try:
                item = coalesce(self._work.get(timeout=timeout), self._work)
            except queue.Empty:
                item = Work.TICK
            if item is Work.STOP:
                break
            self._tick()
            # a metadata change already seen by the last refresh needs no other
            wanted = item is Work.REFRESH_NOW or (
                item is Work.REFRESH and self._meta_changes != self._seen_changes
            )
            if wanted or self._clock() >= next_refresh:
                retry = retry_after(self.refresh_once(), fails, self.cfg.refresh_interval_s)
                fails = retry.fails
                next_refresh = self._clock() + retry.delay_s
                release_free_memory()
            self.manager.poll_trials()
            if self._clock() >= next_metrics:
                self.reporter.report_once()
                next_metrics = max(next_metrics + self.cfg.metrics_interval_s, self._clock())
                # the retained state carries the inference count and p50 for `status`
                figures = self._served()
                if figures != self._last_served:
                    self._last_served = figures
                    self.publish_state()
            self._maybe_ready()
        if self._signalled is not None:
            logger.info("signal %s: stopping", signal.Signals(self._signalled).name)
        self._stopped_as_asked = True

    def refresh_once(self) -> RefreshOutcome:
        """One refresh, and how it ended (the loop's retry policy reads it)."""
        try:
            result = self.updater.refresh(self.manager.state, self._should_stop)
        except NoRepositoryError:
            # connected and synced, and there is nothing to fetch yet: ready; the first
            # push's metadata wakes the loop
            self._set_status(self._serving_status(), None)
            return RefreshOutcome.NO_REPOSITORY
        except ModelRejectedError as exc:
            self._report_failure(exc.reason, str(exc))
            if exc.reason is Reason.MISSING_METADATA:  # a push still on its way, most likely
                return RefreshOutcome.TRANSPORT
            return RefreshOutcome.FAILED
        except TransportError as exc:
            logger.info("refresh postponed: %s", exc)
            self._set_status(self._serving_status(), keep_error=True)
            return RefreshOutcome.TRANSPORT
        except StorageError as exc:
            self._report_failure(Reason.STORAGE, str(exc))
            return RefreshOutcome.FAILED
        for name, failure in sorted(result.failures.items()):
            if failure.reason in PERMANENT:
                self.manager.refuse(name, failure.version, failure.sha256, failure.reason, failure.message)
            else:
                self._report_failure(failure.reason, failure.message, model=name, version=failure.version)
        for cand in result.candidates:
            self._set_status(DeviceStatus.CHECKING, keep_error=True)
            with self._cpu_gate:
                self.manager.consider(cand)
        self.manager.cleanup()
        self.manager.apply_shadows(result.chosen)
        transient = any(f.reason not in PERMANENT for f in result.failures.values())
        if self.manager.last_error and (result.candidates or result.failures):
            self.error = ": ".join(self.manager.last_error)
        elif not transient:
            self.error = None
            self._last_reported = None
        # the state carries the models and repo_version too: publish it once either way
        if not self._set_status(self._serving_status(), self.error):
            self.publish_state()
        return RefreshOutcome.FAILED if transient else RefreshOutcome.OK

    def _status_text(self) -> str:
        busy = self.status if self.status in (DeviceStatus.DOWNLOADING, DeviceStatus.CHECKING) else None
        return status_line(
            self.manager.summary(), busy, self.client.connected, self.cfg.broker_address, self.error
        )

    def _maybe_ready(self) -> None:
        """READY=1 at the work loop's start: the installed models are loaded and REST listens,
        so the device serves, broker or not (it serves offline). Then STATUS= on each change."""
        text = self._status_text()
        if self.ready_at is None:
            self.ready_at = time.time()
            # logged first: in the journal this line precedes systemd's "Started" (one socket)
            after_s = self.ready_at - self.started_at
            logger.info("ready %.2f s after start", after_s, extra=log_fields(event="ready"))
            self._notifier.ready(text)
        elif text != self._notified_status:
            self._notifier.status(text)
        self._notified_status = text

    def _serving_status(self) -> DeviceStatus:
        return DeviceStatus.SERVING if self.registry.names() else DeviceStatus.IDLE

    def _report_failure(self, reason: Reason, message: str, **fields: Any) -> None:
        key = (reason, message)
        if key != self._last_reported:
            self._last_reported = key
            self.event("rejected", reason=reason, message=message, **fields)
        self._set_status(self._serving_status(), f"{reason}: {message}")


def install_signal_handlers(agent: Agent) -> None:
    # A handler runs between two bytecodes of the main thread, which may hold the work
    # queue's lock or be inside a logging call on stderr: logging from here raised
    # "reentrant call inside <_io.BufferedWriter name='<stderr>'>" (seen under emulation).
    def handle(signum: int, frame: Any) -> None:
        agent.stop_from_signal(signum)

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
