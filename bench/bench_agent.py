"""The device agent's footprint: start-to-ready time and idle resident memory.

    .venv/bin/python bench/bench_agent.py [--runs 5]

The agent runs as systemd would run it: ``python -m agent run`` with
``NOTIFY_SOCKET`` pointing at a datagram socket this script listens on, so
"ready" is the agent's own ``READY=1``, sent once its installed models are loaded
and its REST API listens (until issue 13 it also waited for the broker and a first
refresh: figures from before are not comparable). Two cases: a fresh device with no
model, and a device restarting with the digits int8 model installed.
RSS is read from ``/proc/<pid>/status`` after a few seconds idle. Baselines in
the same run: a bare Python interpreter, and one that imports only numpy,
paho-mqtt, tuf and ai_edge_litert (the agent's dependencies).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe
from converter.broker.mosquitto import BrokerConfig, BrokerProcess
from tests.support.harness import FleetWatcher, must, write_agent_config

REPO = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def python_rss(code: str) -> float:
    proc = subprocess.Popen([sys.executable, "-c", code + "\nimport time; time.sleep(3)"])
    time.sleep(2.0)
    try:
        return rss_mb(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def start_agent(config: Path, work: Path) -> tuple[float, float]:
    """(seconds from exec to READY=1, idle RSS in MB)."""
    sock_path = work / f"notify-{time.monotonic_ns()}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            msg = sock.recv(4096).decode()
            if "READY=1" in msg.split("\n"):
                ready_s = time.perf_counter() - t0
                break
        time.sleep(3.0)  # idle
        return ready_s, rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
        sock.close()
        sock_path.unlink()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lf-bench-agent-"))
    print(f"# machine: {describe('ai-edge-litert', 'numpy', 'paho-mqtt', 'tuf')}")
    bare = python_rss("pass")
    deps = python_rss("import numpy, paho.mqtt.client, tuf.ngclient, ai_edge_litert.interpreter")
    broker = BrokerProcess(BrokerConfig(data_dir=work / "broker"))
    broker.start()
    try:
        repo = work / "repo"
        must("repo", "init", str(repo))
        results: dict[str, list[tuple[float, float]]] = {"no model": [], "digits int8 loaded": []}
        for run in range(args.runs):
            cfg = write_agent_config(
                work / f"empty-{run}.toml",
                device_id=f"empty-{run}",
                broker=broker.url,
                state_dir=str(work / f"st-empty-{run}"),
                trusted_root=str(repo / "root.json"),
                http="127.0.0.1:0",
            )
            results["no model"].append(start_agent(cfg, work))
        # a device with the model installed: push it, let one agent take it, then restart it
        from tests.support.models import convert_digits, digits_data, save_digits_cnn, save_digits_npz

        data = digits_data()
        keras = save_digits_cnn(work / "digits.keras", data)
        model = convert_digits(
            keras,
            save_digits_npz(work / "cal.npz", data.x_train),
            save_digits_npz(work / "val.npz", data.x_test, data.y_test),
            work / "digits.tflite",
            "int8",
        )
        must("push", str(model.tflite), "--repo", str(repo), "--name", "digits", "--broker", broker.url)
        cfg = write_agent_config(
            work / "loaded.toml",
            device_id="loaded",
            broker=broker.url,
            state_dir=str(work / "st-loaded"),
            trusted_root=str(repo / "root.json"),
            http="127.0.0.1:0",
        )
        watch = FleetWatcher(broker.port)
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(cfg)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        watch.wait_active("loaded", "digits", 1, timeout_s=60)
        proc.terminate()
        proc.wait(10)
        watch.close()
        for _ in range(args.runs):
            results["digits int8 loaded"].append(start_agent(cfg, work))
    finally:
        broker.stop()
    print(f"\nbaselines: bare python {bare:.1f} MB; python importing the agent's dependencies {deps:.1f} MB")
    print("| case | start-to-ready p50 (s) | idle RSS p50 (MB) | runs |")
    print("| --- | --- | --- | --- |")
    for case, rows in results.items():
        ready = statistics.median(r[0] for r in rows)
        rss = statistics.median(r[1] for r in rows)
        print(f"| {case} | {ready:.2f} | {rss:.1f} | {len(rows)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
