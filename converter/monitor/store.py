"""The fleet monitor's history: SQLite (WAL) with deduplication and bounded retention.

Guarantees:

- One writer: :meth:`MonitorStore.write` takes a whole batch of parsed
  messages and commits it in one transaction (the collector calls it from its
  writer thread only). Readers (the HTTP page) open their own connections with
  :meth:`MonitorStore.reader`; WAL lets them read while the writer writes.
  Several collector processes may share one file: SQLite serialises their
  transactions (``busy_timeout``) and the unique keys below keep each message
  once across all of them.
- Deduplication is done by the database's unique keys, so it holds across
  restarts: an event is stored once per ``(device_id, boot, seq)``, a metrics
  message once per ``(device_id, seq, ts)``. The agent replays its offline
  queue byte for byte, so a replayed or QoS 1 duplicate has the same ``seq``
  *and* ``ts``; keying on ``ts`` too keeps the history of a device whose queue
  file was lost (its ``seq`` starts again at 1) instead of dropping it.
- Retention: :meth:`MonitorStore.prune` deletes samples, events and rollout
  records whose timestamp is older than the cutoff; :meth:`write` does not store
  them in the first place (a replay of week-old messages after a long outage
  would otherwise be written and pruned again).
- Rollout records (:class:`converter.monitor.rollouts.RolloutView`) are stored once
  per ``(model, version, updated)``: the retained record delivered again at every
  (re)subscription adds no row. Each record's gates go to ``rollout_gates``, one row
  per gate, so gate values can be drawn over time.
- A schema 1 file (before rollouts) is upgraded in place: the new tables are added.

The schema is documented in ``docs/monitor.md``; the queries are in
:mod:`converter.monitor.history`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import StorageError
from converter.monitor.history import StoreReader
from converter.monitor.payloads import (
    EventRecord,
    MetricsSample,
    Parsed,
    StateCleared,
    StateRecord,
    parse_state,
)
from converter.monitor.rollouts import RolloutView

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# schema 1 lacks only the rollout tables, which CREATE TABLE IF NOT EXISTS adds
UPGRADABLE = ("1",)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    online INTEGER,                 -- NULL: no state seen yet
    status TEXT, model TEXT, version TEXT, error TEXT,
    agent_version TEXT, boot TEXT,
    state_ts REAL,                  -- the state's own ts (device clock)
    state_json TEXT,                -- the whole retained state (a will: the last full one)
    first_seen REAL NOT NULL,       -- collector clock
    last_seen REAL NOT NULL         -- collector clock: last message of any kind
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL, boot TEXT NOT NULL, seq INTEGER,
    ts REAL NOT NULL, received REAL NOT NULL,
    event TEXT NOT NULL, model TEXT, version TEXT, reason TEXT, message TEXT,
    payload TEXT NOT NULL,
    UNIQUE (device_id, boot, seq)
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL, seq INTEGER NOT NULL,
    ts REAL NOT NULL, received REAL NOT NULL, interval_s REAL,
    cpu_percent_process REAL, cpu_percent_system REAL, rss_bytes INTEGER,
    load1 REAL, temperature_c REAL, throttled_raw INTEGER,
    disk_free_bytes INTEGER, disk_total_bytes INTEGER,
    queue_pending INTEGER, queue_dropped_total INTEGER,
    UNIQUE (device_id, seq, ts)
);
CREATE INDEX IF NOT EXISTS samples_device_ts ON samples (device_id, ts);
CREATE INDEX IF NOT EXISTS samples_ts ON samples (ts);
CREATE TABLE IF NOT EXISTS model_samples (
    sample_id INTEGER NOT NULL,     -- samples.id
    device_id TEXT NOT NULL, ts REAL NOT NULL,
    model TEXT NOT NULL, version TEXT NOT NULL, active INTEGER NOT NULL,
    requests INTEGER, ok INTEGER, errors INTEGER, bad_requests INTEGER,
    interval_requests INTEGER, interval_errors INTEGER, throughput_rps REAL,
    p50_ms REAL, p90_ms REAL, p99_ms REAL, mean_ms REAL,
    PRIMARY KEY (sample_id, model, version)
);
CREATE INDEX IF NOT EXISTS model_samples_device_ts ON model_samples (device_id, ts);
CREATE INDEX IF NOT EXISTS model_samples_ts ON model_samples (ts);
CREATE TABLE IF NOT EXISTS rollout_records (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL, version TEXT NOT NULL, previous TEXT,
    state TEXT NOT NULL, wave INTEGER NOT NULL, canary_pct INTEGER,
    waves TEXT NOT NULL,            -- JSON list of canary percentages
    started REAL,
    updated REAL NOT NULL,          -- the record's own time (the controller's clock)
    received REAL NOT NULL,         -- collector clock
    canary_devices INTEGER, control_devices INTEGER, selected_devices INTEGER, reason TEXT,
    UNIQUE (model, version, updated)
);
CREATE INDEX IF NOT EXISTS rollout_records_updated ON rollout_records (updated);
CREATE TABLE IF NOT EXISTS rollout_gates (
    record_id INTEGER NOT NULL,     -- rollout_records.id
    model TEXT NOT NULL, version TEXT NOT NULL, ts REAL NOT NULL, wave INTEGER NOT NULL,
    gate TEXT NOT NULL, verdict TEXT NOT NULL,
    value REAL, threshold REAL, op TEXT, samples INTEGER,
    PRIMARY KEY (record_id, gate)
);
CREATE INDEX IF NOT EXISTS rollout_gates_model ON rollout_gates (model, version, ts);
"""


