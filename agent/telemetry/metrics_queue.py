"""The bounded on-disk queue every metrics message goes through.

One SQLite file in the state folder (``metrics-queue.sqlite3``, WAL mode).
Guarantees:

- **Order and numbering.** :meth:`MetricsQueue.append` gives each message the
  next ``seq`` (1, 2, 3, ... kept in the file, so it keeps growing across
  agent restarts) and stores it with its original timestamp; a replayed
  message is the very bytes built at the time.
- **Nothing acknowledged is kept, nothing unacknowledged is deleted** except
  by the bound. :meth:`MetricsQueue.drain` publishes the oldest messages in
  ``seq`` order (QoS 1, a window of a few in flight), deletes a message only
  after the broker's PUBACK (``Delivery.wait``), and stops at the first
  failure; the next drain starts again at the oldest unacknowledged message.
  Delivery is at least once: after a failure the broker may see a message
  twice. Consumers deduplicate on ``(device_id, seq)``.
- **Bounded.** At most ``max_rows`` messages are kept. When a new message
  would exceed that, the **oldest** are deleted first (the newest picture of
  the device is worth most after a long outage), and ``dropped_total`` (also
  kept in the file) grows by their number; every message carries the
  ``dropped_total`` of the moment it was built, so the collector sees the gap.
- **Acknowledged but kept, for a site's device.** With ``keep_acked_s`` (a device
  behind a site broker, :mod:`agent.telemetry.uplink`) an acknowledged message is
  kept that long, marked, and :meth:`MetricsQueue.rewind` makes every kept one
  pending again: the site broker acknowledges what its bridge may still lose, and
  the device sends those again when it learns that the uplink was down (consumers
  drop the repeats, as above). Kept messages are not ``pending``; the bound counts
  them, and drops them first without counting them as dropped. Their time is the
  machine's monotonic clock, one per boot: the next run of the agent in the same boot
  (``clock_id``, the kernel's boot id) keeps them as they were; after a reboot, or
  where the boot is unknown, they wait again (sent once more: repeats, never a loss).
- **Survives restarts and crashes.** Commits are atomic; WAL with
  ``synchronous=NORMAL`` survives a crash of the agent, and a power cut may
  lose at most the last messages before the previous checkpoint, never the
  file (fewer fsyncs: easier on SD cards). A file that is not a database is
  moved aside and a fresh queue started.

:class:`QueueSender` is the thread that drains the queue whenever the
publisher is connected.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.errors import StorageError, TransportError
from agent.mqtt.transport import Delivery, Publisher

logger = logging.getLogger(__name__)

FILE_NAME = "metrics-queue.sqlite3"

# build(seq, pending_before, dropped_total) -> payload bytes
Builder = Callable[[int, int, int], bytes]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    -- NULL while waiting; acknowledged and kept (keep_acked_s): when, on the monotonic
    -- clock of meta's clock_id (a run on another clock sends such rows again)
    acked_at REAL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('last_seq', 0), ('dropped_total', 0);
"""


def machine_boot_id() -> str | None:
    """This boot of the machine (Linux's boot id), or None: ``time.monotonic`` is one
    clock for every process of a boot, and starts again with the next."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _clock_key(clock_id: str | None) -> int:
    """``clock_id`` as meta's integer (0: unknown, never equal to another)."""
    if not clock_id:
        return 0
    return int(hashlib.sha256(clock_id.encode()).hexdigest()[:15], 16) or 1


@dataclass(frozen=True)
class QueuedMessage:
    seq: int
    ts: float
    topic: str
    payload: bytes


@dataclass(frozen=True)
class QueueStats:
    pending: int
    dropped_total: int
    last_seq: int


@dataclass(frozen=True)
class DrainResult:
    acked: int  # messages acknowledged and deleted by this drain
    reason: str  # "empty", "disconnected", "held" (may_send said no) or "failed"


