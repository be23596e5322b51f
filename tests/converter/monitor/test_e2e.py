"""The fleet monitor against a real Mosquitto: a real agent, shared subscriptions, the CLI.

- a real agent pulls a pushed model and serves REST predictions; the monitor's
  ``/metrics`` shows the exact request count, its SQLite history holds the
  samples and the activation event, its page draws the latency as an SVG
  path, and a metrics message delivered again is stored once;
- two monitors in one ``--share`` group split the metrics (each gets some,
  together all, none twice) while both see every device's retained state;
- ``litefleet monitor`` as a process: serves, stops cleanly on SIGTERM with
  everything written; bad flags exit 2, an unreachable broker exits 1.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt.client import wait_until
from converter.broker.mosquitto import free_port
from converter.monitor.store import MonitorStore
from tests.support.harness import AgentProcess, litefleet, must
from tests.support.monitor import (
    promtool_check,
    publish_many,
    publish_one,
    run_cli,
    running_monitor,
    scraped_value,
    status_of,
)
from tests.support.payloads import agent_payload, state_payload


def post_json(url: str, body: object) -> int:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status


class RawMetrics:
    """Records every metrics payload of a device as published (to replay one later)."""

    def __init__(self, port: int, device_id: str) -> None:
        self.payloads: list[bytes] = []
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"rec-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
        )
        self.client.on_message = lambda c, u, msg: self.payloads.append(bytes(msg.payload))
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"litefleet/v1/devices/{device_id}/metrics", 1)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_monitor_sees_a_real_agent(broker, tmp_path: Path, digits_int8, digits_data) -> None:
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits", "--broker", broker.url)
    rest_port = free_port()
    agent = AgentProcess(
        tmp_path,
        "pi-m",
        broker.url,
        repo / "root.json",
        http=f"127.0.0.1:{rest_port}",
        metrics_interval_s=0.5,
    )
    raw = RawMetrics(broker.port, "pi-m")
    with running_monitor(broker.port, tmp_path / "monitor.db") as mon:
        try:
            agent.start()

            def serving() -> bool:
                dev = mon.collector.snapshot().device("pi-m")
                return bool(
                    dev
                    and dev.state
                    and dev.state.online
                    and dev.state.model == "digits"
                    and dev.state.version == "1"
                )

            assert wait_until(serving, 60), agent.log()[-3000:]
            _, _, x_test, _ = digits_data
            requests = 6
            for i in range(requests):
                assert (
                    post_json(
                        f"http://127.0.0.1:{rest_port}/v1/models/digits:predict",
                        {"instances": x_test[i : i + 1].tolist()},
                    )
                    == 200
                )

            labels = 'device="pi-m",model="digits",version="1"'
            assert wait_until(
                lambda: mon.metric(f"litefleet_model_requests_total{{{labels}}}") == requests, 15
            ), mon.get("/metrics")
            scrape = mon.get("/metrics")
            assert scraped_value(scrape, f"litefleet_model_inferences_total{{{labels}}}") == requests
            assert scraped_value(scrape, f"litefleet_model_errors_total{{{labels}}}") == 0
            count = scraped_value(scrape, f"litefleet_model_inference_duration_seconds_count{{{labels}}}")
            assert count == requests
            rss = scraped_value(scrape, 'litefleet_device_resident_memory_bytes{device="pi-m"}')
            assert rss is not None and rss > 10_000_000
            assert scraped_value(scrape, 'litefleet_device_online{device="pi-m"}') == 1
            assert re.search(
                r'litefleet_model_info\{device="pi-m",model="digits",sha256="[0-9a-f]{64}"', scrape
            )
            promtool_check(scrape)

            # a latency quantile appears for an interval that had the requests in it: the
            # history has it (the live value may already be a later, idle interval)
            def stored_samples() -> int:
                with mon.collector.store.reader() as r:
                    return r.count("samples")

            assert wait_until(lambda: stored_samples() >= 3, 10)
            with mon.collector.store.reader() as r:
                series = r.latency_series("pi-m", "digits", 0.0)
                assert any(p.p99_ms is not None and p.p99_ms > 0 for p in series)
            # the page: the device, a drawn latency line, the activation event
            assert mon.collector.wait_idle(5)
            page = mon.get("/")
            assert "pi-m" in page and re.search(r'<path d="M[0-9.]+,[0-9.]+', page)
            assert ">activated<" in page
            devices = json.loads(mon.get("/api/devices"))
            assert devices[0]["device_id"] == "pi-m" and devices[0]["inferences"] == requests

            # a metrics message delivered twice (QoS 1 redelivery, a replay) is stored once
            assert wait_until(lambda: len(raw.payloads) >= 2, 10)
            replayed = raw.payloads[0]
            seq = json.loads(replayed)["seq"]
            dup_line = 'litefleet_monitor_duplicates_total{kind="metrics"}'
            before = mon.metric(dup_line) or 0
            publish_one(broker.port, "litefleet/v1/devices/pi-m/metrics", replayed)
            assert wait_until(lambda: (mon.metric(dup_line) or 0) == before + 1, 10)
            with mon.collector.store.reader() as r:
                stored = [k for k in r.sample_keys() if k[1] == seq]
                assert stored == [("pi-m", seq, json.loads(replayed)["ts"])]
            dev = mon.collector.snapshot().device("pi-m")
            # "now" did not go back to the replayed message
            assert dev is not None and dev.metrics is not None and dev.metrics.seq > seq

            agent.stop()
            assert wait_until(lambda: mon.metric('litefleet_device_online{device="pi-m"}') == 0, 10)
        finally:
            agent.stop()
            raw.close()
    # after stopping, the history file is complete and readable by anyone
    store = MonitorStore.open(tmp_path / "monitor.db")
    try:
        with store.reader() as r:
            assert r.count("events") >= 2  # at least verified and activated
            assert [d["device_id"] for d in r.devices()] == ["pi-m"]
    finally:
        store.close()


def test_two_monitors_in_a_share_group_split_the_metrics(broker, tmp_path: Path) -> None:
    devices = ["pi-a", "pi-b", "pi-c"]
    publish_many(
        broker.port,
        [(f"litefleet/v1/devices/{d}/state", state_payload(device_id=d)) for d in devices],
        retain=True,
    )
    per_device = 60
    with (
        running_monitor(broker.port, tmp_path / "m1.db", share="fleet") as m1,
        running_monitor(broker.port, tmp_path / "m2.db", share="fleet") as m2,
        running_monitor(broker.port, tmp_path / "all.db") as everything,
    ):
        messages = [
            (f"litefleet/v1/devices/{d}/metrics", agent_payload(d, seq=s, ts=1_800_000_000.0 + s))
            for s in range(1, per_device + 1)
            for d in devices
        ]
        publish_many(broker.port, messages)
        total = len(messages)
        assert wait_until(lambda: m1.received("metrics") + m2.received("metrics") >= total, 20)
        assert wait_until(lambda: everything.received("metrics") >= total, 20)
        for m in (m1, m2, everything):
            assert m.collector.wait_idle(10)
            # state is an ordinary subscription: every collector knows the whole fleet
            snap = m.collector.snapshot()
            assert [d.device_id for d in snap.devices] == devices
            assert all(d.state is not None and d.state.online for d in snap.devices)
        time.sleep(0.3)  # nothing more arrives
        keys = []
        for m in (m1, m2, everything):
            with m.collector.store.reader() as r:
                keys.append(set(r.sample_keys()))
        k1, k2, k_all = keys
        assert m1.received("metrics") + m2.received("metrics") == total
        assert k1 and k2, f"one collector got nothing: {len(k1)} / {len(k2)}"
        assert not k1 & k2, "a message went to both collectors of the group"
        assert k1 | k2 == k_all and len(k_all) == total


def test_monitor_command_serves_and_stops_cleanly(broker, tmp_path: Path) -> None:
    """``--prometheus`` serves /metrics only, ``--http`` the page and its API only (issue 12)."""
    db = tmp_path / "cli.db"
    proc = run_cli(
        "monitor",
        "--broker",
        broker.url,
        "--db",
        str(db),
        "--prometheus",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--share",
        "cli",
        "--summary-interval",
        "0.5",
    )
    try:
        assert proc.stderr is not None
        lines = [proc.stderr.readline(), proc.stderr.readline()]
        urls = {}
        for line in lines:
            found = re.search(r"serving (the page|Prometheus) on (http://127\.0\.0\.1:\d+)/", line)
            assert found, "".join(lines) + (proc.stderr.read() if proc.poll() is not None else "")
            urls[found.group(1)] = found.group(2)
        prom, page = urls["Prometheus"], urls["the page"]
        assert prom != page
        topic = "litefleet/v1/devices/pi-z/metrics"
        publish_one(broker.port, topic, agent_payload("pi-z", seq=1))

        def scraped() -> bool:
            with urllib.request.urlopen(prom + "/metrics", timeout=5) as resp:
                body = resp.read().decode()
            series = 'litefleet_model_requests_total{device="pi-z",model="digits",version="3"}'
            return scraped_value(body, series) == 5

        assert wait_until(scraped, 10)
        with urllib.request.urlopen(page + "/", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/html")
        assert [status_of(prom + p) for p in ("/", "/api/devices", "/api/rollouts", "/healthz")] == [
            404,
            404,
            404,
            200,
        ]
        assert [status_of(page + p) for p in ("/metrics", "/api/devices", "/api/rollouts", "/healthz")] == [
            404,
            200,
            200,
            200,
        ]
        publish_one(broker.port, topic, agent_payload("pi-z", seq=2))
        time.sleep(1.2)  # at least one summary line
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "devices online" in err and "msg/s" in err and err.rstrip().endswith("monitor: stopped")
    assert "Traceback" not in err
    store = MonitorStore.open(db)
    try:
        with store.reader() as r:
            assert [k[:2] for k in r.sample_keys()] == [("pi-z", 1), ("pi-z", 2)]
    finally:
        store.close()


def test_a_live_scrape_passes_promtool(broker, tmp_path: Path) -> None:
    """Debian's ``promtool check metrics`` on what a running monitor serves: every kind of
    family filled (gauges, counters, the latency summary, the histogram), hostile text in
    label values, an offline device, a device with state only."""
    hostile = json.loads(agent_payload("pi-2", seq=1))
    hostile["models"][0]["name"] = 'evil"}\nx 1 #'
    publish_many(
        broker.port,
        [
            ("litefleet/v1/devices/pi-1/state", state_payload(device_id="pi-1")),
            ("litefleet/v1/devices/pi-2/state", state_payload(device_id="pi-2", status='a\\b"c')),
            ("litefleet/v1/devices/pi-3/state", state_payload(device_id="pi-3", online=False)),
        ],
        retain=True,
    )
    with running_monitor(broker.port, tmp_path / "monitor.db") as mon:
        publish_one(broker.port, "litefleet/v1/devices/pi-1/metrics", agent_payload("pi-1", seq=1))
        publish_one(broker.port, "litefleet/v1/devices/pi-2/metrics", json.dumps(hostile).encode())
        assert wait_until(lambda: mon.metric('litefleet_devices{health="offline"}') == 1, 10)
        assert wait_until(lambda: mon.metric('litefleet_monitor_messages_total{kind="metrics"}') == 2, 10)
        body = mon.get("/metrics")
    for kind in ("gauge", "counter", "summary", "histogram"):
        assert f" {kind}\n" in body
    labels = 'device="pi-1",model="digits",quantile="0.99",version="3"'
    assert scraped_value(body, f"litefleet_model_latency_seconds{{{labels}}}") is not None
    promtool_check(body)


def test_monitor_command_errors(tmp_path: Path) -> None:
    for args, words in [
        (["--share", "a/b"], "--share"),
        (["--prometheus", "nonsense"], "HOST:PORT"),
        (["--retention-days", "-1"], "--retention-days"),
    ]:
        code, _, err = litefleet(
            "monitor", "--broker", "mqtt://127.0.0.1:1", "--db", str(tmp_path / "x.db"), *args
        )
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    code, _, err = litefleet("monitor", "--broker", "mqtt://127.0.0.1:1", "--db", str(junk))
    assert code == 2 and "--db" in err and len(err.strip().splitlines()) == 1, err
    dead = free_port()
    code, _, err = litefleet(
        "monitor",
        "--broker",
        f"mqtt://127.0.0.1:{dead}",
        "--db",
        str(tmp_path / "y.db"),
        "--timeout",
        "1",
        "--quiet",
    )
    assert code == 1 and "could not connect" in err, err
    assert not (tmp_path / "y.db").exists()  # a failed start leaves no file behind


def test_number_flags_refuse_nan_and_inf(tmp_path: Path) -> None:
    """nan made the summary loop spin, inf overflowed the clock (a traceback): now one usage line."""
    for command, flag, value in [
        ("monitor", "--summary-interval", "nan"),
        ("monitor", "--summary-interval", "inf"),
        ("monitor", "--summary-interval", "0"),
        ("monitor", "--timeout", "inf"),
        ("monitor", "--timeout", "1e300"),
        ("monitor", "--retention-days", "nan"),
        ("monitor", "--session-expiry", "inf"),
        ("status", "--timeout", "inf"),
        ("status", "--timeout", "nan"),
        ("status", "--metrics", "inf"),
        ("status", "--metrics", "nan"),
    ]:
        extra = ["--db", str(tmp_path / "x.db")] if command == "monitor" else []
        code, out, err = litefleet(command, "--broker", "mqtt://127.0.0.1:1", *extra, flag, value)
        assert code == 2 and flag in err and len(err.strip().splitlines()) == 1, (flag, value, err)
        assert "Traceback" not in err and out == "" and not (tmp_path / "x.db").exists()


def test_why_state_is_not_a_shared_subscription(broker) -> None:
    """Mosquitto 2.0 hands a retained state to *every* new shared subscriber (the MQTT 5
    spec says none), but a live state change to only *one* member of the group: a
    collector with a shared state subscription would miss devices going offline."""
    publish_one(broker.port, "litefleet/v1/devices/pi-r/state", state_payload(device_id="pi-r"), retain=True)
    got: list[list[tuple[bool, bytes]]] = [[], []]
    clients = []
    for i in range(2):
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"_lf-probe-{i}-{uuid.uuid4().hex[:6]}",
            protocol=paho.MQTTv5,
        )
        c.on_message = lambda cl, u, msg, i=i: got[i].append((bool(msg.retain), bytes(msg.payload)))
        c.connect("127.0.0.1", broker.port)
        c.subscribe("$share/probe/litefleet/v1/devices/+/state", 1)
        c.loop_start()
        clients.append(c)
    try:
        assert wait_until(lambda: all(len(g) == 1 for g in got), 5), got
        assert all(g[0][0] for g in got)  # both got the retained message
        publish_one(
            broker.port,
            "litefleet/v1/devices/pi-r/state",
            state_payload(device_id="pi-r", online=False),
            retain=True,
        )
        assert wait_until(lambda: len(got[0]) + len(got[1]) == 3, 5)
        time.sleep(0.3)
        assert sorted(len(g) for g in got) == [1, 2]  # the change went to one member only
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()


def test_collectors_of_a_group_can_share_one_history_file(broker, tmp_path: Path) -> None:
    """On one machine several collectors may write one SQLite file: the unique keys
    drop a replay even when the other collector stored the original."""
    db = tmp_path / "shared.db"
    messages = [
        (
            f"litefleet/v1/devices/pi-{i % 20}/metrics",
            agent_payload(f"pi-{i % 20}", seq=i // 20 + 1, ts=1_800_000_000.0 + i),
        )
        for i in range(600)
    ]
    replays = messages[:200]
    with running_monitor(broker.port, db, share="g") as m1, running_monitor(broker.port, db, share="g") as m2:
        publish_many(broker.port, messages + replays)
        assert wait_until(lambda: m1.received("metrics") + m2.received("metrics") >= 800, 20)
        assert m1.collector.wait_idle(10) and m2.collector.wait_idle(10)
        s1, s2 = m1.collector.snapshot().stats, m2.collector.snapshot().stats
        with m1.collector.store.reader() as r:
            assert r.count("samples") == 600
    assert s1.stored_samples + s2.stored_samples == 600
    assert s1.duplicates.get("metrics", 0) + s2.duplicates.get("metrics", 0) == 200
    assert s1.write_errors == s2.write_errors == 0


def test_monitor_survives_a_broker_restart(broker, tmp_path: Path) -> None:
    topic = "litefleet/v1/devices/pi-x/metrics"
    with running_monitor(broker.port, tmp_path / "restart.db", share="g") as mon:
        publish_one(broker.port, topic, agent_payload("pi-x", seq=1))
        assert wait_until(lambda: mon.received("metrics") == 1, 5)
        broker.restart(hard=True)  # SIGKILL: the collector's connection just breaks
        assert wait_until(lambda: mon.collector.client.connects >= 2, 20)
        assert wait_until(lambda: mon.collector.client.wait_synced(0), 5)
        publish_one(broker.port, topic, agent_payload("pi-x", seq=2))
        assert wait_until(lambda: mon.received("metrics") == 2, 10)  # subscribed again, shared too
        assert mon.collector.wait_idle(5)
        with mon.collector.store.reader() as r:
            assert [k[1] for k in r.sample_keys()] == [1, 2]


def _cli_monitor(broker: Any, db: Path, *extra: str) -> subprocess.Popen[str]:
    proc = run_cli(
        "monitor",
        "--broker",
        broker.url,
        "--db",
        str(db),
        "--prometheus",
        "127.0.0.1:0",
        "--summary-interval",
        "60",
        *extra,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()  # "serving http://..." once connected and subscribed
    assert "serving" in line, line + (proc.stderr.read() if proc.poll() is not None else "")
    return proc


def _stop_cli(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "Traceback" not in err, err
    return err


def test_a_monitor_session_keeps_what_came_while_the_collector_was_away(broker, tmp_path: Path) -> None:
    """Restarting the only collector (an upgrade, a reboot): with ``--session NAME`` the broker
    queues the fleet's metrics and events meanwhile and the restarted collector stores them;
    without it they are gone for this collector (the documented default)."""
    topic = "litefleet/v1/devices/pi-s/metrics"
    for session, want in ((["--session", "main"], [1, 2, 3, 4]), ([], [1, 4])):
        db = tmp_path / f"session-{bool(session)}.db"
        proc = _cli_monitor(broker, db, *session)
        try:
            publish_one(broker.port, topic, agent_payload("pi-s", seq=1))
            time.sleep(0.5)
            _stop_cli(proc)
            # the collector is away: two metrics messages and an event are published
            publish_many(
                broker.port,
                [
                    (topic, agent_payload("pi-s", seq=2)),
                    (topic, agent_payload("pi-s", seq=3)),
                    (
                        "litefleet/v1/devices/pi-s/events",
                        json.dumps(
                            {
                                "event": "activated",
                                "model": "digits",
                                "version": 3,
                                "ts": time.time(),
                                "boot": "b1",
                                "seq": 1,
                            }
                        ).encode(),
                    ),
                ],
            )
            proc = _cli_monitor(broker, db, *session)
            publish_one(broker.port, topic, agent_payload("pi-s", seq=4))
            time.sleep(1.0)
            _stop_cli(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        store = MonitorStore.open(db)
        try:
            with store.reader() as r:
                assert [k[1] for k in r.sample_keys()] == want, session
                events = [e for e in r.recent_events(10) if e.event == "activated"]
        finally:
            store.close()
        # the event came while the collector was away: kept only with a session
        assert bool(events) == bool(session), (session, events)


def test_monitor_session_name_is_checked(tmp_path: Path) -> None:
    for bad in ("a/b", "+", "#", "x" * 65, ""):
        code, _, err = litefleet(
            "monitor", "--broker", "mqtt://127.0.0.1:1", "--db", str(tmp_path / "x.db"), "--session", bad
        )
        assert code == 2 and "--session" in err and len(err.strip().splitlines()) == 1, (bad, err)
