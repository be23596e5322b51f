"""What the rollout's device side costs: the output sketch, the shadow sample at k = 10, memory.

    .venv/bin/python bench/bench_rollout.py                  # prints Markdown and PASS/FAIL
    .venv/bin/python bench/bench_rollout.py --write-results  # also updates bench/RESULTS.md
    .venv/bin/python bench/bench_rollout.py --quick          # fewer iterations (~2 min)

All in one run, every comparison as a ratio of figures measured in alternating blocks on ONE
runner (one interpreter, one server) whose sketch or shadow is switched on and off between
blocks, so no difference between two interpreters' memory placement gets in (the machine is
shared and noisy); an A/A column (two blocks of the same set-up) shows the noise floor.

- **Sketch on REST**: p50 of ``POST /v1/models/digits:predict`` (JSON, one sample, keep-alive
  client in another process) against an in-process server, the runner's sketch on or off
  (``stats.outputs``). Goal: <= 3 % added.
- **Sketch in process**: p50 of ``agent.active_models(registry).predict`` (the registry path
  REST/MQTT use, int8 input of the exact dtype) for MobileNetV2 224 int8 (``weights=None``,
  1000-class softmax), with and without the sketch, and A/A. Goal: <= 1 % added. Digits too,
  for scale (no goal: the whole call is ~5 µs there).
- **Shadow at k = 10**: the same REST and in-process set-ups with a shadow attached (the
  previous version: digits float32 for REST, a second MobileNetV2 interpreter in process)
  against none: p50, p99, and the process's CPU per request (``time.process_time`` of the
  serving process, the shadow's thread included).
- **Memory**: an agent process (``python -m agent run``) on a private Mosquitto: idle RSS with
  the model active and no shadow, with the previous version loaded as a shadow
  (``shadow_k = 10``), and after the re-target without ``shadow_k`` released it; for digits and
  MobileNetV2. Goal (issue 10): the idle agent without shadowing stays under 60 MB.

Models are built by TensorFlow in a child process into ``bench/out/rollout/`` and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "out" / "rollout"
RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## Rollouts: output sketch and shadow evaluation"

import numpy as np  # noqa: E402

from bench.common import build_in_child, check, exit_code  # noqa: E402
from bench.machine import describe  # noqa: E402


# -- models (child process with TensorFlow) ---------------------------------------------------
def build_models(out: Path) -> None:  # runs in the child
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf

    from tests.support import models as m

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "digits_int8.tflite").exists():
        data = m.digits_data()
        keras_path = m.save_digits_cnn(out / "digits.keras", data)
        cal = m.save_digits_npz(out / "digits-cal.npz", data.x_train)
        val = m.save_digits_npz(out / "digits-val.npz", data.x_test, data.y_test)
        m.convert_digits(keras_path, cal, val, out / "digits_f32.tflite", "none")
        m.convert_digits(keras_path, cal, val, out / "digits_int8.tflite", "int8")
    if not (out / "mobilenet_v2_int8.tflite").exists():
        images = m.synthetic_images(16, seed=1)
        model = m.mobilenet_v2(bn_data=images)
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        rng = np.random.default_rng(0)
        conv.representative_dataset = lambda: (
            [rng.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)] for _ in range(20)
        )
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
        part = out / "mobilenet_v2_int8.tflite.part"
        part.write_bytes(conv.convert())
        os.replace(part, out / "mobilenet_v2_int8.tflite")


def ensure_models() -> dict[str, Path]:
    want = {
        "digits": OUT / "digits_int8.tflite",
        "digits_f32": OUT / "digits_f32.tflite",
        "mobilenet_v2": OUT / "mobilenet_v2_int8.tflite",
    }
    if not all(p.exists() for p in want.values()):
        build_in_child(__file__, OUT)
    return want


# -- measuring -----------------------------------------------------------------------------------
def pct(samples: list[int], q: float) -> float:
    """The q-th percentile of nanosecond samples, in µs."""
    return float(np.percentile(np.asarray(samples), q)) / 1000.0


def runner(path: Path, version: str = "1") -> Any:
    from agent.serving.inference import ModelRunner

    return ModelRunner.from_file(path, threads=1, name="m", version=version)


def attach_shadow(active: Any, previous_path: Path, k: int) -> tuple[Any, Any]:
    """A shadow of ``active`` by a fresh runner of ``previous_path``: (shadow, its worker)."""
    from agent.serving.shadow import Shadow, ShadowWorker

    worker = ShadowWorker()
    worker.start()
    previous = runner(previous_path, "0")
    shadow = Shadow(active=active, runner=previous, k=k, submit=worker.submit)
    active.set_tap(shadow.offer)
    return shadow, worker


Setups = dict[str, Callable[[], None]]


def in_process(
    model: Any, setups: Setups, x: np.ndarray, *, rounds: int, block: int
) -> dict[str, dict[str, Any]]:
    """p50/p99 (µs) and CPU µs per call of the registry path on one runner, in alternating
    blocks, each label's set-up applied before its block (the order reversed every other round).
    One runner, one interpreter for every label: no difference of memory placement between
    two interpreters gets into the comparison."""
    import agent
    from agent.serving.registry import ActiveModel, ModelRegistry

    reg = ModelRegistry()
    reg.activate(ActiveModel("m", model.version, "", model))
    predict = agent.active_models(reg).predict
    samples: dict[str, list[int]] = {k: [] for k in setups}
    rounds_p50: dict[str, list[float]] = {k: [] for k in setups}
    cpu: dict[str, float] = dict.fromkeys(setups, 0.0)
    clock = time.perf_counter_ns
    for _ in range(5):  # warm-up
        predict("m", x)
    labels = list(setups)
    for r in range(rounds):
        for label in labels if r % 2 == 0 else labels[::-1]:
            setups[label]()
            out = []
            c0 = time.process_time()
            for _ in range(block):
                t0 = clock()
                predict("m", x)
                out.append(clock() - t0)
            cpu[label] += time.process_time() - c0
            samples[label] += out
            rounds_p50[label].append(pct(out, 50))
    return summary(samples, rounds_p50, cpu)


CLIENT = r"""
import http.client, json, sys, time
import numpy as np
x = np.load(sys.argv[1])
body = json.dumps({"instances": x.tolist()}).encode()
headers = {"Content-Type": "application/json"}
conns = {}
for line in sys.stdin:
    port, n = (int(v) for v in line.split())
    if port not in conns:
        conns[port] = http.client.HTTPConnection("127.0.0.1", port)
        for _ in range(20):
            conns[port].request("POST", "/v1/models/m:predict", body, headers)
            conns[port].getresponse().read()
    conn, times = conns[port], []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        conn.request("POST", "/v1/models/m:predict", body, headers)
        r = conn.getresponse(); r.read()
        if r.status != 200: raise SystemExit(f"status {r.status}")
        times.append(time.perf_counter_ns() - t0)
    print(json.dumps(times), flush=True)
