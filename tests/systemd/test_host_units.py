"""Check 10: the host side as services under a real systemd, installed by systemd/install-host.sh.

The machine runs the host's own litefleet (this checkout and its venv, bound read-only at the
same paths; the venv's base Python too when it is not the system's), as an operator's host
would run the litefleet it converts and pushes with. Debian's Mosquitto is in the rootfs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from .machine import Machine
from .specs import REPO_ROOT

pytestmark = pytest.mark.systemd

LITEFLEET = str(Path(sys.executable).parent / "litefleet")
UNITS = ("litefleet-broker.service", "litefleet-monitor.service")
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
PROBE = """
import json, socket, sys, urllib.request
socket.create_connection(("127.0.0.1", 8883), 5).close()
with urllib.request.urlopen("http://127.0.0.1:9464/api/devices", timeout=5) as r:
    print(r.status, json.dumps(json.loads(r.read())))
"""


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
    m.run(["useradd", "--create-home", "--shell", "/bin/sh", "fleetop"])
    m.run(["install", "-d", "-o", "fleetop", "-g", "fleetop", "/srv/fleet"])
    m.run(["runuser", "-u", "fleetop", "--", LITEFLEET, "repo", "init", "/srv/fleet/repo"])
    return m


def timestamp_version(m: Machine) -> int:
    doc = json.loads(m.run(["cat", "/srv/fleet/repo/metadata/timestamp.json"]).stdout)
    return int(doc["signed"]["version"])


def test_host_units_start_stop_restart_and_the_timer_re_signs(host: Machine) -> None:
    m = host
    out = m.run(INSTALL_HOST, timeout=300).stdout
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
    # again, with nothing changed: said so; then removed, the data kept
    again = m.run([*INSTALL_HOST, "--no-start"]).stdout
    assert "litefleet-broker.service unchanged" in again
    m.run(["sh", f"{REPO_ROOT}/systemd/install-host.sh", "--uninstall"])
    for unit in (*UNITS, "litefleet-resign.timer"):
        assert m.show(unit, "LoadState")["LoadState"] == "not-found"
    assert m.run(["test", "-f", "/srv/fleet/broker/ca.pem"], check=False).returncode == 0
    assert m.run(["test", "-f", "/srv/fleet/repo/repo.json"], check=False).returncode == 0
