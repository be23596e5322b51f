"""Route tables for the project's HTTP servers (the agent's REST API, the host's monitor).

Both are :mod:`http.server` servers, one thread per connection. Each declares what it serves
as data, a :class:`RouteTable` of :class:`Route` (methods, path pattern -> handler), and its
request handler derives from :class:`RoutedHandler`, which finds the route, calls it and
writes the :class:`Reply`. What differs between the servers (limits, error bodies, counters)
lives in a few hooks the handler overrides. The host side imports this module; it imports
nothing from either server.

Guarantees:

- Resolution is pure (:meth:`RouteTable.resolve`): the first route, in table order, whose
  pattern matches the *whole* path (the query string is not part of it) and whose methods
  include the request's is :class:`Found`, with the pattern's named groups; a path that
  some route matches for other methods only is :class:`NotAllowed`; anything else
  :class:`NotFound`. HEAD is answered as GET where a route allows GET (without the body).
- Only the methods a handler class lists in ``methods`` reach the table; any other is left to
  :meth:`http.server.BaseHTTPRequestHandler.send_error` (501, or what the server makes of it).
- A route marked ``probe`` is a liveness or readiness check (``/healthz``, ``/readyz``):
  :meth:`RoutedHandler.replied` tells a server's counters which answers were probes.
- Nothing a handler raises escapes its connection's thread: :meth:`RoutedHandler.failed` turns
  it into a reply, or into a quiet close. A client that goes away mid-request or
  mid-reply ends its connection quietly.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar, Generic, TypeVar

logger = logging.getLogger(__name__)

H = TypeVar("H")


@dataclass(frozen=True)
class Reply:
    """One answer. ``close``: end the connection after it."""

    status: int
    body: bytes
    content_type: str
    close: bool = False
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Request:
    """What a route handler is told about its request (the handler object has the rest:
    headers, the body stream, its server)."""

    method: str
    path: str  # without the query string
    query: str = ""
    params: Mapping[str, str] = field(default_factory=dict)  # the route pattern's named groups


@dataclass(frozen=True)
class Route(Generic[H]):
    methods: frozenset[str]  # empty: any method
    pattern: re.Pattern[str]
    handler: Callable[[H, Request], Reply]
    probe: bool = False

    def allows(self, method: str) -> bool:
        return not self.methods or method in self.methods or (method == "HEAD" and "GET" in self.methods)


def route(
    methods: str, pattern: str, handler: Callable[[H, Request], Reply], *, probe: bool = False
) -> Route[H]:
    """``route("GET", r"/v1/models/(?P<name>\\w+)", handler)``; ``methods`` is a space-separated
    list, or ``*`` for any method."""
    allowed = frozenset() if methods.strip() == "*" else frozenset(methods.split())
    return Route(allowed, re.compile(pattern), handler, probe)


@dataclass(frozen=True)
class Found(Generic[H]):
    route: Route[H]
    params: dict[str, str]


@dataclass(frozen=True)
class NotAllowed:
    allowed: frozenset[str]


@dataclass(frozen=True)
class NotFound:
    pass


class RouteTable(Generic[H]):
    """Routes tried in order."""

    def __init__(self, *routes: Route[H]) -> None:
        self.routes = routes

    def resolve(self, method: str, path: str) -> Found[H] | NotAllowed | NotFound:
        allowed: set[str] = set()
        for r in self.routes:
            match = r.pattern.fullmatch(path)
            if match is None:
                continue
            if r.allows(method):
                return Found(r, {k: v for k, v in match.groupdict().items() if v is not None})
            allowed |= r.methods
        return NotAllowed(frozenset(allowed)) if allowed else NotFound()


class RoutedHandler(BaseHTTPRequestHandler):
    """A request handler that answers from its class's ``routes``.

    Subclasses set ``routes`` and ``methods`` (the HTTP methods that go to the table) and may
    override the hooks: :meth:`not_found`, :meth:`not_allowed`, :meth:`failed`,
    :meth:`replied`. ``send_server_headers`` adds ``Server`` and ``Date`` to every reply."""

    routes: ClassVar[RouteTable[Any]] = RouteTable()
    methods: ClassVar[tuple[str, ...]] = ("GET", "HEAD")
    send_server_headers: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for method in cls.methods:
            if f"do_{method}" not in cls.__dict__:
                setattr(cls, f"do_{method}", RoutedHandler.dispatch)

    # -- hooks ------------------------------------------------------------------------------------
    def not_found(self, request: Request) -> Reply:
        return Reply(404, b"not found\n", "text/plain; charset=utf-8")

    def not_allowed(self, request: Request, allowed: frozenset[str]) -> Reply:
        return Reply(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", "text/plain; charset=utf-8")

    def failed(self, request: Request, exc: Exception) -> Reply | None:
        """The reply to a handler's exception; None closes the connection without one."""
        logger.error("%s %.200s failed", request.method, request.path, exc_info=exc)
        return Reply(500, b"internal error\n", "text/plain; charset=utf-8", close=True)

    def replied(self, request: Request, resolved: Found[Any] | NotAllowed | NotFound, reply: Reply) -> None:
        """Called before each reply is written (counters)."""

    # -- the machinery ----------------------------------------------------------------------------
    def handle_one_request(self) -> None:
        # (the base class already closes quietly on a timeout while reading a request line)
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def dispatch(self) -> None:
        path, _, query = self.path.partition("?")
        resolved = self.routes.resolve(self.command, path)
        params = resolved.params if isinstance(resolved, Found) else {}
        request = Request(self.command, path, query, params)
        reply: Reply | None
        try:
            if isinstance(resolved, Found):
                reply = resolved.route.handler(self, request)
            elif isinstance(resolved, NotAllowed):
                reply = self.not_allowed(request, resolved.allowed)
            else:
                reply = self.not_found(request)
        except Exception as exc:
            reply = self.failed(request, exc)
        if reply is None:
            self.close_connection = True
            return
        self.replied(request, resolved, reply)
        try:
            self.send_reply(reply, head_only=self.command == "HEAD")
        except (OSError, ValueError):  # the client went away (ValueError: a closed file)
            self.close_connection = True

    def send_reply(self, reply: Reply, *, head_only: bool = False) -> None:
        """Write ``reply`` in one piece (small bodies in one write: one TCP segment);
        ``head_only``: its head alone (the answer to HEAD, with the body's length)."""
        if reply.close:
            self.close_connection = True
        status = int(reply.status)
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        lines = [
            f"{self.protocol_version} {status} {phrase}",
            f"Content-Type: {reply.content_type}",
            f"Content-Length: {len(reply.body)}",
        ]
        if self.send_server_headers:
            lines += [f"Server: {self.version_string()}", f"Date: {self.date_time_string()}"]
        lines += [f"{k}: {v}" for k, v in reply.headers]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin1")
        self.log_request(status, len(reply.body))
        body = b"" if head_only else reply.body
        if len(body) < 65536:
            self.wfile.write(head + body)
        else:
            self.wfile.write(head)
            self.wfile.write(body)
