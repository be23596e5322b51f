"""The one plain-text table formatter of the CLI, and the tables made with it."""

from __future__ import annotations

import pytest

from converter.cli.table import Align, Column, format_table


def test_columns_fit_their_widest_cell_and_lines_end_clean() -> None:
    text = format_table(("DEVICE", "AUTH"), [("pi-0001", "cert"), ("p", "password")])
    assert text == "DEVICE   AUTH\npi-0001  cert\np        password\n"


def test_right_aligned_columns_a_rule_and_an_untitled_last_column() -> None:
    columns = [Column("variant"), Column("size", Align.RIGHT), Column("p50 ms", Align.RIGHT), Column("")]
    text = format_table(
        columns, [("float32", "1.2 MiB", "0.41", ""), ("int8", "300 KiB", "0.2", "<- written")], rule=True
    )
    assert text.splitlines() == [
        "variant     size  p50 ms",
        "-------  -------  ------",
        "float32  1.2 MiB    0.41",
        "int8     300 KiB     0.2  <- written",
    ]


def test_indent_and_a_row_of_the_wrong_width() -> None:
    assert format_table(("A",), [("x",)], indent="  ") == "  A\n  x\n"
    with pytest.raises(ValueError, match="a row of 2 cells in a table of 1 columns"):
        format_table(("A",), [("x", "y")])
