"""Is the site's Mosquitto still answering? A probe on a fresh connection, counted misses.

A hung broker looks alive: its process exists and its port accepts TCP (the
kernel completes the handshake), but no MQTT packet is answered. So the probe
does what a device does, end to end: a new TLS connection with the host
identity, CONNECT, a QoS 1 PUBLISH, its PUBACK.

Guarantees:

* a probe never blocks the watchdog longer than its deadline: it runs in a
  throwaway daemon thread (a TLS handshake with a stopped broker can block
  paho's thread; that thread ends when the broker is killed);
* :meth:`Watchdog.record` is the whole decision: ``misses`` failed probes in a
  row make the broker hung; one answer resets the count;
* after :meth:`Watchdog.reset` (the broker was restarted) the count starts again
  at zero, and no probe counts while it is paused.

Thread ownership: :meth:`Watchdog.run` is the body of the supervisor's
"site-watchdog" thread; ``hung`` is read, and ``pause``/``reset`` are called, by
the supervisor's main thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agent.errors import TransportError
from agent.mqtt.client import ConnectionSettings, MqttClient

logger = logging.getLogger(__name__)


def run_with_deadline(fn: Callable[[], bool], timeout_s: float) -> bool:
    """``fn()`` in a daemon thread; False when it raised or did not finish in time."""
    result: list[bool] = []

    def body() -> None:
        try:
            result.append(bool(fn()))
        except Exception:  # a probe's failure is a miss, whatever it was
            logger.debug("watchdog probe failed", exc_info=True)

    t = threading.Thread(target=body, name="site-watchdog-probe", daemon=True)
    t.start()
    t.join(timeout_s)
    return bool(result and result[0])


def probe_broker(settings: ConnectionSettings, topic: str, timeout_s: float) -> bool:
    """Connect, publish one QoS 1 message, wait for its PUBACK, disconnect."""
    client = MqttClient(settings)
    try:
        client.connect(timeout_s)
        return client.publish(topic, b"%.3f" % time.time(), qos=1).wait(timeout_s)
    except TransportError:
        return False
    finally:
        client.stop()


class Watchdog:
    def __init__(self, probe: Callable[[], bool], *, interval_s: float, misses: int = 3) -> None:
        self.probe = probe
        self.interval_s = interval_s
        self.misses_allowed = misses
        self.misses = 0
        self.hung = threading.Event()
        self._paused = threading.Event()
        self._lock = threading.Lock()

    def record(self, answered: bool) -> bool:
        """Count one probe's outcome; True once the broker counts as hung."""
        with self._lock:
            if self._paused.is_set():
                return False
            self.misses = 0 if answered else self.misses + 1
            if self.misses >= self.misses_allowed:
                self.hung.set()
            return self.hung.is_set()

    def pause(self) -> None:
        self._paused.set()

    def reset(self) -> None:
        with self._lock:
            self.misses = 0
            self.hung.clear()
            self._paused.clear()

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            if self._paused.is_set() or self.hung.is_set():
                continue
            answered = run_with_deadline(self.probe, self.interval_s + 1.0)
            if self.record(answered):
                logger.error("site broker: no answer to %d probes in a row", self.misses)
            elif not answered:
                logger.warning("site broker: no answer to a probe (%d in a row)", self.misses)
