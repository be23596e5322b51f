"""Push-to-active time of a 14 MB model on loopback, against mosquitto_pub -> mosquitto_sub.

    .venv/bin/python bench/bench_delivery.py [--runs 5] [--megabytes 14]

Baseline (same run, same broker, same bytes): ``mosquitto_sub -C 1`` waits on a
topic, ``mosquitto_pub -f MODEL`` sends the file (QoS 1); the time from starting
the publisher to the subscriber's exit.

litefleet: an agent (``python -m agent run``) is up and idle; the time from the
start of ``litefleet push`` (sign, publish the metadata, then the chunks) to the
agent's ``activated`` event (downloaded as verified chunks, whole-file hash
checked, installed, checked against its golden vectors in an isolated process,
loaded, swapped in). Medians of ``--runs`` runs; the ratio is what the goal (<= 3x) is about.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe
from converter.broker.mosquitto import BrokerConfig, BrokerProcess
from tests.support.big_models import build_dense_model
from tests.support.harness import AgentProcess, FleetWatcher, must


def baseline(port: int, model: Path) -> float:
    topic = "bench/baseline"
    sub = subprocess.Popen(
        ["mosquitto_sub", "-p", str(port), "-t", topic, "-C", "1", "-q", "1"], stdout=subprocess.DEVNULL
    )
    time.sleep(0.5)  # subscribed
    t0 = time.perf_counter()
    subprocess.run(["mosquitto_pub", "-p", str(port), "-t", topic, "-q", "1", "-f", str(model)], check=True)
    sub.wait(60)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--megabytes", type=float, default=14.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lf-bench-delivery-"))
    print(f"# machine: {describe('paho-mqtt', 'tuf', 'ai-edge-litert', 'numpy')}")
    models = [
        build_dense_model(work / f"m{i}" / "model.tflite", megabytes=args.megabytes, seed=i) for i in range(2)
    ]
    size = models[0].stat().st_size
    broker = BrokerProcess(BrokerConfig(data_dir=work / "broker"))
    broker.start()
    repo = work / "repo"
    must("repo", "init", str(repo))
    watch = FleetWatcher(broker.port)
    agent = AgentProcess(work, "bench-1", broker.url, repo / "root.json", log_level="info", probation_s=60.0)
    agent.start()
    try:
        watch.wait_for(lambda: (watch.states.get("bench-1") or {}).get("online") is True, 30)
        base, ours, active = [], [], []
        for run in range(args.runs):
            base.append(baseline(broker.port, models[run % 2]))
            version = run + 1
            wall0 = time.time()
            t0 = time.perf_counter()
            must("push", str(models[run % 2]), "--repo", str(repo), "--name", "bench", "--broker", broker.url)
            t_push = time.perf_counter() - t0
            watch.wait_event("bench-1", "activated", timeout_s=120, version=version)
            ours.append(time.perf_counter() - t0)
            marks = [
                (e["event"], round((e["ts"] - wall0) * 1000))
                for e in watch.events_of("bench-1")
                if e.get("version") == version
            ]
            active.append(next(ms for ev, ms in marks if ev == "activated") / 1000)
            print(
                f"run {run + 1}: baseline {base[-1] * 1000:.0f} ms, push {t_push * 1000:.0f} ms, "
                f"push-to-active {ours[-1] * 1000:.0f} ms; agent events (ms after push start): {marks}"
            )
        b, o, a = statistics.median(base), statistics.median(ours), statistics.median(active)
        print(
            f"\nmodel {size / 1e6:.1f} MB; median baseline {b * 1000:.0f} ms; "
            f"median push start -> activated event {a * 1000:.0f} ms ({a / b:.2f}x); "
            f"median push start -> push command done and model active {o * 1000:.0f} ms "
            f"({o / b:.2f}x) (goal <= 3x)"
        )
    finally:
        agent.stop()
        watch.close()
        broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
