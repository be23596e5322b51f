"""Measure the real agent under emulation: start-to-ready, inference latency, memory.

``python -m tests.pi.measure_agent [--arch arm64 armhf host] [--runs 3] [--requests 50]
[--json OUT]`` prints a Markdown table for ``bench/RESULTS.md``. Each run: a private
Mosquitto, ``litefleet repo init`` and ``push`` of the int8 digits model, then the agent
(``python -m agent run``) started under qemu exactly as ``tests/pi/test_agent_emulated.py``
starts it ("host" = the same agent natively on x86-64, for reference), with a stand-in
``$NOTIFY_SOCKET``. Measured per run:

- process start (just before ``Popen``) to ``READY=1`` on the notify socket, and to the
  first retained state showing the model active: the first start pulls, verifies, checks
  (golden vectors, forked child) and activates; the agent's own "ready X s after start"
  (counted from its ``Agent`` object, after the imports) is recorded too;
- the same after a restart with the model already installed (what a reboot costs);
- per-inference latency: REST ``:predict`` from a host client over one keep-alive
  connection (``.npy`` int8 sample, JSON float instance), and in process as the agent's own
  runner histogram reports it on the metrics topic (``latency_ms_total``);
- memory: ``rss_bytes`` in the agent's metrics (``/proc/self/statm`` read inside the
  emulated process), and VmRSS/VmHWM of the host process (qemu's) from the host's ``/proc``;
- push of v2 (the float32 model) to its ``activated`` event: download, forked check, swap.

Figures are qemu user-mode emulation on this host, not a Raspberry Pi's speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from converter.broker.mosquitto import BrokerConfig, BrokerProcess, free_port
from tests.support.harness import AgentProcess, FleetWatcher, must

from .emulated_agent import (
    EmulatedAgent,
    MetricsListener,
    NotifySocket,
    Rest,
    logged_ready_s,
    model_metrics,
)
from .userland import REPO_ROOT, ensure_userland

logger = logging.getLogger(__name__)

WAIT_S = 300.0


def _models(folder: Path) -> tuple[Any, Any]:
    from tests.support.models import convert_digits, digits_data, save_digits_cnn, save_digits_npz

    data = digits_data()
    keras = save_digits_cnn(folder / "digits.keras", data)
    calib = save_digits_npz(folder / "calib.npz", data.x_train)
    valid = save_digits_npz(folder / "valid.npz", data.x_test, data.y_test)
    (folder / "int8").mkdir()
    (folder / "float32").mkdir()
    with contextlib.redirect_stdout(sys.stderr):  # TensorFlow's prints
        int8 = convert_digits(keras, calib, valid, folder / "int8/digits.tflite", "int8")
        f32 = convert_digits(keras, calib, valid, folder / "float32/digits.tflite", "none")
    return int8, f32


class TimedWatcher(FleetWatcher):
    """A FleetWatcher that also keeps each message's host arrival time."""

    def __init__(self, port: int) -> None:
        self.arrivals: list[tuple[float, str, bytes]] = []
        super().__init__(port)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.arrivals.append((time.monotonic(), msg.topic, bytes(msg.payload)))
        super()._on_message(client, userdata, msg)

    def first_state(self, device_id: str, model: str, version: int, after: float) -> float:
        """Arrival time of the first retained state showing ``model`` ``version`` online."""
        for t, topic, payload in list(self.arrivals):
            if t >= after and topic.endswith(f"/{device_id}/state") and payload:
                doc = json.loads(payload)
                if doc.get("online") and (doc.get("model"), doc.get("version")) == (model, str(version)):
                    return t
        raise AssertionError(f"no state with {model} v{version}")


def _host_status_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1])
    return out


def _quantiles_ms(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"p50": statistics.median(ordered) * 1e3, "p90": ordered[int(0.9 * (len(ordered) - 1))] * 1e3}


