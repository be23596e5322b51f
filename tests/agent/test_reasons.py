"""The reasons vocabulary: agent.reasons.Reason and docs/protocol.md section 6.3 say the same."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agent.errors import ModelRejectedError
from agent.reasons import PERMANENT, Reason, parse_reason

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def documented_reasons() -> dict[str, bool]:
    """word -> remembered?, from the table of docs/protocol.md section 6.3."""
    text = PROTOCOL_MD.read_text()
    section = text.split("### 6.3 Reasons", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "no table in docs/protocol.md section 6.3"
    out: dict[str, bool] = {}
    for row in rows:
        words_cell, _meaning, remembered = (c.strip() for c in row.strip("|").rsplit("|", 2))
        remembered = remembered.lower()
        assert remembered.startswith("no") or "yes" in remembered, row
        for word in re.findall(r"`([a-z_]+)`", words_cell):
            assert word not in out, f"{word} is listed twice"
            out[word] = "yes" in remembered
    return out


def test_the_documented_reasons_are_the_enum() -> None:
    documented = set(documented_reasons())
    spelled = {r.value for r in Reason}
    assert documented - spelled == set(), "documented, but no Reason says it"
    assert spelled - documented == set(), "a Reason docs/protocol.md section 6.3 does not list"


def test_the_documented_remembered_set_is_permanent() -> None:
    remembered = {word for word, yes in documented_reasons().items() if yes}
    assert remembered == {r.value for r in PERMANENT}
    assert all(r.permanent == (r in PERMANENT) for r in Reason)


def test_a_reason_is_its_wire_word() -> None:
    exc = ModelRejectedError(Reason.GOLDEN, "off by 3")
    assert exc.reason == "golden" and f"{exc.reason}: {exc}" == "golden: off by 3"
    assert json.dumps({"reason": Reason.CRASH_LOOP}) == '{"reason": "crash_loop"}'


@pytest.mark.parametrize("word", ["signature_mismatch", "", "GOLDEN", None, 3, "no_repository"])
def test_unknown_words_parse_to_none(word: object) -> None:
    assert parse_reason(word) is None
    assert parse_reason("hash") is Reason.HASH