class MetricsQueue:
    """The queue file. Thread-safe: one connection behind a lock; publishing
    and waiting for acknowledgements happen outside the lock."""

    def __init__(
        self,
        path: Path,
        *,
        max_rows: int,
        keep_acked_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        clock_id: str | None = None,
    ) -> None:
        """``clock_id`` names ``clock``'s epoch (:func:`machine_boot_id` for the default
        clock): kept acknowledged rows of a run on the same one stay kept; None: unknown."""
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.path = path
        self.max_rows = max_rows
        self.keep_acked_s = keep_acked_s
        self._clock = clock
        self._clock_key = _clock_key(clock_id)
        self._lock = threading.Lock()
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            if not path.exists():
                raise StorageError(f"cannot open the metrics queue {path}: {exc}") from exc
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            logger.warning("metrics queue %s is unreadable (%s); moved to %s", path, exc, aside.name)
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(path) + suffix)
                if src.exists():
                    os.replace(src, Path(str(aside) + suffix))
            try:
                self._db = self._open()
            except (sqlite3.Error, OSError) as exc2:
                raise StorageError(f"cannot create the metrics queue {path}: {exc2}") from exc2
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open the metrics queue {path}: {exc}") from exc

    @classmethod
    def in_state_dir(cls, state_dir: Path, *, max_rows: int, keep_acked_s: float = 0.0) -> MetricsQueue:
        return cls(
            state_dir / FILE_NAME, max_rows=max_rows, keep_acked_s=keep_acked_s, clock_id=machine_boot_id()
        )

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
            if "acked_at" not in columns:  # a queue file of an agent before sites
                db.execute("ALTER TABLE outbox ADD COLUMN acked_at REAL")
            # kept acknowledged rows of an earlier run on another clock (a reboot): their
            # times mean nothing here, so they wait again
            row = db.execute("SELECT value FROM meta WHERE key = 'clock_id'").fetchone()
            if not self._clock_key or row is None or int(row[0]) != self._clock_key:
                db.execute("UPDATE outbox SET acked_at = NULL WHERE acked_at IS NOT NULL")
            if self._clock_key:  # a program that does not know the clock leaves it be
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('clock_id', ?)", (self._clock_key,)
                )
            db.execute("SELECT count(*) FROM outbox").fetchone()
        except sqlite3.Error:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writing -----------------------------------------------------------------
    def append(self, topic: str, build: Builder, *, ts: float) -> int:
        """Build and store the next message in one transaction; return its seq.
        Drops the oldest messages beyond ``max_rows``. Raises StorageError."""
        with self._writing() as db:
            last = self._meta("last_seq")
            dropped = self._meta("dropped_total")
            pending = self._pending()
            rows = int(db.execute("SELECT count(*) FROM outbox").fetchone()[0])
            seq = last + 1
            payload = build(seq, pending, dropped)
            db.execute(
                "INSERT INTO outbox (seq, ts, topic, payload) VALUES (?, ?, ?, ?)",
                (seq, ts, topic, payload),
            )
            db.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (seq,))
            excess = rows + 1 - self.max_rows
            if excess > 0:
                # the oldest go first: kept acknowledged ones are older than any waiting
                # one (acknowledgements come in seq order); only waiting ones count as dropped
                oldest = "SELECT seq FROM outbox ORDER BY seq LIMIT ?"
                lost = int(
                    db.execute(
                        f"SELECT count(*) FROM outbox WHERE acked_at IS NULL AND seq IN ({oldest})",
                        (excess,),
                    ).fetchone()[0]
                )
                db.execute(f"DELETE FROM outbox WHERE seq IN ({oldest})", (excess,))
                db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped_total'", (lost,))
                logger.debug("metrics queue full: dropped the %d oldest", excess)
        return seq

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock: committed, or rolled back on any error
        (an SQLite one raises StorageError)."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StorageError(f"cannot write the metrics queue {self.path}: {exc}") from exc

    def _meta(self, key: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    def _pending(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM outbox WHERE acked_at IS NULL").fetchone()[0])

    # -- reading ----------------------------------------------------------------
    def peek(self, limit: int) -> list[QueuedMessage]:
        """The oldest ``limit`` messages, oldest first."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT seq, ts, topic, payload FROM outbox WHERE acked_at IS NULL ORDER BY seq LIMIT ?",
                    (limit,),
                ).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read the metrics queue {self.path}: {exc}") from exc
        return [QueuedMessage(int(s), float(t), str(tp), bytes(p)) for s, t, tp, p in rows]

    def ack(self, through_seq: int) -> int:
        """Every message up to ``through_seq`` is acknowledged: deleted, or with
        ``keep_acked_s`` marked and kept that long; how many were waiting."""
        with self._writing() as db:
            if self.keep_acked_s <= 0:
                return int(db.execute("DELETE FROM outbox WHERE seq <= ?", (through_seq,)).rowcount)
            now = self._clock()
            cur = db.execute(
                "UPDATE outbox SET acked_at = ? WHERE seq <= ? AND acked_at IS NULL", (now, through_seq)
            )
            db.execute("DELETE FROM outbox WHERE acked_at < ?", (now - self.keep_acked_s,))
            return int(cur.rowcount)

    def rewind(self) -> int:
        """Make every kept acknowledged message (of the last ``keep_acked_s``) wait again;
        how many. The next drain sends them first, in order."""
        with self._writing() as db:
            db.execute("DELETE FROM outbox WHERE acked_at < ?", (self._clock() - self.keep_acked_s,))
            return int(db.execute("UPDATE outbox SET acked_at = NULL WHERE acked_at IS NOT NULL").rowcount)

    def stats(self) -> QueueStats:
        with self._lock:
            return QueueStats(self._pending(), self._meta("dropped_total"), self._meta("last_seq"))

    # -- sending ----------------------------------------------------------------
    def drain(
        self,
        publisher: Publisher,
        *,
        window: int = 16,
        ack_timeout_s: float = 10.0,
        max_messages: int | None = None,
        may_send: Callable[[], bool] = lambda: True,
    ) -> DrainResult:
        """Publish the oldest messages in order until the queue is empty, the
        publisher disconnects, a message is not acknowledged in time, or (looked at
        before each window) ``may_send()`` turns false."""
        acked = 0
        while max_messages is None or acked < max_messages:
            if not publisher.connected:
                return DrainResult(acked, "disconnected")
            if not may_send():
                return DrainResult(acked, "held")
            batch = self.peek(window if max_messages is None else min(window, max_messages - acked))
            if not batch:
                return DrainResult(acked, "empty")
            sent: list[tuple[int, Delivery]] = []
            for msg in batch:
                try:
                    sent.append((msg.seq, publisher.publish(msg.topic, msg.payload, qos=1)))
                except TransportError as exc:
                    logger.debug("metrics seq %d not sent: %s", msg.seq, exc)
                    break
            through: int | None = None
            n = 0
            for seq, delivery in sent:  # in order: stop at the first one not acknowledged
                if not delivery.wait(ack_timeout_s):
                    break
                through = seq
                n += 1
            if through is not None:
                self.ack(through)
                acked += n
            if n < len(batch):
                return DrainResult(acked, "failed" if publisher.connected else "disconnected")
        return DrainResult(acked, "failed")


class QueueSender:
    """A thread that drains the queue while the publisher is connected.

    Call :meth:`wake` after queueing a message or after a (re)connection; it
    also looks by itself every ``idle_s`` seconds, and waits ``retry_s``
    after a failed drain. While ``may_send()`` is false (a site's uplink is
    down: :mod:`agent.telemetry.uplink`) it drains nothing; wake it when that
    changes. :meth:`rewind` asks it to make the kept acknowledged messages wait
    again (:meth:`MetricsQueue.rewind`): it does so between two drains, so that
    no acknowledgement of a drain under way lands after it.
    """

    def __init__(
        self,
        queue: MetricsQueue,
        publisher: Publisher,
        *,
        window: int = 16,
        ack_timeout_s: float = 10.0,
        idle_s: float = 1.0,
        retry_s: float = 2.0,
        may_send: Callable[[], bool] = lambda: True,
    ) -> None:
        self.queue = queue
        self.may_send = may_send
        self.publisher = publisher
        self.window = window
        self.ack_timeout_s = ack_timeout_s
        self.idle_s = idle_s
        self.retry_s = retry_s
        self._wake = threading.Event()
        self._rewind = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_result: DrainResult | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="metrics-sender", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def rewind(self) -> None:
        self._rewind.set()
        self._wake.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                if self._rewind.is_set():
                    self._rewind.clear()
                    again = self.queue.rewind()
                    logger.info("metrics sender: %d acknowledged messages will go again", again)
                result = self.queue.drain(
                    self.publisher,
                    window=self.window,
                    ack_timeout_s=self.ack_timeout_s,
                    may_send=self.may_send,
                )
            except StorageError as exc:
                logger.warning("metrics sender: %s", exc)
                result = DrainResult(0, "failed")
            self.last_result = result
            if result.acked:
                logger.debug("metrics sender: %d acknowledged (%s)", result.acked, result.reason)
            pause = self.retry_s if result.reason == "failed" else self.idle_s
            self._wake.wait(pause)
