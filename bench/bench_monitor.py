"""How fast the fleet monitor stores metrics, against a bare MQTT subscriber.

    .venv/bin/python bench/bench_monitor.py [--messages 4000] [--devices 200] [--runs 3]

Both sides receive the same agent-shaped ~1 KB metrics messages (built by the agent's
own payload builder), QoS 1, published as fast as one paho client can, through a private
Mosquitto on loopback:

- baseline: a bare paho subscriber (QoS 1) that only counts messages;
- litefleet: ``converter.monitor.collector.Collector`` (parse, live view, SQLite history in WAL
  mode), timed until every message is stored.

The time runs from the first publish to the last message counted/stored; medians of
``--runs``; the ratio is what to watch on a shared machine. Keep ``--messages`` below
the broker's per-subscriber queue (``max_queued_messages``, 10,000 in ``litefleet broker``'s
config): a backlog beyond it is dropped by Mosquitto, and the bench says so. Also the ``/metrics`` scrape
time for the devices seen.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt.client import wait_until
from bench.machine import describe
from converter.broker.mosquitto import BrokerConfig, BrokerProcess
from tests.support.monitor import publish_many, running_monitor
from tests.support.payloads import agent_payload


def messages(n: int, devices: int, run: int) -> list[tuple[str, bytes]]:
    return [
        (
            f"litefleet/v1/devices/pi-{i % devices}/metrics",
            agent_payload(f"pi-{i % devices}", seq=run * n + i // devices + 1, ts=1_800_000_000.0 + i),
        )
        for i in range(n)
    ]


def baseline(port: int, msgs: list[tuple[str, bytes]]) -> float:
    got = 0
    done = threading.Event()

    def on_message(client: object, userdata: object, msg: object) -> None:
        nonlocal got
        got += 1
        if got >= len(msgs):
            done.set()

    sub = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
    )
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe("litefleet/v1/devices/+/metrics", qos=1)
    sub.loop_start()
    time.sleep(0.5)  # subscribed
    try:
        t0 = time.perf_counter()
        publish_many(port, msgs)
        if not done.wait(120):
            raise SystemExit(f"baseline subscriber got {got} of {len(msgs)}")
        return time.perf_counter() - t0
    finally:
        sub.disconnect()
        sub.loop_stop()


def collector(port: int, msgs: list[tuple[str, bytes]], db: Path) -> tuple[float, float]:
    with running_monitor(port, db) as mon:
        t0 = time.perf_counter()
        publish_many(port, msgs)
        if not wait_until(lambda: mon.collector.snapshot().stats.stored_samples >= len(msgs), 120):
            stored = mon.collector.snapshot().stats.stored_samples
            raise SystemExit(f"collector stored {stored} of {len(msgs)}: did the broker queue overflow?")
        elapsed = time.perf_counter() - t0
        stats = mon.collector.snapshot().stats
        if stats.dropped or stats.write_errors:
            raise SystemExit(f"collector dropped {stats.dropped}, write errors {stats.write_errors}")
        s0 = time.perf_counter()
        mon.get("/metrics")
        return elapsed, time.perf_counter() - s0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lf-bench-monitor-"))
    print(f"# machine: {describe('paho-mqtt', 'numpy')}")
    broker = BrokerProcess(BrokerConfig(data_dir=work / "broker"))
    broker.start()
    base, coll, scrape = [], [], []
    try:
        for run in range(args.runs):
            msgs = messages(args.messages, args.devices, run)
            base.append(baseline(broker.port, msgs))
            c, s = collector(broker.port, msgs, work / f"run{run}.db")
            coll.append(c)
            scrape.append(s)
    finally:
        broker.kill()
    n = args.messages
    b, c = statistics.median(base), statistics.median(coll)
    print(f"| | median of {args.runs} | msg/s | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| bare paho subscriber, {n} messages, {args.devices} devices | {b:.2f} s | {n / b:,.0f} | 1x |")
    print(f"| litefleet collector, stored in SQLite | {c:.2f} s | {n / c:,.0f} | {c / b:.2f}x |")
    print(f"\n/metrics of {args.devices} devices: {statistics.median(scrape) * 1e3:.0f} ms (median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
