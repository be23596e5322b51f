"""The host side at 1,000+ devices, each figure against a baseline of the same run.

    .venv/bin/python bench/bench_host.py [--devices 1000,10000] [--messages 9000] [--runs 3]

1. ``litefleet status --json`` over N retained device states (agent-shaped, ~700 B), against
   ``mosquitto_sub --retained-only -C N`` reading the same states (both processes, both
   timed from start to exit; ``litefleet --version`` gives the CLI's own start-up); and
   ``collect_states`` in-process (without the CLI's start-up), against a bare paho
   subscriber reading them at QoS 0.
2. The monitor: two collectors in one share group (``--share``, one SQLite file, as
   ``docs/monitor.md`` describes) storing M agent-shaped metrics messages from the
   devices, against two bare paho subscribers in the same share group counting them.
3. SQLite growth: bytes per stored metrics message (file and WAL after a checkpoint), per
   device-day at one message every 10 s; the time to prune one message's rows (retention).
4. Parsing what a fleet view reads (the monitor's parsers, which ``status`` and the
   rollout controller share): states, metrics and events of N devices per second, against
   ``json.loads`` of the same payloads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt.client import ConnectionSettings, MqttClient, wait_until
from agent.protocol import Topics
from bench.machine import describe
from converter.broker.mosquitto import BrokerConfig, BrokerProcess
from converter.fleet.view import collect_states
from converter.monitor.payloads import parse_event, parse_metrics, parse_state
from converter.monitor.store import MonitorStore, Received
from tests.support.monitor import publish_many, running_monitor
from tests.support.payloads import agent_payload, state_payload

REPO = Path(__file__).resolve().parents[1]
STATE_FILTER = "litefleet/v1/devices/+/state"


def states(n: int) -> list[tuple[str, bytes]]:
    return [
        (f"litefleet/v1/devices/pi-{i:06d}/state", state_payload(device_id=f"pi-{i:06d}", ts=1.8e9 + i))
        for i in range(n)
    ]


def clear_states(port: int, n: int) -> None:
    publish_many(port, [(f"litefleet/v1/devices/pi-{i:06d}/state", b"") for i in range(n)], retain=True)


# -- 1. status ---------------------------------------------------------------------------------
def status_cli(url: str, n: int) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "converter", "status", "--broker", url, "--json", "--timeout", "60"],
        capture_output=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    took = time.perf_counter() - t0
    rows = json.loads(out.stdout)
    if len(rows) != n:
        raise SystemExit(f"status listed {len(rows)} of {n} devices")
    return took


def cli_startup() -> float:
    """``litefleet --version``: the CLI's interpreter start and imports, no broker."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "converter", "--version"],
        capture_output=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return time.perf_counter() - t0


def status_baseline(port: int, n: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        ["mosquitto_sub", "-p", str(port), "-t", STATE_FILTER, "--retained-only", "-C", str(n), "-W", "60"],
        stdout=subprocess.DEVNULL,
        check=True,
    )
    return time.perf_counter() - t0


def collect_inprocess(port: int, n: int) -> float:
    client = MqttClient(ConnectionSettings("127.0.0.1", port, f"_bench-{uuid.uuid4().hex[:6]}"))
    client.connect(10)
    try:
        t0 = time.perf_counter()
        rows = collect_states(client, Topics(), timeout_s=60)
        took = time.perf_counter() - t0
    finally:
        client.stop()
    if len(rows) != n:
        raise SystemExit(f"collect_states gave {len(rows)} of {n}")
    return took


def bare_read(port: int, n: int) -> float:
    got = 0
    done = threading.Event()

    def on_message(c: Any, u: Any, msg: Any) -> None:
        nonlocal got
        got += 1
        if got >= n:
            done.set()

    sub = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
    )
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    try:
        t0 = time.perf_counter()
        sub.subscribe(STATE_FILTER, qos=0)
        if not done.wait(60):
            raise SystemExit(f"bare subscriber got {got} of {n}")
        return time.perf_counter() - t0
    finally:
        sub.disconnect()
        sub.loop_stop()


