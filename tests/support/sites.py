"""Sites for tests and benches: a central secure broker that issues site identities, site
brokers run as real ``litefleet broker --secure SITE --upstream ...`` processes, and a view of
what a broker retains read with a plain test client (not the product's own prune code)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.broker.mosquitto import BrokerProcess, free_port
from converter.broker.registry import ListenerPorts
from converter.broker.secure import SecureDir
from converter.broker.sites import CentralDir
from tests.support.secure import Client, connect

REPO_ROOT = Path(__file__).resolve().parents[2]
START_S = 30.0


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, step_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(step_s)


def retained(client: Client, topic_filter: str) -> dict[str, bytes]:
    """Topic -> payload of every retained message under ``topic_filter``: subscribe at QoS 0
    (no in-flight window holds anything back), then a second SUBSCRIBE whose SUBACK comes
    after every retained message of the first (protocol 3.3)."""
    start = len(client.messages)
    client.subscribe(topic_filter, qos=0)
    client.subscribe(f"$litefleet-sync/{uuid.uuid4().hex}", qos=0)
    with client.new_message:
        got = client.messages[start:]
    client.client.unsubscribe(topic_filter)
    view: dict[str, bytes] = {}
    for m in got:
        if m.payload:
            view[m.topic] = m.payload
        else:
            view.pop(m.topic, None)
    return view


def host_client(secure: SecureDir, client_id: str | None = None) -> Client:
    s = secure.host_client_settings()
    c = connect(
        s["port"],
        ca=Path(s["ca_file"]),
        username=s["username"],
        password=s["password"],
        client_id=client_id or f"{s['client_id_prefix']}t-{uuid.uuid4().hex[:8]}",
    )
    assert c.connected.is_set(), c.connack
    return c


@dataclass
class Central:
    dir: CentralDir
    broker: BrokerProcess

    @property
    def cert_port(self) -> int:
        return self.dir.load().ports.cert

    def host(self, client_id: str | None = None) -> Client:
        return host_client(self.dir, client_id)

    def stop(self) -> None:
        self.broker.kill()


def start_central(root: Path, sites: dict[str, list[str]]) -> Central:
    """Central's folder with ``sites`` (name -> the device ids it owns), its broker running."""
    cd = CentralDir(root / "central")
    cd.ensure(ports=ListenerPorts(free_port(), free_port(), free_port()))
    for name, devices in sites.items():
        cd.add_site(name)
        for device_id in devices:
            cd.add_site_device(device_id, name)
    broker = BrokerProcess(cd.broker_config())
    broker.start()
    return Central(cd, broker)


class SiteBroker:
    """``litefleet broker --secure DIR --upstream mqtts://127.0.0.1:PORT`` as a process, with
    the bundle ``site add`` made copied to ``DIR/uplink`` as an operator would."""

    def __init__(
        self, root: Path, name: str, central: Central, devices: list[str], *, upstream_port: int | None = None
    ) -> None:
        self.name = name
        self.dir = SecureDir(root / f"site-{name}")
        self.dir.ensure(ports=ListenerPorts(free_port(), free_port(), free_port()))
        # the bundle first, as docs/sites.md says: device add then tells devices their site
        shutil.copytree(central.dir.site_dir(name), self.dir.root / "uplink")
        for device_id in devices:
            self.dir.add_device(device_id)
        self.upstream = f"mqtts://127.0.0.1:{upstream_port or central.cert_port}"
        self.proc: subprocess.Popen[str] | None = None
        self.stdout: list[str] = []

    @property
    def status_file(self) -> Path:
        return self.dir.paths.default_data_dir / "site-status.json"

    @property
    def log_file(self) -> Path:
        return self.dir.paths.default_data_dir / "mosquitto.log"

    def start(self, *extra: str) -> None:
        self.stderr = open(self.dir.root / "supervisor.log", "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "converter",
                "broker",
                "--secure",
                str(self.dir.root),
                "--upstream",
                self.upstream,
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        ready = threading.Event()

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.stdout.append(line.rstrip("\n"))
                if line.startswith("Ctrl-C stops it."):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(START_S) or self.proc.poll() is not None:
            self.kill()
            raise AssertionError(
                f"site broker {self.name} did not start: {self.stdout} {self.supervisor_log()}"
            )

    def supervisor_log(self) -> str:
        try:
            return (self.dir.root / "supervisor.log").read_text()[-3000:]
        except OSError:
            return ""

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status_file.read_text()))
        except (OSError, ValueError):
            return {}

    def wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float, what: str
    ) -> dict[str, Any]:
        try:
            wait_until(lambda: predicate(self.status()), timeout_s, f"site {self.name}: {what}", 0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; status {self.status()}; {self.supervisor_log()[-1500:]}") from None
        return self.status()

    def mosquitto_pid(self) -> int:
        return int(self.status()["mosquitto_pid"])

    def host(self) -> Client:
        return host_client(self.dir)

    def device_keys(self, device_id: str) -> dict[str, str]:
        """agent.toml keys of a device of this site (absolute paths, no systemd)."""
        d = self.dir.paths.device_dir(device_id)
        assert f'site = "{self.name}"' in (d / "agent.toml").read_text()
        return {
            "site": self.name,
            "ca_file": str(d / "ca.pem"),
            "cert_file": str(d / f"{device_id}.pem"),
            "key_file": str(d / f"{device_id}.key"),
        }

    @property
    def device_url(self) -> str:
        return f"mqtts://localhost:{self.dir.load().ports.cert}"

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        # Mosquitto dies with its supervisor (PR_SET_PDEATHSIG); make sure of it
        pid = self.status().get("mosquitto_pid")
        if pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), signal.SIGKILL)


def dense_models(count: int, megabytes: float) -> list[Path]:
    """``count`` float32 models of ``megabytes`` with their cards and golden vectors, different bytes each,
    built once and cached in the temp folder (one TensorFlow process: ~10-20 s here)."""
    from tests.support import big_models
    from tests.support.big_models import build_dense_models

    stamp = hashlib.sha256(
        Path(big_models.__file__).read_bytes() + f"{count}/{megabytes}".encode()
    ).hexdigest()
    out = Path(tempfile.gettempdir()) / "litefleet-site-models" / stamp[:16]
    paths = [out / f"m{i}" / "model.tflite" for i in range(count)]
    sidecars = ("model.golden.npz", "model.card.json")
    if not all(p.exists() and all(p.with_name(n).exists() for n in sidecars) for p in paths):
        work = out.parent / f".build-{os.getpid()}"
        built = build_dense_models(
            [work / f"m{i}" / "model.tflite" for i in range(count)],
            megabytes=megabytes,
            seeds=list(range(count)),
        )
        for i, b in enumerate(built):
            paths[i].parent.mkdir(parents=True, exist_ok=True)
            for n in sidecars:
                os.replace(b.with_name(n), paths[i].with_name(n))
            os.replace(b, paths[i])
        shutil.rmtree(work, ignore_errors=True)
    return paths
