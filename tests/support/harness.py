"""Test helpers for end-to-end delivery: a repository, agents as real processes, a fleet watcher.

Everything here drives the real programs: ``litefleet`` commands run
in-process through :func:`converter.cli.main.main`, agents run as
``python -m agent run`` subprocesses (or in-process :class:`agent.service.daemon.Agent`
objects where ten of them would be too heavy), and :class:`FleetWatcher`
listens to the devices' state and events topics on the real broker.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

REPO_ROOT = Path(__file__).resolve().parents[2]


def litefleet(*args: str) -> tuple[int, str, str]:
    """Run ``litefleet ARGS`` in this process; return (exit code, stdout, stderr)."""
    from converter.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def must(*args: str) -> str:
    code, out, err = litefleet(*args)
    assert code == 0, f"litefleet {' '.join(args)} failed ({code}): {err}"
    return out


def push(model: Path, repo: Path, broker_url: str, name: str = "digits", *extra: str) -> str:
    """``litefleet push MODEL --repo REPO --name NAME --broker URL [extra...]``; its output."""
    return must("push", str(model), "--repo", str(repo), "--name", name, "--broker", broker_url, *extra)


def copy_model(src: Any, dest_dir: Path, name: str = "model") -> Path:
    """Copy a converted model (:class:`tests.support.models.ConvertedModel`) with its card and
    golden vectors under a new stem; returns the new ``.tflite``."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / f"{name}.tflite"
    shutil.copy(src.tflite, out)
    shutil.copy(src.card, dest_dir / f"{name}.card.json")
    shutil.copy(src.golden, dest_dir / f"{name}.golden.npz")
    return out


def http_json(url: str, body: Any | None = None, *, timeout_s: float = 10.0) -> tuple[int, Any]:
    """A JSON REST call: POST ``body`` (a JSON-able value, or ``bytes`` sent as they are), or
    GET without one. Returns (HTTP status, decoded JSON answer), error statuses included."""
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def soak_report(name: str, **figures: Any) -> None:
    """Print a soak test's figures as one JSON line and append it to ``$LITEFLEET_SOAK_REPORT``
    (scripts/soak.sh prints them)."""
    path = os.environ.get("LITEFLEET_SOAK_REPORT")
    line = json.dumps({"test": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), **figures})
    print(line)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def write_agent_config(path: Path, **keys: Any) -> Path:
    lines = []
    for k, v in keys.items():
        if isinstance(v, str):
            lines.append(f"{k} = {json.dumps(v)}")
        elif isinstance(v, list | tuple):
            lines.append(f"{k} = {json.dumps(list(v))}")
        else:
            lines.append(f"{k} = {v}")
    path.write_text("\n".join(lines) + "\n")
    return path


class AgentProcess:
    """``python -m agent run --config ...`` as a subprocess."""

    def __init__(
        self, workdir: Path, device_id: str, broker_url: str, trusted_root: Path, **extra: Any
    ) -> None:
        self.device_id = device_id
        self.workdir = workdir
        self.state_dir = workdir / f"state-{device_id}"
        self.log_path = workdir / f"agent-{device_id}.log"
        keys: dict[str, Any] = {
            "device_id": device_id,
            "broker": broker_url,
            "state_dir": str(self.state_dir),
            "trusted_root": str(trusted_root),
            "http": "",
            "probation_s": 1.0,
            "probation_inferences": 1,
            "log_level": "debug",
        }
        keys.update(extra)
        self.config = write_agent_config(workdir / f"agent-{device_id}.toml", **keys)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, *, env: dict[str, str] | None = None) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(REPO_ROOT)
        full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        if env:
            full_env.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=self.workdir,
        )
        log.close()
        self.starts += 1

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def state_file(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.state_dir / "state.json").read_text())
        return doc


def queued_metrics(state_dir: Path) -> tuple[int, int | None, int]:
    """An agent's on-disk metrics queue, read beside the running agent: (messages waiting,
    the oldest one's seq, the last seq given). Acknowledged messages a site's device keeps
    (to send again after an outage) are not waiting."""
    path = state_dir / "metrics-queue.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        rows, oldest = db.execute("SELECT COUNT(*), MIN(seq) FROM outbox WHERE acked_at IS NULL").fetchone()
        (last,) = db.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
    return int(rows), oldest, int(last)


