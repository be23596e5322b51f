"""The on-disk metrics queue: numbering, bound, restarts (real SQLite files);
draining with a recording publisher; and broker outages against a real
Mosquitto, one of them minutes long (marked slow)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.errors import StorageError, TransportError
from agent.telemetry.metrics_queue import MetricsQueue, QueueSender
from tests.support.harness import PersistentSubscriber

TOPIC = "litefleet/v1/devices/pi-1/metrics"


def body(seq: int, pending: int, dropped: int) -> bytes:
    return json.dumps({"seq": seq, "pending": pending, "dropped_total": dropped}).encode()


def seqs(q: MetricsQueue) -> list[int]:
    return [m.seq for m in q.peek(10_000)]


def test_seq_grows_and_survives_restarts(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    q = MetricsQueue(path, max_rows=100)
    assert [q.append(TOPIC, body, ts=100.0 + i) for i in range(3)] == [1, 2, 3]
    q.ack(2)
    q.close()
    q = MetricsQueue(path, max_rows=100)  # the agent restarted
    assert q.append(TOPIC, body, ts=200.0) == 4
    kept = q.peek(10)
    assert [(m.seq, m.ts) for m in kept] == [(3, 102.0), (4, 200.0)]
    assert json.loads(kept[1].payload) == {"seq": 4, "pending": 1, "dropped_total": 0}
    assert q.stats().pending == 2 and q.stats().last_seq == 4
    q.close()


def test_full_queue_drops_the_oldest_and_says_so(tmp_path: Path) -> None:
    q = MetricsQueue(tmp_path / "q.sqlite3", max_rows=5)
    for i in range(8):
        q.append(TOPIC, body, ts=float(i))
    assert seqs(q) == [4, 5, 6, 7, 8]
    assert q.stats().dropped_total == 3
    q.append(TOPIC, body, ts=9.0)
    assert json.loads(q.peek(10)[-1].payload)["dropped_total"] == 3  # known when it was built
    assert q.stats().dropped_total == 4


def test_a_sites_device_keeps_what_was_acknowledged_and_sends_it_again_on_rewind(tmp_path: Path) -> None:
    """keep_acked_s (a device behind a site broker): acknowledged messages stay that long,
    not pending, and rewind() makes them wait again, oldest first, before the newer ones."""
    now = [1000.0]
    q = MetricsQueue(tmp_path / "q.sqlite3", max_rows=100, keep_acked_s=60.0, clock=lambda: now[0])
    for i in range(4):
        q.append(TOPIC, body, ts=float(i))
    assert q.ack(2) == 2
    assert seqs(q) == [3, 4] and q.stats().pending == 2
    now[0] += 30.0
    assert q.ack(3) == 1  # 1 and 2 were acknowledged 30 s ago: kept
    assert q.append(TOPIC, body, ts=9.0) == 5
    assert json.loads(q.peek(10)[-1].payload)["pending"] == 1  # kept ones are not pending
    now[0] += 40.0  # 1 and 2 are now 70 s old: gone with the next write; 3 is 40 s old
    assert q.rewind() == 1
    assert seqs(q) == [3, 4, 5] and q.stats().pending == 3
    assert q.rewind() == 0  # nothing kept any more
    first = q.peek(1)[0].payload
    q.ack(5)
    assert q.rewind() == 3 and q.peek(1)[0].payload == first  # the very bytes again


def test_kept_messages_go_first_when_full_and_do_not_count_as_dropped(tmp_path: Path) -> None:
    q = MetricsQueue(tmp_path / "q.sqlite3", max_rows=4, keep_acked_s=60.0)
    for i in range(3):
        q.append(TOPIC, body, ts=float(i))
    q.ack(3)
    for i in range(3):
        q.append(TOPIC, body, ts=10.0 + i)
    assert q.stats().dropped_total == 0  # two kept ones made room, nothing waiting was lost
    assert q.rewind() == 1 and seqs(q) == [3, 4, 5, 6]
    q.append(TOPIC, body, ts=20.0)
    assert q.stats().dropped_total == 1 and seqs(q) == [4, 5, 6, 7]


def test_a_queue_file_from_before_sites_is_upgraded_in_place(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "q.sqlite3"
    with sqlite3.connect(path) as db:  # the schema of the agent before keep_acked_s
        db.executescript(
            "CREATE TABLE outbox (seq INTEGER PRIMARY KEY, ts REAL NOT NULL, topic TEXT NOT NULL, "
            "payload BLOB NOT NULL);"
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
            "INSERT INTO meta VALUES ('last_seq', 7), ('dropped_total', 2);"
            "INSERT INTO outbox VALUES (7, 1.0, 't', x'7b7d');"
        )
    db.close()
    q = MetricsQueue(path, max_rows=10, keep_acked_s=60.0)
    assert seqs(q) == [7] and q.stats().dropped_total == 2
    assert q.append(TOPIC, body, ts=2.0) == 8
    q.ack(8)
    q.close()
    q = MetricsQueue(path, max_rows=10, keep_acked_s=60.0)  # kept rows of the last run wait again
    assert seqs(q) == [7, 8]


def test_kept_messages_survive_a_restart_on_the_same_clock_only(tmp_path: Path) -> None:
    """The agent's next run in the same boot (one monotonic clock) keeps what the last run
    kept, with its times; after a reboot (another clock) those wait again."""
    path = tmp_path / "q.sqlite3"
    now = [100.0]
    q = MetricsQueue(path, max_rows=10, keep_acked_s=60.0, clock=lambda: now[0], clock_id="boot-1")
    for i in range(3):
        q.append(TOPIC, body, ts=float(i))
    q.ack(2)
    q.close()
    now[0] = 130.0
    q = MetricsQueue(path, max_rows=10, keep_acked_s=60.0, clock=lambda: now[0], clock_id="boot-1")
    assert seqs(q) == [3] and q.stats().pending == 1  # 1 and 2 stay kept, not sent again
    q.ack(3)
    now[0] = 170.0  # 1 and 2 were acknowledged 70 s ago, 3 only 40 s ago
    assert q.rewind() == 1 and seqs(q) == [3]
    q.ack(3)
    q.close()
    q = MetricsQueue(path, max_rows=10, keep_acked_s=60.0, clock=lambda: now[0], clock_id="boot-2")
    assert seqs(q) == [3]  # another boot: kept ones wait again
    q.ack(3)
    assert seqs(q) == []
    q.close()
    q = MetricsQueue(path, max_rows=10, keep_acked_s=60.0, clock=lambda: now[0])
    assert seqs(q) == [3]  # the clock unknown: the same


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    q = MetricsQueue(tmp_path / "q.sqlite3", max_rows=5)

    def broken(seq: int, pending: int, dropped: int) -> bytes:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        q.append(TOPIC, broken, ts=1.0)
    assert q.append(TOPIC, body, ts=1.0) == 1


def test_unreadable_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    q = MetricsQueue(path, max_rows=5)
    assert q.append(TOPIC, body, ts=1.0) == 1
    assert len(list(tmp_path.glob("q.sqlite3.corrupt-*"))) == 1
    (tmp_path / "file").write_text("a file where the state folder should be")
    with pytest.raises(StorageError, match="cannot open"):
        MetricsQueue(tmp_path / "file" / "q.sqlite3", max_rows=5)


# -- draining with a recording publisher ------------------------------------------------------
class FakeDelivery:
    def __init__(self, ok: bool) -> None:
        self.ok = ok

    def wait(self, timeout_s: float) -> bool:
        return self.ok


class RecordingPublisher:
    """Acknowledges everything unless told which seqs to leave unacknowledged."""

    def __init__(self) -> None:
        self.connected = True
        self.sent: list[int] = []
        self.unacked: set[int] = set()
        self.refuse_after: int | None = None

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, **kw: Any) -> FakeDelivery:
        assert qos == 1 and topic == TOPIC
        if not self.connected or (self.refuse_after is not None and len(self.sent) >= self.refuse_after):
            raise TransportError("not connected")
        seq = json.loads(payload)["seq"]
        self.sent.append(seq)
        return FakeDelivery(seq not in self.unacked)


def filled(tmp_path: Path, n: int) -> MetricsQueue:
    q = MetricsQueue(tmp_path / "q.sqlite3", max_rows=1000)
    for i in range(n):
        q.append(TOPIC, body, ts=float(i))
    return q


def test_drain_sends_in_order_and_deletes_only_acknowledged(tmp_path: Path) -> None:
    q = filled(tmp_path, 10)
    pub = RecordingPublisher()
    pub.unacked = {5}
    result = q.drain(pub, window=3)
    assert (result.acked, result.reason) == (4, "failed")
    assert pub.sent == [1, 2, 3, 4, 5, 6]  # window 4-6 went out; 5 not acknowledged
    assert seqs(q) == list(range(5, 11))  # 6 was acknowledged but stays: order first
    pub.unacked = set()
    result = q.drain(pub, window=3)
    assert (result.acked, result.reason) == (6, "empty")
    assert pub.sent[6:] == [5, 6, 7, 8, 9, 10]
    assert seqs(q) == []


def test_drain_stops_when_disconnected(tmp_path: Path) -> None:
    q = filled(tmp_path, 5)
    pub = RecordingPublisher()
    pub.connected = False
    assert q.drain(pub).reason == "disconnected" and seqs(q) == [1, 2, 3, 4, 5]
    pub.connected = True
    pub.refuse_after = 2  # the connection drops in the middle of a window
    result = q.drain(pub, window=4)
    assert result.acked == 2 and seqs(q) == [3, 4, 5]
    pub.refuse_after = None
    assert q.drain(pub, max_messages=2).acked == 2 and seqs(q) == [5]


def test_sender_thread_delivers_everything_in_order_across_outages(tmp_path: Path) -> None:
    q = MetricsQueue(tmp_path / "q.sqlite3", max_rows=1000)
    pub = RecordingPublisher()
    sender = QueueSender(q, pub, window=4, idle_s=0.02, retry_s=0.02)
    sender.start()
    try:
        for i in range(60):
            if i % 20 == 5:
                pub.connected = False
            if i % 20 == 15:
                pub.connected = True
            q.append(TOPIC, body, ts=float(i))
            sender.wake()
            time.sleep(0.005)
        deadline = time.monotonic() + 10
        while seqs(q) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        sender.stop()
    assert seqs(q) == []
    assert pub.sent == list(range(1, 61))


# -- real Mosquitto ------------------------------------------------------------------------------
def run_outage(
    broker: Any, tmp_path: Path, *, interval_s: float, before_s: float, outage_s: float, after_s: float
) -> None:
    """Metrics every ``interval_s`` through the agent's MQTT client while the
    broker process is stopped for ``outage_s``; then check that every message
    arrived, first arrivals in seq order, with the timestamps of their making."""
    from agent.mqtt.client import ConnectionSettings, MqttClient

    subscriber = PersistentSubscriber(broker.port, TOPIC)
    assert subscriber.subscribed.wait(10)
    client = MqttClient(ConnectionSettings(host="127.0.0.1", port=broker.port, client_id="pi-1"))
    q = MetricsQueue(tmp_path / "metrics-queue.sqlite3", max_rows=100_000)
    sender = QueueSender(q, client, window=16, ack_timeout_s=2.0, idle_s=0.2, retry_s=0.5)
    client.add_connect_listener(sender.wake)
    client.connect(10)
    sender.start()
    made: dict[int, float] = {}
    stop = threading.Event()

    def reporter() -> None:  # a metrics tick every interval_s, whatever the broker does
        while not stop.is_set():
            ts = time.time()

            def build(seq: int, pending: int, dropped: int, ts: float = ts) -> bytes:
                return json.dumps({"seq": seq, "ts": ts}).encode()

            seq = q.append(TOPIC, build, ts=ts)
            made[seq] = ts
            sender.wake()
            stop.wait(interval_s)

    thread = threading.Thread(target=reporter)
    thread.start()
    got: list[tuple[float, dict[str, Any]]] = []
    try:
        time.sleep(before_s)
        broker.stop()
        down_at = time.time()
        time.sleep(outage_s)
        up_at = time.time()
        broker.start()
        time.sleep(after_s)
        stop.set()
        thread.join()
        last = max(made)
        subscriber.collect(lambda docs: last in {d["seq"] for d in docs}, 60 + outage_s, got)
        subscriber.collect(lambda docs: False, 1.0, got)  # stragglers, duplicates
    finally:
        stop.set()
        sender.stop()
        client.stop()
        subscriber.stop()
    first_seen: dict[int, tuple[float, float]] = {}
    order: list[int] = []
    for arrived, doc in got:
        if doc["seq"] not in first_seen:
            first_seen[doc["seq"]] = (arrived, doc["ts"])
            order.append(doc["seq"])
    during = [s for s, ts in made.items() if down_at <= ts < up_at]
    assert len(during) >= outage_s / interval_s * 0.8  # the ticks really went on during the outage
    assert sorted(first_seen) == sorted(made), f"lost: {sorted(set(made) - set(first_seen))}"
    assert order == sorted(order), "out of order"
    for s in during:
        arrived, ts = first_seen[s]
        assert ts == pytest.approx(made[s], abs=1e-3)  # the original timestamp
        assert arrived >= up_at  # replayed after the broker came back
    assert seqs(q) == []


def test_short_broker_outage_loses_nothing(broker: Any, tmp_path: Path) -> None:
    run_outage(broker, tmp_path, interval_s=0.1, before_s=1.0, outage_s=4.0, after_s=2.0)


@pytest.mark.slow
def test_half_a_minute_broker_outage_at_one_metric_per_second_loses_nothing(
    broker: Any,
    tmp_path: Path,
) -> None:
    """The sender alone, a message a second, 30 s without a broker (the real agent through a
    three-minute outage: test_agent_service_e2e.py)."""
    run_outage(broker, tmp_path, interval_s=1.0, before_s=3.0, outage_s=30.0, after_s=5.0)
