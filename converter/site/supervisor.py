"""A site broker: the secure Mosquitto, its bridge to central through the relay, the
prune after each reconnect, a status report, and a watchdog that restarts what hangs.

``litefleet broker --secure SITE_DIR --upstream mqtts://central:8883`` runs one
:class:`SiteSupervisor` (docs/sites.md). Devices use the site broker exactly as
they would use a central one.

Guarantees:

* Mosquitto is restarted (SIGKILL, then started again on the same ports with the
  same persistence file) when it exits or when the watchdog finds it hung; it
  dies with this process (``PR_SET_PDEATHSIG``); more than ``max_restarts`` in
  ``restart_window_s`` raise :class:`~agent.errors.TransportError` (the command
  exits 1 and its service manager takes over);
* after each bridge session central accepts, once the re-send has gone quiet
  (``prune_quiet_s`` without a byte down, at most ``prune_max_wait_s``), and every
  ``prune_interval_s`` while the link is up, the site's repository is pruned
  against central's (:mod:`converter.site.prune`); a failed prune is retried;
* the status (:func:`status_document`) is written to ``DATA/site-status.json``
  when it changes (at most once per tick) and published retained on
  ``<prefix>/v1/sites/<name>/status`` every ``status_interval_s``; the bridge
  carries it to central;
* the link's state is published retained on the site broker as
  ``<prefix>/v1/sites/<name>/bridge`` (``1``/``0``, Mosquitto's own notification
  topic) within a tick of the relay seeing it change, and again after Mosquitto was
  restarted (its persistence file may hold an older word). Mosquitto says ``0`` there
  itself only when the bridge's connection breaks (its will); when the bridge's own
  keep-alive ends a silent link it disconnects cleanly and says nothing, and the
  site's devices, which hold their metrics and events on a ``0``
  (:mod:`agent.telemetry.uplink`), would never learn of the outage.

Thread ownership: the main thread calls :meth:`start`, :meth:`poll` and
:meth:`stop`, and is the only one that starts or kills Mosquitto (so
``PR_SET_PDEATHSIG`` follows the process, not a worker thread); "site-relay"
runs the relay's event loop; "site-worker" runs the prune and the status;
"site-watchdog" probes; paho's threads belong to the worker's clients and only
hand messages over.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.errors import StorageError, TransportError
from agent.files import atomic_write
from agent.mqtt.client import ConnectionSettings, MqttClient
from agent.protocol import Topics
from converter.broker.layout import HOST_CLIENT_ID_PREFIX
from converter.broker.mosquitto import BrokerProcess
from converter.broker.registry import HOST_USERNAME, site_sync_identity
from converter.broker.secure import SecureDir
from converter.broker.uplink import UplinkPaths
from converter.site.bridge import BridgeSettings, bridge_lines
from converter.site.prune import prune_site
from converter.site.relay import Relay, RelayCounters, Upstream, upstream_context
from converter.site.watchdog import Watchdog, probe_broker

logger = logging.getLogger(__name__)

STATUS_FILE = "site-status.json"
TICK_S = 0.5


@dataclass(frozen=True)
class SiteSettings:
    site: str
    upstream_host: str
    upstream_port: int
    uplink: UplinkPaths
    keepalive_s: int = 15
    retry_max_s: int = 10
    # 0 turns the watchdog off; a hang is found after about watchdog_s * watchdog_misses
    watchdog_s: float = 5.0
    watchdog_misses: int = 3
    status_interval_s: float = 5.0
    prune_quiet_s: float = 1.0
    prune_max_wait_s: float = 30.0
    prune_interval_s: float = 600.0
    prune_retry_s: float = 10.0
    max_restarts: int = 5
    restart_window_s: float = 120.0


@dataclass(frozen=True)
class SupervisorFacts:
    """What the supervisor itself did (the relay counts the link)."""

    prunes: int = 0
    pruned: int = 0
    last_prune_ts: float | None = None
    prune_error: str | None = None  # the last failure, None once a prune succeeds
    prune_note: str | None = None  # what the last prune could not check (prune.PrunePlan.note)
    broker_restarts: int = 0
    last_restart_reason: str | None = None
    mosquitto_pid: int | None = None


def status_document(
    site: str, upstream: str, link: RelayCounters, facts: SupervisorFacts, *, now: float
) -> dict[str, Any]:
    """The site's status: the link (bytes relayed each way since start, sessions,
    failures) and what the supervisor did (prunes, restarts)."""
    return {
        "site": site,
        "ts": round(now, 3),
        "upstream": upstream,
        "link": "up" if link.link_up else "down",
        "bytes_down": link.bytes_down,
        "bytes_up": link.bytes_up,
        "sessions": link.sessions,
        "failures": link.failures,
        "last_error": link.last_error,
        **asdict(facts),
    }


def local_address(bind: str) -> str:
    """Where this host reaches its own broker: loopback unless bound to one address."""
    return "127.0.0.1" if bind in ("0.0.0.0", "::", "127.0.0.1", "localhost", "::1") else bind


@dataclass
class _PruneState:
    # monotonic time a new session began and its prune is still to do; None: none pending
    pending_since: float | None = None
    retry_at: float = 0.0
    last_ok: float = field(default_factory=time.monotonic)


class SiteSupervisor:
    def __init__(
        self, secure: SecureDir, settings: SiteSettings, *, data_dir: Path, bind: str = "127.0.0.1"
    ) -> None:
        self.secure = secure
        self.settings = settings
        self.registry = secure.load()
        self.topics = Topics(self.registry.prefix)
        self.data_dir = data_dir
        self.bind = bind
        u = settings.uplink
        self.relay = Relay(
            Upstream(
                settings.upstream_host,
                settings.upstream_port,
                upstream_context(u.ca_cert, u.uplink_cert, u.uplink_key),
            ),
            on_session=self._on_session,
        )
        self.broker: BrokerProcess | None = None
        host = secure.host_client_settings()
        self._local = ConnectionSettings(
            host=local_address(bind),
            port=self.registry.ports.host,
            client_id=f"{HOST_CLIENT_ID_PREFIX}site-{settings.site}",
            tls=True,
            ca_file=str(host["ca_file"]),
            username=HOST_USERNAME,
            password=str(host["password"]),
        )
        self._site_client = MqttClient(self._local)
        self.watchdog = Watchdog(
            self._probe, interval_s=settings.watchdog_s or 1.0, misses=settings.watchdog_misses
        )
        self._stop = threading.Event()
        self._session = threading.Event()
        self._lock = threading.Lock()
        self._facts = SupervisorFacts()
        self._prune = _PruneState()
        self._said_link: bool | None = None  # the last link word published on .../bridge
        self._restart_times: list[float] = []
        self._threads: list[threading.Thread] = []
        self._last_file: dict[str, Any] | None = None

    # -- main thread ---------------------------------------------------------------
    @property
    def status_file(self) -> Path:
        return self.data_dir / STATUS_FILE

    def start(self) -> None:
        port = self.relay.start()
        config = self.secure.broker_config(data_dir=self.data_dir, bind=self.bind, registry=self.registry)
        s = self.settings
        config.extra_lines = [
            *config.extra_lines,
            *bridge_lines(
                self.topics,
                BridgeSettings(s.site, port, keepalive_s=s.keepalive_s, retry_max_s=s.retry_max_s),
            ),
        ]
        self.broker = BrokerProcess(config, die_with_parent=True)
        self.broker.start()
        self._set_facts(mosquitto_pid=self._pid())
        self._write_status_file(self.status())  # before the worker runs: no lock needed yet
        self._site_client.start()
        self._spawn("site-worker", self._work)
        if s.watchdog_s > 0:
            self._spawn("site-watchdog", lambda: self.watchdog.run(self._stop))

    def poll(self) -> None:
        """One supervision step: restart a Mosquitto that exited or hangs; raise
        :class:`TransportError` when a part of this process died (a bug) or restarts
        come too often."""
        broker = self.broker
        assert broker is not None, "start() first"
        dead = [t.name for t in self._threads if not t.is_alive()]
        if dead and not self._stop.is_set():
            raise TransportError(f"site supervisor thread {', '.join(dead)} died; see the log")
        if not self.relay.alive():
            raise TransportError("the site's relay stopped; see the log")
        if not broker.running():
            code = broker.proc.returncode if broker.proc is not None else None
            self._restart(f"mosquitto exited (code {code})")
        elif self.watchdog.hung.is_set():
            self._restart(f"mosquitto hung (no answer to {self.settings.watchdog_misses} probes)")

    def _restart(self, why: str) -> None:
        now = time.monotonic()
        s = self.settings
        self._restart_times = [t for t in self._restart_times if now - t < s.restart_window_s] + [now]
        if len(self._restart_times) > s.max_restarts:
            raise TransportError(
                f"{why}; restarted {s.max_restarts} times within {s.restart_window_s:g} s, giving up"
            )
        logger.warning("site broker: %s; restarting it", why)
        assert self.broker is not None
        self.watchdog.pause()
        self.broker.kill()
        self.broker.start()
        self.watchdog.reset()
        self._said_link = None  # its persistence file may hold an older word: say it again
        with self._lock:
            self._facts = replace(
                self._facts,
                broker_restarts=self._facts.broker_restarts + 1,
                last_restart_reason=why,
                mosquitto_pid=self._pid(),
            )

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        self._site_client.stop()
        if self.broker is not None:
            self.broker.stop()
        self.relay.stop()

    def _pid(self) -> int | None:
        proc = self.broker.proc if self.broker is not None else None
        return proc.pid if proc is not None else None

    def _spawn(self, name: str, body: Callable[[], None]) -> None:
        t = threading.Thread(target=body, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _set_facts(self, **changes: Any) -> None:
        with self._lock:
            self._facts = replace(self._facts, **changes)

    # -- other threads -----------------------------------------------------------------
    def _on_session(self, number: int) -> None:  # the relay's loop thread
        self._session.set()

    def _probe(self) -> bool:  # a watchdog probe thread
        settings = replace(self._local, client_id=f"{HOST_CLIENT_ID_PREFIX}site-probe-{self.settings.site}")
        return probe_broker(settings, self.topics.site(self.settings.site, "ping"), self.watchdog.interval_s)

    def facts(self) -> SupervisorFacts:
        with self._lock:
            return self._facts

    def status(self) -> dict[str, Any]:
        return status_document(
            self.settings.site,
            f"{self.settings.upstream_host}:{self.settings.upstream_port}",
            self.relay.counters(),
            self.facts(),
            now=time.time(),
        )

    def _work(self) -> None:  # "site-worker"
        next_status = 0.0
        while not self._stop.wait(TICK_S):
            now = time.monotonic()
            if self._session.is_set():
                self._session.clear()
                self._prune.pending_since = now
            link = self.relay.counters()
            self._say_link(link.link_up)
            if link.link_up and self._prune_due(link, now):
                self._run_prune(now)
            doc = self.status()
            self._write_status_file(doc)
            if now >= next_status and self._site_client.connected:
                next_status = now + self.settings.status_interval_s
                self._publish_status(doc)

    def _prune_due(self, link: RelayCounters, now: float) -> bool:
        p, s = self._prune, self.settings
        if now < p.retry_at:
            return False
        if p.pending_since is None:
            return now - p.last_ok >= s.prune_interval_s
        quiet_since = max(link.last_byte_down_at, p.pending_since)
        return now - quiet_since >= s.prune_quiet_s or now - p.pending_since >= s.prune_max_wait_s

    def _run_prune(self, now: float) -> None:
        s, u = self.settings, self.settings.uplink
        central = MqttClient(
            ConnectionSettings(
                host=s.upstream_host,
                port=s.upstream_port,
                client_id=site_sync_identity(s.site),
                tls=True,
                ca_file=str(u.ca_cert),
                cert_file=str(u.sync_cert),
                key_file=str(u.sync_key),
            )
        )
        try:
            if not self._site_client.wait_connected(10.0):
                raise TransportError("not connected to the site broker")
            central.connect(10.0)
            plan = prune_site(self._site_client, central, self.topics)
        except TransportError as exc:
            logger.warning("prune failed (retried in %.0f s): %s", s.prune_retry_s, exc)
            self._prune.retry_at = now + s.prune_retry_s
            self._set_facts(prune_error=str(exc))
            return
        finally:
            central.stop()
        self._prune = _PruneState(pending_since=None, retry_at=0.0, last_ok=time.monotonic())
        with self._lock:
            f = self._facts
            self._facts = replace(
                f,
                prunes=f.prunes + 1,
                pruned=f.pruned + len(plan.stale),
                last_prune_ts=time.time(),
                prune_error=None,
                prune_note=plan.note,
            )

    def _write_status_file(self, doc: dict[str, Any]) -> None:
        same = {k: v for k, v in doc.items() if k != "ts"}
        if same == self._last_file:
            return
        # not durable: a status a power cut loses is simply written again
        try:
            atomic_write(self.status_file, (json.dumps(doc, indent=2) + "\n").encode(), 0o644, durable=False)
        except StorageError as exc:  # a full disk must not stop the broker; the topic still has it
            logger.warning("status file not written: %s", exc)
            return
        self._last_file = same

    def _say_link(self, up: bool) -> None:
        """Publish the link's word when it changed (or was never said to this broker)."""
        if up == self._said_link or not self._site_client.connected:
            return
        try:
            self._site_client.publish(
                self.topics.site(self.settings.site, "bridge"), b"1" if up else b"0", qos=1, retain=True
            )
        except TransportError as exc:
            logger.debug("link state not published: %s", exc)
            return
        self._said_link = up

    def _publish_status(self, doc: dict[str, Any]) -> None:
        try:
            self._site_client.publish(
                self.topics.site(self.settings.site, "status"), json.dumps(doc).encode(), qos=1, retain=True
            )
        except TransportError as exc:
            logger.debug("status not published: %s", exc)
