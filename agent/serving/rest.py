"""The agent's local REST API, in TensorFlow Serving's shape.

Routes (``<name>``: letters, digits, ``.``, ``_``, ``-``)::

    GET  /v1/models/<name>[/versions/<v>]            version status
    GET  /v1/models/<name>[/versions/<v>]/metadata   signature (inputs, outputs)
    POST /v1/models/<name>[/versions/<v>]:predict    inference
    GET  /v1/models                                  active models (litefleet extra)
    GET  /healthz                                    200 while the server runs
    GET  /readyz                                     200 once a model is active, else 503

``:predict`` takes JSON (see :mod:`agent.serving.formats`) or, as a fast path,
``Content-Type: application/x-npy`` with one ``.npy`` array as the body
(single-input models; the array's dtype decides: floats are quantized for an
integer model and the answer dequantized, exact integer codes come back as
codes). The answer to a ``.npy`` request is ``.npy`` (one output) or
``.npz`` (``application/x-npz``, one array per output key).

Guarantees:

- Listens on loopback unless told otherwise. HTTP/1.1 with keep-alive, one
  thread per connection, at most ``max_connections`` at once (more are told
  503 and closed); inference is serialized per model by its runner.
- Every caller mistake is a JSON ``{"error": "..."}`` with a 4xx status:
  400 malformed JSON/.npy, wrong shapes, dtypes, NaN; 404 unknown route,
  model or version (also while a version is being replaced); 405 wrong
  method; 408 a client too slow to send its request (``timeout_s`` per socket
  read, ``body_timeout_s`` for the whole body); 411 no Content-Length;
  413 a body over ``max_body_bytes`` (refused before it is read); 415 an
  unknown content type. A runtime failure is 500. No request can raise out
  of its handler thread: an unexpected exception is logged and answered 500,
  and the server keeps serving.
- Memory stays bounded: bodies over ``large_body_bytes`` (1 MiB) are read
  and decoded one at a time (others wait up to ``timeout_s``, then get 503),
  since JSON takes about ten times its size once parsed.
- Every answer is counted in ``counters`` (channel ``rest``, by status class)
  except the probes' (``/healthz``, ``/readyz``): a supervisor asking whether
  the agent is ready is not API traffic. The routes are one table
  (:mod:`agent.http_routes`, the monitor's idiom too).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from typing import Any

from agent.errors import BadRequestError, InferenceError
from agent.http_routes import Found, NotAllowed, NotFound, Reply, Request, RoutedHandler, RouteTable, route
from agent.serving import npy
from agent.serving.formats import (
    JSON_CONTENT_TYPE,
    dump_json,
    load_json,
    model_metadata,
    model_status,
    npy_predict,
    parse_predict,
    predict_json,
)
from agent.serving.inference import ModelRunner
from agent.serving.registry import ActiveModel, ModelRegistry
from agent.serving.stats import ApiCounters

logger = logging.getLogger(__name__)

NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"


def json_reply(status: int, doc: Any, *, close: bool = False) -> Reply:
    return Reply(status, dump_json(doc), JSON_CONTENT_TYPE, close)


def error_reply(status: int, message: str, *, close: bool = False) -> Reply:
    return json_reply(status, {"error": message}, close=close)


_BUSY_BODY = b'{"error":"too many open connections, try again"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], app: RestServer) -> None:
        self.app = app
        self._slots = threading.BoundedSemaphore(app.max_connections)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # runs on the accepting thread: refuse at once when every slot is taken
        if not self._slots.acquire(blocking=False):
            self.app.counters.record("rest", 503)
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.discard(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # called by socketserver inside its own except block
        logger.error("REST connection from %s failed", client_address, exc_info=True)  # noqa: LOG014

    def close_connections(self) -> None:
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


MODEL = rf"/v1/models/(?P<name>{NAME})(?:/versions/(?P<version>[0-9A-Za-z_.-]{{1,64}}))?"


class _Handler(RoutedHandler):
    protocol_version = "HTTP/1.1"
    server_version = "litefleet-agent"
    sys_version = ""
    disable_nagle_algorithm = True
    # the rest (HEAD, PATCH, ...) is refused by send_error as 405
    methods = ("GET", "POST", "PUT", "DELETE")
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.app.timeout_s)  # every socket read and write

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.client_address[0], format % args)

    # errors found while parsing the request line and headers (400, 414, 431, 501)
    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        if code == 501:  # an HTTP method nobody serves here
            code, message = 405, f"method {str(self.command)[:20]!r} is not allowed"
        self.close_connection = True
        self.server.app.counters.record("rest", code)
        self.send_reply(error_reply(code, message or HTTPStatus(code).phrase, close=True))

    def handle_expect_100(self) -> bool:
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.server.app.max_body_bytes:
            self.close_connection = True
            self.server.app.counters.record("rest", 413)
            self.send_reply(error_reply(413, self._too_large(int(length)), close=True))
            return False
        return super().handle_expect_100()

    # -- the routes ------------------------------------------------------------------------------
    def healthz(self, req: Request) -> Reply:
        return json_reply(200, {"status": "ok"})

    def readyz(self, req: Request) -> Reply:
        app = self.server.app
        ready = app.ready()
        return json_reply(200 if ready else 503, {"ready": ready, "models": app.registry.names()})

    def list_models(self, req: Request) -> Reply:
        snap = self.server.app.registry.snapshot()
        models = [{"name": m.name, "version": m.version} for m in sorted(snap.values(), key=lambda m: m.name)]
        return json_reply(200, {"models": models})

    def status(self, req: Request) -> Reply:
        return json_reply(200, model_status(self._active(req)))

    def metadata(self, req: Request) -> Reply:
        return json_reply(200, model_metadata(self._active(req)))

    def unsupported(self, req: Request) -> Reply:
        self.close_connection = True  # a body, if any, stays unread
        return error_reply(404, f"{req.params['verb']} is not supported; use :predict")

    def predict(self, req: Request) -> Reply:
        app = self.server.app
        length = self._body_length()
        # large bodies one at a time: JSON grows ~10x in memory once parsed, and
        # a small device must survive many clients sending the largest allowed
        large = length > app.large_body_bytes
        if large and not app.large_bodies.acquire(timeout=app.timeout_s):
            self.close_connection = True
            return error_reply(503, "busy with other large requests; try again", close=True)
        try:
            body = self._read_body(length)
            return self._predict(self._active(req).runner, body)
        finally:
            if large:
                app.large_bodies.release()

    routes = RouteTable["_Handler"](
        route("GET", "/healthz", healthz, probe=True),
        route("GET", "/readyz", readyz, probe=True),
        route("GET", "/v1/models/?", list_models),
        route("POST", MODEL + ":predict", predict),
        route("*", MODEL + ":(?P<verb>classify|regress)", unsupported),
        route("GET", MODEL + "/metadata", metadata),
        route("GET", MODEL, status),
    )

    # -- the hooks -------------------------------------------------------------------------------
    def not_found(self, req: Request) -> Reply:
        if req.method == "POST" and self.headers.get("Content-Length"):
            self.close_connection = True  # the body stays unread
        return error_reply(404, f"no such route: {req.path[:200]}")

    def not_allowed(self, req: Request, allowed: frozenset[str]) -> Reply:
        self.close_connection = bool(self.headers.get("Content-Length"))  # the body stays unread
        if req.path.endswith(":predict"):
            return error_reply(405, "use POST for :predict")
        return error_reply(405, f"{req.method} is not allowed on {req.path[:200]}")

    def failed(self, req: Request, exc: Exception) -> Reply | None:
        if isinstance(exc, BadRequestError):
            return error_reply(exc.status, str(exc))
        if isinstance(exc, InferenceError):
            return error_reply(500, str(exc))
        if isinstance(exc, TimeoutError):
            return error_reply(408, "the request body arrived too slowly", close=True)
        if isinstance(exc, ConnectionError):
            return None
        logger.error("REST %s %s failed", req.method, req.path[:200], exc_info=exc)
        return error_reply(500, "internal error (see the agent's log)", close=True)

    def replied(self, req: Request, resolved: Found[Any] | NotAllowed | NotFound, reply: Reply) -> None:
        # probes are not API traffic: a 503 from /readyz before the first model is no error
        if not (isinstance(resolved, Found) and resolved.route.probe):
            self.server.app.counters.record("rest", reply.status)

    # -- helpers ---------------------------------------------------------------------------------
    def _active(self, req: Request) -> ActiveModel:
        return self.server.app.registry.get(req.params["name"], req.params.get("version"))

    def _too_large(self, length: int) -> str:
        return f"a body of {length} bytes is larger than the {self.server.app.max_body_bytes} allowed"

    def _body_length(self) -> int:
        """The declared body length, checked against the limit (before reading anything)."""
        app = self.server.app
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise BadRequestError("chunked bodies are not supported: send Content-Length", status=411)
        raw = self.headers.get("Content-Length")
        if raw is None:
            self.close_connection = True
            raise BadRequestError("a body needs a Content-Length header", status=411)
        if not raw.strip().isdigit():
            self.close_connection = True
            raise BadRequestError(f"bad Content-Length {raw[:40]!r}")
        length = int(raw)
        if length > app.max_body_bytes:
            self.close_connection = True
            raise BadRequestError(self._too_large(length), status=413)
        return length

    def _read_body(self, length: int) -> bytearray:
        body = bytearray(length)
        view = memoryview(body)
        got = 0
        deadline = time.monotonic() + self.server.app.body_timeout_s
        while got < length:
            if time.monotonic() > deadline:
                self.close_connection = True
                raise TimeoutError("body deadline")
            n = self.rfile.readinto1(view[got:])
            if not n:
                self.close_connection = True
                raise BadRequestError("the body ended before its Content-Length")
            got += n
        return body

    def _predict(self, runner: ModelRunner, body: bytearray) -> Reply:
        ctype = (self.headers.get("Content-Type") or JSON_CONTENT_TYPE).split(";", 1)[0].strip().lower()
        if ctype == npy.CONTENT_TYPE or (ctype == "application/octet-stream" and npy.is_npy(body)):
            payload, out_type = npy_predict(runner, body)
            return Reply(200, payload, out_type)
        if ctype not in (JSON_CONTENT_TYPE, "text/json", "text/plain", "application/x-www-form-urlencoded"):
            return error_reply(
                415,
                f"unsupported Content-Type {ctype[:60]!r}: send {JSON_CONTENT_TYPE} or {npy.CONTENT_TYPE}",
            )
        req = parse_predict(load_json(body))
        return json_reply(200, predict_json(req, runner))


def default_ready(registry: ModelRegistry) -> Callable[[], bool]:
    return lambda: bool(registry.names())


class RestServer:
    """The REST API over ``registry``. ``start()`` binds and serves on a thread."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        host: str = "127.0.0.1",
        port: int = 8501,
        max_body_bytes: int = 32 * 1024 * 1024,
        timeout_s: float = 10.0,
        body_timeout_s: float = 60.0,
        max_connections: int = 32,
        large_body_bytes: int = 1024 * 1024,
        counters: ApiCounters | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        if max_body_bytes < 1 or timeout_s <= 0 or body_timeout_s <= 0 or max_connections < 1:
            raise ValueError("REST limits must be positive")
        self.registry = registry
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s
        self.body_timeout_s = body_timeout_s
        self.max_connections = max_connections
        self.large_body_bytes = large_body_bytes
        self.large_bodies = threading.Semaphore(1)
        self.counters = counters or ApiCounters()
        self.ready = ready or default_ready(registry)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(
        cls, cfg: Any, registry: ModelRegistry, counters: ApiCounters | None = None, **kwargs: Any
    ) -> RestServer | None:
        """From an :class:`agent.service.config.AgentConfig`; None when ``http`` is empty."""
        address = cfg.http_address
        if address is None:
            return None
        return cls(
            registry,
            host=address[0],
            port=address[1],
            max_body_bytes=cfg.http_max_body_bytes,
            counters=counters,
            **kwargs,
        )

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (the real port when 0 was asked)."""
        if self._server is None:
            return self.host, self.port
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        """Bind (raises OSError when the port is taken) and serve on a daemon thread."""
        if self._server is not None:
            return
        self._server = _Server((self.host, self.port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="rest-accept",
            daemon=True,
        )
        self._thread.start()
        logger.info("REST API on %s", self.url)

    def stop(self) -> None:
        """Stop accepting, close open connections, release the port."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join(5.0)
        logger.info("REST API stopped")
