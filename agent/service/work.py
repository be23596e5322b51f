"""The daemon's work loop, as data: what it is asked to do, how a refresh ended, when to retry.

Pure (the queue is passed in; no clock is read). :mod:`agent.service.daemon` runs the loop.

Guarantees:

- :func:`coalesce` turns a burst of queued refresh requests into one, and never loses a
  :attr:`Work.STOP` or the upgrade to :attr:`Work.REFRESH_NOW`.
- :func:`retry_after` is the only place the retry policy lives (docs/protocol.md section
  7.1): a refresh that went well, and a broker that holds no repository yet, wait the full
  ``refresh_interval_s`` (new metadata wakes the device at once anyway); a broker that is
  away is asked again after 5 s, doubling; bad data on it after 15 s, doubling; never later
  than ``refresh_interval_s``.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from enum import Enum


class Work(Enum):
    """An item on the daemon's work queue."""

    REFRESH_NOW = "refresh!"  # refresh whatever the last one saw (start-up)
    REFRESH = "refresh"  # metadata changed: refresh unless the last refresh already saw it
    WAKE = "wake"  # connected: readiness may be due now
    TICK = "tick"  # nothing queued before the next timer: periodic work only
    STOP = "stop"


class RefreshOutcome(Enum):
    """How one refresh ended."""

    OK = "ok"  # verified; every release this device should run is active or remembered
    TRANSPORT = "transport"  # the broker is away, or its metadata incomplete: retry soon
    FAILED = "failed"  # bad data on the broker, or a full disk: back off
    NO_REPOSITORY = "no_repository"  # connected and synced, nothing published yet

    @property
    def settled(self) -> bool:
        """Whether the device has heard what the broker holds (it may say it is ready)."""
        return self is not RefreshOutcome.TRANSPORT


# first retry after a failed refresh, doubling with each failure in a row
TRANSPORT_RETRY_S = 5.0
FAILED_RETRY_S = 15.0


@dataclass(frozen=True)
class Retry:
    delay_s: float  # until the next refresh
    fails: int  # failed refreshes in a row, counting this one


def retry_after(outcome: RefreshOutcome, fails: int, refresh_interval_s: float) -> Retry:
    """When to refresh again after ``outcome``, with ``fails`` failures in a row before it."""
    if outcome in (RefreshOutcome.OK, RefreshOutcome.NO_REPOSITORY):
        return Retry(refresh_interval_s, 0)
    base = TRANSPORT_RETRY_S if outcome is RefreshOutcome.TRANSPORT else FAILED_RETRY_S
    return Retry(min(refresh_interval_s, base * 2 ** min(fails, 10)), fails + 1)


def coalesce(item: Work, pending: queue.Queue[Work]) -> Work:
    """``item``, or for a refresh the strongest of it and every item queued behind it (a burst
    of metadata changes becomes one refresh; a STOP among them wins)."""
    if item not in (Work.REFRESH, Work.REFRESH_NOW):
        return item
    while True:
        try:
            nxt = pending.get_nowait()
        except queue.Empty:
            return item
        if nxt is Work.STOP:
            return Work.STOP
        if nxt is Work.REFRESH_NOW:
            item = nxt
