"""A burst of metrics against the collector: a synthetic publisher and a real Mosquitto.

Agent-shaped payloads (~1 KB, built by the agent's own builder) from 200
devices, QoS 1, published as fast as paho can. The collector must store every
one, none dropped by its own queue and no write error. How fast is the business
of ``bench/bench_monitor.py`` (a ratio to a bare subscriber, in the same run);
the rate is only printed here (``pytest -s``).
"""

from __future__ import annotations

import time
from pathlib import Path

from agent.mqtt.client import wait_until
from tests.support.monitor import publish_many, running_monitor
from tests.support.payloads import agent_payload

MESSAGES = 4000
DEVICES = 200


def test_collector_keeps_up_with_a_synthetic_fleet(broker, tmp_path: Path) -> None:
    messages = [
        (
            f"litefleet/v1/devices/pi-{i % DEVICES}/metrics",
            agent_payload(f"pi-{i % DEVICES}", seq=i // DEVICES + 1, ts=1_800_000_000.0 + i),
        )
        for i in range(MESSAGES)
    ]
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
    print(
        f"\ncollector: {MESSAGES} messages from {DEVICES} devices stored in {elapsed:.2f} s "
        f"({rate:.0f} msg/s); /metrics of {DEVICES} devices in {scrape_ms:.0f} ms, "
        f"{len(scrape) / 1024:.0f} KiB"
    )
    assert stats.stored_samples == MESSAGES and stats.dropped == 0 and stats.write_errors == 0


def test_the_monitor_reads_every_retained_state_on_a_stock_broker(stock_broker, tmp_path: Path) -> None:
    """A stock Mosquitto queues at most 1,000 QoS 1 messages per client beyond the 20 in
    flight and drops the rest: a monitor that subscribed to the state at QoS 1 saw 1,020
    of 2,000 devices (and again after each reconnect). The state is read at QoS 0."""
    from tests.support.payloads import state_payload

    count = 2000
    publish_many(
        stock_broker.port,
        [(f"litefleet/v1/devices/pi-{i}/state", state_payload(device_id=f"pi-{i}")) for i in range(count)],
        retain=True,
    )
    with running_monitor(stock_broker.port, tmp_path / "stock.db") as mon:
        assert wait_until(lambda: len(mon.collector.snapshot().devices) >= count, 60)
        assert mon.collector.wait_idle(30)
        assert len(mon.collector.snapshot().devices) == count
