"""Many MqttClients on one shared network thread (agent.mqtt.network) against a real Mosquitto."""

from __future__ import annotations

import threading
from typing import Any

from agent.mqtt.client import ConnectionSettings, MqttClient, wait_until
from agent.mqtt.network import SharedNetwork
from agent.mqtt.transport import Message
from tests.support.harness import read_retained

CLIENTS = 60


def on_network(net: SharedNetwork, port: int, client_id: str, will_topic: str | None = None) -> MqttClient:
    """A client of ``net`` (keep-alive 60 s), with a retained will ``b"will"`` on ``will_topic``."""
    settings = ConnectionSettings(
        host="127.0.0.1",
        port=port,
        client_id=client_id,
        keepalive_s=60,
        will_topic=will_topic,
        will_payload=b"will",
    )
    return MqttClient(settings, network=net)


class Staller:
    """Holds ``net``'s one thread still on demand: a client whose message handler (which
    runs on that thread) waits on a gate. Nothing is read or written meanwhile."""

    def __init__(self, net: SharedNetwork, port: int, name: str) -> None:
        self.topic = f"{name}/stall"
        self.gate = threading.Event()
        self.stalled = threading.Event()
        self.client = on_network(net, port, name)
        self.client.subscribe(self.topic, self._stall, qos=0)

    def _stall(self, m: Message) -> None:
        self.stalled.set()
        self.gate.wait(30)

    def start(self) -> None:
        self.client.start()
        assert wait_until(lambda: self.client.connected, 30) and self.client.wait_synced(10)

    def hold(self) -> None:
        self.client.publish(self.topic, b"x")
        assert self.stalled.wait(10)

    def release(self) -> None:
        self.gate.set()


def test_many_clients_share_one_network_thread(broker: Any) -> None:
    """Each client has its own connection, subscriptions, will and QoS 1 publishes; one
    thread drives them all, and reconnects them all after the broker restarts."""
    before = {t.name for t in threading.enumerate()}
    net = SharedNetwork()
    net.start()
    got: dict[str, list[bytes]] = {f"sim-{i}": [] for i in range(CLIENTS)}
    lock = threading.Lock()
    clients: list[MqttClient] = []

    def handler(name: str) -> Any:
        def handle(m: Message) -> None:
            with lock:
                got[name].append(m.payload)

        return handle

    try:
        for i in range(CLIENTS):
            name = f"sim-{i}"
            c = MqttClient(
                ConnectionSettings(
                    host="127.0.0.1",
                    port=broker.port,
                    client_id=name,
                    will_topic=f"sim/{name}/state",
                    will_payload=b"gone",
                ),
                network=net,
            )
            c.subscribe(f"sim/{name}/in", handler(name), qos=1)
            c.start()
            clients.append(c)
        assert wait_until(lambda: all(c.connected for c in clients), 30)
        threads = {t.name for t in threading.enumerate()} - before
        assert threads == {"mqtt-shared-network"}, threads  # no thread per client
        assert all(c.wait_synced(10) for c in clients)
        # each client publishes to the next one's topic, QoS 1, acknowledged
        deliveries = [
            c.publish(f"sim/sim-{(i + 1) % CLIENTS}/in", b"hello %d" % i, qos=1)
            for i, c in enumerate(clients)
        ]
        assert all(d.wait(10) for d in deliveries)
        assert wait_until(lambda: all(len(v) == 1 for v in got.values()), 10), got
        assert got["sim-0"] == [b"hello %d" % (CLIENTS - 1)]

        broker.restart()
        assert wait_until(lambda: all(c.connected for c in clients), 60)
        assert all(c.wait_synced(10) for c in clients)  # re-subscribed after the reconnect
        assert clients[1].publish("sim/sim-2/in", b"again", qos=1).wait(10)
        assert wait_until(lambda: got["sim-2"][-1:] == [b"again"], 10)
        assert net.connects >= 2 * CLIENTS
    finally:
        for c in clients:
            c.stop()
        net.stop()
    assert not any(c.connected for c in clients)


