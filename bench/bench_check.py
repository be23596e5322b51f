"""A candidate's check: in a forked child (as a real agent runs it) against in-process, one process.

    .venv/bin/python bench/bench_check.py [--models digits,mobilenet] [--repeat 30]

The measuring process imports what the agent imports (``agent.service.daemon``) and keeps
the model loaded for serving, as an agent that serves the previous version does, so a fork
copies an agent-sized process. It then checks the same release (model, card, golden
vectors) ``--repeat`` times each way, alternating:

* **in-process**: :func:`agent.activation.check.load_checked`, the baseline (what a
  simulated device, or a platform that cannot fork, runs);
* **forked**: :func:`agent.activation.check.check_isolated`, what a real agent runs: the
  agent's own CPU (fork, pipe, waiting) plus the child's (``RUSAGE_CHILDREN``), and the
  child's minor page faults.

CPU is process CPU time (user + system), so other jobs on the machine change it less than
wall time; the ratio forked / in-process is what to compare across runs. This is the price
of the isolation a real agent keeps (docs/scale.md, "Kept on purpose"): a model that
crashes the runtime kills the child, not the agent.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import agent.service.daemon  # noqa: E402, F401  (the agent's imports: a fork copies them)
from agent.activation.check import check_isolated, load_checked  # noqa: E402
from agent.files import file_sha256  # noqa: E402
from agent.telemetry.metrics import read_rss_bytes  # noqa: E402
from bench.common import build_in_child  # noqa: E402
from bench.machine import describe  # noqa: E402

# bench_activation's models (built by it, in a child with TensorFlow); importing it would
# bring the broker and test helpers into this process and make it bigger than an agent
MODELS = REPO / "bench" / "out" / "activation"


def ensure_models() -> dict[str, Path]:
    want = {name: MODELS / name / f"{name}.tflite" for name in ("digits", "mobilenet")}
    if not all(p.exists() for p in want.values()):
        build_in_child(str(REPO / "bench" / "bench_activation.py"), MODELS)
    return want


def release(model: Path) -> tuple[Path, Path, Path]:
    stem = model.with_suffix("")
    return model, Path(f"{stem}.card.json"), Path(f"{stem}.golden.npz")


def children() -> tuple[float, int]:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime, ru.ru_minflt


def measure(model: Path, repeat: int) -> dict[str, list[float]]:
    model, card, golden = release(model)
    sha = file_sha256(model)
    serving = load_checked(model, card, golden)  # the agent's own copy, kept while it checks
    load_checked(model, card, golden)  # warm: lazy imports, the page cache
    keys = ("inproc_ms", "agent_ms", "child_ms", "forked_ms", "faults")
    out: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(repeat):
        t = time.process_time()
        load_checked(model, card, golden, model_sha256=sha)
        out["inproc_ms"].append((time.process_time() - t) * 1000)

        c0, f0 = children()
        t = time.process_time()
        assert check_isolated(model, card, golden, threads=1, runtime="auto", model_sha256=sha)
        agent_ms = (time.process_time() - t) * 1000
        c1, f1 = children()
        out["agent_ms"].append(agent_ms)
        out["child_ms"].append((c1 - c0) * 1000)
        out["forked_ms"].append(agent_ms + (c1 - c0) * 1000)
        out["faults"].append(float(f1 - f0))
    out["rss_mb"] = [(read_rss_bytes() or 0) / 1e6]
    del serving
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="digits,mobilenet")
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    models = ensure_models()
    print(f"# machine: {describe('ai-edge-litert', 'numpy')}")
    print(f"# {args.repeat} checks each way per model, alternating; medians (CPU ms)")
    print(
        "\n| model | RSS | in-process | forked: agent | forked: child | forked total "
        "| forked / in-process | child faults |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models.split(","):
        r = measure(models[name], args.repeat)
        m = {k: statistics.median(v) for k, v in r.items()}
        print(
            f"| {name} ({models[name].stat().st_size:,} B) | {m['rss_mb']:.1f} MB | {m['inproc_ms']:.2f} | "
            f"{m['agent_ms']:.2f} | {m['child_ms']:.2f} | {m['forked_ms']:.2f} | "
            f"{m['forked_ms'] / m['inproc_ms']:.1f}x | {m['faults']:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
