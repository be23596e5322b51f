"""The tests' keep-alive HTTP client: one connection, reused, reopened the way real clients do.

A server may close a keep-alive connection while it is idle (the agent's REST API does after
``timeout_s``, 10 s by default). A client that sends its next request on that connection gets
``BrokenPipeError``, ``ConnectionResetError`` or ``http.client.RemoteDisconnected`` before any
answer: the request never reached the server. urllib3 and browsers send it again on a fresh
connection; so does :class:`KeepAliveClient`, once, and only then (a request on a fresh
connection, or one whose answer had begun, fails as it is).
"""

from __future__ import annotations

import http.client
from dataclasses import dataclass

# what a request on a connection the server has closed meets before any answer
STALE = (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected)


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes


class KeepAliveClient:
    """HTTP/1.1 requests to ``host:port`` over one kept-alive connection."""

    def __init__(self, host: str, port: int, timeout_s: float = 60.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.conn: http.client.HTTPConnection | None = None
        self._reused = False  # the open connection has carried a whole exchange already
        self.connections = 0  # opened so far
        self.resent = 0  # requests sent again after a stale connection

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Answer:
        while True:
            conn = self._connection()
            stale_possible = self._reused
            try:
                conn.request(method, path, body=body, headers=headers or {})
                resp = conn.getresponse()
            except STALE:
                self.close()
                if not stale_possible:
                    raise
                self.resent += 1
                continue  # a fresh connection cannot be stale: this happens once at most
            data = resp.read()
            if resp.will_close:
                self.close()
            else:
                self._reused = True
            return Answer(resp.status, resp.getheader("Content-Type") or "", data)

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            self.connections += 1
            self._reused = False
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
