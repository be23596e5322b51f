"""The litefleet demo, run by scripts/demo.sh: what exists end to end, shown step by step.

1. train a small Keras CNN on scikit-learn's digits (a few seconds, nothing downloaded);
2. convert it to full-integer int8 with ``litefleet convert`` (the real CLI, in a
   subprocess), measuring float32, float16 and dynamic-range beside it;
3. load the int8 model the way a device does (``agent.serving.runtime`` +
   ``agent.serving.inference.ModelRunner``), check its golden vectors, classify the
   held-out digits and print how it compares with the Keras model;
4. start a private Mosquitto (``litefleet broker``) and create a signed model
   repository (``litefleet repo init``);
5. start a local agent (``litefleet-agent run``) with its REST API on loopback;
6. sign and publish the model (``litefleet push``) and watch the agent verify,
   check and activate it (its events on the broker);
7. send real inference requests to the agent: REST (TensorFlow Serving's
   shape) and MQTT (request/response with correlation data);
8. show the fleet: ``litefleet status`` and the agent's metrics message.

Everything is written to ``demo-out/`` (git-ignored); running it again
starts from scratch. The broker and agent are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def step(n: int, total: int, text: str) -> None:
    print(f"\n[{n}/{total}] {text}", flush=True)


def ascii_digit(image: np.ndarray) -> list[str]:
    shades = " .:-=+*#%@"
    return ["".join(shades[min(9, int(v * 9.99))] * 2 for v in row) for row in image[..., 0]]


def main() -> int:
    ap = argparse.ArgumentParser(description="litefleet demo: train, convert to int8, run on LiteRT")
    ap.add_argument("--out", type=Path, default=REPO / "demo-out")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    total = 8

    step(1, total, "training a small CNN on scikit-learn's digits (8x8 images, 10 classes)")
    from converter.cli.convert import native_output_hidden
    from tests.support.models import digits_data, keras_accuracy, save_digits_npz, train_digits_cnn

    data = digits_data()
    t0 = time.monotonic()
    with native_output_hidden(True):  # TensorFlow's start-up chatter
        model = train_digits_cnn(data)
        keras_acc = keras_accuracy(model, data.x_test, data.y_test)
        model.save(out / "digits.keras")
    save_digits_npz(out / "calibration.npz", data.x_train)
    save_digits_npz(out / "validation.npz", data.x_test, data.y_test)
    print(
        f"    trained in {time.monotonic() - t0:.1f} s: {len(data.x_train)} training images, "
        f"Keras top-1 on {len(data.x_test)} held-out images {keras_acc:.2f} %"
    )
    print(f"    wrote {out / 'digits.keras'}, calibration.npz (x), validation.npz (x, y)")

    step(2, total, "converting to int8 with litefleet convert")
    cmd = [
        "litefleet",
        "convert",
        str(out / "digits.keras"),
        "-o",
        str(out / "digits.tflite"),
        "--quantize",
        "int8",
        "--calibration",
        str(out / "calibration.npz"),
        "--validate",
        str(out / "validation.npz"),
        "--compare",
        "none,float16,dynamic",
        "--report",
        str(out / "digits.report.json"),
        "--force",
    ]
    print(
        "    $ " + " ".join(str(Path(c).relative_to(REPO)) if c.startswith(str(REPO)) else c for c in cmd),
        flush=True,
    )
    proc = subprocess.run([sys.executable, "-m", "converter", *cmd[1:]], check=False)
    if proc.returncode != 0:
        print(f"demo: litefleet convert failed (exit {proc.returncode})", file=sys.stderr)
        return proc.returncode

    step(3, total, "running the int8 model with LiteRT, the way a device does")
    from agent.model_card import check_signature, parse_card
    from agent.serving.inference import ModelRunner

    card = parse_card((out / "digits.card.json").read_bytes())
    with native_output_hidden(True):  # LiteRT's "Created XNNPACK delegate" line
        runner = ModelRunner.from_file(out / "digits.tflite", threads=1, name="digits")
    check_signature(card, runner.inputs, runner.outputs)
    with np.load(out / "digits.golden.npz") as golden:
        raw = [runner.run_raw([golden["input_0"][i : i + 1]])[0][0] for i in range(card.golden["count"])]
        worst = float(np.max(np.abs(np.stack(raw).astype(np.float64) - golden["output_0"])))
        atol = float(golden["atol_0"])
    ok = worst <= atol
    print(
        f"    signature matches the card: {card.inputs[0].dtype} {list(card.inputs[0].shape)} -> "
        f"{card.outputs[0].dtype} {list(card.outputs[0].shape)}"
    )
    print(
        f"    golden vectors: {card.golden['count']} samples, largest difference {worst:g} "
        f"(allowed {atol:g}): {'OK' if ok else 'MISMATCH'}"
    )
    t0 = time.perf_counter()
    scores = runner.predict(data.x_test)[0]  # floats in: quantized for the model, scores dequantized
    per_image_ms = (time.perf_counter() - t0) * 1e3 / len(data.x_test)
    lite_pred = np.argmax(scores, axis=-1)
    keras_pred = np.argmax(model.predict(data.x_test, verbose=0), axis=-1)
    lite_acc = float(np.mean(lite_pred == data.y_test) * 100)
    agree = float(np.mean(lite_pred == keras_pred) * 100)
    report = json.loads((out / "digits.report.json").read_text())
    fp32_size = next(v["size_bytes"] for v in report["variants"] if v["mode"] == "none")
    size = (out / "digits.tflite").stat().st_size
    rows = [
        ("", "Keras (float32)", "LiteRT int8"),
        ("model file", f"{fp32_size:,} B as .tflite", f"{size:,} B ({size / fp32_size:.2f}x)"),
        (f"top-1 on {len(data.x_test)} held-out digits", f"{keras_acc:.2f} %", f"{lite_acc:.2f} %"),
        ("same answer as Keras", "-", f"{agree:.2f} %"),
        ("per image, Python API incl. quantize", "-", f"{per_image_ms:.3f} ms"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print()
    for r in rows:
        print("    " + r[0].ljust(widths[0]) + "   " + r[1].rjust(widths[1]) + "   " + r[2].rjust(widths[2]))
    print("\n    a few held-out digits as the int8 model reads them:")
    picks = [0, 1, 2, 3]
    art = [ascii_digit(data.x_test[i]) for i in picks]
    for line in range(8):
        print("      " + "   ".join(a[line] for a in art))
    print(
        "      "
        + "   ".join(
            f"says {lite_pred[i]} ({'right' if lite_pred[i] == data.y_test[i] else 'wrong'})".ljust(16)
            for i in picks
        )
    )
    print(f"\n    files in {out}: digits.tflite, digits.card.json, digits.golden.npz, digits.report.json")
    if not (ok and abs(lite_acc - keras_acc) <= 1.0):
        print("demo: the int8 model does not match the Keras model", file=sys.stderr)
        return 1
    from scripts.demo_fleet import fleet_demo

    return fleet_demo(out, data, first_step=4, total=total, step=step)


if __name__ == "__main__":
    raise SystemExit(main())
