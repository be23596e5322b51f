"""The monitor's HTTP server (standard library ``http.server``): ``/metrics``, ``/``, ``/api/devices``.

Guarantees:

- One thread per request (``ThreadingHTTPServer``, daemon threads); a request
  only reads: the live snapshot (immutable) and the history through its own
  read-only SQLite connection. Nothing a request does can block the collector.
- ``/metrics`` is the Prometheus text format 0.0.4
  (:mod:`converter.monitor.prometheus`); ``/`` the HTML page
  (:mod:`converter.monitor.page`); ``/api/devices`` the fleet as JSON (the
  columns of ``litefleet status`` plus health and metrics, see
  ``docs/monitor.md``); ``/healthz`` 200 while serving.
- Only GET and HEAD; anything else is 405, unknown paths 404 (the routes are a
  table: :mod:`agent.http_routes`). Access logs go to :mod:`logging` at debug
  level, never to the console.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs

from agent.http_routes import Reply, Request, RoutedHandler, RouteTable, route
from converter.errors import BadInputError
from converter.monitor.live import DeviceView, FleetSnapshot
from converter.monitor.page import latency_chart_svg, render_page
from converter.monitor.payloads import shown_model
from converter.monitor.prometheus import CONTENT_TYPE as PROMETHEUS_CONTENT_TYPE
from converter.monitor.prometheus import render as render_prometheus
from converter.monitor.store import MonitorStore

logger = logging.getLogger(__name__)

MAX_CHARTS = 60
MAX_WINDOW_H = 24 * 31
RECENT_EVENTS = 50


class MonitorSource(Protocol):
    """What the server reads: the live view and the history file."""

    store: MonitorStore

    def snapshot(self) -> FleetSnapshot: ...


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6; ``:9464`` means 127.0.0.1)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise BadInputError(f"--prometheus {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def device_json(d: DeviceView) -> dict[str, Any]:
    """A device with the columns of ``litefleet status``, plus health and metrics; the figures
    are those of :func:`converter.monitor.payloads.shown_model`."""
    st, m = d.state, d.metrics
    first = shown_model(m, st.model if st else None)
    # as in the state and ``status --metrics``: the answered requests of every active model
    served = sum(x.ok or 0 for x in m.models if x.active) if m is not None else None
    return {
        "device_id": d.device_id,
        "online": bool(st and st.online),
        "model": st.model if st else None,
        "version": st.version if st else None,
        "status": st.status if st else None,
        "error": st.error if st else None,
        # offline by its will: model and version are the last known ones
        "last_will": bool(st and st.will),
        "latency_ms_p50": first.p50_ms if first else (st.latency_ms_p50 if st else None),
        "inferences": served if first else (st.inferences if st else None),
        "health": d.health,
        "last_seen": d.last_seen,
        "latency_ms_p99": first.p99_ms if first else None,
        "throughput_rps": first.throughput_rps if first else None,
        "cpu_percent_system": m.cpu_percent_system if m else None,
        "temperature_c": m.temperature_c if m else None,
        "rss_bytes": m.rss_bytes if m else None,
    }


def build_page(source: MonitorSource, query: dict[str, list[str]], now: float) -> str:
    try:
        hours = float(query.get("hours", ["1"])[0])
    except ValueError:
        hours = 1.0
    hours = min(max(hours, 0.05), MAX_WINDOW_H) if hours == hours else 1.0
    only = query.get("device", [None])[0]
    since = now - hours * 3600
    snap = source.snapshot()
    devices = [d for d in snap.devices if only is None or d.device_id == only]
    charts: list[str] = []
    omitted = 0
    with source.store.reader() as r:
        pairs = r.charted_models(since, 100_000, device_id=only)
        omitted = max(0, len(pairs) - MAX_CHARTS)
        for device_id, model in pairs[:MAX_CHARTS]:
            points = r.latency_series(device_id, model, since)
            charts.append(latency_chart_svg(points, since=since, until=now, title=f"{device_id} · {model}"))
        events = r.recent_events(RECENT_EVENTS, device_id=only)
    return render_page(
        devices=devices,
        charts=charts,
        events=events,
        now=now,
        window_s=hours * 3600,
        charts_omitted=omitted,
        only_device=only,
    )


TEXT = "text/plain; charset=utf-8"
NO_STORE = (("Cache-Control", "no-store"),)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        source: MonitorSource,
        clock: Callable[[], float],
        histograms: bool,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.source = source
        self.clock = clock
        self.histograms = histograms
        super().__init__(address, _Handler)


class _Handler(RoutedHandler):
    server_version = "litefleet-monitor"
    send_server_headers = True
    # GET and HEAD are served; the others are answered 405 on any path
    methods = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH")
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    # -- the routes ------------------------------------------------------------------------------
    def metrics(self, req: Request) -> Reply:
        body = render_prometheus(self.server.source.snapshot(), histograms=self.server.histograms).encode()
        return Reply(200, body, PROMETHEUS_CONTENT_TYPE, headers=NO_STORE)

    def page(self, req: Request) -> Reply:
        page = build_page(self.server.source, parse_qs(req.query), self.server.clock())
        return Reply(200, page.encode(), "text/html; charset=utf-8", headers=NO_STORE)

    def devices(self, req: Request) -> Reply:
        doc = [device_json(d) for d in self.server.source.snapshot().devices]
        return Reply(200, json.dumps(doc, indent=1).encode(), "application/json", headers=NO_STORE)

    def healthz(self, req: Request) -> Reply:
        return Reply(200, b'{"status": "ok"}', "application/json", headers=NO_STORE)

    routes = RouteTable["_Handler"](
        route("GET", "/metrics", metrics),
        route("GET", r"/(?:index\.html)?", page),
        route("GET", "/api/devices", devices),
        route("GET", "/healthz", healthz, probe=True),
    )

    # -- the hooks -------------------------------------------------------------------------------
    def not_found(self, req: Request) -> Reply:
        if req.method not in ("GET", "HEAD"):
            return self.not_allowed(req, frozenset({"GET", "HEAD"}))
        return Reply(404, b"not found\n", TEXT, headers=NO_STORE)

    def not_allowed(self, req: Request, allowed: frozenset[str]) -> Reply:
        return Reply(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", TEXT, headers=NO_STORE)

    def failed(self, req: Request, exc: Exception) -> Reply | None:
        if isinstance(exc, BrokenPipeError | ConnectionResetError):
            return None
        logger.error("monitor page %s failed", req.path, exc_info=exc)
        return Reply(500, b"internal error (see the monitor's log)\n", TEXT, headers=NO_STORE)


class MonitorHttpServer:
    """Serve ``source`` on ``host:port`` in a background thread (port 0: any free port)."""

    def __init__(
        self,
        source: MonitorSource,
        host: str,
        port: int,
        clock: Callable[[], float] = time.time,
        histograms: bool = True,
    ) -> None:
        try:
            self._server = _Server((host, port), source, clock, histograms)
        except OSError as exc:
            raise BadInputError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="monitor-http", kwargs={"poll_interval": 0.2}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever, so only once started
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()
