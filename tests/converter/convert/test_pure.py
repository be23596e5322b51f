"""Fast tests of the converter's pure decisions: no TensorFlow, no model files."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converter.convert.artifacts import AtomicOutputs, OutputPaths, golden_atol
from converter.convert.datasets import Dataset, fit_to_inputs
from converter.convert.measure import accuracy, compare_outputs, latency_stats, top1
from converter.convert.quantize import OpInfo, calibration_indices, flex_ops_in_error, float_compute_ops
from converter.convert.selection import TIE_TOLERANCE, Candidate, choose_variant
from converter.convert.sources import InputSpec, detect_format, source_sha256
from converter.errors import BadInputError, ConversionError

IMAGE = (InputSpec("image", (None, 8, 8, 1), "float32"),)


# -- auto's rule ----------------------------------------------------------------
def _mobilenet_like() -> list[Candidate]:
    # the FACTS.md figures: dynamic is smaller but slower than float32 with XNNPACK
    return [
        Candidate("none", 13_900_000, 6.9, accuracy=71.0),
        Candidate("float16", 7_000_000, 6.9, accuracy=71.0),
        Candidate("dynamic", 3_700_000, 13.2, accuracy=70.8),
        Candidate("int8", 3_900_000, 3.2, accuracy=70.5),
    ]


def test_auto_picks_int8_and_never_dynamic_when_it_is_slower() -> None:
    sel = choose_variant(_mobilenet_like(), source_accuracy=71.0, max_accuracy_drop=1.0)
    assert sel.mode == "int8"
    assert "slower than float32" in sel.rejected["dynamic"]
    assert "3.2 ms" in sel.reason and "6.9 ms" in sel.reason


def test_auto_drops_int8_beyond_the_accuracy_budget() -> None:
    cands = _mobilenet_like()
    cands[3] = Candidate("int8", 3_900_000, 3.2, accuracy=69.5)
    sel = choose_variant(cands, source_accuracy=71.0, max_accuracy_drop=1.0)
    assert sel.mode == "float16"  # as fast as float32 (tie) and half the size
    assert "1.50 points" in sel.rejected["int8"]
    assert "larger" in sel.rejected["none"]


def test_auto_takes_dynamic_when_it_really_is_fastest() -> None:
    cands = [
        Candidate("none", 1000, 10.0, accuracy=90.0),
        Candidate("dynamic", 300, 5.0, accuracy=90.0),
        Candidate("int8", 300, 7.0, error="int8 cannot express these ops: SIN"),
    ]
    sel = choose_variant(cands, source_accuracy=90.0)
    assert sel.mode == "dynamic"
    assert sel.rejected["int8"].startswith("could not be converted")


def test_auto_prefers_int8_among_equally_fast() -> None:
    cands = [
        Candidate("none", 1000, 10.0, accuracy=90.0),
        Candidate("dynamic", 250, 5.1, accuracy=90.0),
        Candidate("int8", 300, 5.0, accuracy=90.0),
    ]
    assert choose_variant(cands, source_accuracy=90.0).mode == "int8"


def test_auto_without_labels_uses_disagreement() -> None:
    cands = [
        Candidate("none", 1000, 10.0, agreement=100.0),
        Candidate("int8", 300, 5.0, agreement=97.0),
    ]
    sel = choose_variant(cands, source_accuracy=None, max_accuracy_drop=1.0)
    assert sel.mode == "none"
    assert "3.00 %" in sel.rejected["int8"]
    assert choose_variant(cands, source_accuracy=None, max_accuracy_drop=5.0).mode == "int8"


def _digits_like(noise: tuple[float, float, float, float], int8_accuracy: float = 98.2) -> list[Candidate]:
    """The digits CNN's candidates as measured here (sizes in bytes, p50 in ms), every p50
    moved by its factor of ``noise``."""
    base = (("none", 40_704, 0.002985, 98.2), ("float16", 22_688, 0.00299, 98.2))
    rest = (("dynamic", 13_576, 0.00301, 98.2), ("int8", 15_616, 0.003, int8_accuracy))
    return [
        Candidate(mode, size, p50 * f, accuracy=acc)
        for (mode, size, p50, acc), f in zip((*base, *rest), noise, strict=True)
    ]


def test_auto_is_stable_where_it_used_to_flip() -> None:
    """The run of issue 12: int8 1.6 % slower than float32 was refused as "slower than
    float32" by a strict comparison, and that run chose dynamic; the other five chose int8."""
    flipped = [
        Candidate("none", 40_704, 0.002985, accuracy=98.2),
        Candidate("float16", 22_688, 0.002990, accuracy=98.2),
        Candidate("dynamic", 13_576, 0.003001, accuracy=98.2),
        Candidate("int8", 15_616, 0.003034, accuracy=98.2),
    ]
    assert choose_variant(flipped, source_accuracy=98.2).mode == "int8"


