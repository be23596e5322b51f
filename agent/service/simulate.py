"""``litefleet-agent simulate``: N devices in one process, each a real :class:`Agent`.

``simulate()`` is the command (the agent CLI hands over to it): it prints one line when
every device is ready (``simulate: N devices ready in S s``) and one when they have
stopped, and runs until SIGTERM or SIGINT (exit 0; 1 when no device started).

Every simulated device is an :class:`agent.service.daemon.Agent` built from the
same template config with its own ``device_id`` (``<device_id>-<n>``, n from
``first``) and ``state_dir`` (``<state_dir>/<its id>``), so each has its own MQTT
connection and client id, will, retained-metadata cache, TUF metadata and
verification, chunk downloads, model store and state file, checks, activation,
trial, events, state and metrics queue, and runs the agent's own work loop on
its own thread. What the devices share (docs/scale.md says why each):

- the process: the Python interpreter, imported modules, the runtime library;
- **one network thread** for all connections (:mod:`agent.mqtt.network`) instead
  of paho's thread per connection;
- **loaded interpreters**: one set per model file content
  (:mod:`agent.serving.pool`), used by each device's own runners for its
  golden check and for serving, one device at a time per interpreter;
- the candidate check runs **in-process** (``isolate_checks=False``, the agent's
  path where no child can be forked): a fork per device of a process holding a
  thousand devices would measure the simulator, not the device; a model that
  crashes the runtime ends the whole simulation;
- the device probe of the metrics reads this process (CPU, memory): every
  device reports the simulator's figures;
- **a CPU gate**: a device verifies TUF metadata and checks and activates a
  candidate holding one of ``os.cpu_count()`` permits. Python runs one thread at
  a time; with hundreds of devices activating at once the network thread got
  about one turn in a hundred and its keep-alive checks ran up to 15 s late on
  this 2-core machine (the broker drops a client silent for 45 s and publishes
  its will). Devices wait for a permit instead, and the network thread keeps
  its share. The last line says how late the checks ran at worst
  (``keep-alive checks ran up to S s late``).

The REST API is off (``http = ""``): a thousand devices would need a thousand
ports. Threads: per device its work loop (``sim:<id>``), its MQTT inference
worker and its metrics sender; one network thread; the caller's thread waits.

Start-up is staggered: a device is started once fewer than ``STARTING_AT_ONCE`` are
connecting and doing their first refresh (a broker that lets none become ready for
``RAMP_PATIENCE_S`` ends the wait). An idle simulated device's loop wakes every
``TICK_S`` instead of every second.

Guarantees: :meth:`SimulatedFleet.stop` stops every device as ``run``'s caller
would (the goodbye state with ``online`` false, a clean disconnect); a device
whose start fails is reported and the others run on.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from agent.errors import LitefleetError
from agent.mqtt.network import SharedNetwork
from agent.service.config import AgentConfig, with_overrides
from agent.service.daemon import Agent
from agent.service.sdnotify import Notifier

logger = logging.getLogger(__name__)

# a simulated device's threads block on queues and sockets; 1 MiB of stack (virtual) is
# ample for the agent's work and the runtime's invoke (Python's default: 8 MiB each)
THREAD_STACK_BYTES = 1024 * 1024
# devices started but not ready yet, at most: a start-up at a steady pace, as real fleets
# boot staggered. It does not make more devices fit: 2,500 per process on 2 cores lost
# their connections with or without it (docs/scale.md)
STARTING_AT_ONCE = 100
# no device became ready for this long (a broker away): start the rest without waiting
RAMP_PATIENCE_S = 60.0
# a simulated device's work loop wakes this often when it has nothing to do (a device's: 1 s,
# for the watchdog and trial deadlines): 77 us a second per idle device at 1 s, most of an
# idle core at 10,000 devices, in a process whose network thread needs its turns
TICK_S = 5.0


class _ReadySignal(Notifier):
    """Says nothing to systemd (there is no unit per simulated device); wakes the start-up
    ramp when its device becomes ready."""

    def __init__(self, became_ready: threading.Condition) -> None:
        super().__init__(env={})
        self._became_ready = became_ready

    def ready(self, status: str | None = None) -> bool:
        with self._became_ready:  # ready_at is set: the ramp sees it once it holds the lock
            self._became_ready.notify_all()
        return super().ready(status)


@dataclass(frozen=True)
class SimulatedDevice:
    agent: Agent
    thread: threading.Thread


def device_ids(prefix: str, devices: int, first: int = 0) -> list[str]:
    """The ids of ``devices`` simulated devices: ``<prefix>-00000`` upwards from ``first``."""
    return [f"{prefix}-{i:05d}" for i in range(first, first + devices)]


class SimulatedFleet:
    """``start()``, then ``stop()`` once. Not thread-safe itself: one owner."""

    def __init__(self, template: AgentConfig, devices: int, *, first: int = 0) -> None:
        if devices < 1:
            raise ValueError("devices must be at least 1")
        self.template = template
        self.ids = device_ids(template.device_id, devices, first)
        self.network = SharedNetwork()
        self.devices: list[SimulatedDevice] = []
        self.failed: list[tuple[str, str]] = []
        self.cpu_gate = threading.Semaphore(max(1, os.cpu_count() or 1))
        self.started_at = 0.0
        self._ramp_gave_up = False
        self._became_ready = threading.Condition()

    def config_of(self, device_id: str) -> AgentConfig:
        return with_overrides(
            self.template, device_id=device_id, state_dir=self.template.state_dir / device_id, http=""
        )

    def start(self) -> None:
        from agent.activation.check import share_interpreters
        from agent.serving.pool import InterpreterPool

        share_interpreters(InterpreterPool())
        threading.stack_size(THREAD_STACK_BYTES)
        self.started_at = time.monotonic()
        self.network.start()
        starting: list[Agent] = []
        for device_id in self.ids:
            try:
                agent = Agent(
                    self.config_of(device_id),
                    notifier=_ReadySignal(self._became_ready),
                    network=self.network,
                    isolate_checks=False,
                    cpu_gate=self.cpu_gate,
                    tick_s=TICK_S,
                )
                agent.start()
            except (LitefleetError, OSError) as exc:
                logger.error("device %s did not start: %s", device_id, exc)
                self.failed.append((device_id, str(exc)))
                continue
            thread = threading.Thread(target=_run, args=(agent,), name=f"sim:{device_id}", daemon=True)
            thread.start()
            self.devices.append(SimulatedDevice(agent, thread))
            starting.append(agent)
            starting = self._ramp(starting)

    def _ramp(self, starting: list[Agent]) -> list[Agent]:
        """Wait while ``STARTING_AT_ONCE`` devices are starting; the ones still starting."""
        progress_at = time.monotonic()
        with self._became_ready:
            while True:
                left = [a for a in starting if a.ready_at is None]
                if len(left) < len(starting):
                    progress_at = time.monotonic()
                starting = left
                if len(starting) < STARTING_AT_ONCE or self._ramp_gave_up:
                    return starting
                patience = RAMP_PATIENCE_S - (time.monotonic() - progress_at)
                if patience <= 0:
                    logger.warning(
                        "no device became ready in %g s: starting the rest at once", RAMP_PATIENCE_S
                    )
                    self._ramp_gave_up = True
                    return starting
                self._became_ready.wait(patience)

    def ready(self) -> int:
        """How many devices told systemd READY (connected, first refresh done)."""
        return sum(1 for d in self.devices if d.agent.ready_at is not None)

    def stop(self, timeout_s: float = 60.0) -> None:
        for d in self.devices:
            d.agent.stop()
        deadline = time.monotonic() + timeout_s
        for d in self.devices:
            d.thread.join(max(0.1, deadline - time.monotonic()))
        late = [d.agent.cfg.device_id for d in self.devices if d.thread.is_alive()]
        if late:
            logger.warning(
                "%d devices did not stop within %g s (%s): the broker publishes their wills",
                len(late),
                timeout_s,
                ", ".join(late[:5]),
            )
        self.network.stop()  # writes every stopped device's goodbye and DISCONNECT first
        from agent.activation.check import share_interpreters

        share_interpreters(None)


def _run(agent: Agent) -> None:
    """One device's work loop, then its goodbye (as ``litefleet-agent run`` does)."""
    try:
        agent.run()
    except Exception:  # a bug in one device: logged, the others run on
        logger.exception("device %s stopped on an error", agent.cfg.device_id)
    finally:
        agent.shutdown()


def simulate(template: AgentConfig, devices: int, first: int = 0) -> int:
    if devices < 1 or first < 0:
        sys.stderr.write("litefleet-agent: error: --devices must be at least 1, --first at least 0\n")
        return 2
    fleet = SimulatedFleet(template, devices, first=first)
    stop = threading.Event()

    def handle(signum: int, frame: Any) -> None:  # only records: the main thread acts
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    fleet.start()
    sys.stdout.write(f"simulate: {len(fleet.devices)} devices started, {len(fleet.failed)} failed\n")
    sys.stdout.flush()
    if not fleet.devices:
        fleet.stop()
        return 1
    announced = False
    while not stop.wait(0.5):
        if not announced and fleet.ready() == len(fleet.devices):
            announced = True
            took = time.monotonic() - fleet.started_at
            sys.stdout.write(f"simulate: {len(fleet.devices)} devices ready in {took:.1f} s\n")
            sys.stdout.flush()
    fleet.stop()
    lag = fleet.network.max_misc_lag_s
    sys.stdout.write(
        f"simulate: {len(fleet.devices)} devices stopped; keep-alive checks ran up to {lag:.1f} s late\n"
    )
    sys.stdout.flush()
    return 0
