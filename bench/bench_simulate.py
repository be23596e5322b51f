"""N simulated devices (``litefleet-agent simulate``) take a push, against raw retained fan-out.

    .venv/bin/python bench/bench_simulate.py [--devices 1000] [--models digits,mobilenet] [--runs 1]
        [--processes 1] [--raw-max 2000]

Per model, on private Mosquittos (``litefleet broker``'s limits), same run:

* **raw**: N ``mosquitto_sub -C 1 -q 1`` processes receive one retained QoS 1 message of the
  bytes a device fetches (model + card + golden vectors), as ``bench_activation.py`` does
  (on a broker of the same configuration started for it, before the simulation and again
  after it: the machine's load moves within minutes, the ratio is given to each);
* **simulated**: ``--processes P`` processes of ``python -m agent simulate`` (default one;
  with P they split the N devices through ``--first``, each its own Python and GIL: P
  cores of simulation instead of one) (each device a real
  agent: its own connection, TUF client, download, checks, activation; what they share is
  in ``docs/scale.md``), idle and ready; ``litefleet push``; time until every retained
  state shows the version online (**all active**); the simulator's CPU (utime + stime of
  the process) from the push until its CPU use is back to idle, minus the idle rate
  measured just before, divided by N; the machine's busy share over the same window; the
  broker's CPU; wills (states without ``models``) and duplicate events seen.

Beyond ``--raw-max`` devices (default 2,000: one ``mosquitto_sub`` process per subscriber)
the raw fan-out is measured with ``--raw-max`` subscribers and scaled by N / raw-max; the
rows say so (``raw_scaled_from``).

The models are ``bench_activation.py``'s (built once with TensorFlow in
``bench/out/activation``). Agents run with metrics, refresh and probation at an hour.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_activation import (  # noqa: E402
    duplicate_events,
    ensure_models,
    machine_busy,
    offline_states,
    payload_of,
    proc_cpu_s,
    raw_fanout,
    rss_mb,
)
from bench.machine import describe  # noqa: E402
from converter.broker.mosquitto import BrokerConfig, BrokerProcess  # noqa: E402
from tests.support.harness import FleetWatcher, must, write_agent_config  # noqa: E402

SIMULATE = [sys.executable, "-m", "agent", "simulate"]


def cpu_s(pids: list[int]) -> float:
    return sum(proc_cpu_s(p) for p in pids)


def settle(pids: list[int], idle_rate: float, step_s: float = 0.5, timeout_s: float = 300) -> None:
    """Return once the simulators' CPU use is back near its idle rate for two steps."""
    quiet = 0
    last = cpu_s(pids)
    deadline = time.monotonic() + timeout_s
    while quiet < 2 and time.monotonic() < deadline:
        time.sleep(step_s)
        now = cpu_s(pids)
        quiet = quiet + 1 if now - last <= idle_rate * step_s + 0.03 else 0
        last = now


def raw_baselines(n: int, models: dict[str, Path], work: Path, raw_max: int) -> dict[str, float]:
    """Raw fan-out of each model's bytes to N mosquitto_sub, on a broker of its own (same
    configuration): after 1,000 copies of 5 MB Mosquitto keeps ~3.6 GB resident, which
    would hide the simulated devices' own footprint on a shared broker."""
    work.mkdir(exist_ok=True)
    broker = BrokerProcess(BrokerConfig(data_dir=work / "raw-broker", persistence=False))
    broker.start()
    raws: dict[str, float] = {}
    try:
        for name, model in models.items():
            raw_file = work / f"raw-{name}.bin"
            raw_file.write_bytes(payload_of(model))
            subs = min(n, raw_max)
            raws[name] = raw_fanout(broker.port, raw_file, subs)["wall_s"] * n / subs
            scaled = f" (measured with {subs}, scaled)" if subs < n else ""
            print(f"N={n} raw fan-out {name}: {raws[name]:.2f} s{scaled}", flush=True)
    finally:
        broker.stop()
    return raws