@settings(max_examples=300, deadline=None)
@given(
    noise=st.tuples(*[st.floats(0.98, 1.02)] * 4),
    int8_ok=st.booleans(),
)
def test_auto_choice_does_not_follow_timing_noise_within_2_percent(
    noise: tuple[float, float, float, float], int8_ok: bool
) -> None:
    """Latencies within 2 % of each other, moved by any noise within 2 %: one choice."""
    accuracy = 98.2 if int8_ok else 95.0
    quiet = choose_variant(_digits_like((1.0, 1.0, 1.0, 1.0), accuracy), source_accuracy=98.2).mode
    noisy = choose_variant(_digits_like(noise, accuracy), source_accuracy=98.2).mode
    assert noisy == quiet == ("int8" if int8_ok else "dynamic")


def test_auto_with_nothing_acceptable_is_a_conversion_error() -> None:
    with pytest.raises(ConversionError, match="no acceptable variant"):
        choose_variant([Candidate("none", error="boom")], source_accuracy=None)


candidate_st = st.builds(
    Candidate,
    mode=st.sampled_from(["float16", "dynamic", "int8", "int16x8"]),
    size_bytes=st.integers(1, 10**7),
    latency_ms_p50=st.floats(0.01, 100.0),
    accuracy=st.floats(0.0, 100.0),
)


@settings(max_examples=200, deadline=None)
@given(
    others=st.lists(candidate_st, max_size=4, unique_by=lambda c: c.mode),
    base_p50=st.floats(0.01, 100.0),
    source=st.floats(50.0, 100.0),
    budget=st.floats(0.0, 5.0),
)
def test_auto_choice_is_never_slower_than_float32_nor_over_budget(
    others: list[Candidate], base_p50: float, source: float, budget: float
) -> None:
    base = Candidate("none", 10**7 + 1, base_p50, accuracy=source)
    sel = choose_variant([base, *others], source_accuracy=source, max_accuracy_drop=budget)
    chosen = next(c for c in [base, *others] if c.mode == sel.mode)
    assert chosen.latency_ms_p50 <= base_p50 * (1 + TIE_TOLERANCE)
    assert chosen.accuracy is not None and source - chosen.accuracy <= budget + 1e-9
    assert set(sel.rejected) | {sel.mode} == {c.mode for c in [base, *others]}


# -- integer-only check and converter error parsing -----------------------------
def test_float_ops_are_found_but_boundary_quantize_is_allowed() -> None:
    ops = [
        OpInfo("QUANTIZE", ("float32",), ("int8",)),
        OpInfo("CONV_2D", ("int8", "int8", "int32"), ("int8",)),
        OpInfo("DEQUANTIZE", ("int8",), ("float32",)),
        OpInfo("SIN", ("float32",), ("float32",)),
        OpInfo("CUMSUM", ("float32", "int32"), ("float32",)),
        OpInfo("RESHAPE", ("int8", "int32"), ("int8",)),
    ]
    assert float_compute_ops(ops) == ["CUMSUM", "SIN"]
    assert float_compute_ops(ops[:3]) == []


def test_flex_ops_are_named_from_the_converter_message() -> None:
    msg = (
        "<unknown>:0: error: loc(...): 'tf.Erf' op is neither a custom op nor a flex op\n"
        "<unknown>:0: error: 'tf.Erf' op is neither a custom op nor a flex op\n"
        "'tf.RFFT' op is neither a custom op nor a flex op"
    )
    assert flex_ops_in_error(msg) == ["Erf", "RFFT"]
    assert flex_ops_in_error("something else") == []


