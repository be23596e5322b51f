"""A site's uplink as the agent reads it: metrics and events held while the site broker says
its bridge to central is down, sent in order when it is back.

The logic with a recording publisher; then the real agent process on a real Mosquitto, the
test playing the site broker's part (its retained ``1``/``0`` on ``sites/<site>/bridge``):
metrics made while down stay on disk, unsent, and events wait; after ``1`` every metric
arrives with no gap in its numbering, and the events too."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.errors import TransportError
from agent.mqtt.transport import Message
from agent.protocol import Topics
from agent.telemetry.uplink import FIRST_WORD_S, SiteUplink
from tests.support.harness import AgentProcess, FleetWatcher, PersistentSubscriber, must, queued_metrics
from tests.support.sites import wait_until

TOPICS = Topics()
BRIDGE = TOPICS.site("s1", "bridge")


class Recorder:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.connected = True

    def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        if not self.connected:
            raise TransportError("not connected to the broker")
        self.sent.append(payload)


def word(w: bytes) -> Message:
    return Message(topic=BRIDGE, payload=w, retain=True)


def test_events_wait_while_down_and_go_in_order_before_newer_ones() -> None:
    rec, ups = Recorder(), []
    uplink = SiteUplink(rec, on_up=lambda: ups.append(1), max_held=3)
    uplink.send_event("e", b"1")
    assert uplink.up and rec.sent == [b"1"]
    uplink.handle(word(b"0"))
    assert not uplink.may_send()
    for e in (b"2", b"3", b"4", b"5"):
        uplink.send_event("e", e)
    assert rec.sent == [b"1"] and uplink.events_dropped == 1  # bounded: the oldest went
    uplink.handle(word(b"0"))  # a repeat changes nothing
    uplink.handle(word(b"1"))
    uplink.send_event("e", b"6")
    assert rec.sent == [b"1", b"3", b"4", b"5", b"6"] and ups == [1] and uplink.outages == 1


def test_the_report_says_the_site_the_word_and_what_was_held_or_dropped() -> None:
    assert SiteUplink(Recorder()).report() is None  # a device without a site says nothing
    uplink = SiteUplink(Recorder(), site="s1", max_held=2)
    assert uplink.report() == {"site": "s1", "up": True, "outages": 0, "events_held": 0, "events_dropped": 0}
    uplink.handle(word(b"0"))
    for e in (b"a", b"b", b"c"):
        uplink.send_event("e", e)
    assert uplink.report() == {"site": "s1", "up": False, "outages": 1, "events_held": 2, "events_dropped": 1}
    uplink.handle(word(b"1"))
    assert uplink.report() == {"site": "s1", "up": True, "outages": 1, "events_held": 0, "events_dropped": 1}


def test_events_sent_just_before_the_0_go_again_first() -> None:
    """What the site broker acknowledged in the resend_s before the 0 may have been dropped
    by its cut bridge: held again, in order, before what was held meanwhile."""
    rec, now, downs = Recorder(), [100.0], []
    uplink = SiteUplink(rec, site="s1", resend_s=60.0, clock=lambda: now[0], on_down=lambda: downs.append(1))
    uplink.send_event("e", b"old")
    now[0] += 61.0
    uplink.send_event("e", b"a")
    uplink.send_event("e", b"b")
    uplink.handle(word(b"0"))
    assert downs == [1]
    uplink.send_event("e", b"c")
    assert rec.sent == [b"old", b"a", b"b"] and uplink.report()["events_held"] == 3
    uplink.handle(word(b"1"))
    assert rec.sent == [b"old", b"a", b"b", b"a", b"b", b"c"]
    now[0] += 1.0
    uplink.handle(word(b"0"))  # the uplink flaps: what went out on the 1 may be lost again
    uplink.handle(word(b"1"))
    assert rec.sent[6:] == [b"a", b"b", b"c"]
    now[0] += 61.0
    uplink.handle(word(b"0"))
    uplink.handle(word(b"1"))
    assert rec.sent[9:] == [], "events older than resend_s went again"
    no_site = SiteUplink(Recorder(), on_down=lambda: downs.append(2))
    no_site.send_event("e", b"x")
    no_site.handle(word(b"0"))
    no_site.handle(word(b"1"))
    assert downs == [1, 1, 1, 2] and no_site.report() is None


def test_unknown_words_are_ignored_and_a_cleared_message_means_up() -> None:
    rec = Recorder()
    uplink = SiteUplink(rec)
    uplink.handle(word(b"garbage"))
    assert uplink.up
    uplink.handle(word(b"0"))
    uplink.handle(word(b"{}"))
    assert not uplink.up
    uplink.handle(word(b""))  # the retained message was cleared: no word against sending
    assert uplink.up


def test_held_events_wait_for_the_next_connection_when_the_broker_is_gone_at_up() -> None:
    rec = Recorder()
    uplink = SiteUplink(rec, site="s1")
    uplink.handle(word(b"0"))
    uplink.send_event("e", b"a")
    uplink.send_event("e", b"b")
    rec.connected = False
    uplink.handle(word(b"1"))  # the device lost its site broker at that moment
    uplink.send_event("e", b"c")  # behind them
    assert rec.sent == [] and uplink.up and uplink.report()["events_held"] == 3  # type: ignore[index]
    rec.connected = True
    uplink.on_connected()
    assert rec.sent == [b"a", b"b", b"c"] and uplink.up


def test_events_made_while_not_connected_go_at_the_next_connection() -> None:
    """Any device (no site too): an event made before the first connection (a rollback
    decided at start-up) or while the connection is down waits, in order, and goes first
    once connected; bounded like the site's held events."""
    rec = Recorder()
    rec.connected = False
    uplink = SiteUplink(rec, max_held=3)
    for e in (b"rolled_back", b"a", b"b", b"c"):
        uplink.send_event("e", e)
    assert rec.sent == [] and uplink.events_dropped == 1
    rec.connected = True
    uplink.send_event("e", b"d")  # connected before the callback ran: still in order
    assert rec.sent == [b"a", b"b", b"c", b"d"]
    rec.connected = False
    uplink.send_event("e", b"e")
    rec.connected = True
    uplink.on_connected()
    uplink.on_connected()  # nothing twice
    assert rec.sent == [b"a", b"b", b"c", b"d", b"e"] and uplink.up


