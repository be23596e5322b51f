"""How a rollout looks on the console: the live view, plain progress lines, the status table.

Guarantees:

* on a terminal, :class:`LiveView` redraws one block in place (headline and a gate table)
  at most twice a second; elsewhere it prints one plain line when the state, the wave or
  a verdict changes, and at most every ``plain_every_s`` while values move, so a log or
  a pipe gets a readable history, not a flood;
* everything is text made from the record; nothing here reads the broker or the store.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from converter.cli.table import Align, Column, format_table
from converter.rollout.gates import GateResult
from converter.rollout.record import RolloutRecord, RolloutState

GATE_COLUMNS = (
    Column("GATE"),
    Column("VALUE", Align.RIGHT),
    Column("RULE"),
    Column("VERDICT"),
    Column("SAMPLES", Align.RIGHT),
)


def duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _value(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def gate_rows(gates: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for name, g in gates.items():
        rule = (
            f"{g.get('op')} {g.get('threshold'):g}" if g.get("op") and g.get("threshold") is not None else ""
        )
        rows.append((name, _value(g.get("value")), rule, str(g.get("verdict")), str(g.get("samples", 0))))
    return rows


def headline(record: RolloutRecord, now: float) -> str:
    spec = record.spec
    head = f"{record.name} v{record.version} (from v{record.previous})"
    wave = f"wave {record.wave + 1}/{len(spec.waves)}: {record.canary_pct} % of {spec.target}"
    state = record.state.value
    if record.state is RolloutState.BAKING and record.wave_started is not None:
        state = f"baking {duration(now - record.wave_started)} of {duration(spec.bake_s)}"
    cur = record.current
    devices = ""
    if cur and cur.devices:
        devices = f"; canary {cur.devices.get('canary', 0)}, control {cur.devices.get('control', 0)}"
    ignored = sum(record.ignored.values())
    junk = f"; {ignored} messages ignored" if ignored else ""
    reason = f" ({record.reason})" if record.reason and record.state is not RolloutState.ABORTED else ""
    return f"{head} {wave}, {state}{reason}{devices}{junk}"


def plain_line(record: RolloutRecord, now: float) -> str:
    cur = record.current
    gates = cur.gates if cur else {}
    parts = [
        f"{name} {_value(g.get('value'))} {g.get('verdict')}"
        + (f" ({g.get('samples')})" if g.get("verdict") not in ("off", "skip") else "")
        for name, g in gates.items()
    ]
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    return f"{stamp} {headline(record, now)}" + (" | " + ", ".join(parts) if parts else "")


def final_line(record: RolloutRecord) -> str:
    if record.state is RolloutState.PROMOTED:
        waves = ", ".join(f"{w} %" for w in record.spec.waves)
        return f"rollout {record.name} v{record.version} promoted through {waves} of {record.spec.target}"
    if record.state is RolloutState.ABORTED:
        return (
            f"rollout {record.name} v{record.version} aborted: {record.reason}; devices that took "
            f"v{record.version} go back to v{record.previous}"
        )
    return f"rollout {record.name} v{record.version} is {record.state.value}" + (
        f": {record.reason}" if record.reason else ""
    )


def _key(record: RolloutRecord) -> tuple[Any, ...]:
    cur = record.current
    verdicts = tuple((k, v.get("verdict")) for k, v in (cur.gates if cur else {}).items())
    return (record.state, record.wave, verdicts, record.reason)


class LiveView:
    """Shows a driven rollout as it moves (the foreground ``rollout start``/``resume``)."""

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool | None = None,
        clock: Callable[[], float] = time.time,
        plain_every_s: float = 10.0,
    ) -> None:
        self.stream = stream
        self.tty = bool(stream.isatty()) if tty is None else tty
        self._clock = clock
        self._plain_every_s = plain_every_s
        self._lines = 0
        self._last_draw = 0.0
        self._last_key: tuple[Any, ...] | None = None
        self._last_values: Any = None

    def update(self, record: RolloutRecord, results: Sequence[GateResult] = ()) -> None:
        now = self._clock()
        if self.tty:
            if now - self._last_draw >= 0.5 or _key(record) != self._last_key:
                self._draw(record, now)
            self._last_key = _key(record)
            return
        cur = record.current
        values = dict(cur.gates) if cur else {}
        changed = _key(record) != self._last_key
        moved = values != self._last_values and now - self._last_draw >= self._plain_every_s
        if changed or moved:
            self.stream.write(plain_line(record, now) + "\n")
            self.stream.flush()
            self._last_key, self._last_values, self._last_draw = _key(record), values, now

    def _draw(self, record: RolloutRecord, now: float) -> None:
        cur = record.current
        block = headline(record, now) + "\n"
        if cur and cur.gates:
            block += format_table(GATE_COLUMNS, gate_rows(cur.gates), indent="  ")
        if self._lines:
            self.stream.write(f"\x1b[{self._lines}F\x1b[J")
        self.stream.write(block)
        self.stream.flush()
        self._lines = block.count("\n")
        self._last_draw = now

    def close(self) -> None:
        self._lines = 0


def status_rows(entries: Sequence[tuple[RolloutRecord, int | None]], now: float) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for record, pid in entries:
        cur = record.current
        devices = cur.devices if cur else {}
        failing = [k for k, g in (cur.gates if cur else {}).items() if g.get("verdict") in ("fail", "wait")]
        note = record.reason or (("waiting on " + ", ".join(failing)) if failing else "")
        driver = f"pid {pid}" if pid else ("service" if record.detached else "-")
        rows.append(
            (
                record.name,
                f"v{record.version}",
                f"v{record.previous}",
                record.state.value,
                f"{record.wave + 1}/{len(record.spec.waves)} ({record.canary_pct} %)",
                str(devices.get("canary", "-")),
                str(devices.get("control", "-")),
                driver if not record.state.terminal else "-",
                duration(now - record.updated) + " ago",
                note,
            )
        )
    return rows


STATUS_COLUMNS = (
    "MODEL",
    "VERSION",
    "FROM",
    "STATE",
    "WAVE",
    Column("CANARY", Align.RIGHT),
    Column("CONTROL", Align.RIGHT),
    "DRIVEN BY",
    "UPDATED",
    "NOTE",
)


def status_table(entries: Sequence[tuple[RolloutRecord, int | None]], now: float) -> str:
    return format_table(STATUS_COLUMNS, status_rows(entries, now))
