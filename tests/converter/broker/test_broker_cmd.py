"""``litefleet broker`` and ``litefleet device`` as a user runs them: real processes,
real Mosquitto, clean stops, and the printed device instructions followed to the letter."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from converter.broker.mosquitto import free_port

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
    reason="mosquitto is not installed",
)

REPO = Path(__file__).resolve().parents[3]
URL_RE = re.compile(r"mqtts?://\S+")
START_S = 30.0


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "converter", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=120,
    )


class Running:
    """``litefleet broker ...`` in the background; ``banner`` is what it printed up to
    "Ctrl-C stops it."."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "converter", "broker", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.lines: list[str] = []
        done = threading.Event()
        self.reader = threading.Thread(target=lambda: read(), daemon=True)

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if line.startswith("Ctrl-C stops it."):
                    done.set()
            done.set()

        self.reader.start()
        if not done.wait(START_S) or self.proc.poll() is not None:
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"broker did not start: {self.lines} {err}")

    @property
    def banner(self) -> str:
        return "\n".join(self.lines)

    def urls(self) -> list[str]:
        return URL_RE.findall(self.banner)

    def mosquitto_pid(self) -> int:
        m = re.search(r"mosquitto pid (\d+)", self.banner)
        assert m, self.banner
        return int(m.group(1))

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.reader.join(10)
        err = self.proc.stderr.read() if self.proc.stderr else ""
        return self.proc.returncode, "\n".join(self.lines), err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def started() -> Iterator[list[Running]]:
    runs: list[Running] = []
    yield runs
    for r in runs:
        r.kill()
        try:
            pid = r.mosquitto_pid()
        except AssertionError:
            continue
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def round_trip(
    host: str,
    port: int,
    *,
    tls: ssl.SSLContext | None = None,
    username: str | None = None,
    password: str | None = None,
    topic: str = "litefleet/v1/repo/metadata/x",
    retain: bool = False,
    publish: bool = True,
) -> bytes | None:
    """Connect, subscribe, optionally publish one message; return what came back."""
    got: list[bytes] = []
    event = threading.Event()
    c = paho.Client(
        CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5, client_id=f"_lf-host-t{uuid.uuid4().hex[:6]}"
    )
    if tls is not None:
        c.tls_set_context(tls)
    if username:
        c.username_pw_set(username, password)
    c.on_message = lambda cl, u, m: (got.append(m.payload), event.set())
    c.connect(host, port)
    c.loop_start()
    try:
        c.subscribe(topic, qos=1)
        payload = uuid.uuid4().hex.encode()
        if publish:
            c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
        event.wait(10)
        return got[0] if got else None
    finally:
        c.disconnect()
        c.loop_stop()


def can_connect(host: str, port: int, tls: ssl.SSLContext) -> bool:
    """True once a successful CONNACK arrives; False when TLS or CONNACK refuses."""
    ok: list[bool] = []
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    c.tls_set_context(tls)
    c.on_connect = lambda cl, u, f, rc, p=None: ok.append(not rc.is_failure)
    try:
        c.connect(host, port)
    except (ssl.SSLError, OSError):
        return False
    deadline = time.monotonic() + 10
    while not ok and time.monotonic() < deadline:
        if c.loop_read() not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_AGAIN):
            break
        time.sleep(0.005)
    c.disconnect()
    return ok == [True]


# -- plain -------------------------------------------------------------------------------


def test_plain_broker_starts_serves_and_stops_cleanly(tmp_path: Path, started: list[Running]) -> None:
    port = free_port()
    run = Running("--port", str(port), cwd=tmp_path)
    started.append(run)
    assert run.urls() == [f"mqtt://127.0.0.1:{port}"]
    data = tmp_path / ".litefleet-broker"
    assert str(data) in run.banner
    mosq = run.mosquitto_pid()
    assert alive(mosq)
    assert round_trip("127.0.0.1", port, retain=True) is not None
    # SIGHUP is passed on to Mosquitto (reload), not taken as "stop"
    run.proc.send_signal(signal.SIGHUP)
    log = tmp_path / ".litefleet-broker" / "mosquitto.log"
    deadline = time.monotonic() + 10
    while "Reloading config." not in log.read_text():
        assert time.monotonic() < deadline, "mosquitto never reloaded"
        time.sleep(0.05)
    assert run.proc.poll() is None and alive(mosq)
    code, out, err = run.stop(signal.SIGTERM)
    assert code == 0, err
    assert "broker stopped (SIGTERM)" in out
    assert err == ""
    assert not alive(mosq)
    assert (data / "mosquitto.db").exists()  # saved on the way out
    conf = (data / "mosquitto.conf").read_text()
    assert f"listener {port} 127.0.0.1" in conf and "max_packet_size 4194304" in conf
    # retained messages persist into the next run; Ctrl-C stops it too
    run2 = Running("--port", str(port), cwd=tmp_path)
    started.append(run2)
    assert round_trip("127.0.0.1", port, publish=False) is not None
    code, out, _ = run2.stop(signal.SIGINT)
    assert code == 0 and "broker stopped (SIGINT)" in out


