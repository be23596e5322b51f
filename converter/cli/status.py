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
from functools import partial

from converter.cli.host_mqtt import add_broker_args, connect, finite_float
from converter.fleet.view import METRICS_COLUMNS, collect_metrics, collect_states, format_table, merge_metrics


def register(sub: argparse._SubParsersAction) -> None:
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
        sys.stdout.write(format_table(rows, METRICS_COLUMNS) if args.metrics > 0 else format_table(rows))
    return 0
