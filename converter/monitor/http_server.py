"""The monitor's HTTP servers (standard library ``http.server``): Prometheus, and the page with its API.

Guarantees:

- A server serves what it is made for (:class:`Serves`): ``METRICS`` is
  ``/metrics`` (the Prometheus text format 0.0.4, :mod:`converter.monitor.prometheus`);
  ``PAGE`` is ``/`` (the HTML page, :mod:`converter.monitor.dashboard`),
  ``/api/devices`` (the fleet as JSON: the columns of ``litefleet status`` plus
  health and metrics) and ``/api/rollouts`` (the newest rollout record per model).
  Both answer ``/healthz`` (200 while serving). ``litefleet monitor --prometheus``
  and ``--http`` start one each, or one serving both when given the same address;
  anything a server is not made for is 404 there.
- One thread per request (``ThreadingHTTPServer``, daemon threads); a request
  only reads: the live snapshot (immutable) and the history through its own
  read-only SQLite connection. Nothing a request does can block the collector.
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
from dataclasses import asdict
from enum import StrEnum
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs

from agent.http_routes import Reply, Request, RoutedHandler, RouteTable, route
from converter.errors import BadInputError
from converter.monitor.dashboard import MonitorSource, build_page
from converter.monitor.live import DeviceView
from converter.monitor.payloads import refused_json, shown_model
from converter.monitor.prometheus import CONTENT_TYPE as PROMETHEUS_CONTENT_TYPE
from converter.monitor.prometheus import render as render_prometheus
from converter.monitor.rollouts import RolloutView

logger = logging.getLogger(__name__)


class Serves(StrEnum):
    METRICS = "metrics"  # /metrics for Prometheus
    PAGE = "page"  # the page and its JSON API


def parse_listen(text: str, flag: str = "--prometheus") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6; ``:9464`` means 127.0.0.1)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise BadInputError(f"{flag} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
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
        # the newer releases it refused (docs/protocol.md 6.1), as ``status --json`` has them
        "refused": refused_json(st.refused) if st else {},
        # offline by its will: model and version are the last known ones
        "last_will": bool(st and st.will),
        "latency_ms_p50": first.p50_ms if first else (st.latency_ms_p50 if st else None),
        "inferences": served if first else (st.inferences if st else None),
        "health": d.health,
        "last_seen": d.last_seen,
        # the figures below are the newest report's; "now" only while the device is online
        "metrics_ts": m.ts if m else None,
        "metrics_current": d.current,
        "latency_ms_p99": first.p99_ms if first else None,
        "throughput_rps": first.throughput_rps if first else None,
        "cpu_percent_system": m.cpu_percent_system if m else None,
        "temperature_c": m.temperature_c if m else None,
        "rss_bytes": m.rss_bytes if m else None,
    }


def rollout_json(r: RolloutView) -> dict[str, Any]:
    """A rollout record as the monitor read it (``/api/rollouts``)."""
    doc = asdict(r)
    doc["waves"] = list(r.waves)
    doc["selected"] = list(r.selected)
    doc["ignored"] = dict(r.ignored)
    doc["gates"] = {g["name"]: {k: v for k, v in g.items() if k != "name"} for g in doc["gates"]}
    return doc


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
        handler: type[_Handler],
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.source = source
        self.clock = clock
        self.histograms = histograms
        super().__init__(address, handler)


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

    def rollouts(self, req: Request) -> Reply:
        doc = [rollout_json(r) for r in self.server.source.snapshot().rollouts]
        return Reply(200, json.dumps(doc, indent=1).encode(), "application/json", headers=NO_STORE)

    def healthz(self, req: Request) -> Reply:
        return Reply(200, b'{"status": "ok"}', "application/json", headers=NO_STORE)

    ROUTES: ClassVar[dict[Serves, tuple[Any, ...]]] = {
        Serves.METRICS: (route("GET", "/metrics", metrics),),
        Serves.PAGE: (
            route("GET", r"/(?:index\.html)?", page),
            route("GET", "/api/devices", devices),
            route("GET", "/api/rollouts", rollouts),
        ),
    }

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


def _handler_for(serves: frozenset[Serves]) -> type[_Handler]:
    """A handler class whose route table has exactly what ``serves`` asks for."""
    table = [r for s in Serves if s in serves for r in _Handler.ROUTES[s]]
    table.append(route("GET", "/healthz", _Handler.healthz, probe=True))
    name = "_Handler_" + "_".join(sorted(serves))
    return type(name, (_Handler,), {"routes": RouteTable["_Handler"](*table)})


class MonitorHttpServer:
    """Serve ``source`` on ``host:port`` in a background thread (port 0: any free port):
    what ``serves`` names, and ``/healthz``."""

    def __init__(
        self,
        source: MonitorSource,
        host: str,
        port: int,
        clock: Callable[[], float] = time.time,
        histograms: bool = True,
        serves: frozenset[Serves] = frozenset(Serves),
    ) -> None:
        self.serves = serves
        try:
            self._server = _Server((host, port), source, clock, histograms, _handler_for(serves))
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
