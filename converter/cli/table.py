"""Plain-text tables for the console: ``status``, ``repo show``, ``device list``, ``convert``.

Guarantees:

* every column is as wide as its widest cell or title, columns are two spaces
  apart, and no line ends in spaces;
* a cell is printed as given (the caller turns values into text and shortens
  them); nothing here reads a terminal or writes anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

GAP = "  "


class Align(Enum):
    LEFT = "left"
    RIGHT = "right"


@dataclass(frozen=True)
class Column:
    title: str
    align: Align = Align.LEFT

    def fit(self, text: str, width: int) -> str:
        return text.rjust(width) if self.align is Align.RIGHT else text.ljust(width)


def format_table(
    columns: Sequence[Column | str], rows: Iterable[Sequence[str]], *, rule: bool = False, indent: str = ""
) -> str:
    """The table as lines ending in a newline: titles, a rule of dashes under the titled
    columns (``rule``), then the rows. A row has one cell per column."""
    cols = [c if isinstance(c, Column) else Column(c) for c in columns]
    body = [tuple(r) for r in rows]
    for r in body:
        if len(r) != len(cols):
            raise ValueError(f"a row of {len(r)} cells in a table of {len(cols)} columns")
    widths = [max([len(c.title), *(len(r[i]) for r in body)]) for i, c in enumerate(cols)]

    def line(cells: Sequence[str]) -> str:
        return (indent + GAP.join(c.fit(v, w) for c, v, w in zip(cols, cells, widths, strict=True))).rstrip()

    lines = [line([c.title for c in cols])]
    if rule:
        lines.append(line(["-" * w if c.title else "" for c, w in zip(cols, widths, strict=True)]))
    lines += [line(r) for r in body]
    return "\n".join(lines) + "\n"