class FleetWatcher:
    """Collects every device's retained state and events from the broker.

    Plain MQTT on loopback by default (``host`` for another address); ``secure_dir`` (a
    ``litefleet broker --secure`` folder) connects with that broker's host identity over TLS
    instead."""

    def __init__(
        self,
        port: int | None = None,
        prefix: str = "litefleet",
        *,
        secure_dir: Path | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.prefix = prefix
        self.states: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.raw: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        client_id = f"watch-{uuid.uuid4().hex[:6]}"
        settings: dict[str, Any] = {}
        if secure_dir is not None:
            from converter.broker.secure import host_client_settings

            settings = host_client_settings(secure_dir)
            host, port = settings["host"], settings["port"]
            client_id = f"{settings['client_id_prefix']}watch-{uuid.uuid4().hex[:6]}"
        assert port is not None, "give the broker's port or secure_dir"
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        if settings:
            import ssl

            self.client.tls_set_context(ssl.create_default_context(cafile=settings["ca_file"]))
            self.client.username_pw_set(settings["username"], settings["password"])
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.connect(host, port)
        self.client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        base = f"{self.prefix}/v1/devices/+"
        client.subscribe([(f"{base}/state", 1), (f"{base}/events", 1)])

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        with self._cond:
            self.raw.append((msg.topic, bytes(msg.payload)))
            try:
                doc = json.loads(msg.payload) if msg.payload else None
            except ValueError:
                doc = None
            if parts[-1] == "state" and isinstance(doc, dict):
                self.states[parts[-2]] = doc
            elif parts[-1] == "events" and isinstance(doc, dict):
                self.events.append(doc)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 30.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout_s:g} s waiting for {what or predicate}; "
                        f"states={json.dumps(self.states)[:2000]} "
                        f"events={json.dumps(self.events[-10:])[:3000]}"
                    )
                self._cond.wait(min(left, 0.2))

    def active(self, device_id: str) -> tuple[str | None, str | None]:
        st = self.states.get(device_id) or {}
        return st.get("model"), st.get("version")

    def wait_active(self, device_id: str, model: str, version: int, timeout_s: float = 30.0) -> None:
        self.wait_for(
            lambda: (
                self.active(device_id) == (model, str(version))
                and (self.states.get(device_id) or {}).get("online") is True
            ),
            timeout_s,
            f"{device_id} to serve {model} v{version}",
        )

    def events_of(self, device_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        with self._cond:
            return [
                e
                for e in self.events
                if e.get("device_id") == device_id and (kind is None or e.get("event") == kind)
            ]

    def wait_event(self, device_id: str, kind: str, timeout_s: float = 30.0, **match: Any) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def pred() -> bool:
            for e in self.events:
                if (
                    e.get("device_id") == device_id
                    and e.get("event") == kind
                    and all(e.get(k) == v for k, v in match.items())
                ):
                    found.append(e)
                    return True
            return False

        self.wait_for(pred, timeout_s, f"{kind} event from {device_id} matching {match}")
        return found[0]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@contextlib.contextmanager
def watching(port: int) -> Iterator[FleetWatcher]:
    w = FleetWatcher(port)
    try:
        yield w
    finally:
        w.close()


def publish_raw(port: int, topic: str, payload: bytes, *, retain: bool = True, qos: int = 1) -> None:
    """Publish as an outsider would (no litefleet code involved)."""
    publish_many(port, [(topic, payload, retain)], qos=qos)


def publish_many(port: int, messages: list[tuple[str, bytes, bool]], *, qos: int = 1) -> None:
    """Publish (topic, payload, retain) messages in order over one outsider connection."""
    c = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
    )
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        infos = [c.publish(topic, payload, qos=qos, retain=retain) for topic, payload, retain in messages]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        c.loop_stop()
        c.disconnect()


def read_retained(port: int, topic: str, timeout_s: float = 5.0) -> bytes | None:
    got: list[bytes] = []
    ev = threading.Event()
    c = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"read-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
    )

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        got.append(bytes(msg.payload))
        ev.set()

    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.subscribe(topic, 1)
    c.loop_start()
    try:
        ev.wait(timeout_s)
    finally:
        c.loop_stop()
        c.disconnect()
    return got[0] if got else None


class PersistentSubscriber:
    """A test-side paho client with a persistent session, so the broker keeps
    its QoS 1 messages while it is away (as the fleet monitor's would)."""

    def __init__(self, port: int, topic: str) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.received: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        self.subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"monitor-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600

        def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, properties: Any = None) -> None:
            client.subscribe(topic, qos=1)

        def on_subscribe(*args: Any) -> None:
            self.subscribed.set()

        def on_message(client: Any, userdata: Any, m: Any) -> None:
            self.received.put((time.time(), json.loads(m.payload)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def collect(
        self,
        until: Callable[[list[dict[str, Any]]], bool],
        timeout_s: float,
        got: list[tuple[float, dict[str, Any]]],
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while not until([d for _, d in got]) and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                got.append(self.received.get(timeout=0.5))
