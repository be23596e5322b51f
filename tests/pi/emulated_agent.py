"""The real ``litefleet-agent`` as a process under qemu, and what a test watches it with.

:class:`EmulatedAgent` is :class:`tests.support.harness.AgentProcess` started as
``python3.11 -m agent run --config agent.toml`` inside an emulated Raspberry Pi userland
(:class:`tests.pi.userland.Userland`): the agent process itself runs under qemu (an emulated
process cannot exec another arm64 program; its forked candidate checks stay emulated, being
forks). The host's ``Popen.pid`` is qemu's: memory read from the host's ``/proc`` for it is
the emulator's.

:class:`NotifySocket` is a stand-in for systemd's ``$NOTIFY_SOCKET``: it records every
datagram the agent sends (``READY=1``, ``WATCHDOG=1``...) with the host time it arrived.
:class:`MetricsListener` collects a device's metrics messages from the broker.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.harness import AgentProcess
from tests.support.http_client import KeepAliveClient

from .userland import Userland


class EmulatedAgent(AgentProcess):
    """``python -m agent run --config ...`` under qemu in ``userland``."""

    def __init__(
        self,
        userland: Userland,
        workdir: Path,
        device_id: str,
        broker_url: str,
        trusted_root: Path,
        **extra: Any,
    ) -> None:
        super().__init__(workdir, device_id, broker_url, trusted_root, **extra)
        self.userland = userland

    def start(self, *, env: dict[str, str] | None = None) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115
        try:
            self.proc = self.userland.popen(
                ["-m", "agent", "run", "--config", str(self.config)],
                env=env,
                stdout=log,
                stderr=log,
                stdin=None,
                cwd=self.workdir,
            )
        finally:
            log.close()
        self.starts += 1

    def ready_after_s(self, timeout_s: float = 0.0) -> float | None:
        return logged_ready_s(self, timeout_s)


def logged_ready_s(agent: AgentProcess, timeout_s: float = 0.0) -> float | None:
    """The agent's own "ready X s after start" (counted from its Agent object's creation,
    after the imports), waiting up to ``timeout_s`` for the line: it is logged just after
    READY=1 is sent."""
    deadline = time.monotonic() + timeout_s
    while True:
        for line in agent.log().splitlines():
            if "agent.service.daemon: ready " in line:
                return float(line.split("ready ", 1)[1].split()[0])
        if time.monotonic() >= deadline or not agent.alive():
            return None
        time.sleep(0.1)


class NotifySocket:
    """A datagram socket standing in for systemd's: ``(host monotonic time, fields)`` per message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                self.messages.append((time.monotonic(), fields))
                self._cond.notify_all()

    def first(self, key: str) -> tuple[float, dict[str, str]] | None:
        with self._cond:
            return next(((t, m) for t, m in self.messages if key in m), None)

    def wait_for(self, key: str, timeout_s: float) -> tuple[float, dict[str, str]]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (found := next(((t, m) for t, m in self.messages if key in m), None)) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no {key} on the notify socket after {timeout_s:g} s: {self.messages[-5:]}"
                    )
                self._cond.wait(min(left, 0.2))
            return found

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


class MetricsListener:
    """Every metrics document one device publishes, in arrival order."""

    def __init__(self, port: int, device_id: str, prefix: str = "litefleet") -> None:
        self.docs: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"_metrics-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5
        )
        topic = f"{prefix}/v1/devices/{device_id}/metrics"
        self.client.on_connect = lambda c, *_: c.subscribe(topic, 1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._cond:
            self.docs.append(json.loads(msg.payload))
            self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float, what: str
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (found := next((d for d in reversed(self.docs) if predicate(d)), None)) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no metrics with {what} after {timeout_s:g} s; "
                        f"last: {json.dumps(self.docs[-1:])[:2000]}"
                    )
                self._cond.wait(min(left, 0.2))
            return found

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def model_metrics(doc: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((m for m in doc.get("models", []) if m.get("name") == name), None)


# -- REST from the host ---------------------------------------------------------------------


class Rest:
    """One keep-alive HTTP connection to the agent's REST API (reopened, as real clients do,
    when the agent closed it while idle: :class:`tests.support.http_client.KeepAliveClient`)."""

    def __init__(self, port: int, timeout_s: float = 60.0) -> None:
        self.client = KeepAliveClient("127.0.0.1", port, timeout_s)

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"
    ) -> tuple[int, str, bytes]:
        headers = {"Content-Type": content_type} if body is not None else {}
        answer = self.client.request(method, path, body, headers)
        return answer.status, answer.content_type, answer.body

    def get_json(self, path: str) -> tuple[int, Any]:
        status, _, body = self.request("GET", path)
        return status, json.loads(body)

    def predict_json(self, model: str, instances: np.ndarray) -> tuple[int, Any]:
        status, _, body = self.request(
            "POST", f"/v1/models/{model}:predict", json.dumps({"instances": instances.tolist()}).encode()
        )
        return status, json.loads(body)

    def predict_npy(self, model: str, x: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        np.save(buf, x, allow_pickle=False)
        status, ctype, body = self.request(
            "POST", f"/v1/models/{model}:predict", buf.getvalue(), "application/x-npy"
        )
        assert status == 200, (status, body[:500])
        assert ctype.startswith("application/x-npy"), ctype
        return np.load(io.BytesIO(body), allow_pickle=False)

    def close(self) -> None:
        self.client.close()