def test_stopping_flushes_every_goodbye_even_when_the_network_thread_is_late(broker: Any) -> None:
    """Stopping many devices at once on a busy machine: each queues its retained goodbye and
    its DISCONNECT, then detaches before the network thread had the time to write them. They
    must still reach the broker (a clean goodbye, not the will) before the thread stops."""
    net = SharedNetwork()
    net.start()
    staller = Staller(net, broker.port, "staller")
    names = [f"late-{i}" for i in range(5)]
    clients = [on_network(net, broker.port, name, f"late/{name}/state") for name in names]
    try:
        staller.start()
        for c in clients:
            c.start()
        assert wait_until(lambda: all(c.connected for c in clients), 30)
        staller.hold()
        # the network thread is held: nothing below is written until it is released
        for name, c in zip(names, clients, strict=True):
            c.publish(f"late/{name}/state", b"goodbye", qos=1, retain=True)
        stoppers = [threading.Thread(target=c.stop) for c in clients]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(30)  # each gives up waiting for its acknowledgements and DISCONNECT
        staller.release()
        staller.client.stop()
        net.stop()
    finally:
        staller.release()
        net.stop()
    for name in names:
        assert read_retained(broker.port, f"late/{name}/state") == b"goodbye"


def test_a_lost_write_registration_still_gets_the_packet_out(broker: Any) -> None:
    """paho's external-loop interface can lose a write registration when a thread queues a
    packet while the network thread finishes a write (seen: 1 of 1,000 simulated devices'
    goodbye never left). The network thread must notice the queued packet by itself."""
    net = SharedNetwork()
    net.start()
    c = on_network(net, broker.port, "lost-write")
    try:
        c.start()
        assert wait_until(lambda: c.connected, 30)
        assert c.wait_synced(10)
        paho_client = c._client  # the race is inside paho: play its outcome
        paho_client._call_socket_register_write = lambda: None  # type: ignore[method-assign]
        writes = []
        loop_write = paho_client.loop_write

        def counted() -> Any:
            writes.append(1)
            return loop_write()

        paho_client.loop_write = counted  # type: ignore[method-assign]
        assert c.publish("lost/write", b"x", qos=1, retain=True).wait(10)
        # and once written, the socket is not left registered for writing: no spinning
        seen = len(writes)
        threading.Event().wait(2.0)  # a window to count in, not a timing assertion
        assert len(writes) - seen < 20, len(writes) - seen
    finally:
        c.stop()
        net.stop()


def test_a_client_stopped_at_its_keepalive_time_still_says_goodbye(broker: Any) -> None:
    """paho's keep-alive check closes a disconnecting client's socket without its queued
    DISCONNECT once the keep-alive time has passed since it last heard from the broker; with
    1,000 devices stopping at once that was ~5 % of them, and the broker published their
    wills. A client stopped just then must still disconnect cleanly."""
    net = SharedNetwork()
    net.start()
    staller = Staller(net, broker.port, "staller2")
    c = on_network(net, broker.port, "due", "late2/due/state")
    try:
        staller.start()
        c.start()
        assert wait_until(lambda: c.connected, 30) and c.wait_synced(10)
        assert c.publish("late2/due/state", b"goodbye", qos=1, retain=True).wait(10)
        staller.hold()
        c._client._last_bytes_received -= 120  # heard nothing for two keep-alive periods
        # held past the 1 s keep-alive pass, so that one is due when the thread resumes (this
        # makes the case, it waits for nothing)
        threading.Event().wait(1.5)
        stopper = threading.Thread(target=c.stop)
        stopper.start()
        # let the network thread go while stop() still waits for its DISCONNECT to be written
        assert wait_until(lambda: c._stopping, 10)
        staller.release()
        stopper.join(30)
        staller.client.stop()
        net.stop()
    finally:
        staller.release()
        net.stop()
    log = broker.config.data_dir / "mosquitto.log"

    def ended() -> list[str]:  # the broker's lines about the end of the client's connection
        return [ln.split(": ", 1)[1] for ln in log.read_text().splitlines() if "Client due " in ln]

    assert wait_until(lambda: bool(ended()), 30)
    assert ended() == ["Client due disconnected."]  # not "closed its connection." (the will)
    assert read_retained(broker.port, "late2/due/state") == b"goodbye"
