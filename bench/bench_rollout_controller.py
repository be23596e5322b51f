"""What the rollout controller costs per device message, against parsing the JSON alone.

    .venv/bin/python bench/bench_rollout_controller.py [--devices 1000] [--messages 20000] [--runs 3]

The messages are metrics in the rollout schema (latency histogram, output sketch of a
10-class classifier, shadow counts; ``tests.support.fake_fleet``), one per device in
turn, half the devices on the new version, as a controller sees them:

- baseline: ``json.loads`` of each payload, nothing else;
- controller: the monitor's parser (``parse_message``) and the rollout observer
  (``FleetObserver.on_message``: windows per device, boot and version);
- evaluation: one ``evidence`` + ``evaluate`` of every gate over the whole fleet, which the
  controller does once a second.

Medians of ``--runs``; the ratio to the baseline is what to watch on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.protocol import Rollout
from bench.machine import describe
from converter.monitor.payloads import parse_message
from converter.rollout.gates import evaluate
from converter.rollout.observe import FleetObserver
from converter.rollout.spec import gate_settings
from tests.support.fake_fleet import Behaviour, FakeDevice


def payloads(devices: int, messages: int) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    rng = random.Random(0)
    fleet = [FakeDevice(f"pi-{i:04d}", "digits", "2" if i % 2 else "1") for i in range(devices)]
    states = [(d.device_id, d.state_payload()) for d in fleet]
    out = []
    for i in range(messages):
        dev = fleet[i % devices]
        dev.counters(dev.active).serve(10, Behaviour(), rng, 5 if dev.active == "2" else 0, "1")
        out.append((dev.device_id, dev.metrics_payload(ts=1_800_000_000.0 + i)))
    return states, out


def run(devices: int, messages: int) -> dict[str, float]:
    states, metrics = payloads(devices, messages)
    t = time.perf_counter()
    for _, payload in metrics:
        json.loads(payload)
    baseline = time.perf_counter() - t

    obs = FleetObserver("digits", 2, 1, "all")
    for device, payload in states:
        obs.on_message(parse_message("state", device, payload))
    t = time.perf_counter()
    for device, payload in metrics:
        obs.on_message(parse_message("metrics", device, payload))
    controller = time.perf_counter() - t

    obs.start_latency_window()
    t = time.perf_counter()
    ev, _ = obs.evidence(Rollout("all", 50), None)
    evaluate(ev, gate_settings([]), 100)
    evaluation = time.perf_counter() - t
    return {"baseline_s": baseline, "controller_s": controller, "evaluate_s": evaluation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results = [run(args.devices, args.messages) for _ in range(args.runs)]
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    n = args.messages
    print(describe())
    print(f"{args.devices} devices, {n} metrics messages, median of {args.runs} runs")
    print(f"  json.loads only:        {n / med['baseline_s']:10.0f} msg/s")
    print(
        f"  parse + observer:       {n / med['controller_s']:10.0f} msg/s  "
        f"({med['controller_s'] / med['baseline_s']:.1f}x json.loads)"
    )
    print(f"  evidence + all gates:   {med['evaluate_s'] * 1000:10.1f} ms per evaluation (once a second)")


if __name__ == "__main__":
    main()
