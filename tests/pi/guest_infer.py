"""Run a TF Lite model over saved inputs with one LiteRT runtime; the same script runs on the
host and inside the emulated userland, so both sides take the same code path.

Usage: ``guest_infer.py RUNTIME_MODULE MODEL.tflite INPUTS.npz OUT.npz [--threads N]``

``INPUTS.npz`` holds ``input_0``..``input_{k-1}``, N samples each, already in the inputs'
dtypes (the layout of the converter's golden vectors). Each sample is run on its own
(batch 1); ``OUT.npz`` gets ``output_0``..``output_{m-1}`` stacked. One JSON line on stdout
reports the runtime, the time to import it and to load the model, and the median time of
one set-invoke-get (``infer_ms_p50``).

Imports only numpy and the runtime: it must run where neither TensorFlow nor the project is.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("runtime_module")
    parser.add_argument("model")
    parser.add_argument("inputs")
    parser.add_argument("out")
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args(argv)

    started = time.perf_counter()
    module = importlib.import_module(opts.runtime_module)
    package = importlib.import_module(opts.runtime_module.split(".")[0])
    import_s = time.perf_counter() - started

    started = time.perf_counter()
    interpreter = module.Interpreter(model_path=opts.model, num_threads=opts.threads)
    interpreter.allocate_tensors()
    load_s = time.perf_counter() - started
    inputs = interpreter.get_input_details()
    outputs = interpreter.get_output_details()

    with np.load(opts.inputs) as data:
        xs = [data[f"input_{k}"] for k in range(len(inputs))]
    count = int(xs[0].shape[0])
    ys: list[list[np.ndarray]] = [[] for _ in outputs]
    times = []
    for i in range(count):
        t0 = time.perf_counter()
        for detail, x in zip(inputs, xs, strict=True):
            interpreter.set_tensor(detail["index"], x[i : i + 1])
        interpreter.invoke()
        row = [interpreter.get_tensor(d["index"]) for d in outputs]
        times.append(time.perf_counter() - t0)
        for k, y in enumerate(row):
            ys[k].append(np.array(y[0], copy=True))
    stacked = {f"output_{k}": np.stack(y) for k, y in enumerate(ys)}
    np.savez(opts.out, **stacked)  # type: ignore[arg-type]  # numpy stubs: allow_pickle
    report = {
        "runtime": opts.runtime_module,
        "version": str(getattr(package, "__version__", "unknown")),
        "numpy": np.__version__,
        "samples": count,
        "import_s": round(import_s, 4),
        "load_s": round(load_s, 4),
        "infer_ms_p50": round(statistics.median(times) * 1000, 4),
    }
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
