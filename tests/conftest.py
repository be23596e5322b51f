"""Shared fixtures: a real Mosquitto per test on a free loopback port."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# TensorFlow's C++ logging is noise in test output
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[object]:
    """A private Mosquitto (persistence on) in this test's tmp folder."""
    from converter.broker.mosquitto import BrokerConfig, BrokerProcess

    proc = BrokerProcess(BrokerConfig(data_dir=tmp_path / "broker"))
    proc.start()
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture
def stock_broker(tmp_path: Path) -> Iterator[object]:
    """A Mosquitto with the stock limits (no max_inflight_messages / max_queued_messages
    lines: 20 QoS 1 messages in flight per client, 1,000 queued), as an operator's own
    broker would run; ``broker`` runs with ``litefleet broker``'s raised limits."""
    from converter.broker.mosquitto import BrokerConfig, BrokerProcess

    class StockConfig(BrokerConfig):
        def render(self) -> str:
            tuned = ("max_inflight_messages", "max_queued_messages")
            return "".join(
                line + "\n" for line in super().render().splitlines() if not line.startswith(tuned)
            )

    proc = BrokerProcess(StockConfig(data_dir=tmp_path / "stock-broker"))
    proc.start()
    try:
        yield proc
    finally:
        proc.kill()


# -- converted models shared by converter, delivery and agent tests (session-wide) -----------
# (tests.support.models imports only numpy; TensorFlow loads when a fixture first needs it)
from tests.support.models import ConvertedModel, DigitsData  # noqa: E402


@pytest.fixture(scope="session")
def digits_data() -> DigitsData:
    """scikit-learn digits: ``x_train, y_train, x_test, y_test = digits_data`` (float32 / int64)."""
    from tests.support.models import digits_data as load

    return load()


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory: pytest.TempPathFactory, digits_data: DigitsData) -> dict[str, Path]:
    """The trained digits CNN as ``.keras`` plus its calibration and validation ``.npz``."""
    from tests.support.models import save_digits_cnn, save_digits_npz

    folder = tmp_path_factory.mktemp("digits")
    x_train, _, x_test, y_test = digits_data
    return {
        "keras": save_digits_cnn(folder / "digits.keras", digits_data),
        "calibration": save_digits_npz(folder / "calibration.npz", x_train),
        "validation": save_digits_npz(folder / "validation.npz", x_test, y_test),
    }


@pytest.fixture(scope="session")
def digits_int8(tmp_path_factory: pytest.TempPathFactory, digits_files: dict[str, Path]) -> ConvertedModel:
    """Digits CNN converted to full-integer int8 (int8 I/O): ``.tflite``, ``.card``, ``.golden``."""
    from tests.support.models import convert_digits

    out = tmp_path_factory.mktemp("digits_int8") / "digits.tflite"
    return convert_digits(
        digits_files["keras"], digits_files["calibration"], digits_files["validation"], out, "int8"
    )


@pytest.fixture(scope="session")
def digits_float32(tmp_path_factory: pytest.TempPathFactory, digits_files: dict[str, Path]) -> ConvertedModel:
    """Digits CNN converted without quantization: ``.tflite``, ``.card``, ``.golden``."""
    from tests.support.models import convert_digits

    out = tmp_path_factory.mktemp("digits_float32") / "digits.tflite"
    return convert_digits(
        digits_files["keras"], digits_files["calibration"], digits_files["validation"], out, "none"
    )


# -- the long soak (scripts/soak.sh) ----------------------------------------------------------
# Tests marked ``soak`` run only when asked for (``-m soak``, or LITEFLEET_SOAK=1); the
# default suite (CI) skips them. HYPOTHESIS_PROFILE=soak makes the fuzz tests draw thousands
# of examples instead of CI's few hundred (tests/fuzz/ reads it).
from hypothesis import HealthCheck as _HealthCheck  # noqa: E402
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile(
    "soak",
    max_examples=int(os.environ.get("LITEFLEET_FUZZ_EXAMPLES", "5000")),
    deadline=None,
    suppress_health_check=list(_HealthCheck),
)
if os.environ.get("HYPOTHESIS_PROFILE"):
    _hypothesis_settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = "soak" in (config.getoption("-m") or "") or os.environ.get("LITEFLEET_SOAK") == "1"
    if wanted:
        return
    skip = pytest.mark.skip(reason="soak test: run scripts/soak.sh (or pytest -m soak)")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def dense_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two ~14 MB float32 models with the same signature, [1, 3500] -> [1, 1000], with
    golden vectors (tests/support/big_models.py): for delivery resilience, faults, the watchdog
    and the soak."""
    from tests.support.big_models import build_dense_model

    folder = tmp_path_factory.mktemp("dense")
    return [
        build_dense_model(folder / f"d{i}" / "dense.tflite", megabytes=14.0, seed=10 + i) for i in range(2)
    ]