# (table, time column) that retention prunes
PRUNED = (
    ("model_samples", "ts"),
    ("samples", "ts"),
    ("events", "ts"),
    ("rollout_gates", "ts"),
    ("rollout_records", "updated"),
)


@dataclass(frozen=True)
class Received:
    """A parsed message with the collector's clock reading when it arrived."""

    parsed: Parsed | RolloutView
    received: float


@dataclass
class WriteResult:
    """What one batch did, for the collector's counters."""

    samples: int = 0
    events: int = 0
    duplicate_samples: int = 0
    duplicate_events: int = 0
    too_old: int = 0
    rollout_records: int = 0
    # the events written by this batch (not those already stored): what is counted
    new_events: list[EventRecord] = field(default_factory=list)


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    try:
        if readonly:
            db = sqlite3.connect(
                f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=10.0, check_same_thread=False
            )
        else:
            db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=10000")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open the monitor database {path}: {exc}") from exc
    return db


class MonitorStore:
    """The history file. Create it with :meth:`open`; close it with :meth:`close`."""

    def __init__(self, path: Path, db: sqlite3.Connection) -> None:
        self.path = path
        self._db = db

    @classmethod
    def open(cls, path: Path) -> MonitorStore:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {path.parent}: {exc.strerror}") from exc
        db = _connect(path)
        try:
            db.executescript(SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None or row[0] in UPGRADABLE:
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(SCHEMA_VERSION),),
                )
            elif row[0] != str(SCHEMA_VERSION):
                raise StorageError(f"{path} has schema {row[0]}, this monitor writes {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StorageError(f"{path} is not a usable monitor database: {exc}") from exc
        return cls(path, db)

    def close(self) -> None:
        self._db.close()

    # -- writer ---------------------------------------------------------------------
    def write(self, batch: Iterable[Received], *, cutoff_ts: float | None = None) -> WriteResult:
        """Store a batch in one transaction. ``cutoff_ts``: samples and events
        older than this (device clock) are not stored (counted as ``too_old``)."""
        result = WriteResult()
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for item in batch:
                    self._write_one(db, item, cutoff_ts, result)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StorageError(f"cannot write the monitor database {self.path}: {exc}") from exc
        return result

    @staticmethod
    def _touch(db: sqlite3.Connection, device_id: str, received: float) -> None:
        db.execute(
            "INSERT INTO devices (device_id, first_seen, last_seen) VALUES (?, ?, ?) "
            "ON CONFLICT (device_id) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)",
            (device_id, received, received),
        )

    def _write_one(
        self, db: sqlite3.Connection, item: Received, cutoff_ts: float | None, result: WriteResult
    ) -> None:
        p, now = item.parsed, item.received
        if isinstance(p, MetricsSample):
            self._touch(db, p.device_id, now)
            if cutoff_ts is not None and p.ts < cutoff_ts:
                result.too_old += 1
                return
            load1 = p.load_avg[0] if p.load_avg else None
            cur = db.execute(
                "INSERT OR IGNORE INTO samples (device_id, seq, ts, received, interval_s, "
                "cpu_percent_process, cpu_percent_system, rss_bytes, load1, temperature_c, throttled_raw, "
                "disk_free_bytes, disk_total_bytes, queue_pending, queue_dropped_total) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    p.device_id,
                    p.seq,
                    p.ts,
                    now,
                    p.interval_s,
                    p.cpu_percent_process,
                    p.cpu_percent_system,
                    p.rss_bytes,
                    load1,
                    p.temperature_c,
                    p.throttled_raw,
                    p.disk_free_bytes,
                    p.disk_total_bytes,
                    p.queue_pending,
                    p.queue_dropped_total,
                ),
            )
            if cur.rowcount == 0:
                result.duplicate_samples += 1
                return
            sample_id = cur.lastrowid
            db.executemany(
                "INSERT OR IGNORE INTO model_samples (sample_id, device_id, ts, model, version, active, "
                "requests, ok, errors, bad_requests, interval_requests, interval_errors, throughput_rps, "
                "p50_ms, p90_ms, p99_ms, mean_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        sample_id,
                        p.device_id,
                        p.ts,
                        m.name,
                        m.version,
                        int(m.active),
                        m.requests,
                        m.ok,
                        m.errors,
                        m.bad_requests,
                        m.interval_requests,
                        m.interval_errors,
                        m.throughput_rps,
                        m.p50_ms,
                        m.p90_ms,
                        m.p99_ms,
                        m.mean_ms,
                    )
                    for m in p.models
                ],
            )
            result.samples += 1
        elif isinstance(p, EventRecord):
            self._touch(db, p.device_id, now)
            if cutoff_ts is not None and p.ts < cutoff_ts:
                result.too_old += 1
                return
            cur = db.execute(
                "INSERT OR IGNORE INTO events (device_id, boot, seq, ts, received, event, model, version, "
                "reason, message, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    p.device_id,
                    p.boot,
                    p.seq,
                    p.ts,
                    now,
                    p.event,
                    p.model,
                    p.version,
                    p.reason,
                    p.message,
                    p.raw_json,
                ),
            )
            if cur.rowcount == 0:
                result.duplicate_events += 1
            else:
                result.events += 1
                result.new_events.append(p)
        elif isinstance(p, StateRecord):
            db.execute(
                "INSERT INTO devices (device_id, online, status, model, version, error, agent_version, boot, "
                "state_ts, state_json, first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET online = excluded.online, status = excluded.status, "
                "model = excluded.model, version = excluded.version, error = excluded.error, "
                "agent_version = excluded.agent_version, boot = excluded.boot, "
                "state_ts = excluded.state_ts, "
                # a will says nothing of the models: keep the last full state's JSON
                "state_json = CASE WHEN ? THEN devices.state_json ELSE excluded.state_json END, "
                "last_seen = max(last_seen, excluded.last_seen)",
                (
                    p.device_id,
                    int(p.online),
                    p.status,
                    p.model,
                    p.version,
                    p.error,
                    p.agent_version,
                    p.boot,
                    p.ts,
                    p.raw_json,
                    now,
                    now,
                    p.will,
                ),
            )
        elif isinstance(p, StateCleared):
            # the device left the fleet; its history stays until retention removes it
            db.execute("DELETE FROM devices WHERE device_id = ?", (p.device_id,))
        elif isinstance(p, RolloutView):
            self._write_rollout(db, p, now, cutoff_ts, result)

    @staticmethod
    def _write_rollout(
        db: sqlite3.Connection, r: RolloutView, now: float, cutoff_ts: float | None, result: WriteResult
    ) -> None:
        updated = r.updated if r.updated is not None else now
        if cutoff_ts is not None and updated < cutoff_ts:
            result.too_old += 1
            return
        cur = db.execute(
            "INSERT OR IGNORE INTO rollout_records (model, version, previous, state, wave, canary_pct, "
            "waves, started, updated, received, canary_devices, control_devices, selected_devices, reason) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.name,
                r.version,
                r.previous,
                r.state,
                r.wave,
                r.canary_pct,
                json.dumps(list(r.waves)),
                r.started,
                updated,
                now,
                r.canary_devices,
                r.control_devices,
                len(r.selected),
                r.reason,
            ),
        )
        if cur.rowcount == 0:
            return
        result.rollout_records += 1
        db.executemany(
            "INSERT OR IGNORE INTO rollout_gates (record_id, model, version, ts, wave, gate, verdict, value, "
            "threshold, op, samples) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    cur.lastrowid,
                    r.name,
                    r.version,
                    updated,
                    r.wave,
                    g.name,
                    g.verdict,
                    g.value,
                    g.threshold,
                    g.op,
                    g.samples,
                )
                for g in r.gates
            ],
        )

    def last_state(self, device_id: str) -> StateRecord | None:
        """The device's last full state as stored (writer thread): what a will that arrives
        after a restart of the monitor is merged with (:func:`after_will`)."""
        try:
            row = self._db.execute(
                "SELECT state_json FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the monitor database {self.path}: {exc}") from exc
        if row is None or not row[0]:
            return None
        state = parse_state(device_id, str(row[0]).encode())
        return state if isinstance(state, StateRecord) else None

    def prune(self, cutoff_ts: float) -> int:
        """Delete samples and events older than ``cutoff_ts``; return rows deleted."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            n = 0
            for table, column in PRUNED:
                n += db.execute(f"DELETE FROM {table} WHERE {column} < ?", (cutoff_ts,)).rowcount
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StorageError(f"cannot prune the monitor database {self.path}: {exc}") from exc
        if n:
            logger.info("pruned %d rows older than %.0f", n, cutoff_ts)
        return n

    # -- readers --------------------------------------------------------------------
    @contextmanager
    def reader(self) -> Iterator[StoreReader]:
        """A read-only connection for one thread (the HTTP handler's)."""
        db = _connect(self.path, readonly=True)
        try:
            yield StoreReader(db)
        finally:
            db.close()