"""


def rest(model: Any, setups: Setups, x: np.ndarray, *, rounds: int, block: int) -> dict[str, dict[str, Any]]:
    """Like :func:`in_process` for ``POST :predict`` to one in-process server from a keep-alive
    client in another process; CPU is this (the serving) process's, per request."""
    from agent.serving.registry import ActiveModel, ModelRegistry
    from agent.serving.rest import RestServer

    reg = ModelRegistry()
    reg.activate(ActiveModel("m", model.version, "", model))
    server = RestServer(reg, port=0)
    server.start()
    sample = OUT / "digits-sample.npy"
    np.save(sample, x)
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(sample)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None
    samples: dict[str, list[int]] = {k: [] for k in setups}
    rounds_p50: dict[str, list[float]] = {k: [] for k in setups}
    cpu: dict[str, float] = dict.fromkeys(setups, 0.0)
    labels = list(setups)
    try:
        for r in range(rounds):
            for label in labels if r % 2 == 0 else labels[::-1]:
                setups[label]()
                c0 = time.process_time()
                client.stdin.write(f"{server.address[1]} {block}\n")
                client.stdin.flush()
                out = json.loads(client.stdout.readline())
                cpu[label] += time.process_time() - c0
                samples[label] += out
                rounds_p50[label].append(pct(out, 50))
    finally:
        client.stdin.close()
        client.wait(30)
        server.stop()
    return summary(samples, rounds_p50, cpu)


