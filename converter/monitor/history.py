"""Queries over the monitor's history (SQLite, read-only): what the page draws and tests read.

Guarantees:

- Read-only: a :class:`StoreReader` wraps a connection opened with ``mode=ro``
  (:meth:`converter.monitor.store.MonitorStore.reader`), one per HTTP request thread.
- Every series comes back oldest first, every list of events newest first, and a
  query for one device or one model filters in SQL (never after a ``LIMIT``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True)
class LatencyPoint:
    """One model version's figures of one metrics interval."""

    ts: float
    version: str
    p50_ms: float | None
    p99_ms: float | None
    interval_s: float | None
    throughput_rps: float | None = None


@dataclass(frozen=True)
class DevicePoint:
    """A device's own figures of one metrics interval."""

    ts: float
    interval_s: float | None
    cpu_percent_process: float | None
    cpu_percent_system: float | None
    rss_bytes: int | None


@dataclass(frozen=True)
class StoredEvent:
    device_id: str
    ts: float
    event: str
    model: str | None
    version: str | None
    reason: str | None
    message: str | None


@dataclass(frozen=True)
class GatePoint:
    """A gate's value in one rollout record."""

    ts: float
    wave: int
    gate: str
    verdict: str
    value: float | None
    threshold: float | None


@dataclass(frozen=True)
class RolloutStep:
    """One stored rollout record, reduced to what a timeline shows."""

    ts: float
    state: str
    wave: int
    canary_pct: int | None
    waves: tuple[int, ...]


class StoreReader:
    """Queries for the HTML page and the tests."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def count(self, table: str) -> int:
        if table not in ("devices", "events", "samples", "model_samples", "rollout_records", "rollout_gates"):
            raise ValueError(table)
        return int(self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    def sample_keys(self) -> list[tuple[str, int, float]]:
        return [
            (r[0], int(r[1]), float(r[2]))
            for r in self._db.execute("SELECT device_id, seq, ts FROM samples ORDER BY device_id, seq")
        ]

    def devices(self) -> list[dict[str, object]]:
        cur = self._db.execute(
            "SELECT device_id, online, status, model, version, error, agent_version, first_seen, last_seen "
            "FROM devices ORDER BY device_id"
        )
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur]

    def latency_series(self, device_id: str, model: str, since_ts: float) -> list[LatencyPoint]:
        """The device's p50/p99 and throughput of ``model`` (the active version, whichever it
        was) since ``since_ts``, oldest first."""
        cur = self._db.execute(
            "SELECT m.ts, m.version, m.p50_ms, m.p99_ms, s.interval_s, m.throughput_rps FROM model_samples m "
            "JOIN samples s ON s.id = m.sample_id "
            "WHERE m.device_id = ? AND m.model = ? AND m.ts >= ? AND m.active = 1 ORDER BY m.ts",
            (device_id, model, since_ts),
        )
        return [LatencyPoint(float(r[0]), str(r[1]), r[2], r[3], r[4], r[5]) for r in cur]

    def device_series(self, device_id: str, since_ts: float) -> list[DevicePoint]:
        """The device's CPU and memory since ``since_ts``, oldest first."""
        cur = self._db.execute(
            "SELECT ts, interval_s, cpu_percent_process, cpu_percent_system, rss_bytes FROM samples "
            "WHERE device_id = ? AND ts >= ? ORDER BY ts",
            (device_id, since_ts),
        )
        return [DevicePoint(float(r[0]), r[1], r[2], r[3], r[4]) for r in cur]

    def charted_models(
        self, since_ts: float, limit: int, *, device_id: str | None = None
    ) -> list[tuple[str, str]]:
        """``(device_id, model)`` pairs with samples since ``since_ts`` (at most ``limit``),
        only ``device_id``'s when given."""
        if device_id is None:
            cur = self._db.execute(
                "SELECT DISTINCT device_id, model FROM model_samples WHERE ts >= ? "
                "ORDER BY device_id, model LIMIT ?",
                (since_ts, limit),
            )
        else:
            cur = self._db.execute(
                "SELECT DISTINCT device_id, model FROM model_samples WHERE device_id = ? AND ts >= ? "
                "ORDER BY model LIMIT ?",
                (device_id, since_ts, limit),
            )
        return [(str(r[0]), str(r[1])) for r in cur]

    def recent_events(
        self, limit: int, *, device_id: str | None = None, device_ids: Collection[str] | None = None
    ) -> list[StoredEvent]:
        """The ``limit`` newest events, newest first; only ``device_id``'s, or only those of
        ``device_ids`` (a site's devices), when given."""
        where, params = ("WHERE device_id = ? ", (device_id,)) if device_id is not None else ("", ())
        if device_id is None and device_ids is not None:
            # one parameter however many (SQLite caps the number of parameters)
            where, params = (
                "WHERE device_id IN (SELECT value FROM json_each(?)) ",
                (json.dumps(sorted(device_ids)),),
            )
        cur = self._db.execute(
            "SELECT device_id, ts, event, model, version, reason, message FROM events "
            f"{where}ORDER BY ts DESC, id DESC LIMIT ?",
            (*params, limit),
        )
        return [StoredEvent(*row) for row in cur]

    # -- rollouts ---------------------------------------------------------------------------
    def version_events(self, model: str, version: str, limit: int) -> list[StoredEvent]:
        """The newest events about one model version, newest first."""
        cur = self._db.execute(
            "SELECT device_id, ts, event, model, version, reason, message FROM events "
            "WHERE model = ? AND version = ? ORDER BY ts DESC, id DESC LIMIT ?",
            (model, version, limit),
        )
        return [StoredEvent(*row) for row in cur]

    def version_event_devices(self, model: str, version: str) -> dict[str, int]:
        """event -> how many devices sent it about one model version."""
        cur = self._db.execute(
            "SELECT event, count(DISTINCT device_id) FROM events "
            "WHERE model = ? AND version = ? GROUP BY event",
            (model, version),
        )
        return {str(r[0]): int(r[1]) for r in cur}

    def gate_series(self, model: str, version: str) -> list[GatePoint]:
        """Every stored gate value of one rollout (model, version), oldest first."""
        cur = self._db.execute(
            "SELECT ts, wave, gate, verdict, value, threshold FROM rollout_gates "
            "WHERE model = ? AND version = ? ORDER BY ts, gate",
            (model, version),
        )
        return [GatePoint(float(r[0]), int(r[1]), str(r[2]), str(r[3]), r[4], r[5]) for r in cur]

    def rollout_steps(self, model: str, version: str) -> list[RolloutStep]:
        """Every stored record of one rollout, oldest first."""
        cur = self._db.execute(
            "SELECT updated, state, wave, canary_pct, waves FROM rollout_records "
            "WHERE model = ? AND version = ? ORDER BY updated",
            (model, version),
        )
        out = []
        for ts, state, wave, pct, waves in cur:
            try:
                parsed = tuple(int(w) for w in json.loads(waves))
            except (ValueError, TypeError):
                parsed = ()
            out.append(RolloutStep(float(ts), str(state), int(wave), pct, parsed))
        return out
