"""``litefleet convert`` from the outside: exit codes, one clear stderr line, no partial files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from converter.cli.main import main
from converter.errors import BadInputError
from tests.support.models import save_model_with_op

REPO = Path(__file__).resolve().parents[3]


def run(capfd: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["convert", *argv])
    out, err = capfd.readouterr()
    return rc, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("litefleet: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_convert_writes_everything_and_keeps_tensorflow_quiet(
    capfd: pytest.CaptureFixture[str], digits_files: dict[str, Path], out_dir: Path
) -> None:
    rc, out, err = run(
        capfd,
        str(digits_files["keras"]),
        "-o",
        str(out_dir / "digits.tflite"),
        "--quantize",
        "int8",
        "--calibration",
        str(digits_files["calibration"]),
        "--validate",
        str(digits_files["validation"]),
        "--report",
        str(out_dir / "report.json"),
        "--compare",
        "none",
        "--latency-runs",
        "20",
    )
    assert rc == 0, err
    assert err == ""  # TensorFlow's and LiteRT's chatter is hidden without --debug
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "digits.card.json",
        "digits.golden.npz",
        "digits.tflite",
        "report.json",
    ]
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["variant", "size", "x", "fp32"]
    int8_row = next(ln for ln in lines if ln.startswith("int8 "))
    assert int8_row.endswith("<- written")
    assert any(ln.startswith("float32 ") for ln in lines)
    assert "measured on 450 validation samples" in out
    report = json.loads((out_dir / "report.json").read_text())
    assert report["chosen"] == "int8" and len(report["variants"]) == 2


def test_existing_output_needs_force(
    capfd: pytest.CaptureFixture[str], digits_files: dict[str, Path], out_dir: Path
) -> None:
    target = out_dir / "m.tflite"
    target.write_bytes(b"precious")
    rc, _, err = run(capfd, str(digits_files["keras"]), "-o", str(target))
    assert rc == 2
    assert_one_line_error(err, str(target), "--force")
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.tflite"]
    (out_dir / "m.golden.npz").write_bytes(b"old")  # any one of the outputs counts
    target.unlink()
    rc, _, err = run(capfd, str(digits_files["keras"]), "-o", str(target))
    assert rc == 2 and "m.golden.npz" in err
    rc, _, err = run(capfd, str(digits_files["keras"]), "-o", str(target), "--force", "--latency-runs", "20")
    assert rc == 0, err
    assert target.read_bytes()[4:8] == b"TFL3"  # the flatbuffer identifier


def _corrupt_keras(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", "{not json")
        zf.writestr("model.weights.h5", b"\0" * 64)
    return path


@pytest.mark.parametrize(
    ("make_source", "fragments"),
    [
        (lambda d: d / "missing.keras", ("missing.keras", "does not exist")),
        (
            lambda d: (d / "dangling.keras").symlink_to(d / "gone") or d / "dangling.keras",
            ("cannot read source",),
        ),
        (lambda d: _corrupt_keras(d / "broken.keras"), ("cannot read Keras model",)),
        (
            lambda d: (d / "model.onnx").write_bytes(b"\x08\x07onnx-ish") and d / "model.onnx",
            ("not a model litefleet can read", ".keras", "SavedModel"),
        ),
        (lambda d: (d / "empty_dir").mkdir() or d / "empty_dir", ("not a SavedModel",)),
    ],
    ids=["missing", "dangling-symlink", "corrupt-keras", "unknown-format", "folder-not-savedmodel"],
)
def test_unreadable_or_unknown_sources_are_exit_2(
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
    out_dir: Path,
    make_source: object,
    fragments: tuple[str, ...],
) -> None:
    src = make_source(tmp_path)  # type: ignore[operator]
    rc, out, err = run(capfd, str(src), "-o", str(out_dir / "m.tflite"))
    assert rc == 2
    assert_one_line_error(err, *fragments)
    assert out == "" and list(out_dir.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_source(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, digits_files: dict[str, Path], out_dir: Path
) -> None:
    src = tmp_path / "locked.keras"
    src.write_bytes(digits_files["keras"].read_bytes())
    src.chmod(0)
    rc, _, err = run(capfd, str(src), "-o", str(out_dir / "m.tflite"))
    assert rc == 2
    assert_one_line_error(err, "cannot read source", "ermission denied")


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (np.zeros((5, 28, 28, 1), np.float32), ("shape [5, 28, 28, 1]", "['N', 8, 8, 1]")),
        (np.zeros((5, 8, 8, 1), np.uint8), ("dtype uint8", "float32")),
    ],
    ids=["shape", "dtype"],
)
def test_calibration_that_does_not_fit_is_exit_2(
    capfd: pytest.CaptureFixture[str],
    digits_files: dict[str, Path],
    tmp_path: Path,
    out_dir: Path,
    data: np.ndarray,
    fragments: tuple[str, ...],
) -> None:
    cal = tmp_path / "cal.npy"
    np.save(cal, data)
    rc, _, err = run(
        capfd,
        str(digits_files["keras"]),
        "-o",
        str(out_dir / "m.tflite"),
        "--quantize",
        "int8",
        "--calibration",
        str(cal),
    )
    assert rc == 2
    assert_one_line_error(err, "calibration data", str(cal), *fragments)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("mode", "fragment"),
    [
        ("int8", "needs calibration data"),
        ("int16x8", "needs calibration data"),
        ("auto", "auto needs --validate DATA"),
    ],
)
def test_modes_that_need_data_refuse_without_it(
    capfd: pytest.CaptureFixture[str],
    digits_files: dict[str, Path],
    out_dir: Path,
    mode: str,
    fragment: str,
) -> None:
    rc, _, err = run(capfd, str(digits_files["keras"]), "-o", str(out_dir / "m.tflite"), "--quantize", mode)
    assert rc == 2
    assert_one_line_error(err, fragment)
    assert list(out_dir.iterdir()) == []


def test_ops_int8_cannot_express_are_named_exit_2(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, out_dir: Path
) -> None:
    src = save_model_with_op(tmp_path / "with_sin.keras", "sin")
    cal = tmp_path / "cal.npy"
    np.save(cal, np.random.default_rng(0).random((16, 8), dtype=np.float32))
    rc, _, err = run(
        capfd, str(src), "-o", str(out_dir / "m.tflite"), "--quantize", "int8", "--calibration", str(cal)
    )
    assert rc == 2
    assert_one_line_error(err, "int8 cannot express", "SIN", "dynamic", "float16")
    assert list(out_dir.iterdir()) == []
    # the suggestion works
    rc, _, err = run(
        capfd, str(src), "-o", str(out_dir / "m.tflite"), "--quantize", "dynamic", "--latency-runs", "20"
    )
    assert rc == 0, err


def test_ops_litert_lacks_fail_the_conversion_exit_1(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, out_dir: Path
) -> None:
    src = save_model_with_op(tmp_path / "with_erf.keras", "erf")
    rc, _, err = run(capfd, str(src), "-o", str(out_dir / "m.tflite"))
    assert rc == 1
    assert_one_line_error(err, "no kernels for: Erf")
    assert list(out_dir.iterdir()) == []


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not exist"):
        main(["convert", str(tmp_path / "nope.keras"), "-o", str(tmp_path / "m.tflite"), "--debug"])


def test_bad_flag_values_are_usage_errors(
    capfd: pytest.CaptureFixture[str], digits_files: dict[str, Path], out_dir: Path
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(digits_files["keras"]), "-o", str(out_dir / "m.tflite"), "--quantize", "int4"])
    assert exc.value.code == 2
    assert "invalid choice: 'int4'" in capfd.readouterr().err
    rc, _, err = run(capfd, str(digits_files["keras"]), "-o", str(out_dir / "m.bin"))
    assert rc == 2
    assert_one_line_error(err, "must end in .tflite")


def test_console_script_failure_after_tensorflow_ran_is_one_line(tmp_path: Path) -> None:
    """The real process: TensorFlow prints to fds 1 and 2 from C++; the user sees one line."""
    src = save_model_with_op(tmp_path / "with_sin.keras", "sin")
    cal = tmp_path / "cal.npy"
    np.save(cal, np.random.default_rng(0).random((16, 8), dtype=np.float32))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["KERAS_BACKEND"] = "jax"  # the user's setting must not matter
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "converter",
            "convert",
            str(src),
            "-o",
            str(out / "m.tflite"),
            "--quantize",
            "int8",
            "--calibration",
            str(cal),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc.stderr, "SIN")
    assert proc.stdout == ""
    assert not out.exists()  # the output folder it created is gone again
