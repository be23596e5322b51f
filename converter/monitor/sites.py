"""Site brokers as the monitor reads them: each site's retained status and bridge link (pure).

A site broker bridged to the central one (docs/sites.md) publishes, retained, its
supervisor's status JSON on ``<prefix>/v1/sites/<name>/status`` (every 5 s) and
Mosquitto's own link notification on ``.../bridge`` (``1`` connected, ``0`` not; at
central the bridge's will sets ``0`` when the link drops).

Guarantees:

- Parsing never raises: an unusable status is
  :class:`converter.monitor.payloads.Malformed`; missing or mistyped fields are ``None``.
- The link shown is Mosquitto's notification when one arrived (it is the bridge's will,
  so it turns ``0`` even when the site is gone and its last status still says ``up``),
  else the status's own ``link``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

from converter.monitor.payloads import Malformed

MAX_STATUS_BYTES = 16 * 1024


@dataclass(frozen=True)
class SiteView:
    """What central knows of one site."""

    name: str
    ts: float | None = None  # the status's own time (the site's clock)
    upstream: str | None = None
    status_link: str | None = None  # "up" / "down" as the supervisor last said
    bridge_up: bool | None = None  # Mosquitto's notification, None before one arrived
    bytes_down: int | None = None
    bytes_up: int | None = None
    sessions: int | None = None
    failures: int | None = None
    last_error: str | None = None
    broker_restarts: int | None = None
    last_restart_reason: str | None = None

    @property
    def link_up(self) -> bool | None:
        if self.bridge_up is not None:
            return self.bridge_up
        return None if self.status_link is None else self.status_link == "up"


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value) if value >= 0 and value == int(value) else None


def _text(value: Any, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


def apply_site_message(
    current: SiteView | None, name: str, leaf: str, payload: bytes
) -> SiteView | Malformed | None:
    """``current`` updated by one retained ``status`` or ``bridge`` message of site ``name``;
    None when a cleared status (zero-length) removes the site."""
    base = current or SiteView(name)
    if not payload:
        if leaf == "status":
            return None
        return replace(base, bridge_up=None)
    if leaf == "bridge":
        text = payload.strip()
        if text not in (b"0", b"1"):
            return Malformed("sites", name, "bridge notification is not 0 or 1")
        return replace(base, bridge_up=text == b"1")
    if leaf != "status":
        return Malformed("sites", name, "not a monitored site topic")
    if len(payload) > MAX_STATUS_BYTES:
        return Malformed("sites", name, "status too large")
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return Malformed("sites", name, "status is not JSON")
    if not isinstance(doc, dict) or doc.get("site") != name:
        return Malformed("sites", name, "status names another site")
    ts = doc.get("ts")
    link = doc.get("link")
    return replace(
        base,
        ts=float(ts)
        if isinstance(ts, int | float) and not isinstance(ts, bool) and math.isfinite(ts)
        else None,
        upstream=_text(doc.get("upstream"), 200),
        status_link=link if link in ("up", "down") else None,
        bytes_down=_count(doc.get("bytes_down")),
        bytes_up=_count(doc.get("bytes_up")),
        sessions=_count(doc.get("sessions")),
        failures=_count(doc.get("failures")),
        last_error=_text(doc.get("last_error"), 300),
        broker_restarts=_count(doc.get("broker_restarts")),
        last_restart_reason=_text(doc.get("last_restart_reason"), 64),
    )
