"""Steps 4-8 of the demo: broker, repository, agent, push, inference, fleet view.

Everything runs as the real programs a user would run (``litefleet``,
``litefleet-agent``) in subprocesses, on loopback, in ``demo-out/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from agent.protocol import Topics
from converter.broker.mosquitto import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
TOPICS = Topics()


def litefleet(*args: str, check: bool = True) -> str:
    cmd = [sys.executable, "-m", "converter", *args]
    print("    $ litefleet " + " ".join(_short(a) for a in args), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if check and proc.returncode != 0:
        raise RuntimeError(f"litefleet {args[0]} failed: {proc.stderr.strip()}")
    return proc.stdout


def _short(arg: str) -> str:
    return str(Path(arg).relative_to(REPO)) if arg.startswith(str(REPO)) else arg


@contextlib.contextmanager
def background(name: str, cmd: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    print(
        f"    $ {' '.join(_short(c) for c in cmd)}   (in the background; log: {_short(str(log))})", flush=True
    )
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        print(f"    stopped the {name}")


class Listener:
    """Prints the agent's events as they come, keeps its metrics."""

    def __init__(self, port: int, device: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.events: list[dict[str, Any]] = []
        self.metrics: list[dict[str, Any]] = []
        self.replies: dict[bytes, bytes] = {}
        self.cond = threading.Condition()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"_demo-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(
            [(TOPICS.events(device), 1), (TOPICS.metrics(device), 1), (TOPICS.reply("demo", "#"), 1)]
        )
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.cond:
            if msg.topic.endswith("/events"):
                ev = json.loads(msg.payload)
                self.events.append(ev)
                extra = {
                    k: v
                    for k, v in ev.items()
                    if k in ("version", "progress", "reason", "message", "sha256", "bytes_received")
                }
                if "sha256" in extra:
                    extra["sha256"] = extra["sha256"][:12] + "..."
                print(f"      agent event: {ev['event']:<12} {json.dumps(extra)}", flush=True)
            elif msg.topic.endswith("/metrics"):
                self.metrics.append(json.loads(msg.payload))
            else:
                self.replies[msg.properties.CorrelationData] = bytes(msg.payload)
            self.cond.notify_all()

    def wait(self, pred: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"timed out waiting for {what}")
                self.cond.wait(left)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def rest(url: str, body: Any = None) -> Any:
    req = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def fleet_demo(
    out: Path, data: Any, *, first_step: int, total: int, step: Callable[[int, int, str], None]
) -> int:
    n = first_step
    for d in ("broker", "repo", "agent-state"):
        shutil.rmtree(out / d, ignore_errors=True)
    broker_port, http_port = free_port(), free_port()
    url = f"mqtt://127.0.0.1:{broker_port}"

    step(n, total, "starting a private Mosquitto and creating a signed model repository")
    with background(
        "broker",
        [
            sys.executable,
            "-m",
            "converter",
            "broker",
            "--port",
            str(broker_port),
            "--data",
            str(out / "broker"),
        ],
        out / "broker.log",
    ):
        if not wait_for_port("127.0.0.1", broker_port, 15):
            raise SystemExit(f"the broker did not start listening; see {out / 'broker.log'}")
        print(f"    broker listening on {url}")
        for line in litefleet("repo", "init", str(out / "repo")).splitlines():
            print("    " + line)

        n += 1
        step(n, total, "starting a local agent (what a Raspberry Pi runs as a systemd service)")
        config = out / "agent.toml"
        config.write_text(
            'device_id = "demo-pi"\n'
            f'broker = "{url}"\n'
            f'state_dir = "{out / "agent-state"}"\n'
            f'trusted_root = "{out / "repo" / "root.json"}"\n'
            f'http = "127.0.0.1:{http_port}"\n'
            "metrics_interval_s = 2\n"
            "probation_s = 5\n"
        )
        print(f"    config: {_short(str(config))} (device demo-pi, REST on 127.0.0.1:{http_port})")
        listener = Listener(broker_port, "demo-pi")
        try:
            with background(
                "agent", [sys.executable, "-m", "agent", "run", "--config", str(config)], out / "agent.log"
            ):
                time.sleep(1.0)

                n += 1
                step(n, total, "signing and publishing the model to the fleet")
                t0 = time.monotonic()
                for line in litefleet(
                    "push",
                    str(out / "digits.tflite"),
                    "--repo",
                    str(out / "repo"),
                    "--name",
                    "digits",
                    "--broker",
                    url,
                ).splitlines():
                    print("    " + line)
                listener.wait(
                    lambda: any(e["event"] == "activated" for e in listener.events),
                    60,
                    "the agent to activate the model",
                )
                print(f"    active on the agent {time.monotonic() - t0:.2f} s after the push started")

                n += 1
                step(n, total, "sending inference requests to the agent")
                x, y = data.x_test[:8], data.y_test[:8]
                status = rest(f"http://127.0.0.1:{http_port}/v1/models/digits")
                print(f"    GET /v1/models/digits -> {json.dumps(status['model_version_status'][0])}")
                t1 = time.perf_counter()
                reply = rest(
                    f"http://127.0.0.1:{http_port}/v1/models/digits:predict", {"instances": x.tolist()}
                )
                rest_ms = (time.perf_counter() - t1) * 1e3
                pred = np.argmax(np.array(reply["predictions"]), axis=-1)
                print(
                    f"    POST /v1/models/digits:predict with 8 images -> {pred.tolist()} "
                    f"(labels {y.tolist()}), {rest_ms:.1f} ms"
                )
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = TOPICS.reply("demo", "demo-pi")
                props.CorrelationData = b"demo-1"
                listener.client.publish(
                    TOPICS.infer("demo-pi"),
                    json.dumps({"model": "digits", "instances": x[:3].tolist()}),
                    qos=1,
                    properties=props,
                )
                listener.wait(lambda: b"demo-1" in listener.replies, 15, "the MQTT reply")
                mqtt_pred = np.argmax(np.array(json.loads(listener.replies[b"demo-1"])["predictions"]), -1)
                print(f"    MQTT request on {TOPICS.infer('demo-pi')} -> {mqtt_pred.tolist()}")
                for _ in range(40):  # some load for the metrics
                    rest(f"http://127.0.0.1:{http_port}/v1/models/digits:predict", {"instances": x.tolist()})

                n += 1
                step(n, total, "the fleet at a glance")
                seen = len(listener.metrics)
                listener.wait(lambda: len(listener.metrics) > seen, 15, "a metrics message")
                for line in litefleet("status", "--broker", url).splitlines():
                    print("    " + line)
                m = listener.metrics[-1]
                dev = m.get("device", {})
                print(f"    latest metrics message (seq {m['seq']}):")
                for model in m.get("models", []):
                    lat = model.get("latency_ms_total") or {}
                    print(
                        f"      {model.get('name')} v{model.get('version')}: {model.get('ok')} answered, "
                        f"{model.get('errors')} errors, latency p50 {lat.get('p50')} ms, "
                        f"p99 {lat.get('p99')} ms"
                    )
                print(
                    f"      device: process CPU {dev.get('cpu_percent_process')} %, "
                    f"RSS {(dev.get('rss_bytes') or 0) / 1e6:.1f} MB, "
                    f"free disk {(dev.get('disk_free_bytes') or 0) / 1e9:.1f} GB"
                )
        finally:
            listener.close()
    print(f"\nDone. Everything is in {_short(str(out))}/ (agent.log and broker.log included).")
    return 0
