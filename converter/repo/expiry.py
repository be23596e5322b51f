"""When a signed expiry is near enough to say so (pure: the clock is an argument).

Every role's metadata expires (docs/protocol.md 3.4); a device refuses expired
metadata and keeps its model, so an expiry nobody renewed silently freezes the
fleet. ``litefleet status`` and ``litefleet repo show`` warn before that, and
``litefleet repo resign`` re-signs root when its expiry is this near.

The window before an expiry in which it counts as near:

* ``timestamp``: 3 days, or half its period if that is shorter (a timestamp
  valid for 1 day is near in its last 12 hours);
* ``snapshot``, ``targets``, ``root``: a quarter of the role's period (with the
  defaults: 7.5, 22.5 and 91.25 days).

Guarantees: :func:`expiry_warnings` returns one :class:`ExpiryWarning` per role
whose expiry is within its window or past, soonest first, and nothing for the
others; it reads no clock, file or socket.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from converter.repo.state import DEFAULT_EXPIRY, ROLES, ExpiryDays

TIMESTAMP_WINDOW = timedelta(days=3)
OTHER_FRACTION = 0.25


def window(role: str, period_days: float) -> timedelta:
    """How long before ``role``'s expiry it counts as near (see the module's rule)."""
    period = timedelta(days=period_days)
    if role == "timestamp":
        return min(TIMESTAMP_WINDOW, period / 2)
    return period * OTHER_FRACTION


@dataclass(frozen=True)
class ExpiryWarning:
    role: str
    expires: datetime
    left: timedelta  # negative: expired already

    @property
    def expired(self) -> bool:
        return self.left <= timedelta(0)

    def describe(self) -> str:
        when = f"{self.expires:%Y-%m-%d %H:%M} UTC"
        if self.expired:
            return (
                f"the {self.role} metadata expired on {when}: devices refuse the repository until re-signed"
            )
        return f"the {self.role} metadata expires on {when}, in {_span(self.left)}"


def _span(left: timedelta) -> str:
    hours = int(left.total_seconds() // 3600)
    if hours >= 48:
        return f"{hours // 24} days"
    if hours >= 1:
        return f"{hours} hours"
    return f"{max(1, int(left.total_seconds() // 60))} minutes"


def expiry_warnings(
    expires: Mapping[str, datetime], now: datetime, periods: ExpiryDays = DEFAULT_EXPIRY
) -> list[ExpiryWarning]:
    """The roles of ``expires`` (role -> expiry) that are near or past at ``now``."""
    out = [
        ExpiryWarning(role, expires[role], expires[role] - now)
        for role in ROLES
        if role in expires and expires[role] - now <= window(role, periods.of(role))
    ]
    return sorted(out, key=lambda w: w.expires)


def needs_root_signature(root_expires: datetime, now: datetime, periods: ExpiryDays) -> bool:
    """``repo resign`` re-signs root (with the root keys) when its expiry is near."""
    return root_expires - now <= window("root", periods.root)
