"""How many metrics messages a collector takes: a synthetic publisher against a real Mosquitto.

Agent-shaped payloads (~1 KB, built by the agent's own builder) from 200
devices, QoS 1, published as fast as paho can. The collector must store every
one (none dropped by its own queue) at a rate well above what a fleet of a few
thousand devices at the default 10 s interval sends. The measured rate is
printed (``pytest -s``); figures are in ``docs/monitor.md``.
"""

from __future__ import annotations

import time
from pathlib import Path

from agent.mqtt_client import wait_until
from tests.test_monitor_e2e import publish_many, running_monitor
from tests.test_monitor_pure import agent_payload

MESSAGES = 4000
DEVICES = 200
# a floor far below what this machine measures (~4,000/s), so only a real regression
# (a commit per message, parsing on paho's thread, a lock held while writing) fails it
FLOOR_PER_S = 600


def test_collector_keeps_up_with_a_synthetic_fleet(broker, tmp_path: Path) -> None:
    messages = [(f"litefleet/v1/devices/pi-{i % DEVICES}/metrics",
                 agent_payload(f"pi-{i % DEVICES}", seq=i // DEVICES + 1, ts=1_800_000_000.0 + i))
                for i in range(MESSAGES)]
    with running_monitor(broker.port, tmp_path / "load.db") as mon:
        t0 = time.perf_counter()
        publish_many(broker.port, messages)
        assert wait_until(lambda: mon.collector.snapshot().stats.stored_samples >= MESSAGES, 60)
        elapsed = time.perf_counter() - t0
        stats = mon.collector.snapshot().stats
        scrape_t0 = time.perf_counter()
        scrape = mon.get("/metrics")
        scrape_ms = (time.perf_counter() - scrape_t0) * 1000
    rate = MESSAGES / elapsed
    print(f"\ncollector: {MESSAGES} messages from {DEVICES} devices stored in {elapsed:.2f} s "
          f"({rate:.0f} msg/s); /metrics of {DEVICES} devices in {scrape_ms:.0f} ms, "
          f"{len(scrape) / 1024:.0f} KiB")
    assert stats.stored_samples == MESSAGES and stats.dropped == 0 and stats.write_errors == 0
    assert rate > FLOOR_PER_S