def _timed_requests(count: int, call: Any) -> dict[str, float]:
    for _ in range(3):  # warm-up
        call()
    times = []
    for _ in range(count):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return _quantiles_ms(times)


def _start(agent: AgentProcess, notify: NotifySocket) -> float:
    notify.messages.clear()
    started = time.monotonic()
    agent.start(env={"NOTIFY_SOCKET": str(notify.path)})
    return started


def run_once(target: str, int8: Any, f32: Any, work: Path, requests: int) -> dict[str, Any]:
    r: dict[str, Any] = {}
    broker = BrokerProcess(BrokerConfig(data_dir=work / "broker"))
    broker.start()
    watch = TimedWatcher(broker.port)
    metrics = MetricsListener(broker.port, "pi-bench")
    notify = NotifySocket(work / "notify.sock")
    port = free_port()
    keys = {"http": f"127.0.0.1:{port}", "metrics_interval_s": 1.0, "log_level": "info"}
    if target == "host":
        agent: AgentProcess = AgentProcess(work, "pi-bench", broker.url, work / "repo/root.json", **keys)
    else:
        agent = EmulatedAgent(
            ensure_userland(target), work, "pi-bench", broker.url, work / "repo/root.json", **keys
        )
    rest = None
    try:
        repo = str(work / "repo")
        must("repo", "init", repo)
        must("push", str(int8.tflite), "--repo", repo, "--name", "digits", "--broker", broker.url)
        started = _start(agent, notify)
        ready_t, _ = notify.wait_for("READY", WAIT_S)
        watch.wait_active("pi-bench", "digits", 1, timeout_s=WAIT_S)
        r["first_ready_s"] = ready_t - started
        r["first_active_state_s"] = watch.first_state("pi-bench", "digits", 1, started) - started
        r["agent_ready_after_s"] = logged_ready_s(agent, timeout_s=30)
        assert agent.proc is not None

        rest = Rest(port)
        with np.load(int8.golden) as golden:
            sample = golden["input_0"][:1]
        x = (sample.astype(np.float32) + 128) / 255  # floats in [0, 1]: the agent quantizes them
        r["rest_npy_ms"] = _timed_requests(requests, lambda: rest.predict_npy("digits", sample))
        r["rest_json_ms"] = _timed_requests(requests, lambda: rest.predict_json("digits", x))
        served = 2 * (requests + 3)
        doc = metrics.wait_for(
            lambda d: (model_metrics(d, "digits") or {}).get("ok", 0) >= served, WAIT_S, f"ok >= {served}"
        )
        m = model_metrics(doc, "digits")
        assert m is not None
        r["inprocess_ms"] = {k: m["latency_ms_total"][k] for k in ("p50", "p90")}
        r["rss_inside_mb"] = doc["device"]["rss_bytes"] / 2**20
        r["rss_served_host_kb"] = _host_status_kb(agent.proc.pid)

        t = time.monotonic()
        must("push", str(f32.tflite), "--repo", repo, "--name", "digits", "--broker", broker.url)
        pushed = time.monotonic()
        watch.wait_active("pi-bench", "digits", 2, timeout_s=WAIT_S)
        r["push_v2_s"] = pushed - t
        r["v2_active_after_push_s"] = watch.first_state("pi-bench", "digits", 2, t) - pushed
        rest.close()
        rest = None

        t = time.monotonic()
        assert agent.stop(timeout_s=60) == 0, agent.log()[-2000:]
        r["stop_s"] = time.monotonic() - t
        started = _start(agent, notify)
        ready_t, _ = notify.wait_for("READY", WAIT_S)
        r["restart_ready_s"] = ready_t - started
        assert agent.proc is not None
        r["rss_restart_host_kb"] = _host_status_kb(agent.proc.pid)
    finally:
        if rest is not None:
            rest.close()
        agent.stop(timeout_s=60)
        notify.close()
        metrics.close()
        watch.close()
        broker.kill()
    return r


