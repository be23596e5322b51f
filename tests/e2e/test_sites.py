"""Two sites bridged to central, end to end: real Mosquittos (central and two site brokers run
by ``litefleet broker --secure SITE --upstream``), five real agent processes per site set up
with their site's credentials, real pushes at central.

Between each site's relay and central sits a fault proxy, the site's "uplink", which the test
cuts. In order, on one fleet:

(a) each model byte crosses each site's bridge about once, not once per device: the relay's
    byte counter against what central published and what the site's devices received;
(b) a site cut off during a rollout (two pushes while its uplink refuses connections, so a
    version leaves central's repository) catches up when the uplink returns: its devices
    activate the newest version and its retained repository equals central's, clears
    included; the metrics its devices made while cut off (held on disk once the site broker
    told them, agent/telemetry/uplink.py) all reach central, none missing;
(b') a site whose uplink goes silent (nothing reset: only the bridge's keep-alive notices)
    loses no metrics either: what its devices sent before they learned of it goes again;
(c) a site broker SIGKILLed after its autosave (uplink down, so the restarted broker can
    only serve what its own persistence file holds) keeps every retained message; one
    SIGKILLed inside the autosave window, mid-push, ends up with central's repository and
    its devices on the new version anyway (the bridge's re-send and the prune).

Central's ACL against a site's identity is tested in tests/converter/broker/test_sites.py,
the hung-broker watchdog in tests/converter/site/test_supervisor.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.protocol import Topics
from tests.support.harness import AgentProcess, FleetWatcher, litefleet, must, queued_metrics
from tests.support.secure import Client
from tests.support.sites import Central, SiteBroker, dense_models, retained, start_central, wait_until
from tests.support.tcp_proxy import FaultProxy

pytestmark = [
    pytest.mark.skipif(
        shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
        reason="mosquitto is not installed",
    ),
    pytest.mark.slow,
]

TOPICS = Topics()
SITES = {"a": [f"pi-a{i}" for i in range(5)], "b": [f"pi-b{i}" for i in range(5)]}
MODEL_MB = 0.75  # 3 chunks of 256 KiB, plus golden vectors
# the bound the issue asks for: a site's bridge carries a push at most 1.2x its bytes
BRIDGE_BOUND = 1.2
WAIT_S = 90.0
METRICS_S = 2.0  # a metrics message every so often from every agent
KEEPALIVE_S = 5  # the bridges' keep-alive: a silent link is noticed after 1.5x this


@dataclass
class Sites:
    central: Central
    proxies: dict[str, FaultProxy]
    sites: dict[str, SiteBroker]
    repo: Path
    watch: FleetWatcher
    tap: Client  # central's host identity, subscribed to the repository: what a push publishes
    metrics: Client  # central's host identity, subscribed to every device's metrics
    agents: dict[str, AgentProcess] = field(default_factory=dict)

    def metrics_seqs(self, device: str) -> set[int]:
        """The seq of every metrics message of ``device`` central has had."""
        topic = TOPICS.metrics(device)
        with self.metrics.new_message:
            return {json.loads(m.payload)["seq"] for m in self.metrics.messages if m.topic == topic}

    def push(self, model: Path) -> None:
        must(
            "push",
            str(model),
            "--repo",
            str(self.repo),
            "--name",
            "dense",
            "--secure-dir",
            str(self.central.dir.root),
        )

    def active(self, version: int, devices: list[str]) -> None:
        for d in devices:
            self.watch.wait_active(d, "dense", version, timeout_s=WAIT_S)

    def cut(self, site: str) -> None:
        self.proxies[site].refuse = True
        self.proxies[site].cut()
        self.sites[site].wait_status(lambda s: s["link"] == "down", 30, "link down")

    def restore(self, site: str) -> None:
        self.proxies[site].refuse = False

    def site_view(self, site: str, topic_filter: str = TOPICS.repo_filter) -> dict[str, bytes]:
        c = self.sites[site].host()
        try:
            return retained(c, topic_filter)
        finally:
            c.close()

    def central_view(self) -> dict[str, bytes]:
        c = self.central.host()
        try:
            return retained(c, TOPICS.repo_filter)
        finally:
            c.close()


@pytest.fixture(scope="module")
def models() -> list[Path]:
    return dense_models(4, MODEL_MB)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    tmp = tmp_path_factory.mktemp("sites")
    central = start_central(tmp, SITES)  # devices are added at central first, then at their site
    proxies = {name: FaultProxy(central.cert_port) for name in SITES}
    sites = {
        name: SiteBroker(tmp, name, central, SITES[name], upstream_port=proxies[name].port) for name in SITES
    }
    repo = tmp / "repo"
    must("repo", "init", str(repo))
    watch = FleetWatcher(secure_dir=central.dir.root)
    tap = central.host()
    tap.subscribe(TOPICS.repo_filter)
    metrics = central.host()
    metrics.subscribe(TOPICS.devices_filter("metrics"))
    world = Sites(central, proxies, sites, repo, watch, tap, metrics)
    try:
        for s in sites.values():
            s.start("--uplink-keepalive-s", str(KEEPALIVE_S))
        for s in sites.values():
            s.wait_status(lambda st: st["link"] == "up", 30, "link up")
        for name, devices in SITES.items():
            for d in devices:
                agent = AgentProcess(
                    tmp,
                    d,
                    sites[name].device_url,
                    repo / "root.json",
                    log_level="info",
                    metrics_interval_s=METRICS_S,
                    **sites[name].device_keys(d),
                )
                agent.start()
                world.agents[d] = agent
        # every device's state reached central through its site's bridge
        watch.wait_for(
            lambda: all((watch.states.get(d) or {}).get("online") for d in world.agents), WAIT_S, "all online"
        )
        yield world
    finally:
        for a in world.agents.values():
            a.kill()
        for s in sites.values():
            s.kill()
        for p in proxies.values():
            p.close()
        tap.close()
        metrics.close()
        watch.close()
        central.stop()


def live_repo_bytes(tap: Client, start: int) -> int:
    """Payload bytes of the repository messages central published since ``start`` (what
    a subscriber gets live: retain flag off)."""
    with tap.new_message:
        return sum(len(m.payload) for m in tap.messages[start:] if not m.retain)


def received(fleet: Sites, devices: list[str], version: int) -> int:
    return sum(
        e["bytes_received"]
        for d in devices
        for e in fleet.watch.events_of(d, "verified")
        if e["version"] == version
    )


def test_two_sites(fleet: Sites, models: list[Path]) -> None:
    check_each_byte_crosses_each_bridge_once(fleet, models[0])
    check_central_status_shows_each_devices_site(fleet)
    check_inference_from_central_reaches_a_site_device(fleet)
    check_a_site_cut_off_during_a_rollout_catches_up(fleet, models[1], models[2])
    check_a_silent_uplink_loses_no_metrics(fleet)
    check_a_site_broker_sigkill_keeps_what_was_retained(fleet)
    check_a_sigkill_inside_the_autosave_window_is_made_good(fleet, models[3])


def check_each_byte_crosses_each_bridge_once(fleet: Sites, model: Path) -> None:
    size = model.stat().st_size + model.with_name("model.golden.npz").stat().st_size
    before = {n: s.status()["bytes_down"] for n, s in fleet.sites.items()}
    mark = len(fleet.tap.messages)
    fleet.push(model)
    fleet.active(1, list(fleet.agents))
    wait_until(lambda: live_repo_bytes(fleet.tap, mark) >= size, 10, "the tap to see the push")
    pushed = live_repo_bytes(fleet.tap, mark)  # model, golden vectors and metadata
    for name, site in fleet.sites.items():
        st = site.wait_status(lambda s, n=name: s["bytes_down"] - before[n] >= pushed, 10, "the push counted")
        bridge = st["bytes_down"] - before[name]
        devices = received(fleet, SITES[name], 1)
        report = (
            f"site {name}: bridge {bridge} B for a push of {pushed} B; its 5 devices received {devices} B"
        )
        print(report)
        assert pushed <= bridge <= BRIDGE_BOUND * pushed, report
        assert devices >= len(SITES[name]) * size, report
        assert devices >= 4 * bridge, report  # once per site, not once per device
        assert st["sessions"] == 1, st  # no reconnect re-sent the repository meanwhile


def check_central_status_shows_each_devices_site(fleet: Sites) -> None:
    """Each device's state says its site (its agent.toml's ``site``, written by ``device add``
    at the site): ``litefleet status`` at central shows it and ``--site`` picks one site."""
    code, out, err = litefleet("status", "--secure", str(fleet.central.dir.root), "--json")
    assert code == 0 and "uplink" not in err, err  # both sites are up
    rows = json.loads(out)
    sites = {r["device_id"]: r["site"] for r in rows}
    assert sites == {d: name for name, devices in SITES.items() for d in devices}, sites
    only_b = json.loads(must("status", "--secure", str(fleet.central.dir.root), "--json", "--site", "b"))
    assert sorted(r["device_id"] for r in only_b) == sorted(SITES["b"])
    assert all(r["online"] and r["version"] == "1" for r in only_b), only_b


def check_inference_from_central_reaches_a_site_device(fleet: Sites) -> None:
    """An MQTT 5 request from central's host to a device at site b: down the bridge, the
    reply up it, with its response topic and correlation data intact."""
    n_in = int(MODEL_MB * 1e6 / 4 / 1000)  # the dense model's input width (big_models.py)
    client_id = "_lf-host-asker"
    host = fleet.central.host(client_id)
    try:
        reply_topic = TOPICS.reply(client_id, "pi-b0")
        host.subscribe(f"{TOPICS.base}/replies/{client_id}/#")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        body = json.dumps({"model": "dense", "instances": [[0.0] * n_in]}).encode()
        got = None
        for attempt in range(10):  # the agent drops requests while it renews its will
            props.CorrelationData = b"req-%d" % attempt
            host.publish(TOPICS.infer("pi-b0"), body, props=props)
            got = host.wait_for(reply_topic, timeout_s=3)
            if got is not None:
                break
        assert got is not None, "no reply through the bridge"
        assert got.props.CorrelationData.startswith(b"req-")
        assert len(json.loads(got.payload)["predictions"][0]) == 1000
    finally:
        host.close()


def check_a_site_cut_off_during_a_rollout_catches_up(fleet: Sites, m2: Path, m3: Path) -> None:
    b = fleet.sites["b"]
    v1 = fleet.central_view()
    fleet.cut("b")
    prunes = b.status()["prunes"]
    # central's status says that site b's rows are old (the bridge's will: its word is 0)
    code, _, err = litefleet("status", "--secure", str(fleet.central.dir.root), "--site", "b")
    assert code == 0 and "site b's uplink to this broker is down" in err and "5 device(s)" in err, err
    # each device of b reads its site broker's "0" and holds its metrics from then on; a
    # message made between the cut and that moment may be lost (docs/sites.md, "Outages")
    for d in SITES["b"]:
        agent = fleet.agents[d]
        wait_until(lambda a=agent: "site uplink down" in a.log(), 60, f"{d} to read its uplink's 0")
    held_after = {d: queued_metrics(fleet.agents[d].state_dir)[2] for d in SITES["b"]}
    fleet.push(m2)
    fleet.push(m3)  # version 1 leaves central's repository (protocol 4.4)
    fleet.active(3, SITES["a"])
    now = fleet.central_view()
    gone = set(v1) - set(now)
    assert any("/models/dense/1/" in t for t in gone), "a version left central's repository"
    # while cut off, site b still holds version 1 and knows nothing newer
    at_b = fleet.site_view("b")
    assert gone <= set(at_b)
    assert at_b[TOPICS.metadata("timestamp.json")] == v1[TOPICS.metadata("timestamp.json")]
    for d in SITES["b"]:
        assert fleet.agents[d].state_file()["models"]["dense"]["active"]["version"] == 1
    # metrics went on being made, and wait on disk
    for d in SITES["b"]:  # (by the seq given: messages waiting from before the 0 do not count)
        sd, n = fleet.agents[d].state_dir, held_after[d] + 2
        wait_until(lambda sd=sd, n=n: queued_metrics(sd)[2] >= n, 60, f"{d} to hold 2 metrics messages")
    made = {d: queued_metrics(fleet.agents[d].state_dir)[2] for d in SITES["b"]}
    fleet.restore("b")
    st = b.wait_status(lambda s: s["link"] == "up" and s["prunes"] > prunes, WAIT_S, "reconnect and prune")
    assert st["pruned"] >= len(gone), st
    fleet.active(3, SITES["b"])
    assert fleet.site_view("b") == fleet.central_view()  # clears included: version 1 left site b
    for d in SITES["b"]:  # every metrics message made after the device read the 0 reached central
        want = set(range(held_after[d] + 1, made[d] + 1))
        assert len(want) >= 2
        try:
            wait_until(lambda d=d, want=want: want <= fleet.metrics_seqs(d), WAIT_S, f"{d}'s held metrics")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: missing {sorted(want - fleet.metrics_seqs(d))}") from None


def check_a_silent_uplink_loses_no_metrics(fleet: Sites) -> None:
    """A link that goes silent (nothing reset) is noticed only after 1.5x the bridge's
    keep-alive: what site a's devices sent meanwhile, their site broker acknowledged and its
    cut bridge dropped. Once they read the 0 they send again what the broker acknowledged in
    the minute before (agent/telemetry/uplink.py): central ends with every metrics message
    they made, none missing (repeats are dropped by seq)."""
    a, devices = fleet.sites["a"], SITES["a"]
    downs = {d: fleet.agents[d].log().count("site uplink down") for d in devices}
    had = {d: max(fleet.metrics_seqs(d)) for d in devices}  # central has these already
    fleet.proxies["a"].stall = True
    t0 = time.monotonic()
    a.wait_status(lambda s: s["link"] == "down", 60, "the silent link noticed")
    noticed_s = time.monotonic() - t0
    for d in devices:
        log = fleet.agents[d].log
        wait_until(lambda log=log, n=downs[d]: log().count("site uplink down") > n, 60, f"{d} to read the 0")
    made = {d: queued_metrics(fleet.agents[d].state_dir)[2] for d in devices}
    fleet.proxies["a"].stall = False
    fleet.proxies["a"].cut()  # what is left of the silent connections
    a.wait_status(lambda s: s["link"] == "up", WAIT_S, "link up again")
    print(f"site a: the silent link was noticed after {noticed_s:.1f} s (keep-alive {KEEPALIVE_S} s)")
    for d in devices:
        want = set(range(had[d], made[d] + 1))
        assert len(want) >= 3, (d, had[d], made[d])  # messages were made in the silent window
        try:
            wait_until(lambda d=d, want=want: want <= fleet.metrics_seqs(d), WAIT_S, f"{d}'s metrics")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: missing {sorted(want - fleet.metrics_seqs(d))}") from None


def check_a_site_broker_sigkill_keeps_what_was_retained(fleet: Sites) -> None:
    a = fleet.sites["a"]
    offset = a.log_file.stat().st_size
    repo = fleet.site_view("a")
    states = fleet.site_view("a", TOPICS.devices_filter("state"))
    assert repo == fleet.central_view() and len(states) == len(SITES["a"])
    # Mosquitto writes its persistence file autosave_interval (2 s) after a change (the
    # agents' states and metrics keep changing something). The repository has not changed
    # since before `offset` (the last push finished in the step before, and site a holds
    # exactly central's), so any save logged after `offset` holds the repository read above.
    wait_until(lambda: b"Saving in-memory database" in a.log_file.read_bytes()[offset:], 10, "an autosave")
    fleet.cut("a")  # the restarted broker can only serve its own file
    old = a.mosquitto_pid()
    restarts = a.status()["broker_restarts"]
    os.kill(old, signal.SIGKILL)
    st = a.wait_status(lambda s: s["broker_restarts"] == restarts + 1, 30, "the supervisor's restart")
    assert "exited" in st["last_restart_reason"] and st["mosquitto_pid"] != old
    assert fleet.site_view("a") == repo
    # (agents republish their state on reconnect, so only the repository, which nobody
    # republishes while the uplink is down, proves the file kept it)
    assert set(fleet.site_view("a", TOPICS.devices_filter("state"))) == set(states)
    fleet.restore("a")
    a.wait_status(lambda s: s["link"] == "up", WAIT_S, "link up again")
    for d in SITES["a"]:  # the agents found the restarted broker
        fleet.watch.wait_for(lambda d=d: (fleet.watch.states.get(d) or {}).get("online") is True, WAIT_S, d)


def check_a_sigkill_inside_the_autosave_window_is_made_good(fleet: Sites, m4: Path) -> None:
    """Killed as the new version's timestamp reaches the site, before its chunks: the last
    changes are lost at the site with its memory, and come back from central."""
    a = fleet.sites["a"]
    watcher = a.host()
    watcher.subscribe(TOPICS.metadata("timestamp.json"))
    mark = len(watcher.messages)
    old_pid = a.mosquitto_pid()
    restarts = a.status()["broker_restarts"]
    fleet.push(m4)
    wait_until(lambda: len(watcher.messages) > mark, 30, "version 4's timestamp at site a")
    os.kill(old_pid, signal.SIGKILL)
    watcher.close()
    a.wait_status(lambda s: s["broker_restarts"] == restarts + 1, 30, "the supervisor's restart")
    fleet.active(4, list(fleet.agents))
    st = a.wait_status(lambda s: s["link"] == "up" and s["prune_error"] is None, WAIT_S, "a prune after it")
    wait_until(
        lambda: fleet.site_view("a") == fleet.central_view(), 30, "site a to hold central's repository"
    )
    assert st["sessions"] >= 3, st
