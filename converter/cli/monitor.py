"""``litefleet monitor``: collect the fleet's state, events and metrics; serve Prometheus and a page.

Runs until Ctrl-C or SIGTERM, then disconnects, writes what is still queued
and exits 0. The console belongs to this module: a short summary line on
stderr every ``--summary-interval`` seconds unless ``--quiet``.

``--prometheus HOST:PORT`` serves ``/metrics`` only (and ``/healthz``): a port to
open to a Prometheus server. ``--http HOST:PORT`` serves the page and its JSON
API (and ``/healthz``): a port for people. The same address for both serves both.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path
from types import FrameType

from agent.errors import LitefleetError, StorageError
from agent.protocol import Topics
from converter.cli.host_mqtt import add_broker_args, finite_float, settings_from_args, topic_prefix
from converter.errors import BadInputError
from converter.monitor.collector import Collector, CollectorConfig, check_share_group, make_client
from converter.monitor.http_server import MonitorHttpServer, Serves, parse_listen
from converter.monitor.live import FleetSnapshot
from converter.monitor.store import MonitorStore

DEFAULT_DB = "litefleet-monitor.db"
MAX_SESSION_EXPIRY_S = 0xFFFFFFFE  # MQTT 5: 0xFFFFFFFF would mean "never expires"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "monitor",
        help="collect fleet metrics into SQLite; serve Prometheus and a page",
        description="Long-running collector of every device's state, events and metrics.",
    )
    add_broker_args(p)
    p.add_argument(
        "--db", type=Path, default=Path(DEFAULT_DB), help="SQLite history file (default: ./%(default)s)"
    )
    p.add_argument(
        "--prometheus",
        metavar="HOST:PORT",
        help="serve /metrics for Prometheus (and /healthz) here, e.g. 127.0.0.1:9464",
    )
    p.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve the HTML page (/), /api/devices and /api/rollouts (and /healthz) here, "
        "e.g. 127.0.0.1:8080; the same address as --prometheus serves both there",
    )
    p.add_argument(
        "--no-histograms",
        action="store_true",
        help="leave the latency histograms out of /metrics (31 series per device and "
        "model version: 29 buckets, sum and count; for large fleets)",
    )
    p.add_argument(
        "--share",
        metavar="GROUP",
        help="MQTT 5 shared subscription group: collectors with the same GROUP split "
        "the fleet's metrics and events",
    )
    p.add_argument(
        "--session",
        metavar="NAME",
        help="a persistent MQTT session named NAME: while this collector is away (a "
        "restart, an upgrade) the broker queues the fleet's metrics and events for "
        "it, up to --session-expiry; without it they are gone for this collector",
    )
    p.add_argument(
        "--session-expiry",
        type=partial(finite_float, maximum=MAX_SESSION_EXPIRY_S),
        default=86400.0,
        metavar="S",
        help="with --session: how long the broker keeps the session of an absent "
        "collector (default: %(default)s s)",
    )
    p.add_argument(
        "--retention-days",
        type=partial(finite_float, allow_zero=True),
        default=30.0,
        help="keep history this long; 0 keeps everything (default: %(default)s)",
    )
    p.add_argument(
        "--summary-interval",
        type=finite_float,
        default=10.0,
        metavar="S",
        help="seconds between summary lines on stderr (default: %(default)s)",
    )
    p.add_argument("--quiet", action="store_true", help="no summary lines")
    p.add_argument(
        "--timeout", type=finite_float, default=10.0, help="seconds to wait for the broker at start"
    )
    p.set_defaults(func=run)


def check_session_name(name: str) -> str:
    """A session name becomes part of an MQTT client id: 1-64 of ``A-Z a-z 0-9 . _ -``."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
        raise BadInputError(f"--session {name!r}: a session name is 1-64 letters, digits, '.', '_' or '-'")
    return name


def plan_servers(prometheus: str | None, http: str | None) -> list[tuple[tuple[str, int], frozenset[Serves]]]:
    """The HTTP servers to start: one per address, serving what was asked there."""
    wanted: dict[tuple[str, int], set[Serves]] = {}
    for text, flag, serves in ((prometheus, "--prometheus", Serves.METRICS), (http, "--http", Serves.PAGE)):
        if text:
            address = parse_listen(text, flag)
            # port 0 means "any free port": two of them are two servers
            key = address if address[1] else (address[0], -len(wanted) - 1)
            wanted.setdefault(key, set()).add(serves)
    return [((host, max(port, 0)), frozenset(serves)) for (host, port), serves in wanted.items()]


def serving_line(server: MonitorHttpServer) -> str:
    host, port = server.address
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    parts = []
    if Serves.PAGE in server.serves:
        parts.append(f"the page on {url}/")
    if Serves.METRICS in server.serves:
        parts.append(f"Prometheus on {url}/metrics")
    return "monitor: serving " + " and ".join(parts)


def summary_line(snap: FleetSnapshot, rate: float) -> str:
    s = snap.stats
    dup = sum(s.duplicates.values())
    bad = sum(s.malformed.values())
    line = (
        f"monitor: {snap.online_count}/{len(snap.devices)} devices online · {rate:.1f} msg/s · "
        f"{s.stored_samples} samples, {s.stored_events} events stored"
    )
    if dup:
        line += f" · {dup} duplicates"
    if bad:
        line += f" · {bad} malformed"
    if s.queue_depth:
        line += f" · queue {s.queue_depth}"
    if s.dropped:
        line += f" · {s.dropped} DROPPED"
    return line


def run(args: argparse.Namespace) -> int:
    group = check_share_group(args.share) if args.share is not None else None
    listens = plan_servers(args.prometheus, args.http)
    session = check_session_name(args.session) if args.session is not None else None
    if not 1 <= args.session_expiry <= MAX_SESSION_EXPIRY_S:
        raise BadInputError(f"--session-expiry must be between 1 and {MAX_SESSION_EXPIRY_S} seconds")
    settings = settings_from_args(args, "monitor", session=session, session_expiry_s=int(args.session_expiry))
    created = not args.db.exists()
    try:
        store = MonitorStore.open(args.db)
    except StorageError as exc:  # not a monitor database, or a folder we cannot write
        raise BadInputError(f"--db: {exc}") from exc
    collector = Collector(
        make_client(settings),
        Topics(topic_prefix(args)),
        store,
        CollectorConfig(share_group=group, retention_days=args.retention_days),
    )
    servers: list[MonitorHttpServer] = []
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            for address, serves in listens:
                servers.append(
                    MonitorHttpServer(collector, *address, histograms=not args.no_histograms, serves=serves)
                )
            collector.start(args.timeout)
        except LitefleetError:
            for server in servers:
                server.stop()
            collector.stop()
            if created:  # a failed command leaves nothing behind
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{args.db}{suffix}").unlink(missing_ok=True)
            raise
        for server in servers:
            server.start()
            sys.stderr.write(serving_line(server) + "\n")
        sys.stderr.write(
            f"monitor: collecting into {args.db}"
            + (f" (shared subscription group {group})" if group else "")
            + "\n"
        )
        last_total, last_t = 0, time.monotonic()
        while not stop.wait(args.summary_interval):
            if args.quiet:
                continue
            snap = collector.snapshot()
            total, now = sum(snap.stats.received.values()), time.monotonic()
            rate = (total - last_total) / max(1e-9, now - last_t)
            last_total, last_t = total, now
            sys.stderr.write(summary_line(snap, rate) + "\n")
            sys.stderr.flush()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for server in servers:
            server.stop()
        collector.stop()
    if not args.quiet:
        sys.stderr.write("monitor: stopped\n")
    return 0
