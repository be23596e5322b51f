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
- Only GET and HEAD; anything else is 405, unknown paths 404. Access logs go
  to :mod:`logging` at debug level, never to the console.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

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


class _Handler(BaseHTTPRequestHandler):
    server_version = "litefleet-monitor"
    source: MonitorSource
    clock: Callable[[], float]
    histograms: bool = True

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        try:
            if url.path == "/metrics":
                body = render_prometheus(self.source.snapshot(), histograms=self.histograms).encode()
                self._send(200, body, PROMETHEUS_CONTENT_TYPE)
            elif url.path in ("/", "/index.html"):
                page = build_page(self.source, parse_qs(url.query), self.clock())
                self._send(200, page.encode(), "text/html; charset=utf-8")
            elif url.path == "/api/devices":
                doc = [device_json(d) for d in self.source.snapshot().devices]
                self._send(200, json.dumps(doc, indent=1).encode(), "application/json")
            elif url.path == "/healthz":
                self._send(200, b'{"status": "ok"}', "application/json")
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:
            logger.exception("monitor page %s failed", url.path)
            self._send(500, b"internal error (see the monitor's log)\n", "text/plain; charset=utf-8")

    def _not_allowed(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", "text/plain; charset=utf-8")

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


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
        handler = type(
            "Handler", (_Handler,), {"source": source, "clock": staticmethod(clock), "histograms": histograms}
        )
        server_class = _Server6 if ":" in host else ThreadingHTTPServer
        try:
            self._server = server_class((host, port), handler)
        except OSError as exc:
            raise BadInputError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        self._server.daemon_threads = True
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