def bench_status(broker: BrokerProcess, sizes: list[int], runs: int) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        publish_many(broker.port, states(n), retain=True)
        cli, base, inproc, bare, startup = [], [], [], [], []
        for _ in range(runs):
            startup.append(cli_startup())
            base.append(status_baseline(broker.port, n))
            cli.append(status_cli(broker.url, n))
            bare.append(bare_read(broker.port, n))
            inproc.append(collect_inprocess(broker.port, n))
        rows.append(
            {
                "devices": n,
                "status_cli_s": statistics.median(cli),
                "mosquitto_sub_s": statistics.median(base),
                "cli_startup_s": statistics.median(startup),
                "collect_states_s": statistics.median(inproc),
                "bare_paho_s": statistics.median(bare),
            }
        )
        r = rows[-1]
        print(
            f"status, {n} devices: litefleet status --json {r['status_cli_s']:.2f} s vs mosquitto_sub "
            f"{r['mosquitto_sub_s']:.2f} s ({r['status_cli_s'] / r['mosquitto_sub_s']:.1f}x; the CLI's "
            f"start-up alone, litefleet --version, {r['cli_startup_s']:.2f} s); in-process "
            f"collect_states {r['collect_states_s'] * 1e3:.0f} ms vs bare paho "
            f"{r['bare_paho_s'] * 1e3:.0f} ms "
            f"({r['collect_states_s'] / r['bare_paho_s']:.1f}x)",
            flush=True,
        )
        clear_states(broker.port, n)
    return rows


# -- 2. the monitor -------------------------------------------------------------------------------
def metrics(m: int, devices: int, run: int) -> list[tuple[str, bytes]]:
    return [
        (
            f"litefleet/v1/devices/pi-{i % devices:06d}/metrics",
            agent_payload(f"pi-{i % devices:06d}", seq=run * m + i // devices + 1, ts=1.8e9 + i),
        )
        for i in range(m)
    ]


def shared_bare(port: int, msgs: list[tuple[str, bytes]]) -> float:
    got = [0, 0]
    done = threading.Event()
    lock = threading.Lock()
    subs = []
    for k in range(2):

        def on_message(c: Any, u: Any, msg: Any, k: int = k) -> None:
            with lock:
                got[k] += 1
                if sum(got) >= len(msgs):
                    done.set()

        s = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
        )
        s.on_message = on_message
        s.connect("127.0.0.1", port)
        s.subscribe("$share/bench/litefleet/v1/devices/+/metrics", qos=1)
        s.loop_start()
        subs.append(s)
    time.sleep(0.5)
    try:
        t0 = time.perf_counter()
        publish_many(port, msgs)
        if not done.wait(300):
            raise SystemExit(f"bare shared subscribers got {got} of {len(msgs)}")
        return time.perf_counter() - t0
    finally:
        for s in subs:
            s.disconnect()
            s.loop_stop()


def shared_collectors(port: int, msgs: list[tuple[str, bytes]], db: Path) -> tuple[float, list[int]]:
    with running_monitor(port, db, share="bench") as a, running_monitor(port, db, share="bench") as b:
        time.sleep(0.5)
        t0 = time.perf_counter()
        publish_many(port, msgs)

        def stored() -> int:
            return sum(m.collector.snapshot().stats.stored_samples for m in (a, b))

        if not wait_until(lambda: stored() >= len(msgs), 300):
            raise SystemExit(f"two collectors stored {stored()} of {len(msgs)}")
        took = time.perf_counter() - t0
        split = [m.collector.snapshot().stats.stored_samples for m in (a, b)]
        for m in (a, b):
            s = m.collector.snapshot().stats
            if s.dropped or s.write_errors:
                raise SystemExit(f"collector dropped {s.dropped}, write errors {s.write_errors}")
    return took, split


def bench_monitor(broker: BrokerProcess, devices: int, m: int, runs: int, work: Path) -> dict[str, Any]:
    base, coll, splits = [], [], []
    for run in range(runs):
        msgs = metrics(m, devices, run)
        base.append(shared_bare(broker.port, msgs))
        took, split = shared_collectors(broker.port, msgs, work / f"shared-{run}.db")
        coll.append(took)
        splits.append(split)
    r: dict[str, Any] = {
        "devices": devices,
        "messages": m,
        "two_collectors_s": statistics.median(coll),
        "two_bare_s": statistics.median(base),
        "split": splits,
    }
    print(
        f"monitor, two collectors in one share group, {m} metrics messages from {devices} devices: "
        f"{r['two_collectors_s']:.2f} s ({m / r['two_collectors_s']:,.0f} msg/s stored) vs two bare "
        f"subscribers {r['two_bare_s']:.2f} s ({m / r['two_bare_s']:,.0f} msg/s): "
        f"{r['two_collectors_s'] / r['two_bare_s']:.1f}x; split {splits}",
        flush=True,
    )
    return r