def test_plain_broker_refuses_a_network_address(tmp_path: Path) -> None:
    r = cli("broker", "--bind", "0.0.0.0", "--port", "0", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--secure" in r.stderr
    assert not (tmp_path / ".litefleet-broker").exists()


def test_port_in_use_is_one_line_and_exit_1(tmp_path: Path, started: list[Running]) -> None:
    port = free_port()
    first = Running("--port", str(port), "--data", str(tmp_path / "one"), cwd=tmp_path)
    started.append(first)
    r = cli("broker", "--port", str(port), "--data", str(tmp_path / "two"), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.startswith("litefleet: error: cannot listen on 127.0.0.1:")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_mosquitto_dying_ends_the_command_with_exit_1(tmp_path: Path, started: list[Running]) -> None:
    run = Running("--port", "0", cwd=tmp_path)
    started.append(run)
    os.kill(run.mosquitto_pid(), signal.SIGKILL)
    run.proc.wait(30)
    assert run.proc.returncode == 1
    assert run.proc.stderr is not None
    assert "mosquitto exited unexpectedly" in run.proc.stderr.read()


# -- secure ------------------------------------------------------------------------------


def test_secure_broker_and_device_add_end_to_end(tmp_path: Path, started: list[Running]) -> None:
    secure = tmp_path / "pki"
    run = Running("--secure", str(secure), "--port", "0", cwd=tmp_path)
    started.append(run)
    urls = run.urls()
    assert len(urls) == 3 and all(u.startswith("mqtts://") for u in urls)
    assert not any(u.startswith("mqtt://") for u in urls)
    assert str(secure / "ca.pem") in run.banner
    assert oct(secure.stat().st_mode & 0o777) == "0o700"

    # the host identity connects with what host_client_settings gives
    from converter.broker.secure import host_client_settings

    s = host_client_settings(secure)
    assert f"mqtts://litefleet-host@localhost:{s['port']}" in urls
    ctx = ssl.create_default_context(cafile=s["ca_file"])
    assert (
        round_trip(s["host"], s["port"], tls=ctx, username=s["username"], password=s["password"], retain=True)
        is not None
    )

    # device add while the broker runs: follow the printed instructions
    r = cli("device", "add", "pi-01", "--secure", str(secure))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Running broker reloaded" in out
    device_root = tmp_path / "device"  # stands in for /etc/litefleet/credentials
    device_root.mkdir()
    copies = re.findall(r"^\s+(\S+)\s+->\s+/etc/litefleet/credentials/(\S+)$", out, re.M)
    assert [name for _, name in copies] == ["ca.pem", "client.pem", "client.key"]
    # systemd's LoadCredential=litefleet:/etc/litefleet/credentials hands file F over
    # as litefleet_F: do the same here
    for src, name in copies:
        shutil.copy(src, device_root / f"litefleet_{name}")
    toml_lines = re.search(r"agent\.toml.*?:\n((?:   \w+ = .*\n)+)", out)
    assert toml_lines, out
    doc = tomllib.loads("\n".join(ln[3:] for ln in toml_lines.group(1).splitlines()))
    assert doc["device_id"] == "pi-01" and doc["broker"] in urls
    host, port = doc["broker"].removeprefix("mqtts://").rsplit(":", 1)
    dctx = ssl.create_default_context(cafile=str(device_root / doc["ca_file"]))
    dctx.load_cert_chain(str(device_root / doc["cert_file"]), str(device_root / doc["key_file"]))
    # the device reads the repository the host wrote, without a broker restart
    assert round_trip(host, int(port), tls=dctx, publish=False) is not None
    assert can_connect(host, int(port), dctx)

    # a password device, then list and remove
    r = cli("device", "add", "pi-02", "--password", "--secure", str(secure))
    assert r.returncode == 0, r.stderr
    assert 'password_file = "litefleet_mqtt-password"' in r.stdout
    assert 'username = "pi-02"' in r.stdout
    r = cli("device", "list", "--secure", str(secure), "--json")
    rows = json.loads(r.stdout)
    assert [(x["device_id"], x["auth"]) for x in rows] == [("pi-01", "cert"), ("pi-02", "password")]
    r = cli("device", "remove", "pi-01", "--secure", str(secure))
    assert r.returncode == 0 and "revoked" in r.stdout and "reloaded" in r.stdout
    # revoked: the CRL refuses it (device remove waited for the broker's reload)
    assert not can_connect(host, int(port), dctx)

    # a second broker on the same folder is refused
    r = cli("broker", "--secure", str(secure), "--port", "0")
    assert r.returncode == 1 and "runs already" in r.stderr

    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    assert not (secure / "mosquitto.pid").exists()
    assert not alive(run.mosquitto_pid())


def test_device_command_errors_are_one_line(tmp_path: Path) -> None:
    secure = str(tmp_path / "pki")
    r = cli("device", "list", "--secure", secure)
    assert r.returncode == 2 and "litefleet broker --secure" in r.stderr
    assert cli("device", "add", "pi-01", "--secure", secure).returncode == 0
    for args in (("add", "pi-01"), ("add", "bad/id"), ("add", "litefleet-host"), ("remove", "pi-09")):
        r = cli("device", *args, "--secure", secure)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("litefleet: error: "), r.stderr
    r = cli("device", "add", "pi-01", "--renew", "--secure", secure)
    assert r.returncode == 0 and "No broker is running" in r.stdout
    r = cli("device", "list", "--secure", secure)
    assert r.returncode == 0 and r.stdout.splitlines()[1].split()[:2] == ["pi-01", "cert"]


def test_secure_broker_replaces_a_damaged_server_certificate(tmp_path: Path, started: list[Running]) -> None:
    """server.pem derives from the CA: a damaged one is issued anew and the broker serves
    TLS with it; a damaged CA file stops ``broker --secure`` with one line instead."""
    secure = tmp_path / "pki"
    assert cli("device", "add", "pi-01", "--secure", str(secure)).returncode == 0
    (secure / "server.pem").write_bytes(b"garbage\n")
    run = Running("--secure", str(secure), "--port", "0", cwd=tmp_path)
    started.append(run)
    from converter.broker.secure import host_client_settings

    s = host_client_settings(secure)
    ctx = ssl.create_default_context(cafile=s["ca_file"])
    assert (
        round_trip(s["host"], s["port"], tls=ctx, username=s["username"], password=s["password"]) is not None
    )
    code, _, err = run.stop(signal.SIGINT)
    assert code == 0, err

    (secure / "ca.key").write_bytes(b"garbage\n")
    r = cli("broker", "--secure", str(secure), "--port", "0", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == (
        f"litefleet: error: {secure / 'ca.key'} is not a PEM private key; restore it from a backup\n"
    )


def test_secure_options_need_secure(tmp_path: Path) -> None:
    r = cli("broker", "--san", "hub.local", "--port", "0", cwd=tmp_path)
    assert r.returncode == 2 and "--secure" in r.stderr


def test_free_ports_come_from_below_the_ephemeral_range() -> None:
    """Outgoing connections never take them between the pick and the bind that uses them."""
    from converter.broker.mosquitto import LOWEST_PICKED_PORT, ephemeral_ports

    low, high = ephemeral_ports()
    assert 1024 < low < high
    ports = [free_port() for _ in range(50)]
    assert all(LOWEST_PICKED_PORT <= p < low for p in ports), ports
    assert len(set(ports)) > 40, ports  # spread, so two pickers seldom meet
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))  # free indeed


def test_a_port_is_handed_out_once_though_nothing_bound_it_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ports picked for 20 agents before any of them binds: a picker that draws the same
    number twice must not give that port twice (it did: an agent's REST port "in use")."""
    import random

    from converter.broker import mosquitto

    drawn = random.Random(7)
    first = free_port()
    picks = iter([first, first, first])

    class Picker:
        def randrange(self, low: int, high: int) -> int:
            return next(picks, None) or drawn.randrange(low, high)

    monkeypatch.setattr(mosquitto, "_picker", Picker())
    again = [free_port() for _ in range(3)]
    assert first not in again and len(set(again)) == 3, (first, again)
