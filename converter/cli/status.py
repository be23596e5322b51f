"""``litefleet status``: one row per device, from the broker's retained state.

With ``--metrics S`` it also waits up to S seconds for each online device's
next metrics message and shows the latency of its last interval, throughput,
CPU, temperature and memory (the retained state has p50 and the inference
count since the model was loaded).

A fleet with site brokers (docs/sites.md) gets a SITE column (``-`` for a device
of the central broker); ``--site NAME`` shows only that site's devices. A site whose
uplink is down gets a warning on stderr: its devices' rows are their last states.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any

from converter.cli.host_mqtt import add_broker_args, connect, finite_float
from converter.cli.table import format_table
from converter.fleet.view import (
    METRICS_COLUMNS,
    TABLE_COLUMNS,
    collect_expiry,
    collect_metrics,
    collect_sites,
    collect_states,
    merge_metrics,
)
from converter.monitor.payloads import Refusal
from converter.monitor.sites import SiteView
from converter.repo.expiry import expiry_warnings

# a cell longer than this (an error message) is cut
MAX_CELL_CHARS = 48


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="show every device's model, state and latency")
    add_broker_args(p)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--timeout", type=finite_float, default=5.0, help="seconds to wait for the broker")
    p.add_argument(
        "--site", metavar="NAME", help="only the devices of this site broker (as their states say)"
    )
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
        if args.site is not None:
            rows = [r for r in rows if r.get("site") == args.site]
        for line in expiry_lines(collect_expiry(client, topics, timeout_s=args.timeout)):
            say(f"litefleet: warning: {line}")
        sites = collect_sites(client, topics, timeout_s=args.timeout)
        if args.site is not None:
            sites = {name: view for name, view in sites.items() if name == args.site}
        for line in site_lines(sites, rows):
            say(f"litefleet: warning: {line}")
        if args.metrics > 0:
            online = [r["device_id"] for r in rows if r.get("online")]
            say(waiting_line(online, args.metrics))
            samples = collect_metrics(client, topics, online, args.metrics)
            if online and set(online) - set(samples):
                missing = ", ".join(sorted(set(online) - set(samples)))
                say(f"no metrics within {args.metrics:g} s from {missing}: their rows show the state only")
            rows = [merge_metrics(r, samples.get(r["device_id"])) for r in rows]
    finally:
        client.stop()
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    elif not rows and args.site is not None:
        sys.stdout.write(f"no device of site {args.site} has reported yet\n")
    else:
        columns = with_site(rows, METRICS_COLUMNS if args.metrics > 0 else TABLE_COLUMNS)
        sys.stdout.write(status_table(rows, columns))
    return 0


def expiry_lines(expires: dict[str, datetime], now: datetime | None = None) -> list[str]:
    """Warnings for the repository's expiry dates as the broker holds them. The broker does
    not say how long each role is valid for: the windows are those of the default periods."""
    lines = []
    for w in expiry_warnings(expires, now or datetime.now(UTC)):
        extra = " (with --root-keys DIR if its root keys are offline)" if w.role == "root" else ""
        lines.append(f"{w.describe()}: run `litefleet repo resign DIR --broker ...`{extra} on the host")
    return lines


def with_site(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> tuple[str, ...]:
    """``columns`` with ``site`` after ``groups`` when any device is behind a site broker."""
    if not any(r.get("site") for r in rows):
        return tuple(columns)
    at = list(columns).index("groups") + 1
    return (*columns[:at], "site", *columns[at:])


def site_lines(sites: dict[str, SiteView], rows: Sequence[dict[str, Any]]) -> list[str]:
    """A line per site whose uplink to this broker is down: its devices' rows are the last
    states that crossed it (they may say online)."""
    lines = []
    for name, view in sorted(sites.items()):
        if view.link_up is False:
            n = sum(1 for r in rows if r.get("site") == name)
            lines.append(
                f"site {name}'s uplink to this broker is down: the rows of its {n} device(s) are "
                "their last states from before (docs/sites.md, Outages)"
            )
    return lines


def say(line: str) -> None:
    """A progress line on stderr (stdout stays the table or the JSON)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def waiting_line(online: Sequence[str], seconds: float) -> str:
    if not online:
        return "no device is online: no metrics to wait for"
    shown = ", ".join(online[:5]) + (f" and {len(online) - 5} more" if len(online) > 5 else "")
    return (
        f"waiting up to {seconds:g} s for the next metrics message of {len(online)} online "
        f"device(s) ({shown}); devices send one every metrics_interval_s (10 s by default)"
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _shown(row: dict[str, Any], column: str) -> str:
    if column in ("model", "version") and row.get("last_will"):
        return "unknown"
    return _cell(row.get(column))[:MAX_CELL_CHARS]


def status_table(rows: list[dict[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """The rows as a table with the given columns (field names, upper case as titles); a
    device offline by its will shows its model as unknown, and a line below says why."""
    if not rows:
        return "no devices have reported yet\n"
    table = format_table([c.upper() for c in columns], ([_shown(r, c) for c in columns] for r in rows))
    table += "".join(line + "\n" for line in refusal_lines(rows))
    wills = sum(1 for r in rows if r.get("last_will"))
    if wills:
        table += (
            f"{wills} device(s) went offline without a goodbye (their last will): the broker keeps "
            "no model for them; `litefleet monitor` shows the last known one\n"
        )
    return table


MAX_REFUSAL_LINES = 20


def refusal_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A line per model a device refused a newer version of (its state's ``refused``): the
    state's ``error`` clears at its next good refresh, this stays while it runs the older one."""
    lines = []
    for r in rows:
        running = r.get("models") or {}
        for name, refusal in sorted((r.get("refused") or {}).items()):
            on = running.get(name)
            now = f"runs v{on['version']}" if on else "runs no version of it"
            said = Refusal(name, refusal["version"], refusal["reason"])
            lines.append(f"{r['device_id']} {said} and {now}")
    if len(lines) > MAX_REFUSAL_LINES:
        more = len(lines) - MAX_REFUSAL_LINES + 1
        lines = [*lines[: MAX_REFUSAL_LINES - 1], f"and {more} more refusals (--json lists them all)"]
    return lines