# -- 3. SQLite growth and retention ------------------------------------------------------------
def bench_sqlite(devices: int, m: int, work: Path) -> dict[str, Any]:
    db = work / "growth.db"
    store = MonitorStore.open(db)
    now = time.time()
    try:
        batch: list[Received] = []
        for topic, payload in metrics(m, devices, 0):
            dev = topic.split("/")[3]
            p = parse_metrics(dev, payload)
            batch.append(Received(p, now))
            if len(batch) == 5000:
                store.write(batch)
                batch = []
        if batch:
            store.write(batch)
        with sqlite3.connect(db) as c:
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = db.stat().st_size + sum(
            p.stat().st_size for p in (Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()
        )
        with store.reader() as reader:
            samples = reader.count("samples")
            model_rows = reader.count("model_samples")
        t0 = time.perf_counter()
        pruned = store.prune(1.8e9 + m / 2)  # the older half (ts = 1.8e9 + i)
        prune_s = time.perf_counter() - t0
    finally:
        store.close()
    per_msg = size / samples
    r: dict[str, Any] = {
        "samples": samples,
        "model_rows": model_rows,
        "bytes": size,
        "bytes_per_message": per_msg,
        "mb_per_device_day": per_msg * 8640 / 1e6,
        "prune_rows": pruned,
        "prune_s": prune_s,
        "prune_us_per_message": prune_s / (samples / 2) * 1e6,
    }
    print(
        f"SQLite: {samples} metrics messages ({model_rows} model rows) in {size / 1e6:.1f} MB: "
        f"{per_msg:.0f} B per message, {r['mb_per_device_day']:.1f} MB per device-day (10 s interval); "
        f"pruning {samples // 2} messages ({pruned} rows) took {prune_s:.2f} s "
        f"({r['prune_us_per_message']:.0f} us per message)",
        flush=True,
    )
    return r


# -- 4. parsing ----------------------------------------------------------------------------------
def bench_parsing(devices: int, runs: int) -> dict[str, Any]:
    st = [(t.split("/")[3], p) for t, p in states(devices)]
    me = [(t.split("/")[3], p) for t, p in metrics(devices, devices, 0)]
    ev = [
        (
            f"pi-{i:06d}",
            json.dumps(
                {
                    "ts": 1.8e9,
                    "device_id": f"pi-{i:06d}",
                    "boot": "b",
                    "seq": 1,
                    "event": "activated",
                    "model": "digits",
                    "version": 2,
                    "sha256": "ab" * 32,
                    "previous": 1,
                }
            ).encode(),
        )
        for i in range(devices)
    ]
    out: dict[str, Any] = {"devices": devices}
    for name, items, parse in (
        ("state", st, parse_state),
        ("metrics", me, parse_metrics),
        ("events", ev, parse_event),
    ):
        ours, base = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            for d, p in items:
                parse(d, p)
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _d, p in items:
                json.loads(p)
            base.append(time.perf_counter() - t0)
        o, b = statistics.median(ours), statistics.median(base)
        out[name] = {"parse_s": o, "json_loads_s": b}
        print(
            f"parsing {devices} {name} messages: {o * 1e3:.1f} ms ({o / devices * 1e6:.0f} us each) "
            "vs json.loads "
            f"{b * 1e3:.1f} ms ({o / b:.1f}x)",
            flush=True,
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", default="1000,10000", help="state counts for status")
    ap.add_argument("--messages", type=int, default=9000, help="metrics messages for the monitor")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sizes = [int(x) for x in args.devices.split(",")]
    work = Path(tempfile.mkdtemp(prefix="lf-bench-host-"))
    print(f"# machine: {describe('paho-mqtt', 'numpy')}")
    if not shutil.which("mosquitto_sub"):
        raise SystemExit("mosquitto_sub is missing (apt-get install mosquitto-clients)")
    broker = BrokerProcess(BrokerConfig(data_dir=work / "broker", persistence=False))
    broker.start()
    try:
        result = {
            "status": bench_status(broker, sizes, args.runs),
            "monitor": bench_monitor(broker, sizes[0], args.messages, args.runs, work),
            "sqlite": bench_sqlite(sizes[0], 10 * args.messages, work),
            "parsing": bench_parsing(sizes[0], args.runs),
        }
    finally:
        broker.kill()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
