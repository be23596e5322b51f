"""Check 10: the host side as services under a real systemd, installed by systemd/install-host.sh.

The machine runs the host's own litefleet (this checkout and its venv, bound read-only at the
same paths; the venv's base Python too when it is not the system's), as an operator's host
would run the litefleet it converts and pushes with. Debian's Mosquitto is in the rootfs.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import Topics
from converter.broker.secure import SecureDir
from tests.support.harness import FleetWatcher, must
from tests.support.secure import Client, connect

from .device import INSTALL as AGENT_INSTALL
from .device import UNIT as AGENT_UNIT
from .device import SecureBrokerCli
from .machine import Machine
from .specs import REPO_ROOT

pytestmark = pytest.mark.systemd

LITEFLEET = str(Path(sys.executable).parent / "litefleet")
UNITS = ("litefleet-broker.service", "litefleet-monitor.service", "litefleet-rollout.service")
INSTALL_HOST = [
    "sh",
    f"{REPO_ROOT}/systemd/install-host.sh",
    "--litefleet",
    LITEFLEET,
    "--user",
    "fleetop",
    "--secure-dir",
    "/srv/fleet/broker",
    "--repo",
    "/srv/fleet/repo",
]
# the broker's TLS port; the monitor's page and API on --http (8080), /metrics alone on
# --prometheus (9464), which does not serve the API
PROBE = """
import json, socket, sys, urllib.error, urllib.request
socket.create_connection(("127.0.0.1", 8883), 5).close()
with urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=5) as r:
    assert r.status == 200 and b"# TYPE" in r.read()
try:
    urllib.request.urlopen("http://127.0.0.1:9464/api/devices", timeout=5)
    sys.exit("the API on the Prometheus port")
except urllib.error.HTTPError as e:
    assert e.code == 404, e.code
with urllib.request.urlopen("http://127.0.0.1:8080/api/devices", timeout=5) as r:
    print(r.status, json.dumps(json.loads(r.read())))
"""
# what a rollout is made of here: placeholder model bytes (TF Lite's identifier, nothing to
# run: no device takes part), no card (--no-check-data), every gate off
PLACEHOLDER = "import sys; open(sys.argv[1], 'wb').write(b'\\0\\0\\0\\0TFL3' + sys.argv[1].encode() * 64)"
GATES_OFF = [
    f"--gate={g}=off"
    for g in (
        "health",
        "error_rate",
        "latency_p99_ratio",
        "latency_p99_self",
        "agreement",
        "drift_js",
        "drift_baseline_js",
    )
]
BROKER_FLAGS = ["--repo", "/srv/fleet/repo", "--secure", "/srv/fleet/broker"]
SITE_DIR = "/srv/site/broker"
DEVICE = "pi-n1"
TOPICS = Topics()


@pytest.fixture(scope="module")
def host(new_machine: Any) -> Machine:
    binds = {REPO_ROOT: str(REPO_ROOT)}
    base = Path(sys.base_prefix)
    if not str(base).startswith("/usr"):  # a Python outside the system's (pyenv, a build)
        binds[base] = str(base)
    m: Machine = new_machine("amd64", binds=binds)
    for parent in (*base.parents, *REPO_ROOT.parents):  # the service user must reach them
        if str(parent) != "/":
            m.run(["chmod", "o+x", str(parent)])
    # a checkout (or its Python) under /tmp is hidden from units with PrivateTmp=yes: a
    # test-only drop-in lets them see it (a fresh clone there failed with the broker unit)
    if any(str(p).startswith(("/tmp/", "/var/tmp/")) for p in binds):
        for unit in (*UNITS, "litefleet-resign.service"):
            folder = f"/etc/systemd/system/{unit}.d"
            m.run(["install", "-d", folder])
            m.run(["sh", "-c", f"printf '[Service]\\nPrivateTmp=no\\n' > {folder}/zz-test-checkout.conf"])
    m.run(["useradd", "--create-home", "--shell", "/bin/sh", "fleetop"])
    m.run(["install", "-d", "-o", "fleetop", "-g", "fleetop", "/srv/fleet"])
    m.run(["runuser", "-u", "fleetop", "--", LITEFLEET, "repo", "init", "/srv/fleet/repo"])
    return m


@pytest.fixture(scope="module")
def installed(host: Machine) -> str:
    """install-host.sh's output: every unit installed and started."""
    return host.run(INSTALL_HOST, timeout=300).stdout


