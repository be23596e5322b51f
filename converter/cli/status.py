"""``litefleet status``: one row per device, from the broker's retained state.

With ``--metrics S`` it also waits up to S seconds for each online device's
next metrics message and shows the latency of its last interval, throughput,
CPU, temperature and memory (the retained state has p50 and the inference
count since the model was loaded).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

from converter.cli.host_mqtt import add_broker_args, connect, finite_float
from converter.cli.table import format_table
from converter.fleet.view import (
    METRICS_COLUMNS,
    STATUS_FIELDS,
    collect_metrics,
    collect_states,
    merge_metrics,
)

# a cell longer than this (an error message) is cut
MAX_CELL_CHARS = 48


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="show every device's model, state and latency")
    add_broker_args(p)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--timeout", type=finite_float, default=5.0, help="seconds to wait for the broker")
    p.add_argument(
        "--metrics",
        type=partial(finite_float, allow_zero=True),
        default=0.0,
        metavar="S",
        help="also wait up to S seconds for each online device's next metrics message "
        "(devices send one every metrics_interval_s, 10 s by default) and show "
        "fresh p50/p99, throughput, CPU, temperature and memory",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    client, topics = connect(args, "status", timeout_s=args.timeout)
    try:
        rows = collect_states(client, topics, timeout_s=args.timeout)
        if args.metrics > 0:
            online = [r["device_id"] for r in rows if r.get("online")]
            samples = collect_metrics(client, topics, online, args.metrics)
            rows = [merge_metrics(r, samples.get(r["device_id"])) for r in rows]
    finally:
        client.stop()
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        sys.stdout.write(status_table(rows, METRICS_COLUMNS if args.metrics > 0 else STATUS_FIELDS))
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _shown(row: dict[str, Any], column: str) -> str:
    if column in ("model", "version") and row.get("last_will"):
        return "unknown"
    return _cell(row.get(column))[:MAX_CELL_CHARS]


def status_table(rows: list[dict[str, Any]], columns: Sequence[str] = STATUS_FIELDS) -> str:
    """The rows as a table with the given columns (field names, upper case as titles); a
    device offline by its will shows its model as unknown, and a line below says why."""
    if not rows:
        return "no devices have reported yet\n"
    table = format_table([c.upper() for c in columns], ([_shown(r, c) for c in columns] for r in rows))
    wills = sum(1 for r in rows if r.get("last_will"))
    if wills:
        table += (
            f"{wills} device(s) went offline without a goodbye (their last will): the broker keeps "
            "no model for them; `litefleet monitor` shows the last known one\n"
        )
    return table
