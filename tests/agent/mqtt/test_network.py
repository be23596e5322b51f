"""Many MqttClients on one shared network thread (agent.mqtt.network) against a real Mosquitto."""

from __future__ import annotations

import threading
from typing import Any

from agent.mqtt.client import ConnectionSettings, MqttClient, wait_until
from agent.mqtt.network import SharedNetwork
from agent.mqtt.transport import Message

CLIENTS = 60


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