def as_operator(m: Machine, *args: str, check: bool = True) -> str:
    return m.run(["runuser", "-u", "fleetop", "--", LITEFLEET, *args], check=check, timeout=120).stdout


def rollout_status(m: Machine) -> dict[str, Any]:
    doc: list[dict[str, Any]] = json.loads(
        as_operator(m, "rollout", "status", "demo", "--repo", "/srv/fleet/repo", "--json")
    )
    return doc[0]


def wait_rollout(m: Machine, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    record: dict[str, Any] = {}

    def check(_: dict[str, str]) -> bool:
        record.update(rollout_status(m))
        return predicate(record)

    m.wait_unit("litefleet-rollout.service", check, 120, what, "ActiveState")
    return record


def timestamp_version(m: Machine) -> int:
    doc = json.loads(m.run(["cat", "/srv/fleet/repo/metadata/timestamp.json"]).stdout)
    return int(doc["signed"]["version"])


def test_host_units_start_stop_restart_and_the_timer_re_signs(host: Machine, installed: str) -> None:
    m, out = host, installed
    for unit in (*UNITS, "litefleet-resign.service", "litefleet-resign.timer"):
        assert f"{unit} installed" in out, out
    for unit in UNITS:
        shown = m.wait_unit(unit, lambda p: p.get("ActiveState") == "active", 60, "active")
        assert m.run(["ps", "-o", "user=", "-p", shown["MainPID"]]).stdout.strip() == "fleetop"
    # they do their jobs: TLS listeners up, the monitor's API answers
    probe = m.wait_unit(
        "litefleet-monitor.service",
        lambda p: m.run(["python3", "-c", PROBE], check=False).returncode == 0,
        60,
        "the broker's port and the monitor's API",
        "ActiveState",
    )
    assert probe["ActiveState"] == "active"
    assert m.run(["python3", "-c", PROBE]).stdout.startswith("200 []")
    # the timer is listed, and the service it starts re-signs and publishes
    timers = m.systemctl("list-timers", "--all", "--no-pager").stdout
    assert "litefleet-resign.timer" in timers and "litefleet-resign.service" in timers, timers
    before = timestamp_version(m)
    m.systemctl("start", "litefleet-resign.service", timeout=120)
    assert m.show("litefleet-resign.service", "Result")["Result"] == "success"
    assert timestamp_version(m) == before + 1
    assert "; published" in m.journal("litefleet-resign.service", lines=20)
    # restart (a new process), reload (the same one), stop, start
    for unit in UNITS:
        old = m.show(unit, "MainPID")["MainPID"]
        m.systemctl("restart", unit)
        m.wait_unit(
            unit,
            lambda p, old=old: p["ActiveState"] == "active" and p["MainPID"] not in ("0", old),
            60,
            "restarted",
        )
        m.systemctl("stop", unit)
        assert m.show(unit, "ActiveState")["ActiveState"] == "inactive"
        m.systemctl("start", unit)
        m.wait_unit(unit, lambda p: p["ActiveState"] == "active", 60, "started again")
    pid = m.show("litefleet-broker.service", "MainPID")["MainPID"]
    m.systemctl("reload", "litefleet-broker.service")
    assert m.show("litefleet-broker.service", "MainPID", "ActiveState") == {
        "MainPID": pid,
        "ActiveState": "active",
    }
    m.wait_unit(
        "litefleet-monitor.service",
        lambda p: m.run(["python3", "-c", PROBE], check=False).returncode == 0,
        60,
        "the monitor's API after the restarts",
        "ActiveState",
    )


def test_the_rollout_service_drives_detached_rollouts(host: Machine, installed: str) -> None:
    m = host
    # Type=notify: active only after READY=1 (sent once connected to the broker)
    shown = m.wait_unit(
        "litefleet-rollout.service",
        lambda p: p["ActiveState"] == "active" and p["StatusText"].startswith("idle"),
        60,
        "ready and idle",
    )
    assert shown["StatusText"] == "idle: no detached rollout", shown
    service_pid = int(shown["MainPID"])
    for tag in ("v1", "v2", "v3"):
        m.run(["runuser", "-u", "fleetop", "--", "python3", "-c", PLACEHOLDER, f"/srv/fleet/{tag}.tflite"])
    as_operator(m, "push", "/srv/fleet/v1.tflite", "--name", "demo", "--no-check-data", *BROKER_FLAGS)
    # a rollout that bakes for an hour: the service picks it up and drives it
    out = as_operator(
        m,
        "rollout",
        "start",
        "/srv/fleet/v2.tflite",
        "--name",
        "demo",
        "--no-check-data",
        "--detach",
        "--allow-empty",
        "--waves",
        "50,100",
        "--bake",
        "1h",
        *GATES_OFF,
        *BROKER_FLAGS,
    )
    assert "recorded rollout demo v2" in out, out
    baking = wait_rollout(m, lambda r: r["state"] == "baking" and r["driver_pid"] is not None, "v2 driven")
    assert baking["detached"] is True and len(baking["steps"]) == 1, baking
    assert baking["driver_pid"] == service_pid, (baking, shown)  # its lock: the service's PID
    m.wait_unit(
        "litefleet-rollout.service",
        lambda p: p["StatusText"] == "driving: demo baking",
        30,
        "its status names the rollout",
    )
    # abort: the service applies it (signs v2 out) and the record says so
    out = as_operator(m, "rollout", "abort", "demo", *BROKER_FLAGS)
    assert "aborted: aborted by the operator" in out, out
    aborted = rollout_status(m)
    assert aborted["state"] == "aborted" and aborted["driver_pid"] is None, aborted
    # it lets the ended rollout go (its lock too: the next start of demo is not refused)
    m.wait_unit(
        "litefleet-rollout.service",
        lambda p: p["StatusText"] == "idle: no detached rollout",
        30,
        "the aborted rollout let go",
    )
    # a short bake with every gate off: promoted through both waves by the service
    as_operator(
        m,
        "rollout",
        "start",
        "/srv/fleet/v3.tflite",
        "--name",
        "demo",
        "--no-check-data",
        "--detach",
        "--allow-empty",
        "--waves",
        "50,100",
        "--bake",
        "1s",
        *GATES_OFF,
        *BROKER_FLAGS,
    )
    done = wait_rollout(m, lambda r: r["state"] in ("promoted", "aborted"), "v3 finished")
    assert done["state"] == "promoted" and done["version"] == 3, done
    assert [s["wave"] for s in done["steps"]] == [0, 1], done  # each wave signed once
    repo = json.loads(as_operator(m, "repo", "show", "/srv/fleet/repo", "--json"))
    assert repo["targets_version"] == done["steps"][-1]["targets_version"], (repo, done)
    # the promoted rollout is let go too; the same process drove all of it
    shown = m.wait_unit(
        "litefleet-rollout.service",
        lambda p: p["StatusText"] == "idle: no detached rollout",
        60,
        "idle again",
        "ActiveState",
        "MainPID",
        "NRestarts",
        "StatusText",
    )
    assert shown["ActiveState"] == "active" and shown["NRestarts"] == "0", shown
    assert int(shown["MainPID"]) == service_pid


def test_a_second_run_says_unchanged_and_uninstall_keeps_the_data(host: Machine, installed: str) -> None:
    m = host
    # again, with nothing changed: said so; then removed, the data kept
    again = m.run([*INSTALL_HOST, "--no-start"]).stdout
    assert "litefleet-broker.service unchanged" in again
    m.run(["sh", f"{REPO_ROOT}/systemd/install-host.sh", "--uninstall"])
    for unit in (*UNITS, "litefleet-resign.timer"):
        assert m.show(unit, "LoadState")["LoadState"] == "not-found"
    assert m.run(["test", "-f", "/srv/fleet/broker/ca.pem"], check=False).returncode == 0
    assert m.run(["test", "-f", "/srv/fleet/repo/repo.json"], check=False).returncode == 0


def latest(client: Client, topic: str) -> bytes | None:
    with client.new_message:
        got = [m.payload for m in client.messages if m.topic == topic]
    return got[-1] if got else None


def wait_latest(client: Client, topic: str, payload: bytes, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    with client.new_message:
        while True:
            got = [m.payload for m in client.messages if m.topic == topic]
            if got and got[-1] == payload:
                return
            left = deadline - time.monotonic()
            assert left > 0, f"timed out after {timeout_s:g} s waiting for {what}: {topic} said {got[-5:]}"
            client.new_message.wait(left)


def test_the_same_host_made_a_site_host_bridges_its_devices_to_central(
    host: Machine, tmp_path: Path, digits_int8: Any
) -> None:
    """docs/sites.md as an operator does it, under the real systemd: central (``litefleet
    broker --secure``, ``site add``, ``device add --site``) on this side of the link; the
    machine (in file order central's host until the test before uninstalled it) becomes site
    north's host by ``install-host.sh --upstream`` (the uplink bundle copied in) and one of
    its devices by ``install.sh --credentials`` with the bundle of the site's own ``device
    add`` (which says ``site = "north"``). A push made at central reaches the agent through
    the site broker's bridge, again after ``systemctl restart`` of the site broker; stopping
    the site broker tells central the site's uplink is down."""
    m = host
    central_dir = tmp_path / "central"
    central = SecureBrokerCli(central_dir, m.link.host_ip, tmp_path / "central.log")
    central.start()
    watch: FleetWatcher | None = None
    tap: Client | None = None
    try:
        must("site", "add", "north", "--secure", str(central_dir))
        must("device", "add", DEVICE, "--site", "north", "--secure", str(central_dir))
        repo = tmp_path / "repo"
        must("repo", "init", str(repo))
        # the bundle `site add` wrote, copied to the site host as SITE_DIR/uplink (0700),
        # and the repository's root for the device's bundle
        m.run(["install", "-d", "-o", "fleetop", "-g", "fleetop", "-m", "0700", "/srv/site", SITE_DIR])
        shutil.copytree(central_dir / "sites" / "north", m.path(f"{SITE_DIR}/uplink"))
        shutil.copyfile(repo / "root.json", m.path("/srv/site/root.json"))
        upstream = f"mqtts://{m.link.host_ip}:{SecureDir(central_dir).load().ports.cert}"
        site_host = [*INSTALL_HOST[:2], "--litefleet", LITEFLEET, "--user", "fleetop",
                     "--secure-dir", SITE_DIR, "--upstream", upstream, "--bind", "0.0.0.0"]  # fmt: skip
        # copied as root: the service user could not read its keys, so it is refused up front
        refused = m.run(site_host, check=False)
        assert refused.returncode == 2 and "chown -R fleetop" in refused.stderr, refused.stderr
        m.run(["chown", "-R", "fleetop:fleetop", f"{SITE_DIR}/uplink", "/srv/site/root.json"])
        m.run(["chmod", "0700", f"{SITE_DIR}/uplink"])
        bundle = f"/srv/site/{DEVICE}"
        as_operator(m, "device", "add", DEVICE, "--secure", SITE_DIR, "--bundle", bundle,
                    "--trusted-root", "/srv/site/root.json")  # fmt: skip
        # the machine runs central's units again (the test before uninstalled them) ...
        assert "running: litefleet-broker.service" in m.run(INSTALL_HOST, timeout=300).stdout
        m.wait_unit("litefleet-monitor.service", lambda p: p["ActiveState"] == "active", 60, "active")
        # ... and is made the site's host: central's other units go
        out = m.run(site_host, timeout=300).stdout
        assert "litefleet-broker.service updated" in out, out
        assert out.splitlines()[-1] == "litefleet install-host: running: litefleet-broker.service", out
        for gone in (*UNITS[1:], "litefleet-resign.service", "litefleet-resign.timer"):
            assert f"removed {gone} (not part of this host any more)" in out, out
            assert m.show(gone, "LoadState", "ActiveState") == {
                "LoadState": "not-found",
                "ActiveState": "inactive",
            }
        assert m.run(["pgrep", "-f", "litefleet monitor"], check=False).returncode == 1
        unit = "litefleet-broker.service"
        first = m.wait_unit(unit, lambda p: p["ActiveState"] == "active", 60, "active")
        # central hears the bridge: its retained word for site north is 1
        settings = SecureDir(central_dir).host_client_settings()
        tap = connect(
            settings["port"],
            ca=Path(settings["ca_file"]),
            username=settings["username"],
            password=settings["password"],
            client_id=f"{settings['client_id_prefix']}t-site",
            host=settings["host"],
        )
        word = TOPICS.site("north", "bridge")
        tap.subscribe(word)
        wait_latest(tap, word, b"1", 60, "site north's bridge up")
        # the site broker's Mosquitto runs as the operator, in the unit's cgroup
        assert m.run(["ps", "-o", "user=", "-C", "mosquitto"]).stdout.split() == ["fleetop"]
        # the device: install.sh carries the bundle's site into agent.toml
        installed = m.run(["sh", AGENT_INSTALL, "--credentials", bundle], timeout=900).stdout
        said = tomllib.loads(m.run(["cat", "/etc/litefleet/agent.toml"]).stdout)
        assert said["site"] == "north" and said["broker"].startswith("mqtts://localhost:"), (said, installed)
        m.wait_unit(AGENT_UNIT, lambda p: p["ActiveState"] == "active", 120, "the agent active")
        watch = FleetWatcher(secure_dir=central_dir)
        push = ["--repo", str(repo), "--name", "digits", "--secure-dir", str(central_dir)]
        must("push", str(digits_int8.tflite), "--version", "1", *push)
        watch.wait_active(DEVICE, "digits", 1, timeout_s=120)
        assert watch.states[DEVICE]["site"] == "north", watch.states[DEVICE]
        # the site broker restarted (a new process): bridge and device come back, the next push lands
        m.systemctl("restart", unit)
        m.wait_unit(
            unit,
            lambda p: p["ActiveState"] == "active" and p["MainPID"] not in ("0", first["MainPID"]),
            60,
            "restarted",
        )
        must("push", str(digits_int8.tflite), "--version", "2", *push)
        watch.wait_active(DEVICE, "digits", 2, timeout_s=120)
        wait_latest(tap, word, b"1", 60, "site north's bridge up after the restart")
        # stopped: no Mosquitto left running, and central learns that the uplink is down
        m.systemctl("stop", unit)
        assert m.run(["pgrep", "-c", "mosquitto"], check=False).stdout.strip() == "0"
        wait_latest(tap, word, b"0", 60, "site north's bridge down")
        m.run(["sh", AGENT_INSTALL, "--uninstall", "--purge"], timeout=300)
        m.run(["sh", f"{REPO_ROOT}/systemd/install-host.sh", "--uninstall"])
        assert m.show(unit, "LoadState")["LoadState"] == "not-found"
    finally:
        for c in (watch, tap):
            if c is not None:
                c.close()
        central.stop()
