"""Agent CPU per activation with N real agents on one Mosquitto, against raw retained fan-out.

    .venv/bin/python bench/bench_activation.py [--agents 10,100] [--models digits,mobilenet]
                                               [--runs 1] [--probe K] [--cprofile]

Per N (same broker, same run):

* **raw**: N ``mosquitto_sub -C 1 -q 1`` processes subscribed to one topic (each has
  seen its SUBACK); ``mosquitto_pub -r -q 1 -f`` sends the same bytes the agents fetch
  (model + card + golden vectors, one retained QoS 1 message); time from starting the
  publisher to the last subscriber's exit.
* **agents**: N ``python -m agent run`` processes (``tests.support.harness.AgentProcess``),
  connected and idle; ``litefleet push`` of the model (name ``bench``, next version);
  time from the push's start to every retained state showing that version online
  (**all active**). The fleet is then left to settle (its CPU use back to idle:
  the will-renewal reconnect and anything else an activation triggers is counted).
  **Agent CPU per activation** = sum over the agents of utime+stime+cutime+cstime from
  ``/proc/<pid>/stat`` (the forked golden check is a waited child: it is in cutime),
  end minus start, minus the idle rate measured just before, divided by N.

Agents run with ``log_level = "info"``, metrics, refresh and probation intervals set
to an hour so that no periodic work falls into the window; what they cost per
period is the probe's business. ``--probe K`` runs the first K agents under
:mod:`bench.agent_probe` (the same agent with per-phase CPU timers) and prints their
phase table; ``--cprofile`` adds a cProfile of their main thread over each push.
An unmeasured warm-up push (the first model) comes first, as a device in the field
has served a model before (``--no-warmup`` measures a fresh agent's first activation,
which also pays the lazy imports of the check and the golden vectors).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import build_in_child  # noqa: E402
from bench.machine import describe  # noqa: E402
from converter.broker.mosquitto import BrokerConfig, BrokerProcess  # noqa: E402
from tests.support.harness import AgentProcess, FleetWatcher, must  # noqa: E402

OUT = REPO / "bench" / "out" / "activation"
TICK = os.sysconf("SC_CLK_TCK")


# -- models (child process with TensorFlow) ----------------------------------------------
def build_models(out: Path) -> None:  # runs in the child
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import numpy as np

    from converter.convert.pipeline import ConvertConfig, convert_model
    from tests.support import models as m

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "digits" / "digits.tflite").exists():
        d = out / "digits"
        d.mkdir(exist_ok=True)
        data = m.digits_data()
        keras_path = m.save_digits_cnn(d / "digits.keras", data)
        cal = m.save_digits_npz(d / "cal.npz", data.x_train)
        val = m.save_digits_npz(d / "val.npz", data.x_test, data.y_test)
        m.convert_digits(keras_path, cal, val, d / "digits.tflite", "int8", force=True)
    if not (out / "mobilenet" / "mobilenet.tflite").exists():
        d = out / "mobilenet"
        d.mkdir(exist_ok=True)
        model = m.mobilenet_v2(224, bn_data=m.synthetic_images(16, seed=1), classifier_activation=None)
        model.save(d / "mobilenet.keras")
        np.savez(d / "cal.npz", x=m.synthetic_images(32, seed=3))
        convert_model(
            d / "mobilenet.keras",
            d / "mobilenet.tflite",
            ConvertConfig(quantize="int8", latency_runs=5, force=True),
            calibration=d / "cal.npz",
        )


def ensure_models() -> dict[str, Path]:
    want = {"digits": OUT / "digits" / "digits.tflite", "mobilenet": OUT / "mobilenet" / "mobilenet.tflite"}
    if not all(p.exists() for p in want.values()):
        build_in_child(__file__, OUT)
    return want


def payload_of(model: Path) -> bytes:
    """What an agent fetches for one release: model, card and golden vectors."""
    stem = model.with_suffix("")
    return b"".join(p.read_bytes() for p in (model, Path(f"{stem}.card.json"), Path(f"{stem}.golden.npz")))


# -- /proc ---------------------------------------------------------------------------------
def proc_cpu_s(pid: int) -> float:
    """utime + stime + cutime + cstime of ``pid`` in seconds (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / TICK


def children_of(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def agent_cpu_s(pid: int) -> float:
    """An agent's CPU with its waited children (cutime) and its live ones (a long-lived
    check process is never waited while the agent runs: its CPU counts here)."""
    return proc_cpu_s(pid) + sum(proc_cpu_s(c) for c in children_of(pid))


def private_mb(pid: int) -> float:
    """Private (unshared) resident memory of ``pid`` in MB, from smaps_rollup."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return total / 1024


def pss_mb(pid: int) -> float:
    """Proportional set size of ``pid`` in MB (shared pages divided among their users)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return float("nan")


def footprint(n: int, agents: list[BenchAgent], what: str) -> dict[str, float]:
    """Median RSS, PSS and private memory of the idle agents (``what`` says which model)."""
    row = {
        "rss_mb": statistics.median(rss_mb(a.pid) for a in agents),
        "pss_mb": statistics.median(pss_mb(a.pid) for a in agents),
        "private_mb": statistics.median(private_mb(a.pid) for a in agents),
        "max_rss_mb": max(rss_mb(a.pid) for a in agents),
    }
    print(
        f"N={n} idle agents ({len(agents)}), {what}: RSS median {row['rss_mb']:.1f} MB "
        f"(max {row['max_rss_mb']:.1f}), "
        f"PSS median {row['pss_mb']:.1f} MB, private median {row['private_mb']:.1f} MB",
        flush=True,
    )
    return row


def proc_faults(pid: int) -> int:
    """Minor page faults of ``pid`` and its waited children so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return int(fields[7]) + int(fields[8])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine_busy() -> tuple[int, int]:
    """(busy ticks, all ticks) of the whole machine so far."""
    cpu = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = cpu[3] + cpu[4]
    return sum(cpu) - idle, sum(cpu)


# -- raw fan-out -----------------------------------------------------------------------------
def raw_fanout(port: int, payload: Path, n: int) -> dict[str, float]:
    """N mosquitto_sub receive one retained QoS 1 message of ``payload``'s bytes."""
    topic = f"bench/raw/{time.monotonic_ns()}"
    subs = []
    for _ in range(n):
        p = subprocess.Popen(
            [
                "stdbuf",
                "-oL",
                "mosquitto_sub",
                "-p",
                str(port),
                "-t",
                topic,
                "-C",
                "1",
                "-q",
                "1",
                "-d",
                "-F",
                "%l",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        subs.append(p)
    for p in subs:  # each prints "received SUBACK" once subscribed
        assert p.stdout is not None
        while "SUBACK" not in (line := p.stdout.readline()):
            if not line:
                raise RuntimeError("mosquitto_sub ended before subscribing")
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(
        ["mosquitto_pub", "-p", str(port), "-t", topic, "-q", "1", "-r", "-f", str(payload)], check=True
    )
    for p in subs:
        p.communicate(timeout=120)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["mosquitto_pub", "-p", str(port), "-t", topic, "-r", "-n"], check=True)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu}


# -- agents ------------------------------------------------------------------------------------
class BenchAgent(AgentProcess):
    """An AgentProcess that may run under :mod:`bench.agent_probe`."""

    def __init__(self, *args: Any, module: str = "agent", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.module = module
        self.tree = "this"

    def start(self, *, env: dict[str, str] | None = None) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
        # the probe always comes from this tree (the agent from PYTHONPATH's): run it as a file
        entry = ["-m", "agent"] if self.module == "agent" else [str(REPO / "bench" / "agent_probe.py")]
        self.proc = subprocess.Popen(
            [sys.executable, *entry, "run", "--config", str(self.config)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=self.workdir,
        )
        log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def fleet_cpu(agents: list[BenchAgent]) -> float:
    return sum(agent_cpu_s(a.pid) for a in agents)


def settle(agents: list[BenchAgent], idle_rate: float, step_s: float = 0.5, timeout_s: float = 120) -> None:
    """Return once the fleet's CPU use is back near idle for two steps in a row."""
    quiet = 0
    last = fleet_cpu(agents)
    deadline = time.monotonic() + timeout_s
    while quiet < 2 and time.monotonic() < deadline:
        time.sleep(step_s)
        now = fleet_cpu(agents)
        # 10 ms ticks: allow one tick per 10 agents per step over the idle rate
        quiet = quiet + 1 if now - last <= idle_rate * step_s + max(0.02, len(agents) * 0.001) else 0
        last = now


def offline_states(watch: FleetWatcher) -> int:
    """Retained states saying offline seen so far: a will (docs/protocol.md 6.1: no
    ``models`` key; before issue 11 the full state with online false) of an unclean
    disconnect. No agent stops cleanly during a push here."""
    return sum(
        1
        for t, p in list(watch.raw)
        if t.endswith("/state") and (b'"online": false' in p or (p and b'"models"' not in p))
    )


def duplicate_events(watch: FleetWatcher, since: int) -> int:
    """Events seen more than once (same device, boot and seq: a QoS 1 redelivery) among
    those after the ``since``-th."""
    from collections import Counter

    seen = Counter((e.get("device_id"), e.get("boot"), e.get("seq")) for e in list(watch.events)[since:])
    return sum(n - 1 for n in seen.values() if n > 1)


def probe_snapshot(agents: list[BenchAgent], probe_dir: Path, index: int) -> None:
    import signal

    for a in agents:
        a.proc.send_signal(signal.SIGUSR1)  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    for a in agents:
        while not (probe_dir / f"{a.pid}.json.{index}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)


def probe_table(agents: list[BenchAgent], probe_dir: Path, i0: int, i1: int) -> dict[str, Any]:
    """Mean per agent over one push: phase -> [calls, CPU ms, wall ms], thread CPU, child phases."""
    phases: dict[str, list[float]] = {}
    threads: dict[str, float] = {}
    totals = {"self": 0.0, "children": 0.0, "process_cpu": 0.0}
    for a in agents:
        s0 = json.loads((probe_dir / f"{a.pid}.json.{i0}").read_text())
        s1 = json.loads((probe_dir / f"{a.pid}.json.{i1}").read_text())
        for k, v in s1["phases"].items():
            v0 = s0["phases"].get(k, [0, 0.0, 0.0])
            d = [v[0] - v0[0], (v[1] - v0[1]) * 1000, (v[2] - v0[2]) * 1000]
            if d[0]:
                row = phases.setdefault(k, [0, 0.0, 0.0])
                for j in range(3):
                    row[j] += d[j] / len(agents)
        for k, v in s1["threads"].items():
            threads[k] = threads.get(k, 0.0) + (v - s0["threads"].get(k, 0.0)) * 1000 / len(agents)
        totals["self"] += (
            (s1["self_user"] + s1["self_system"] - s0["self_user"] - s0["self_system"]) * 1000 / len(agents)
        )
        totals["process_cpu"] += (s1["process_cpu"] - s0["process_cpu"]) * 1000 / len(agents)
        totals["children"] += (
            (s1["children_user"] + s1["children_system"] - s0["children_user"] - s0["children_system"])
            * 1000
            / len(agents)
        )
    children: dict[str, list[float]] = {}
    t_lo, t_hi = (
        json.loads((probe_dir / f"{agents[0].pid}.json.{i0}").read_text())["time"],
        json.loads((probe_dir / f"{agents[0].pid}.json.{i1}").read_text())["time"],
    )
    pids = {str(a.pid) for a in agents}
    files = [
        f
        for f in probe_dir.glob("child-*.json")
        if f.name.split("-")[1] in pids and t_lo <= f.stat().st_mtime <= t_hi + 1
    ]
    for f in files:
        doc = json.loads(f.read_text())
        for k, v in doc["phases"].items():
            row = children.setdefault(k, [0, 0.0, 0.0])
            row[0] += v[0] / len(files)
            row[1] += v[1] * 1000 / len(files)
            row[2] += v[2] * 1000 / len(files)
        row = children.setdefault("(check process CPU for this check, process_time)", [0, 0.0, 0.0])
        row[0] += 1 / len(files)
        row[1] += doc["process_cpu"] * 1000 / len(files)
    return {"phases": phases, "threads": threads, "totals": totals, "child": children}


def print_probe(title: str, tab: dict[str, Any]) -> None:
    print(f"\n#### probe: {title} (mean per probed agent)")
    t = tab["totals"]
    child = tab["child"].get("(check process CPU for this check, process_time)", [0, 0.0])[1]
    print(
        f"process CPU (os.times, 10 ms ticks) {t['self'] + t['children']:.1f} ms = own {t['self']:.1f} "
        f"+ waited children {t['children']:.1f}; precise: own {t['process_cpu']:.1f} (process_time, all "
        f"threads) + check child {child:.1f} = {t['process_cpu'] + child:.1f} ms; live threads: "
        + ", ".join(f"{k} {v:.1f}" for k, v in tab["threads"].items())
    )
    print("| phase (inclusive, calling thread's CPU) | calls | CPU ms | wall ms |")
    print("| --- | ---: | ---: | ---: |")
    for k, (n, c, w) in sorted(tab["phases"].items()):
        print(f"| {k} | {n:.1f} | {c:.2f} | {w:.2f} |")
    if tab["child"]:
        print("| **in the forked check child** | | | |")
        for k, (n, c, w) in sorted(tab["child"].items()):
            print(f"| child: {k} | {n:.1f} | {c:.2f} | {w:.2f} |")


def export_trees(spec: str, work: Path) -> dict[str, Path]:
    """``NAME=REV`` (a commit: exported with ``git archive``) or ``NAME=DIR``; ``this`` = this tree."""
    trees: dict[str, Path] = {}
    for item in spec.split(","):
        name, _, where = item.partition("=")
        if not where or where == "this":
            trees[name] = REPO
        elif Path(where).is_dir():
            trees[name] = Path(where).resolve()
        else:
            dest = work / f"tree-{name}"
            dest.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", where], check=True, capture_output=True
            )
            subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
            trees[name] = dest
    return trees


class Window:
    """CPU, faults and time of a group of agents across one push."""

    def __init__(self, agents: list[BenchAgent]) -> None:
        self.agents = agents
        self.cpu0 = fleet_cpu(agents)
        self.flt0 = sum(proc_faults(p) for a in agents for p in (a.pid, *children_of(a.pid)))

    def close(self, idle_rate: float, seconds: float) -> tuple[float, float]:
        """(CPU ms per agent above idle, minor faults per agent)."""
        n = len(self.agents)
        cpu = fleet_cpu(self.agents) - self.cpu0 - idle_rate * seconds
        flt = sum(proc_faults(p) for a in self.agents for p in (a.pid, *children_of(a.pid)))
        return cpu / n * 1000, (flt - self.flt0) / n


def run_fleet(
    n: int, models: dict[str, Path], trees: dict[str, Path], args: argparse.Namespace, work: Path
) -> list[dict[str, Any]]:
    broker = BrokerProcess(BrokerConfig(data_dir=work / f"broker-{n}", persistence=False))
    broker.start()
    repo = work / f"repo-{n}"
    must("repo", "init", str(repo))
    watch = FleetWatcher(broker.port)
    probe_dir = work / f"probe-{n}"
    agents: list[BenchAgent] = []
    groups: dict[str, list[BenchAgent]] = {t: [] for t in trees}
    rows: list[dict[str, Any]] = []
    raws: dict[str, dict[str, float]] = {}
    try:
        for name, model in models.items():  # raw baseline first, agents not yet running
            raw_file = work / f"raw-{name}.bin"
            raw_file.write_bytes(payload_of(model))
            raws[name] = raw_fanout(broker.port, raw_file, n)
            print(f"N={n} raw fan-out {name}: {raws[name]['wall_s'] * 1000:.0f} ms", flush=True)
        adir = work / f"agents-{n}"
        adir.mkdir()
        names = list(trees)
        isolation = dict(item.split("=", 1) for item in args.check_isolation.split(",") if item)
        for i in range(n):
            tree = names[i % len(names)]
            probed = len(groups[tree]) < args.probe
            a = BenchAgent(
                adir,
                f"dev-{i:04d}",
                broker.url,
                repo / "root.json",
                module="bench.agent_probe" if probed else "agent",
                log_level="info",
                metrics_interval_s=3600.0,
                refresh_interval_s=3600.0,
                probation_s=3600.0,
                probation_inferences=1000000,
                **({"check_isolation": isolation[tree]} if tree in isolation else {}),
            )
            a.tree = tree
            env = {"LF_PROBE_OUT": str(probe_dir), "PYTHONPATH": str(trees[tree])}
            if probed and args.cprofile:
                env["LF_PROBE_CPROFILE"] = "1"
            a.start(env=env)
            agents.append(a)
            groups[tree].append(a)
        ids = [a.device_id for a in agents]

        def all_idle() -> bool:
            return all((watch.states.get(i) or {}).get("status") in ("idle", "serving") for i in ids)

        watch.wait_for(all_idle, 60 + n, "every agent online and idle")
        settle(agents, 0.0, timeout_s=60)
        for t, g in groups.items():
            footprint(n, g, f"tree {t}, no model")
        probed = {t: g[: args.probe] for t, g in groups.items()}
        snap = 0
        version = 0
        if args.warmup:
            # a device in the field has served a model before: its lazy imports are done
            version += 1
            first = next(iter(models.values()))
            must("push", str(first), "--repo", str(repo), "--name", "bench", "--broker", broker.url)
            watch.wait_for(
                lambda: all((watch.states.get(i) or {}).get("version") == "1" for i in ids),
                120 + 3 * n,
                "warm-up push active",
            )
            settle(agents, 0.0, timeout_s=60)
            time.sleep(3.0)  # the state folder's old versions cleaned, malloc_trim done
            for t, g in groups.items():
                footprint(n, g, f"tree {t}, serving {next(iter(models))} (the warm-up push)")
        for run in range(args.runs):
            for name, model in models.items():
                version += 1
                rows += measure_push(
                    n,
                    name,
                    model,
                    version,
                    run,
                    agents,
                    groups,
                    probed,
                    probe_dir,
                    snap,
                    raws[name],
                    watch,
                    broker,
                    repo,
                )
                snap += 2
    finally:
        for a in agents:
            a.stop()
        watch.close()
        broker.stop()
    return rows


def measure_push(
    n: int,
    name: str,
    model: Path,
    version: int,
    run: int,
    agents: list[BenchAgent],
    groups: dict[str, list[BenchAgent]],
    probed: dict[str, list[BenchAgent]],
    probe_dir: Path,
    snap: int,
    raw: dict[str, float],
    watch: FleetWatcher,
    broker: BrokerProcess,
    repo: Path,
) -> list[dict[str, Any]]:
    idle: dict[str, float] = {}
    c0 = {t: fleet_cpu(g) for t, g in groups.items()}
    w0 = time.perf_counter()
    time.sleep(2.0)
    for t, g in groups.items():
        idle[t] = (fleet_cpu(g) - c0[t]) / (time.perf_counter() - w0)
    every_probed = [a for g in probed.values() for a in g]
    if every_probed:
        probe_snapshot(every_probed, probe_dir, snap)
    wills0 = offline_states(watch)
    raw0 = len(watch.raw)
    ev0 = len(watch.events)
    busy0 = machine_busy()
    bc0 = proc_cpu_s(broker.proc.pid) if broker.proc else 0.0
    windows = {t: Window(g) for t, g in groups.items()}
    t0 = time.perf_counter()
    must("push", str(model), "--repo", str(repo), "--name", "bench", "--broker", broker.url)
    t_push = time.perf_counter() - t0
    active_at: dict[str, float] = {}

    def all_active() -> bool:
        for t, g in groups.items():
            if t not in active_at and all(
                (st := watch.states.get(a.device_id) or {}).get("version") == str(version)
                and st.get("online") is True
                for a in g
            ):
                active_at[t] = time.perf_counter() - t0
        return len(active_at) == len(groups)

    watch.wait_for(all_active, 120 + 3 * n, f"every agent serving v{version}")
    t_active = time.perf_counter() - t0
    settle(agents, sum(idle.values()))
    t1 = time.perf_counter()
    busy1 = machine_busy()
    bc1 = proc_cpu_s(broker.proc.pid) if broker.proc else 0.0
    results = {t: windows[t].close(idle[t], t1 - t0) for t in groups}
    sent: dict[str, dict[str, int]] = {}
    for topic, _ in list(watch.raw)[raw0:]:
        parts = topic.split("/")
        sent.setdefault(parts[-2], {}).setdefault(parts[-1], 0)
        sent[parts[-2]][parts[-1]] += 1
    if every_probed:
        probe_snapshot(every_probed, probe_dir, snap + 1)
        for t, g in probed.items():
            if g:
                print_probe(f"N={n} {name} v{version} tree {t}", probe_table(g, probe_dir, snap, snap + 1))
    rows = []
    for t, g in groups.items():
        cpu_ms, faults = results[t]
        row = {
            "n": n,
            "tree": t,
            "agents_in_tree": len(g),
            "model": name,
            "version": version,
            "run": run + 1,
            "push_s": t_push,
            "all_active_s": t_active,
            "tree_active_s": active_at[t],
            "raw_s": raw["wall_s"],
            "ratio": t_active / raw["wall_s"],
            "cpu_ms_per_activation": cpu_ms,
            "minor_faults_per_activation": faults,
            "idle_ms_per_s_per_agent": idle[t] / len(g) * 1000,
            "window_s": t1 - t0,
            "machine_busy_pct": 100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
            "broker_cpu_s": bc1 - bc0,
            "rss_mb_median": statistics.median(rss_mb(a.pid) for a in g),
            "agent_private_mb_median": statistics.median(private_mb(a.pid) for a in g),
            "children_private_mb_median": statistics.median(
                sum(private_mb(c) for c in children_of(a.pid)) for a in g
            ),
            "wills_seen": offline_states(watch) - wills0,
            "duplicate_events": duplicate_events(watch, ev0),
            "state_msgs_per_activation": sum(sent.get(a.device_id, {}).get("state", 0) for a in g) / len(g),
            "event_msgs_per_activation": sum(sent.get(a.device_id, {}).get("events", 0) for a in g) / len(g),
        }
        rows.append(row)
        print(
            f"N={n} {name} v{version} [{t}, {len(g)} agents]: all active {t_active:.2f} s (this tree "
            f"{active_at[t]:.2f} s; push command {t_push:.2f} s), raw {raw['wall_s']:.2f} s, ratio "
            f"{row['ratio']:.1f}x; agent CPU {cpu_ms:.1f} ms per activation (window {t1 - t0:.1f} s, idle "
            f"{row['idle_ms_per_s_per_agent']:.2f} ms/s/agent); busy {row['machine_busy_pct']:.0f} %; "
            f"broker CPU {row['broker_cpu_s']:.2f} s; RSS median {row['rss_mb_median']:.1f} MB (private "
            f"{row['agent_private_mb_median']:.1f} MB, live children private "
            f"{row['children_private_mb_median']:.1f} MB); offline "
            f"states seen {row['wills_seen']}, duplicate events {row['duplicate_events']}; minor faults "
            f"{faults:.0f}, state messages "
            f"{row['state_msgs_per_activation']:.1f}, events {row['event_msgs_per_activation']:.1f} "
            "per activation",
            flush=True,
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", default="10")
    ap.add_argument("--models", default="digits,mobilenet")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument(
        "--trees",
        default="this=this",
        help="NAME=REV|DIR,...: agents run these source trees round-robin in one fleet (A/B in one run)",
    )
    ap.add_argument(
        "--check-isolation",
        default="",
        help="NAME=fork|restart,...: the agents of tree NAME get this check_isolation "
        "(e.g. --trees fork=this,restart=this --check-isolation restart=restart)",
    )
    ap.add_argument("--probe", type=int, default=0, help="run K agents per tree under bench.agent_probe")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false", help="measure the first push too")
    ap.add_argument("--json", type=Path, help="write every row here")
    ap.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        build_models(args.build)
        return 0
    all_models = ensure_models()
    models = {k: all_models[k] for k in args.models.split(",")}
    work = Path(tempfile.mkdtemp(prefix="lf-bench-activation-"))
    trees = export_trees(args.trees, work)
    print(f"# machine: {describe('paho-mqtt', 'tuf', 'ai-edge-litert', 'numpy')}")
    print(f"# work dir {work}; models: " + ", ".join(f"{k} {p.stat().st_size} B" for k, p in models.items()))
    print("# trees: " + ", ".join(f"{k} {v}" for k, v in trees.items()))
    rows: list[dict[str, Any]] = []
    for n in (int(x) for x in args.agents.split(",")):
        rows += run_fleet(n, models, trees, args, work)
    print(
        "\n| N | tree | model | all active (s) | raw (s) | ratio | agent CPU / activation (ms) | busy | RSS |"
    )
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['n']} | {r['tree']} | {r['model']} v{r['version']} | {r['all_active_s']:.2f} | "
            f"{r['raw_s']:.2f} | {r['ratio']:.1f}x | {r['cpu_ms_per_activation']:.1f} | "
            f"{r['machine_busy_pct']:.0f} % | {r['rss_mb_median']:.1f} MB |"
        )
    summary: dict[tuple[int, str, str], list[float]] = {}
    for r in rows:
        summary.setdefault((r["n"], r["tree"], r["model"]), []).append(r["cpu_ms_per_activation"])
    print(
        "\nmedian agent CPU per activation (ms): "
        + "; ".join(
            f"N={k[0]} {k[1]} {k[2]} {statistics.median(v):.1f} (runs: {', '.join(f'{x:.0f}' for x in v)})"
            for k, v in sorted(summary.items())
        )
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
