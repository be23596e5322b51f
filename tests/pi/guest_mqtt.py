"""An MQTT 5 responder for the emulated userland: answers one request, then exits.

Usage: ``guest_mqtt.py HOST PORT PREFIX [--cafile CA.pem]``

Connects (TLS when ``--cafile`` is given, verifying the broker against that CA), subscribes
to ``PREFIX/request``, then publishes ``PREFIX/ready``. The first request is answered on its
MQTT 5 response topic with its correlation data and a JSON payload: the machine, the
request's length and SHA-256. Exit 0 after the reply is delivered (QoS 1), 3 on timeout.

Imports only paho-mqtt and the standard library, like the agent's transport.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import queue
import ssl
import sys
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

TIMEOUT_S = 120.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("prefix")
    parser.add_argument("--cafile")
    opts = parser.parse_args(argv)

    # paho's network thread runs the callbacks; they only hand messages to this queue
    inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subscribed: queue.Queue[bool] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pi-guest", protocol=mqtt.MQTTv5)
    if opts.cafile:
        client.tls_set_context(ssl.create_default_context(cafile=opts.cafile))

    def on_connect(c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        c.subscribe(f"{opts.prefix}/request", qos=1)

    def on_subscribe(_c: mqtt.Client, _u: object, _m: object, _rc: object, _p: object) -> None:
        subscribed.put(True)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = lambda _c, _u, msg: inbox.put(msg)
    client.connect(opts.host, opts.port, keepalive=30)
    client.loop_start()
    try:
        subscribed.get(timeout=TIMEOUT_S)
        ready = client.publish(f"{opts.prefix}/ready", b"1", qos=1)
        ready.wait_for_publish(TIMEOUT_S)
        msg = inbox.get(timeout=TIMEOUT_S)
        request: Any = msg.properties  # MQTT 5: always set on a v5 client's messages
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = request.CorrelationData
        body = {
            "machine": platform.machine(),
            "length": len(msg.payload),
            "sha256": hashlib.sha256(msg.payload).hexdigest(),
            "tls": bool(opts.cafile),
        }
        info = client.publish(request.ResponseTopic, json.dumps(body), qos=1, properties=props)
        info.wait_for_publish(TIMEOUT_S)
        if not (ready.is_published() and info.is_published()):
            return 3
    except queue.Empty:
        return 3
    finally:
        client.disconnect()
        client.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