def sketch_switch(model: Any) -> Setups:
    """``on``: the runner's own output sketch; ``off``, ``off2``: none (stats.outputs None)."""
    recorder = model.stats.outputs

    def on() -> None:
        model.stats.outputs = recorder

    def off() -> None:
        model.stats.outputs = None

    return {"on": on, "off": off, "off2": off}


def shadow_switch(model: Any, shadow: Any) -> Setups:
    """``on``: the shadow is the runner's tap; ``off``: no tap."""
    return {"on": lambda: model.set_tap(shadow.offer), "off": lambda: model.set_tap(None)}


def summary(
    samples: dict[str, list[int]], rounds_p50: dict[str, list[float]], cpu: dict[str, float]
) -> dict[str, dict[str, Any]]:
    """Per label: pooled p50/p99 (µs), CPU µs per call, and the p50 of each round's block (for
    paired ratios: neighbouring blocks share the machine's mood)."""
    return {
        label: {
            "p50": pct(s, 50),
            "p99": pct(s, 99),
            "cpu_us": cpu[label] / len(s) * 1e6,
            "rounds_p50": rounds_p50[label],
        }
        for label, s in samples.items()
    }


# -- agent memory ------------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def shadow_rule(k: int) -> Iterator[None]:
    """``litefleet push`` signing ``shadow_k`` as the rollout controller does for a wave."""
    import converter.cli.push as push_cli
    from agent.protocol import Rollout

    original = Rollout
    setattr(push_cli, "Rollout", lambda target, pct: Rollout(target, pct, k))  # noqa: B010 (a patch)
    try:
        yield
    finally:
        setattr(push_cli, "Rollout", original)  # noqa: B010


def wait_for(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def memory_of(
    work: Path, broker_url: str, port: int, name: str, previous: Path, new: Path, idle_s: float
) -> dict[str, float]:
    """Idle RSS (MB) of one agent process: the previous version active, the new one shadowed
    (k = 10), released by a re-target, and a fresh start without shadowing."""
    from tests.support.harness import AgentProcess, FleetWatcher, must

    repo = work / f"repo-{name}"
    must("repo", "init", str(repo))
    agent = AgentProcess(work, f"dev-{name}", broker_url, repo / "root.json", log_level="info")
    watch = FleetWatcher(port)
    push = ("--repo", str(repo), "--name", name, "--broker", broker_url)
    try:
        must("push", str(previous), *push)
        agent.start()
        watch.wait_active(agent.device_id, name, 1, timeout_s=120)
        time.sleep(idle_s)
        assert agent.proc is not None
        figures = {"previous active": rss_mb(agent.proc.pid)}
        with shadow_rule(10):
            must("push", str(new), *push)
        wait_for(lambda: "shadowed by v1" in agent.log(), 120, "the shadow")
        time.sleep(idle_s)
        figures["new active + shadow"] = rss_mb(agent.proc.pid)
        must("push", str(new), *push, "--version", "2")
        wait_for(lambda: "shadow of" in agent.log() and "stopped" in agent.log(), 120, "the release")
        time.sleep(idle_s)
        figures["shadow released"] = rss_mb(agent.proc.pid)
        agent.stop()
        agent.start()
        watch.wait_active(agent.device_id, name, 2, timeout_s=120)
        time.sleep(idle_s)
        assert agent.proc is not None
        figures["restarted, no shadow"] = rss_mb(agent.proc.pid)
        return figures
    finally:
        agent.stop()
        watch.close()


def imports_rss() -> float:
    """RSS (MB) of a bare interpreter that imports only the agent's dependencies."""
    code = (
        "import numpy, paho.mqtt.client, tuf.ngclient, ai_edge_litert.interpreter, re\n"
        "print(int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024)"
    )
    return float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )


def agent_memory(models: dict[str, tuple[Path, Path]], idle_s: float) -> dict[str, dict[str, float]]:
    from converter.broker.mosquitto import BrokerConfig, BrokerProcess

    work = Path(tempfile.mkdtemp(prefix="lf-bench-rollout-"))
    broker = BrokerProcess(BrokerConfig(data_dir=work / "broker"))
    broker.start()
    try:
        return {
            name: memory_of(work, broker.url, broker.port, name, previous, new, idle_s)
            for name, (previous, new) in models.items()
        }
    finally:
        broker.stop()


# -- report --------------------------------------------------------------------------------------
def fmt(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.1f} µs"


