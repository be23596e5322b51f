"""``litefleet convert``: the console side of :func:`converter.convert.pipeline.convert_model`.

This module owns what the user sees: a spinner with the current phase on
stderr while TensorFlow works (only when stderr is a terminal), TensorFlow's
and LiteRT's own log output swallowed at the file-descriptor level (it is
shown with ``--debug``), and the comparison table on stdout at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING

from converter.cli.table import Align, Column, format_table

if TYPE_CHECKING:
    from converter.convert.results import ConversionResult

DEFAULT_QUANTIZE = "none"


def _modes(text: str) -> tuple[str, ...]:
    from converter.convert.quantize import MODES

    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}"
        )
    return modes


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from converter.convert.artifacts import DEFAULT_GOLDEN_COUNT
    from converter.convert.measure import DEFAULT_LATENCY_RUNS
    from converter.convert.pipeline import QUANTIZE_CHOICES
    from converter.convert.quantize import DEFAULT_CALIBRATION_SAMPLES, IO_TYPES
    from converter.convert.selection import DEFAULT_CANDIDATES, DEFAULT_MAX_ACCURACY_DROP

    p = subparsers.add_parser(
        "convert",
        help="convert a Keras/SavedModel model to TF Lite, quantize and check it",
        description=(
            "Convert SRC (a .keras file, a legacy .h5 file or a SavedModel folder) to "
            "OUT.tflite, and write OUT.card.json (model card) and OUT.golden.npz (golden "
            "vectors the device checks before it activates the model) beside it."
        ),
    )
    p.add_argument("src", metavar="SRC", help=".keras file, .h5 file or SavedModel folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT.tflite", help="model to write")
    p.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default=DEFAULT_QUANTIZE,
        help=f"quantization mode (default {DEFAULT_QUANTIZE}); auto measures candidates "
        "and picks the fastest within --max-accuracy-drop",
    )
    p.add_argument(
        "--calibration", metavar="DATA", help="calibration inputs: .npy, .npz with x, or a folder of images"
    )
    p.add_argument(
        "--validate", metavar="DATA", help="validation data: .npy, .npz with x and optional integer labels y"
    )
    p.add_argument("--report", metavar="PATH.json", help="also write the full report as JSON")
    p.add_argument(
        "--io-type", choices=IO_TYPES, default="int8", help="int8 model's input/output type (default int8)"
    )
    p.add_argument("--threads", type=int, default=1, help="threads for the latency measurement (default 1)")
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=DEFAULT_MAX_ACCURACY_DROP,
        metavar="POINTS",
        help=f"auto: largest acceptable top-1 drop (default {DEFAULT_MAX_ACCURACY_DROP})",
    )
    p.add_argument(
        "--candidates",
        type=_modes,
        default=DEFAULT_CANDIDATES,
        metavar="M1,M2",
        help=f"auto: modes to try (default {','.join(DEFAULT_CANDIDATES)})",
    )
    p.add_argument(
        "--compare",
        type=_modes,
        default=(),
        metavar="M1,M2",
        help="also convert and measure these modes for the table (not written)",
    )
    p.add_argument(
        "--golden-count",
        type=int,
        default=DEFAULT_GOLDEN_COUNT,
        metavar="N",
        help=f"golden vectors to store (default {DEFAULT_GOLDEN_COUNT})",
    )
    p.add_argument(
        "--calibration-samples",
        type=int,
        default=DEFAULT_CALIBRATION_SAMPLES,
        metavar="N",
        help=f"most calibration samples used ({DEFAULT_CALIBRATION_SAMPLES})",
    )
    p.add_argument(
        "--latency-runs",
        type=int,
        default=DEFAULT_LATENCY_RUNS,
        metavar="N",
        help=f"timed invokes per variant (default {DEFAULT_LATENCY_RUNS})",
    )
    p.add_argument(
        "--runtime",
        default="auto",
        choices=("auto", "litert", "tflite_runtime", "tensorflow"),
        help="TF Lite runtime for measurements (default auto: LiteRT)",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show TensorFlow's output, debug logs and tracebacks",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from converter.convert.pipeline import ConvertConfig, convert_model

    debug = bool(getattr(args, "debug", False))
    if debug:
        logging.getLogger().setLevel(logging.DEBUG)
    config = ConvertConfig(
        quantize=args.quantize,
        io_type=args.io_type,
        threads=args.threads,
        runtime=args.runtime,
        max_accuracy_drop=args.max_accuracy_drop,
        candidates=args.candidates,
        compare=args.compare,
        golden_count=args.golden_count,
        calibration_samples=args.calibration_samples,
        latency_runs=args.latency_runs,
        force=args.force,
    )
    with native_output_hidden(not debug) as terminal, Spinner(terminal) as spinner:
        result = convert_model(
            args.src,
            args.output,
            config,
            calibration=args.calibration,
            validate=args.validate,
            report=args.report,
            progress=spinner.phase,
        )
    sys.stdout.write(result_table(result))
    return 0


def result_table(result: ConversionResult) -> str:
    """The comparison of the source and every variant, then the notes under it."""
    from converter.convert.report import TABLE_COLUMNS, table_notes, table_rows

    first, *figures, mark = TABLE_COLUMNS
    columns = [Column(first), *(Column(t, Align.RIGHT) for t in figures), Column(mark)]
    table = format_table(columns, table_rows(result), rule=True)
    return table + "".join(line + "\n" for line in table_notes(result))


@contextlib.contextmanager
def native_output_hidden(enabled: bool) -> Iterator[int | None]:
    """Send fds 1 and 2 (TensorFlow's C++ logs, Keras' prints) to a scratch file.

    Yields a duplicate of the original stderr for the spinner (None when
    hiding is off). Python's logging handlers that write to stderr are pointed
    at that duplicate meanwhile, so litefleet's own warnings still show.
    """
    if not enabled:
        yield None
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    original_stderr = sys.stderr
    handlers = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is original_stderr
    ]
    with (
        tempfile.TemporaryFile() as scratch,
        open(scratch.fileno(), "w", closefd=False) as scratch_text,
        contextlib.redirect_stdout(scratch_text),  # Python-level prints (Keras' export)
        contextlib.redirect_stderr(scratch_text),  # warnings.warn, absl's Python logger
    ):
        os.dup2(scratch.fileno(), 1)  # C++ logs of TensorFlow and LiteRT
        os.dup2(scratch.fileno(), 2)
        for h in handlers:
            h.setStream(terminal)
        try:
            yield terminal.fileno()
        finally:
            with contextlib.suppress(Exception):
                scratch_text.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            for h in handlers:
                h.setStream(original_stderr)
            terminal.close()


class Spinner:
    """A one-line ``⠋ phase  12s`` display on a terminal fd; silent when not a TTY."""

    _FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, fd: int | None, interval_s: float = 0.1) -> None:
        self._fd = fd if fd is not None and os.isatty(fd) else None
        self._interval_s = interval_s
        self._text = "starting"
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def phase(self, text: str) -> None:
        self._text = text

    def __enter__(self) -> Spinner:
        if self._fd is not None:
            # the spinner thread only reads self._text and writes to the terminal fd
            self._thread = threading.Thread(target=self._spin, name="spinner", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._write("\r\x1b[K")

    def _write(self, text: str) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._fd, text.encode())

    def _spin(self) -> None:
        for frame in itertools.cycle(self._FRAMES):
            if self._stop.wait(self._interval_s):
                return
            elapsed = time.monotonic() - self._started
            self._write(f"\r\x1b[K{frame} {self._text}  {elapsed:.0f}s")
