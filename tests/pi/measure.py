"""Measure the emulated Raspberry Pi userland: build, reuse, start-up, imports, inference.

``python -m tests.pi.measure [--arch arm64 armhf] [--skip-cold] [--json OUT]`` prints a
Markdown table for ``bench/RESULTS.md``. The cold build runs in a temporary cache folder
with pip's cache off, so it downloads everything; the other figures use the project's cache.
Inference figures are qemu user-mode emulation on this host, not a Raspberry Pi's speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .userland import REPO_ROOT, Userland, ensure_userland

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent

_IMPORTS = r"""
import json, sys, time
t = time.perf_counter()
import numpy, paho.mqtt.client, tuf.ngclient
import importlib; importlib.import_module(sys.argv[1])
import_s = time.perf_counter() - t
rss = [l.split()[1] for l in open("/proc/self/status") if l.startswith(("VmRSS", "VmHWM"))]
print(json.dumps({"import_s": import_s, "rss_kb": int(rss[0]), "hwm_kb": int(rss[1])}))
"""


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:6]} failed: {proc.stderr[-2000:]}")
    return elapsed, proc.stdout


def _median_runs(land: Userland, args: list[Any], runs: int) -> tuple[float, list[dict[str, Any]]]:
    walls, reports = [], []
    for _ in range(runs):
        wall, out = _timed(land.command(args), land.environment())
        walls.append(wall)
        if out.strip():
            reports.append(json.loads(out.strip().splitlines()[-1]))
    return statistics.median(walls), reports


def _models(folder: Path) -> dict[str, Path]:
    """int8 digits CNN and int8 MobileNetV2 96x96 (random weights), made with the converter."""
    from converter.convert.pipeline import ConvertConfig, convert_model
    from tests.support.models import digits_data, mobilenet_v2, save_digits_cnn, save_digits_npz

    data = digits_data()
    digits = save_digits_cnn(folder / "digits.keras", data)
    calib = save_digits_npz(folder / "digits_calib.npz", data.x_train)
    valid = save_digits_npz(folder / "digits_valid.npz", data.x_test, data.y_test)
    convert_model(
        digits,
        folder / "digits.tflite",
        ConvertConfig(quantize="int8", latency_runs=10),
        calibration=calib,
        validate=valid,
    )
    mnet = mobilenet_v2(96)
    mnet.save(folder / "mnet.keras")
    x = np.random.default_rng(0).random((32, 96, 96, 3), dtype=np.float32)
    np.savez(folder / "mnet_calib.npz", x=x)
    convert_model(
        folder / "mnet.keras",
        folder / "mnet.tflite",
        ConvertConfig(quantize="int8", latency_runs=5),
        calibration=folder / "mnet_calib.npz",
    )
    return {"digits CNN int8": folder / "digits.tflite", "MobileNetV2 96 int8": folder / "mnet.tflite"}


def _inputs(model: Path, count: int, out: Path) -> Path:
    with np.load(model.with_name(model.stem + ".golden.npz")) as golden:
        x = golden["input_0"]
    reps = -(-count // len(x))
    np.savez(out, input_0=np.concatenate([x] * reps)[:count])
    return out


def measure(arches: list[str], skip_cold: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"host_cpus": os.cpu_count(), "arches": {}}
    work = Path(tempfile.mkdtemp(prefix="pi-measure-"))
    with contextlib.redirect_stdout(sys.stderr):  # the converter's TensorFlow prints
        models = _models(work)
    host_infer: dict[str, Any] = {}
    for label, model in models.items():
        inputs = _inputs(model, 50, work / f"{model.stem}_in.npz")
        _, out = _timed(
            [
                sys.executable,
                str(HERE / "guest_infer.py"),
                "ai_edge_litert.interpreter",
                str(model),
                str(inputs),
                str(work / "host_out.npz"),
            ]
        )
        host_infer[label] = json.loads(out.strip().splitlines()[-1])["infer_ms_p50"]
    results["host_infer_ms"] = host_infer
    for arch in arches:
        r: dict[str, Any] = {}
        if not skip_cold:
            with tempfile.TemporaryDirectory(prefix=f"pi-cold-{arch}-") as cold:
                os.environ["PIP_NO_CACHE_DIR"] = "1"
                try:
                    t = time.perf_counter()
                    ensure_userland(arch, cache_dir=Path(cold))
                    r["cold_build_s"] = time.perf_counter() - t
                    t = time.perf_counter()
                    ensure_userland(arch, cache_dir=Path(cold), rebuild=True)
                    r["rebuild_from_downloads_s"] = time.perf_counter() - t
                finally:
                    os.environ.pop("PIP_NO_CACHE_DIR", None)
        land = ensure_userland(arch)
        t = time.perf_counter()
        ensure_userland(arch)
        r["warm_reuse_in_process_s"] = time.perf_counter() - t
        r["warm_reuse_cli_s"], _ = _timed(
            [sys.executable, "-m", "tests.pi.userland", "build", "--arch", arch]
        )
        r["rootfs_mb"] = _du(land.root) / 1e6
        r["downloads_mb"] = (_du(land.home / "debs") + _du(land.home / "wheels")) / 1e6
        r["python_start_s"], _ = _median_runs(land, ["-c", "pass"], 5)
        wall, reports = _median_runs(land, ["-c", _IMPORTS, land.spec.runtime_module], 5)
        r["import_process_s"] = wall
        r["import_s"] = statistics.median(x["import_s"] for x in reports)
        r["import_rss_mb"] = statistics.median(x["rss_kb"] for x in reports) / 1024
        r["infer"] = {}
        for label, model in models.items():
            inputs = _inputs(model, 50, work / f"{model.stem}_in.npz")
            args = [HERE / "guest_infer.py", land.spec.runtime_module, model, inputs, work / "guest_out.npz"]
            _, reports = _median_runs(land, args, 3)
            r["infer"][label] = {
                "load_s": statistics.median(x["load_s"] for x in reports),
                "infer_ms_p50": statistics.median(x["infer_ms_p50"] for x in reports),
            }
        results["arches"][arch] = r
    return results


def _du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def markdown(results: dict[str, Any]) -> str:
    arches = list(results["arches"])
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fmt: str, get: Any) -> None:
        cells = []
        for a in arches:
            try:
                cells.append(fmt.format(get(results["arches"][a])))
            except KeyError:
                cells.append("-")
        rows.append((label, cells))

    row("cold build (apt index, downloads, unpack, byte-compile)", "{:.0f} s", lambda r: r["cold_build_s"])
    row("rebuild from cached downloads", "{:.0f} s", lambda r: r["rebuild_from_downloads_s"])
    row("warm reuse, `ensure_userland()` in process", "{:.4f} s", lambda r: r["warm_reuse_in_process_s"])
    row("warm reuse, `python -m tests.pi.userland build`", "{:.2f} s", lambda r: r["warm_reuse_cli_s"])
    row(
        "rootfs size / kept downloads",
        "{}",
        lambda r: f"{r['rootfs_mb']:.0f} MB / {r['downloads_mb']:.0f} MB",
    )
    row("emulated `python3.11 -c pass`", "{:.2f} s", lambda r: r["python_start_s"])
    row("emulated import numpy+paho+tuf+runtime (in process)", "{:.2f} s", lambda r: r["import_s"])
    row("emulated process start to imports done (wall)", "{:.2f} s", lambda r: r["import_process_s"])
    row(
        "RSS after imports (the qemu process, as /proc/self/status shows it inside)",
        "{:.0f} MB",
        lambda r: r["import_rss_mb"],
    )
    for label, host_ms in results["host_infer_ms"].items():
        row(f"{label}: model load + allocate", "{:.2f} s", lambda r, k=label: r["infer"][k]["load_s"])
        row(
            f"{label}: one inference, emulated (host x86-64: {host_ms:.3f} ms)",
            "{:.2f} ms",
            lambda r, k=label: r["infer"][k]["infer_ms_p50"],
        )
    header = "| measure | " + " | ".join(arches) + " |\n|---|" + "---|" * len(arches) + "\n"
    return header + "".join(f"| {label} | " + " | ".join(c) + " |\n" for label, c in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.pi.measure")
    parser.add_argument("--arch", nargs="+", default=["arm64", "armhf"])
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.chdir(REPO_ROOT)
    results = measure(opts.arch, opts.skip_cold)
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
