"""``litefleet convert --quantize auto`` makes the same choice for the same inputs (issue 12,
item 3), shown with real conversions of the digits CNN repeated as a user runs them.

The digits CNN's variants run in a few microseconds each, where timing noise is a few
percent: the old strict "slower than float32" rule flipped there in one run out of six.
The pure rule is tested under forced noise in test_pure.py; here the whole command runs
three times and must agree with itself. The same runs show the card and golden paths
printed with their folder (item 8).
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.support.cli import litefleet

RUNS = 3


def test_auto_chooses_the_same_variant_every_time(tmp_path: Path, digits_files: dict[str, Path]) -> None:
    chosen = []
    for i in range(RUNS):
        out = tmp_path / f"run{i}"
        result = litefleet(
            "convert",
            str(digits_files["keras"]),
            "-o",
            str(out / "digits.tflite"),
            "--quantize",
            "auto",
            "--calibration",
            str(digits_files["calibration"]),
            "--validate",
            str(digits_files["validation"]),
        )
        assert result.returncode == 0, result.stderr[-2000:]
        picked = re.search(r"^auto picked (\w+):", result.stdout, re.MULTILINE)
        assert picked, result.stdout
        chosen.append(picked.group(1))
        assert f"wrote {out}/digits.tflite, {out}/digits.card.json, {out}/digits.golden.npz" in result.stdout
    assert len(set(chosen)) == 1, chosen