def test_a_connected_device_without_a_site_does_not_rewrite_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing held, nothing recent (no site): the file stays as it was, one write per run."""
    import agent.telemetry.uplink as uplink_module

    writes: list[str] = []
    real_replace = os.replace

    def counted(src: Any, dst: Any) -> None:
        writes.append(str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(uplink_module.os, "replace", counted)
    path, rec = tmp_path / "uplink-events.json", Recorder()
    uplink = SiteUplink(rec, path=path, clock_id="boot-1")
    for e in (b"a", b"b", b"c", b"d"):
        uplink.send_event("e", e)
    assert writes == [str(path)] and rec.sent == [b"a", b"b", b"c", b"d"]
    rec.connected = False
    uplink.send_event("e", b"held")  # now it has something to keep
    assert len(writes) == 2 and b"held" in path.read_bytes()


def test_held_events_survive_an_agent_restart_and_go_first(tmp_path: Path) -> None:
    """With a file: what one run held, the next sends once its site broker says 1, before
    anything of its own; what it had sent in the last resend_s keeps its time on the same
    clock (the same boot), and is held at once on another (a reboot)."""
    path, now = tmp_path / "uplink-events.json", [100.0]

    def run(rec: Recorder, clock_id: str = "boot-1") -> SiteUplink:
        return SiteUplink(rec, site="s1", clock=lambda: now[0], path=path, clock_id=clock_id)

    first = run(Recorder())
    first.send_event("e", b"sent")
    first.handle(word(b"0"))
    first.send_event("e", b"held-1")
    first.send_event("e", b"held-2")
    rec = Recorder()
    second = run(rec)  # the agent restarted while the uplink was down
    assert second.report()["events_held"] == 3  # type: ignore[index]
    second.handle(word(b"0"))
    second.send_event("e", b"mine")  # still down: after the others
    second.handle(word(b"1"))
    assert rec.sent == [b"sent", b"held-1", b"held-2", b"mine"]
    # restarted while up, 30 s after sending: the last minute's events keep their times
    now[0] += 30.0
    rec = Recorder()
    third = run(rec)
    third.handle(word(b"1"))  # the retained word at start: nothing held, nothing sent
    assert rec.sent == [] and third.report()["events_held"] == 0  # type: ignore[index]
    third.handle(word(b"0"))  # 30 s after they went: inside the minute, so they go again
    third.handle(word(b"1"))
    assert rec.sent == [b"sent", b"held-1", b"held-2", b"mine"]
    now[0] += 61.0
    third.send_event("e", b"new")
    third.handle(word(b"0"))
    third.handle(word(b"1"))
    assert rec.sent[4:] == [b"new", b"new"]  # only what was within the minute went again
    # a reboot: the clock's times mean nothing, so the recent ones are held at once
    rec = Recorder()
    rebooted = run(rec, clock_id="boot-2")
    rebooted.send_event("e", b"after")  # behind them, until the site broker's first word
    assert rec.sent == []
    rebooted.handle(word(b"1"))
    rebooted.send_event("e", b"later")
    assert rec.sent == [b"new", b"after", b"later"]
    # no first word (a site broker that never says it): they wait FIRST_WORD_S, no longer
    rebooted.handle(word(b"0"))
    rebooted.send_event("e", b"x")
    rec = Recorder()
    silent = run(rec, clock_id="boot-2")
    silent.send_event("e", b"y")
    assert rec.sent == []
    now[0] += FIRST_WORD_S
    silent.send_event("e", b"z")
    assert rec.sent[-3:] == [b"x", b"y", b"z"]
    # an unreadable file is moved aside with a warning, not a failure
    path.write_text("{not json")
    assert run(Recorder()).report()["events_held"] == 0  # type: ignore[index]
    assert not path.exists() and len(list(tmp_path.glob("uplink-events.json.unreadable-*"))) == 1


def pending(state_dir: Path) -> tuple[int, int | None]:
    """Rows in the agent's on-disk metrics queue, and the oldest one's seq."""
    rows, oldest, _ = queued_metrics(state_dir)
    return rows, oldest


def test_a_device_holds_metrics_and_events_while_its_site_uplink_is_down(
    broker: Any, tmp_path: Path, digits_int8: Any
) -> None:
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    site = paho.Client(CallbackAPIVersion.VERSION2, client_id="site-notifier", protocol=paho.MQTTv5)
    site.connect("127.0.0.1", broker.port)
    site.loop_start()

    def say(w: bytes) -> None:
        site.publish(BRIDGE, w, qos=1, retain=True).wait_for_publish(10)

    agent = AgentProcess(tmp_path, "pi-u", broker.url, repo / "root.json", site="s1", metrics_interval_s=0.5)
    metrics = PersistentSubscriber(broker.port, TOPICS.metrics("pi-u"))
    assert metrics.subscribed.wait(10)
    watch = FleetWatcher(broker.port)
    got: list[tuple[float, dict[str, Any]]] = []
    try:
        say(b"1")
        agent.start()
        metrics.collect(lambda docs: len(docs) >= 2, 30, got)
        assert len(got) >= 2, "no metrics while the uplink was up"
        before = {d["seq"]: d for _, d in got}  # acknowledged by the "site broker" before the 0

        say(b"0")
        wait_until(lambda: "site uplink down" in agent.log(), 30, "the agent to read the 0")
        down_from = queued_metrics(agent.state_dir)[2] + 1  # built after the 0 was read
        metrics.collect(lambda docs: False, 2.0, got)
        # metrics go on being made, and stay on disk
        wait_until(lambda: queued_metrics(agent.state_dir)[2] >= down_from + 3, 60, "4 metrics held")
        # events too: a push while down is taken (its state is retained, not held) but its
        # events wait
        must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits", "--broker", broker.url)
        watch.wait_active("pi-u", "digits", 1, timeout_s=60)
        metrics.collect(lambda docs: False, 1.0, got)
        n, oldest = pending(agent.state_dir)
        assert n >= 4 and oldest is not None
        # what was built before the 0 may still be landing; nothing built after it went out
        late = [d["seq"] for _, d in got if d["seq"] >= down_from]
        assert not late, f"sent while down: {late}"
        assert watch.events_of("pi-u", "activated") == [], "an event was sent while down"
        # what the site broker acknowledged in the minute before the 0 waits again, with the rest
        assert oldest <= min(before), (oldest, sorted(before))
        # the agent restarts while the uplink is down: the held events are in its state
        # folder, its metrics in the queue; the new run reads the retained 0 and holds on
        held_by_first = json.loads((agent.state_dir / "uplink-events.json").read_text())["held"]
        assert held_by_first, "no event held on disk"
        agent.stop()
        first_run_last = queued_metrics(agent.state_dir)[2]
        agent.start()
        wait_until(lambda: agent.log().count("site uplink down") >= 2, 60, "the new run to read the 0")
        assert "events an earlier run held wait" in agent.log()
        metrics.collect(lambda docs: False, 1.0, got)
        assert watch.events_of("pi-u", "activated") == [], "an event was sent while down"
        n, oldest = pending(agent.state_dir)

        say(b"1")
        watch.wait_for(lambda: bool(watch.events_of("pi-u", "activated")), 30, "the held events")
        metrics.collect(lambda docs: max(d["seq"] for d in docs) > oldest + n, 60, got)
        assert max(d["seq"] for _, d in got) > oldest + n, "the held metrics never arrived"
        wait_until(lambda: pending(agent.state_dir)[0] <= 1, 30, "the queue drained")
    finally:
        agent.stop()
        metrics.stop()
        watch.close()
        site.loop_stop()
        site.disconnect()

    seen = sorted({d["seq"] for _, d in got})
    assert seen == list(range(seen[0], seen[-1] + 1)), f"lost: {set(range(seen[0], seen[-1])) - set(seen)}"
    kinds = [e["event"] for e in watch.events_of("pi-u")]
    assert "verified" in kinds and kinds.index("verified") < kinds.index("activated"), kinds
    boots = [e["boot"] for e in watch.events_of("pi-u")]
    assert len(set(boots)) <= 2 and boots == sorted(boots, key=boots.index), "the runs' events interleaved"
    for boot in set(boots):
        seqs = [e["seq"] for e in watch.events_of("pi-u") if e["boot"] == boot]
        assert seqs == sorted(seqs), "held events were sent out of order"
    # what the site broker had acknowledged in the minute before the 0 went again (its cut
    # bridge may have dropped it): the same messages, a second time
    for seq, doc in before.items():
        again = [d for _, d in got if d["seq"] == seq]
        assert len(again) >= 2 and all(d == doc for d in again), f"metrics seq {seq} did not go again"
    # each message says what the device knew of its uplink when it was made
    by_seq = {d["seq"]: d["uplink"] for _, d in got}
    held = [by_seq[s] for s in range(down_from, first_run_last + 1)]  # the first run's, while down
    assert all(u["site"] == "s1" for u in by_seq.values())
    assert all(by_seq[s]["up"] for s in before), "a message made while down was sent before"
    assert not any(u["up"] for u in held) and all(u["outages"] == 1 for u in held)
    assert max(u["events_held"] for u in held) >= 1, "no held message counted the held events"
    last = by_seq[max(by_seq)]
    assert last["up"] and last["outages"] == 1 and last["events_held"] == 0, last