def test_calibration_indices_spread_over_sorted_data() -> None:
    idx = calibration_indices(1000, 10)
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 999
    assert list(calibration_indices(5, 10)) == [0, 1, 2, 3, 4]


# -- golden tolerance --------------------------------------------------------------
def test_golden_atol_by_dtype_and_mode() -> None:
    assert golden_atol(np.array([[-128, 5]], np.int8), "int8") == 1.0
    y = np.array([[0.5, -2.0]], np.float32)
    assert golden_atol(y, "none") == pytest.approx(1e-4 + 2e-3)
    assert golden_atol(y, "float16") == pytest.approx(1e-3 + 2e-2)
    # a dequantized int8 output one quantum off stays inside the tolerance
    scale = (0.5 - -2.0) / 255
    assert golden_atol(y, "int8") > scale


# -- measurements ------------------------------------------------------------------
def test_accuracy_agreement_and_errors() -> None:
    src = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], np.float32)
    var = np.array([[0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.3, 0.7]], np.float32)
    labels = np.array([0, 1, 0, 0])
    cmp = compare_outputs([src], [var], labels)
    assert cmp.accuracy == 50.0 and cmp.agreement == 75.0
    assert cmp.max_abs_error == pytest.approx(0.2) and cmp.samples == 4
    assert accuracy(src, labels) == 75.0
    assert accuracy(src, None) is None
    assert top1(np.zeros((4, 1))) is None  # a single score is not a classifier


def test_latency_stats_in_milliseconds() -> None:
    s = latency_stats([0.001] * 99 + [0.010])
    assert s.p50_ms == pytest.approx(1.0) and s.runs == 100
    assert 1.0 < s.p99_ms <= 10.0


# -- data checks ---------------------------------------------------------------------
def _data(x: np.ndarray, y: np.ndarray | None = None) -> Dataset:
    return Dataset("cal.npz", (x,), y)


def test_data_that_fits_is_cast_to_float32() -> None:
    out = fit_to_inputs(_data(np.zeros((3, 8, 8, 1), np.float64), np.array([1, 2, 3])), "calibration", IMAGE)
    assert out.xs[0].dtype == np.float32 and out.y is not None and out.y.dtype == np.int64


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((3, 8, 8)), None, r"shape \[3, 8, 8\] does not fit model input 'image' \['N', 8, 8, 1\]"),
        (np.zeros((3, 28, 28, 1)), None, "does not fit model input"),
        (np.zeros((3, 8, 8, 1), np.uint8), None, "dtype uint8 does not fit model input 'image' .float32."),
        (np.array([["a"] * 64] * 3).reshape(3, 8, 8, 1), None, "is not numeric"),
        (np.full((3, 8, 8, 1), np.nan), None, "NaN"),
        (np.zeros((0, 8, 8, 1)), None, "no samples"),
        (np.zeros((3, 8, 8, 1)), np.array([0.5, 1.0, 2.0]), "integer class"),
        (np.zeros((3, 8, 8, 1)), np.array([1, 2]), "2 labels for 3 samples"),
    ],
)
def test_data_that_does_not_fit_is_bad_input(x: np.ndarray, y: np.ndarray | None, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        fit_to_inputs(_data(x, y), "calibration", IMAGE)


# -- sources and outputs ----------------------------------------------------------------
def test_detect_format_by_content(tmp_path: Path) -> None:
    h5 = tmp_path / "model.bin"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 32)
    assert detect_format(h5) == "h5"
    keras = tmp_path / "m.keras"
    with zipfile.ZipFile(keras, "w") as zf:
        zf.writestr("config.json", "{}")
    assert detect_format(keras) == "keras"
    npz = tmp_path / "x.npz"
    np.savez(npz, x=np.zeros(3))
    with pytest.raises(BadInputError, match="zip archive but not a Keras model"):
        detect_format(npz)
    (tmp_path / "onnx").write_bytes(b"\x08\x07onnx")
    with pytest.raises(BadInputError, match="not a model litefleet can read"):
        detect_format(tmp_path / "onnx")
    (tmp_path / "folder").mkdir()
    with pytest.raises(BadInputError, match=r"without saved_model\.pb"):
        detect_format(tmp_path / "folder")
    with pytest.raises(BadInputError, match="does not exist"):
        detect_format(tmp_path / "missing.keras")
    (tmp_path / "dangling.keras").symlink_to(tmp_path / "gone")
    with pytest.raises(BadInputError, match="cannot read source"):
        detect_format(tmp_path / "dangling.keras")