def _med(runs: list[dict[str, Any]], get: Any) -> tuple[float, float, float]:
    values = [get(r) for r in runs]
    return statistics.median(values), min(values), max(values)


def markdown(results: dict[str, list[dict[str, Any]]]) -> str:
    targets = list(results)
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fmt: str, get: Any) -> None:
        cells = []
        for t in targets:
            med, lo, hi = _med(results[t], get)
            cells.append(
                f"{fmt.format(med)} ({fmt.format(lo)}-{fmt.format(hi)})"
                if len(results[t]) > 1
                else fmt.format(med)
            )
        rows.append((label, cells))

    row(
        "first start: process start to READY=1 (pull, verify, forked check, activate)",
        "{:.2f} s",
        lambda r: r["first_ready_s"],
    )
    row(
        "first start: process start to the retained state showing digits v1",
        "{:.2f} s",
        lambda r: r["first_active_state_s"],
    )
    row(
        'first start: the agent\'s own "ready X s after start" (after its imports)',
        "{:.2f} s",
        lambda r: r["agent_ready_after_s"],
    )
    row(
        "restart with the model installed: process start to READY=1",
        "{:.2f} s",
        lambda r: r["restart_ready_s"],
    )
    row("REST `:predict`, `.npy` int8, 1 sample, p50", "{:.2f} ms", lambda r: r["rest_npy_ms"]["p50"])
    row("REST `:predict`, JSON float, 1 instance, p50", "{:.2f} ms", lambda r: r["rest_json_ms"]["p50"])
    row(
        "in process, the runner's own histogram (metrics `latency_ms_total`), p50",
        "{:.3f} ms",
        lambda r: r["inprocess_ms"]["p50"],
    )
    row(
        "RSS inside, serving (metrics `rss_bytes`: /proc/self/statm of the emulated process)",
        "{:.0f} MB",
        lambda r: r["rss_inside_mb"],
    )
    row(
        "RSS from the host (VmRSS of the qemu process), serving",
        "{:.0f} MB",
        lambda r: r["rss_served_host_kb"]["VmRSS"] / 1024,
    )
    row(
        "peak RSS from the host (VmHWM), serving",
        "{:.0f} MB",
        lambda r: r["rss_served_host_kb"]["VmHWM"] / 1024,
    )
    row(
        "RSS from the host after a restart, ready (model installed)",
        "{:.0f} MB",
        lambda r: r["rss_restart_host_kb"]["VmRSS"] / 1024,
    )
    row(
        "push v2 (float32): `litefleet push` on the host, start to exit", "{:.2f} s", lambda r: r["push_v2_s"]
    )
    row(
        "push v2: `litefleet push` start to the state showing v2 (download, forked check, swap)",
        "{:.2f} s",
        lambda r: r["push_v2_s"] + r["v2_active_after_push_s"],
    )
    row("SIGTERM to exit", "{:.2f} s", lambda r: r["stop_s"])
    header = "| measure | " + " | ".join(targets) + " |\n|---|" + "---|" * len(targets) + "\n"
    return header + "".join(f"| {label} | " + " | ".join(c) + " |\n" for label, c in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.pi.measure_agent")
    parser.add_argument(
        "--arch", nargs="+", default=["arm64", "armhf", "host"], choices=["arm64", "armhf", "host"]
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--table-from", type=Path, help="print the table of an earlier --json and exit")
    opts = parser.parse_args(argv)
    if opts.table_from:
        print(markdown(json.loads(opts.table_from.read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="pi-measure-agent-"))
    int8, f32 = _models(work)
    results: dict[str, list[dict[str, Any]]] = {t: [] for t in opts.arch}
    for i in range(opts.runs):  # targets interleaved, so background load hits them alike
        for target in opts.arch:
            folder = work / f"{target}-{i}"
            folder.mkdir()
            logger.info("run %d: %s", i + 1, target)
            results[target].append(run_once(target, int8, f32, folder, opts.requests))
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