def run(
    n: int, models: dict[str, Path], runs: int, work: Path, processes: int = 1, raw_max: int = 2000
) -> list[dict[str, Any]]:
    raws = raw_baselines(n, models, work, raw_max)
    broker = BrokerProcess(BrokerConfig(data_dir=work / "broker", persistence=False))
    broker.start()
    repo = work / "repo"
    must("repo", "init", str(repo))
    config = write_agent_config(
        work / "template.toml",
        device_id="sim",
        broker=broker.url,
        state_dir=str(work / "state"),
        trusted_root=str(repo / "root.json"),
        metrics_interval_s=3600.0,
        refresh_interval_s=3600.0,
        probation_s=3600.0,
        probation_inferences=1000000,
        log_level="warning",
    )
    watch = FleetWatcher(broker.port)
    assert broker.proc is not None
    broker_rss0 = rss_mb(broker.proc.pid)
    t0 = time.perf_counter()
    shares = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
    sims = [
        subprocess.Popen(
            [*SIMULATE, "--config", str(config), "--devices", str(k), "--first", str(sum(shares[:i]))],
            stdout=subprocess.PIPE,
            stderr=open(work / f"simulate-{i}.log", "wb"),  # noqa: SIM115
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for i, k in enumerate(shares)
    ]
    pids = [p.pid for p in sims]
    rows: list[dict[str, Any]] = []
    try:
        ids = [f"sim-{i:05d}" for i in range(n)]
        watch.wait_for(
            lambda: all((watch.states.get(i) or {}).get("status") == "idle" for i in ids), 600, "all idle"
        )
        start_s = time.perf_counter() - t0
        start_cpu = cpu_s(pids)
        broker_rss = rss_mb(broker.proc.pid)
        print(
            f"N={n} simulated devices ({processes} processes) idle after {start_s:.1f} s, simulator CPU "
            f"{start_cpu:.1f} s, RSS {sum(rss_mb(p) for p in pids):.0f} MB; "
            f"broker RSS {broker_rss0:.1f} -> {broker_rss:.1f} MB "
            f"({(broker_rss - broker_rss0) * 1024 / n:.1f} KB per connected device)",
            flush=True,
        )
        settle(pids, 0.05 * processes)
        version = 0
        for run_no in range(runs):
            for name, model in models.items():
                version += 1
                rows.append(push_once(n, name, model, version, run_no, pids, watch, broker, repo, raws))
                rows[-1]["processes"] = processes
                rows[-1]["raw_scaled_from"] = min(n, raw_max) if raw_max < n else None
                rows[-1]["start_s"] = start_s
                rows[-1]["start_cpu_s"] = start_cpu
                rows[-1]["broker_rss_mb_before"] = broker_rss0
                rows[-1]["broker_rss_mb_connected"] = broker_rss
                rows[-1]["broker_rss_mb_after_push"] = rss_mb(broker.proc.pid)
    finally:
        for sim in sims:
            sim.send_signal(signal.SIGTERM)
        for sim in sims:
            try:
                sim.wait(300)
            except subprocess.TimeoutExpired:
                sim.kill()
        watch.close()
        broker.stop()
    # the raw fan-out again: the load of this shared machine changes within minutes (1,000
    # devices: raw 10.8 s at load average 2 before a simulation that ran at load 20-25)
    after = raw_baselines(n, models, work / "after", raw_max)
    for row in rows:
        row["raw_after_s"] = after[row["model"]]
        row["ratio_after"] = row["all_active_s"] / after[row["model"]]
    return rows


def push_once(
    n: int,
    name: str,
    model: Path,
    version: int,
    run_no: int,
    pids: list[int],
    watch: FleetWatcher,
    broker: BrokerProcess,
    repo: Path,
    raws: dict[str, float],
) -> dict[str, Any]:
    c0, w0 = cpu_s(pids), time.perf_counter()
    time.sleep(3.0)
    idle = (cpu_s(pids) - c0) / (time.perf_counter() - w0)
    wills0, ev0 = offline_states(watch), len(watch.events)
    busy0 = machine_busy()
    bc0 = proc_cpu_s(broker.proc.pid) if broker.proc else 0.0
    cpu0 = cpu_s(pids)
    t0 = time.perf_counter()
    must("push", str(model), "--repo", str(repo), "--name", "bench", "--broker", broker.url)
    ids = [f"sim-{i:05d}" for i in range(n)]
    watch.wait_for(
        lambda: all(
            (s := watch.states.get(i) or {}).get("version") == str(version) and s.get("online") is True
            for i in ids
        ),
        1800,
        f"every device serving v{version}",
    )
    active_s = time.perf_counter() - t0
    busy_active = machine_busy()
    settle(pids, idle)
    t1 = time.perf_counter()
    busy1 = machine_busy()
    cpu = cpu_s(pids) - cpu0 - idle * (t1 - t0)
    row = {
        "n": n,
        "model": name,
        "version": version,
        "run": run_no + 1,
        "all_active_s": active_s,
        "raw_s": raws[name],
        "ratio": active_s / raws[name],
        "simulator_cpu_s": cpu,
        "cpu_ms_per_device": cpu / n * 1000,
        "machine_busy_pct_to_active": 100 * (busy_active[0] - busy0[0]) / max(1, busy_active[1] - busy0[1]),
        "machine_busy_pct": 100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
        "window_s": t1 - t0,
        "broker_cpu_s": (proc_cpu_s(broker.proc.pid) if broker.proc else 0.0) - bc0,
        "idle_cpu_pct": idle * 100,
        "rss_mb": sum(rss_mb(p) for p in pids),
        "wills_seen": offline_states(watch) - wills0,
        "duplicate_events": duplicate_events(watch, ev0),
        "loadavg_1min_after": os.getloadavg()[0],
    }
    print(
        f"N={n} {name} v{version}: all active {active_s:.2f} s, raw {raws[name]:.2f} s, ratio "
        f"{row['ratio']:.1f}x; simulator CPU {cpu:.1f} s ({row['cpu_ms_per_device']:.1f} ms per device, "
        f"idle {row['idle_cpu_pct']:.1f} % of a core); machine busy "
        f"{row['machine_busy_pct_to_active']:.0f} % "
        f"until all active; broker CPU {row['broker_cpu_s']:.2f} s; RSS {row['rss_mb']:.0f} MB; wills "
        f"{row['wills_seen']}, duplicate events {row['duplicate_events']}; load average "
        f"{row['loadavg_1min_after']:.1f}",
        flush=True,
    )
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--models", default="digits,mobilenet")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--processes", type=int, default=1, help="simulator processes sharing the devices")
    ap.add_argument("--raw-max", type=int, default=2000, help="most mosquitto_sub processes for raw")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    all_models = ensure_models()
    models = {k: all_models[k] for k in args.models.split(",")}
    work = Path(tempfile.mkdtemp(prefix="lf-bench-simulate-"))
    print(f"# machine: {describe('paho-mqtt', 'tuf', 'ai-edge-litert', 'numpy')}")
    print(f"# work dir {work}")
    rows = run(args.devices, models, args.runs, work, args.processes, args.raw_max)
    print(
        "\n| N simulated (processes) | model | all active (s) | raw fan-out before / after (s) "
        "| ratio to each | simulator CPU (s) | per device (ms) | machine busy | RSS |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['n']} ({r['processes']}) | {r['model']} v{r['version']} | {r['all_active_s']:.2f} | "
            f"{r['raw_s']:.2f} / "
            f"{r['raw_after_s']:.2f} | {r['ratio']:.1f}x / {r['ratio_after']:.1f}x | "
            f"{r['simulator_cpu_s']:.1f} | {r['cpu_ms_per_device']:.1f} | "
            f"{r['machine_busy_pct_to_active']:.0f} % | {r['rss_mb']:.0f} MB |"
        )
    by_model: dict[str, list[float]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).extend((r["ratio"], r["ratio_after"]))
    print("median ratio: " + ", ".join(f"{k} {statistics.median(v):.1f}x" for k, v in by_model.items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