def added(r: dict[str, dict[str, Any]], on: str, off: str, key: str = "p50") -> float:
    """``on`` over ``off`` in percent: for p50, the median of the per-round ratios of
    neighbouring blocks; for the others, the ratio of the pooled figures."""
    if key == "p50":
        ratios = np.asarray(r[on]["rounds_p50"]) / np.asarray(r[off]["rounds_p50"])
        return (float(np.median(ratios)) - 1.0) * 100.0
    return float((r[on][key] / r[off][key] - 1.0) * 100.0)


def markdown(res: dict[str, Any]) -> str:
    s_rest, s_mob, s_dig = res["sketch_rest"], res["sketch_mobilenet"], res["sketch_digits"]
    h_rest, h_mob = res["shadow_rest"], res["shadow_mobilenet"]
    lines = [
        SECTION,
        "",
        f"`.venv/bin/python bench/bench_rollout.py{' --quick' if res['quick'] else ''}`, {res['date']}. "
        f"{res['machine']}. One interpreter thread (XNNPACK). Every comparison: alternating blocks "
        "on one runner in one process, order reversed every other round; *A/A* compares two "
        "blocks of the same set-up (the noise floor of that comparison).",
        "",
        "### The output sketch on the inference path",
        "",
        "| path | with sketch p50 | without p50 | added p50 (goal) | A/A p50 | CPU per call with / without |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    rows = (
        ("digits, REST `POST :predict` (JSON, 1 sample)", s_rest, "<= 3 %"),
        ("MobileNetV2 int8, in-process registry `predict`", s_mob, "<= 1 %"),
        ("digits int8, in-process registry `predict`", s_dig, "no goal"),
    )
    for label, r, goal in rows:
        lines.append(
            f"| {label} | {fmt(r['on']['p50'])} | {fmt(r['off']['p50'])} | "
            f"**{added(r, 'on', 'off'):+.2f} %** ({goal}) | {added(r, 'off2', 'off'):+.2f} % | "
            f"{fmt(r['on']['cpu_us'])} / {fmt(r['off']['cpu_us'])} |"
        )
    lines += [
        "",
        "One runner (one interpreter, one server) per row, its sketch switched on and off between "
        "blocks (`stats.outputs`). *added p50*: the median over rounds of p50(with) / p50(without) "
        "of neighbouring blocks; *A/A*: the same for two blocks without the sketch (the noise "
        "floor); CPU per call: `time.process_time` of the serving process over the calls.",
        "",
        "### The shadow sample at k = 10 (the previous version runs on 1 call in 10, off the request path)",
        "",
        "One runner per row, the shadow attached as its tap or not between blocks; the previous "
        "version runs on the shadow's own thread, 8 samples at a time.",
        "",
        "| path | p50 off / on | p99 off / on | CPU per request off / on |",
        "| --- | --- | --- | --- |",
        f"| digits REST (shadow: digits float32) | {fmt(h_rest['off']['p50'])} / {fmt(h_rest['on']['p50'])} "
        f"({added(h_rest, 'on', 'off'):+.1f} %) | {fmt(h_rest['off']['p99'])} / {fmt(h_rest['on']['p99'])} "
        f"({added(h_rest, 'on', 'off', 'p99'):+.1f} %) | {fmt(h_rest['off']['cpu_us'])} / "
        f"{fmt(h_rest['on']['cpu_us'])} ({added(h_rest, 'on', 'off', 'cpu_us'):+.1f} %) |",
        f"| MobileNetV2 int8 in process (shadow: MobileNetV2) | {fmt(h_mob['off']['p50'])} / "
        f"{fmt(h_mob['on']['p50'])} ({added(h_mob, 'on', 'off'):+.1f} %) | {fmt(h_mob['off']['p99'])} / "
        f"{fmt(h_mob['on']['p99'])} ({added(h_mob, 'on', 'off', 'p99'):+.1f} %) | "
        f"{fmt(h_mob['off']['cpu_us'])} / {fmt(h_mob['on']['cpu_us'])} "
        f"({added(h_mob, 'on', 'off', 'cpu_us'):+.1f} %) |",
        "",
        f"Shadow counters after the runs: REST {res['shadow_rest_report']}; "
        f"in process {res['shadow_mobilenet_report']}.",
        "",
        "### Agent memory (idle RSS of `python -m agent run`, MB)",
        "",
        "| model | previous version active | new version + shadow (k = 10) | after the re-target "
        "without shadow_k | restarted, no shadow (goal < 60 MB) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, m in res["memory"].items():
        lines.append(
            f"| {name} | {m['previous active']:.1f} | {m['new active + shadow']:.1f} | "
            f"{m['shadow released']:.1f} | **{m['restarted, no shadow']:.1f}** |"
        )
    lines += [
        "",
        f"The floor on this machine in the same run: a Python process that only imports the "
        f"agent's dependencies (numpy, paho-mqtt, tuf, ai-edge-litert) holds "
        f"{res['dependencies_rss']:.1f} MB.",
        "",
    ]
    return "\n".join(lines)


def write_results(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text.rstrip("\n") + "\n")


def int8_input(path: Path, seed: int = 0) -> np.ndarray:
    r = runner(path)
    spec = r.inputs[0]
    info = np.iinfo(spec.dtype)
    x: np.ndarray = np.random.default_rng(seed).integers(info.min, info.max + 1, spec.shape, dtype=spec.dtype)
    return x


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--write-results", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args()
    if args.build:
        build_models(args.build)
        return 0
    models = ensure_models()
    scale = 0.25 if args.quick else 1.0
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick,
        "machine": describe("ai-edge-litert", "numpy"),
    }
    digits, mobilenet = models["digits"], models["mobilenet_v2"]
    x_digits = np.random.default_rng(0).random((1, 8, 8, 1), dtype=np.float32)
    x_mob = int8_input(mobilenet)
    x_dig8 = int8_input(digits)

    print("sketch: REST digits ...", flush=True)
    model = runner(digits)
    res["sketch_rest"] = rest(model, sketch_switch(model), x_digits, rounds=int(80 * scale), block=200)
    print("sketch: in-process MobileNetV2 ...", flush=True)
    model = runner(mobilenet)
    res["sketch_mobilenet"] = in_process(model, sketch_switch(model), x_mob, rounds=int(200 * scale), block=8)
    print("sketch: in-process digits ...", flush=True)
    model = runner(digits)
    res["sketch_digits"] = in_process(model, sketch_switch(model), x_dig8, rounds=int(100 * scale), block=500)

    print("shadow k=10: REST digits ...", flush=True)
    model = runner(digits, "2")
    shadow, worker = attach_shadow(model, models["digits_f32"], 10)
    res["shadow_rest"] = rest(
        model, shadow_switch(model, shadow), x_digits, rounds=int(80 * scale), block=200
    )
    worker.wait_idle(30)
    res["shadow_rest_report"] = shadow.report()
    worker.stop()
    print("shadow k=10: in-process MobileNetV2 ...", flush=True)
    model = runner(mobilenet, "2")
    shadow, worker = attach_shadow(model, mobilenet, 10)
    res["shadow_mobilenet"] = in_process(
        model, shadow_switch(model, shadow), x_mob, rounds=int(200 * scale), block=10
    )
    worker.wait_idle(30)
    res["shadow_mobilenet_report"] = shadow.report()
    worker.stop()

    print("agent memory ...", flush=True)
    res["dependencies_rss"] = imports_rss()
    res["memory"] = agent_memory(
        {"digits": (models["digits_f32"], digits), "mobilenet": (mobilenet, mobilenet)},
        idle_s=3.0,
    )
    (OUT / "results.json").write_text(json.dumps(res, indent=2))
    section = markdown(res)
    print()
    print(section)
    rest_added = added(res["sketch_rest"], "on", "off")
    mob_added = added(res["sketch_mobilenet"], "on", "off")
    check(rest_added <= 3.0, f"sketch on REST :predict p50 (digits): {rest_added:+.2f} % <= 3 %")
    check(mob_added <= 1.0, f"sketch on in-process predict p50 (MobileNetV2): {mob_added:+.2f} % <= 1 %")
    for name, m in res["memory"].items():
        idle = m["restarted, no shadow"]
        check(idle < 60.0, f"idle agent RSS without shadowing ({name}): {idle:.1f} MB < 60 MB")
    if args.write_results:
        write_results(section)
        print(f"wrote the {SECTION!r} section of {RESULTS.relative_to(REPO)}")
    return exit_code()


if __name__ == "__main__":
    raise SystemExit(main())
