"""``litefleet status``: one row per device, from the broker's retained state."""

from __future__ import annotations

import argparse
import json
import sys

from converter.fleet_view import collect_states, format_table
from converter.host_mqtt import add_broker_args, connect


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show every device's model, state and latency")
    add_broker_args(p)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the broker")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    client, topics = connect(args, "status", timeout_s=args.timeout)
    try:
        rows = collect_states(client, topics, timeout_s=args.timeout)
    finally:
        client.stop()
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        sys.stdout.write(format_table(rows))
    return 0