def test_folder_hash_is_stable_and_checkable_by_hand(tmp_path: Path) -> None:
    (tmp_path / "variables").mkdir()
    (tmp_path / "saved_model.pb").write_bytes(b"graph")
    (tmp_path / "variables" / "v.data").write_bytes(b"weights")
    lines = "".join(
        f"{hashlib.sha256(data).hexdigest()}  {name}\n"
        for name, data in (("saved_model.pb", b"graph"), ("variables/v.data", b"weights"))
    )
    assert source_sha256(tmp_path) == hashlib.sha256(lines.encode()).hexdigest()
    (tmp_path / "variables" / "v.data").write_bytes(b"weightz")
    assert source_sha256(tmp_path) != hashlib.sha256(lines.encode()).hexdigest()


def test_output_paths_sit_beside_the_model(tmp_path: Path) -> None:
    p = OutputPaths.for_model(tmp_path / "digits.v2.tflite")
    assert p.card.name == "digits.v2.card.json" and p.golden.name == "digits.v2.golden.npz"
    with pytest.raises(BadInputError, match=r"must end in \.tflite"):
        OutputPaths.for_model(tmp_path / "model.tfl")


def test_atomic_outputs_leave_nothing_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper"
    with pytest.raises(RuntimeError), AtomicOutputs() as outputs:
        outputs.stage(out / "a.golden.npz", b"a")
        outputs.stage(out / "a.tflite", b"b")
        raise RuntimeError("conversion failed half way")
    assert not (tmp_path / "new").exists()
    with AtomicOutputs() as outputs:
        outputs.stage(out / "a.card.json", b"{}")
        outputs.stage(out / "a.tflite", b"model")
        outputs.commit()
    assert sorted(p.name for p in out.iterdir()) == ["a.card.json", "a.tflite"]
    assert (out / "a.tflite").read_bytes() == b"model"


def test_permission_denied_is_bad_input(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # root (CI) can read any file, so the OS refusal is simulated here; the real
    # chmod 000 case runs in test_convert_cli when the tests run unprivileged
    src = tmp_path / "locked.keras"
    src.write_bytes(b"PK\x03\x04")

    def deny(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("converter.convert.sources.open", deny, raising=False)
    with pytest.raises(BadInputError, match=r"cannot read source .*locked\.keras: Permission denied"):
        detect_format(src)


# -- the settings ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        ({"quantize": "int4"}, "unknown quantize mode 'int4'"),
        ({"io_type": "int4"}, "unknown I/O type"),
        ({"candidates": ("none", "fp8")}, "unknown quantize mode 'fp8'"),
        ({"compare": ("x",)}, "unknown quantize mode 'x'"),
        ({"threads": 0}, "--threads"),
        ({"golden_count": 0}, "golden vector count"),
        ({"max_accuracy_drop": -0.1}, "--max-accuracy-drop"),
        ({"calibration_samples": 0}, "--calibration-samples"),
        ({"latency_runs": 0}, "--latency-runs"),
    ],
)
def test_convert_settings_are_checked_when_made(settings_: dict[str, object], message: str) -> None:
    from converter.convert.pipeline import ConvertConfig

    with pytest.raises(BadInputError, match=message):
        ConvertConfig(**settings_)  # type: ignore[arg-type]


def test_variant_plan() -> None:
    from converter.convert.pipeline import ConvertConfig

    assert ConvertConfig().variant_plan() == (["none"], True)
    assert ConvertConfig(quantize="int8", compare=("none", "int8")).variant_plan() == (["int8", "none"], True)
    auto = ConvertConfig(quantize="auto", candidates=("int8", "none"), compare=("int16x8",))
    assert auto.variant_plan() == (["none", "int8", "int16x8"], False)
