"""The agent under a real systemd, installed by ``systemd/install.sh`` from a wheelhouse.

One booted Debian machine per architecture serves the checks in this module in order (each
check leaves the agent active and serving, or puts it back): install, push, start, kill,
hang, crash loop, hardening, journal, reboot, upgrade and removal. amd64 takes the operator's
secure path (``device add --bundle`` then ``install.sh --credentials``); arm64, under
qemu-user, the plain one, with the test-only emulation drop-in of :mod:`tests.systemd.specs`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import close_device, open_device
from .device import DEVICE_ID, UNIT, Device
from .products import offline_wheelhouse, source_with_version

pytestmark = pytest.mark.systemd

# what the unit says (tests/agent/service/test_systemd_unit.py checks the file itself)
WATCHDOG_S, RESTART_S, START_LIMIT_BURST = 30.0, 5.0, 5


@pytest.fixture(scope="module", params=["amd64", pytest.param("arm64", marks=pytest.mark.emulated)])
def device(request: pytest.FixtureRequest, new_machine: Any) -> Iterator[Device]:
    dev = open_device(request.param, new_machine)
    try:
        # what the machine's disk holds before the agent is installed (for the purge check)
        dev.before_install = upper_files(dev)
        proc = dev.install()
        dev.install_output = proc.stdout + proc.stderr
        yield dev
    finally:
        close_device(dev)


def upper_files(dev: Device) -> set[str]:
    upper = dev.machine.upper
    return {str(p.relative_to(upper)) for p in upper.rglob("*")}


def golden(digits: Any) -> tuple[np.ndarray, np.ndarray]:
    with np.load(digits.golden) as g:
        return g["input_0"], g["output_0"]


def journal_since(dev: Device, cursor: str) -> str:
    return dev.machine.journal(UNIT, lines=2000, after=cursor)


# -- install ----------------------------------------------------------------------------------
def test_install_from_a_wheelhouse_starts_a_connected_agent(device: Device) -> None:
    """install.sh, run from the wheelhouse folder with no network, installs, enables and starts
    the agent; on amd64 from the bundle `device add --bundle` wrote (TLS, client certificate)."""
    out = device.install_output
    m = device.machine
    assert f"machine {m.spec.machine}: runtime ai-edge-litert" in out
    assert "installed litefleet 0.1.0" in out
    assert "the agent is running" in out, out
    conf = m.run(["cat", "/etc/litefleet/agent.toml"]).stdout
    assert f'device_id = "{DEVICE_ID}"' in conf
    if device.secure:
        for line in ('ca_file = "litefleet_ca.pem"', 'cert_file = "litefleet_client.pem"'):
            assert line in conf
        assert re.search(r'broker = "mqtts://10\.213\.\d+\.\d+:\d+"', conf)
        modes = m.sh("stat -c '%n %a %U' /etc/litefleet/credentials/*").stdout.split("\n")
        assert sorted(filter(None, modes)) == [
            f"/etc/litefleet/credentials/{name} 600 root" for name in ("ca.pem", "client.key", "client.pem")
        ]
    # Documentation= points at a file the install put there
    doc = device.unit("Documentation")["Documentation"]
    assert doc == "file:///opt/litefleet/docs/systemd.md"
    assert m.run(["test", "-s", "/opt/litefleet/docs/systemd.md"], check=False).returncode == 0
    shown = device.wait_active(60)
    assert device.watcher is not None
    device.watcher.wait_for(
        lambda: (device.watcher.states.get(DEVICE_ID) or {}).get("online") is True,  # type: ignore[union-attr]
        120,
        "the installed agent online on the broker",
    )
    assert shown["NRestarts"] == "0"


# -- check 2: a push from the host ------------------------------------------------------------
def test_push_activates_and_rest_answers_from_inside(device: Device, digits_int8: Any) -> None:
    device.push(digits_int8.tflite, 1)
    assert device.watcher is not None
    device.watcher.wait_active(DEVICE_ID, "digits", 1, timeout_s=300)
    x, want = golden(digits_int8)
    np.testing.assert_array_equal(device.predict(x), want)


# -- check 1: start is active only after READY=1, STATUS= names the model ---------------------
def test_start_reaches_active_after_ready_and_status_names_the_model(
    device: Device, digits_int8: Any
) -> None:
    m = device.machine
    m.systemctl("stop", UNIT)
    cursor = m.cursor()
    m.systemctl("start", UNIT, timeout=300)  # Type=notify: returns once READY=1 came
    shown = device.unit()
    assert shown["ActiveState"] == "active"
    # READY meant serving: the model answers the moment start returns
    x, want = golden(digits_int8)
    np.testing.assert_array_equal(device.predict(x), want)
    # the agent logs "ready" just before it sends READY=1, and systemd logs "Started" once it got
    # it; both go through journald's one datagram socket, so the journal's order is theirs
    entries = m.journal_json(f"_SYSTEMD_UNIT={UNIT}", after=cursor) + m.journal_json(
        "_PID=1", f"UNIT={UNIT}", after=cursor
    )
    entries.sort(key=lambda e: int(e["__MONOTONIC_TIMESTAMP"]))
    texts = [str(e.get("MESSAGE", "")) for e in entries]
    ready = next(i for i, t in enumerate(texts) if "ready " in t and "s after start" in t)
    started = next(i for i, t in enumerate(texts) if t.startswith("Started litefleet-agent.service"))
    assert ready < started, texts
    status = m.wait_unit(
        UNIT, lambda p: "connected to" in p.get("StatusText", ""), 60, "STATUS= says connected", "StatusText"
    )["StatusText"]
    assert status.startswith("serving digits v1; connected to mqtt"), status
    shown_status = m.systemctl("status", UNIT, "--no-pager", check=False).stdout
    assert f'Status: "{status}"' in shown_status


# -- check 3: SIGKILL -------------------------------------------------------------------------
def test_sigkill_restarts_serving_the_installed_model_without_downloading(
    device: Device, digits_int8: Any
) -> None:
    m = device.machine
    before = device.unit()
    models = m.sh("find /var/lib/litefleet/models -type f -printf '%p %i %T@\\n' | sort").stdout
    cursor = m.cursor()
    m.run(["kill", "-KILL", before["MainPID"]])
    after = device.wait_active(120, other_than_pid=before["MainPID"])
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    x, want = golden(digits_int8)
    np.testing.assert_array_equal(device.predict(x), want)  # at once: READY means serving
    assert m.sh("find /var/lib/litefleet/models -type f -printf '%p %i %T@\\n' | sort").stdout == models
    assert m.sh("ls -A /var/lib/litefleet/downloads").stdout == ""
    log = journal_since(device, cursor)
    assert "downloading" not in log and "activated" not in log, log
    assert "Main process exited, code=killed, status=9/KILL" in log


# -- check 4: a hung agent --------------------------------------------------------------------
def test_a_hung_agent_is_killed_by_the_watchdog_and_restarted(device: Device, digits_int8: Any) -> None:
    m = device.machine
    before = device.unit()
    cursor = m.cursor()
    m.run(["kill", "-STOP", before["MainPID"]])
    bound = WATCHDOG_S + RESTART_S + 120
    device.wait_active(bound, other_than_pid=before["MainPID"])
    log = journal_since(device, cursor)
    assert f"Watchdog timeout (limit {int(WATCHDOG_S)}s)!" in log, log
    assert "Scheduled restart job" in log, log
    x, want = golden(digits_int8)
    np.testing.assert_array_equal(device.predict(x), want)


# -- check 4b: check_isolation = "restart": a model that hangs its check costs one restart --------
def test_restart_isolation_a_model_that_hangs_its_check_costs_one_restart(
    device: Device, digits_int8: Any, tmp_path: Path
) -> None:
    """With the agent checking candidates itself, a model that never returns holds the check
    past check_timeout_s: the agent ends (status 70), Restart=on-failure starts it again, and
    that start rejects the model, reports it, and serves what served before."""
    from tests.support.harness import must
    from tests.support.models import _never_returning_model

    m = device.machine
    if m.spec.emulated:
        pytest.skip("shown on amd64: the same unit and agent code, without qemu-user's slow start")
    conf = "/etc/litefleet/agent.toml"
    hang = tmp_path / "hang.tflite"
    _never_returning_model(hang)
    m.sh(f"cp -p {conf} /root/agent.toml.good")
    m.sh(f"printf 'check_isolation = \"restart\"\\ncheck_timeout_s = 3.0\\n' >> {conf}")
    try:
        # each start counts toward StartLimitBurst= (the checks above made several): this
        # check's own restart and the one the hang costs must not meet the limit
        m.systemctl("reset-failed", UNIT, check=False)
        m.systemctl("restart", UNIT, timeout=300)
        before = device.wait_active(60)
        cursor = m.cursor()
        must(
            "push",
            str(hang),
            "--repo",
            str(device.repo),
            "--name",
            "hang",
            "--no-check-data",
            *device.broker_args(),
        )
        after = device.wait_active(3 + RESTART_S + 120, other_than_pid=before["MainPID"])
        assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
        assert device.watcher is not None
        ev = device.watcher.wait_event(DEVICE_ID, "rejected", timeout_s=120, model="hang")
        assert ev["reason"] == "crashed" and ev["version"] == 1, ev
        log = journal_since(device, cursor)
        assert "the candidate's check used more than 3 s of CPU time" in log, log
        assert "status=70/SOFTWARE" in log, log
        assert "nothing seems to start it again" not in log  # it knows it is a unit
        x, want = golden(digits_int8)
        np.testing.assert_array_equal(device.predict(x), want)  # digits v1 serves on
    finally:
        m.sh(f"mv /root/agent.toml.good {conf}")
        m.systemctl("restart", UNIT, timeout=300)
    device.wait_active(60)


# -- check 5: a crash loop ends in the start limit, one clear line per attempt -------------------
def _hung_before_exec(log: str) -> int:
    """Start attempts whose process timed out still named ``systemd``: PID 1's child hung
    between its fork and the exec of the agent, so the agent never ran. Seen once under
    qemu-user (arm64, a loaded CI machine: "Killing process 1002 (systemd) with signal
    SIGKILL" after the 120 s start timeout), never natively; each still counts toward the
    start limit."""
    timeouts = log.count("start operation timed out")
    killed_unexeced = len(re.findall(r"Killing process \d+ \(systemd\) with signal SIGKILL", log))
    return min(timeouts, killed_unexeced)


def test_a_config_error_ends_in_the_start_limit_with_one_line_per_attempt(device: Device) -> None:
    m = device.machine
    conf = "/etc/litefleet/agent.toml"
    m.sh(f"cp -p {conf} /root/agent.toml.good && echo 'frequency_hz = 5' >> {conf}")
    m.systemctl("reset-failed", UNIT, check=False)  # the kills above count toward the limit
    cursor = m.cursor()
    try:
        m.systemctl("restart", UNIT, check=False, timeout=300)
        bound = START_LIMIT_BURST * (RESTART_S + 60)
        # failed for good: no restart pending (between attempts it is activating/auto-restart)
        m.wait_unit(UNIT, lambda p: p.get("ActiveState") == "failed", bound, "the start limit", "ActiveState")
        log = journal_since(device, cursor)
        errors = [line for line in log.splitlines() if "litefleet-agent: error:" in line]
        hung = _hung_before_exec(log) if m.spec.emulated else 0
        assert hung <= 1 and len(errors) + hung == START_LIMIT_BURST, log
        assert all("unknown key(s) frequency_hz" in line for line in errors), errors
        assert "Traceback" not in log
        assert "Start request repeated too quickly" in log
    finally:
        m.sh(f"mv /root/agent.toml.good {conf}")
        m.systemctl("reset-failed", UNIT, check=False)
        m.systemctl("start", UNIT, timeout=300)
    device.wait_active(60)


# -- check 6: hardening on the live process -----------------------------------------------------
def _in_agent_namespace(device: Device, pid: str, script: str) -> str:
    """``script`` run as root in the agent's mount namespace (its view of the file system)."""
    return device.machine.run_as_seen_by(pid, ["sh", "-c", script]).stdout


def test_hardening_is_applied_to_the_live_process(device: Device) -> None:
    m = device.machine
    pid = device.unit("MainPID")["MainPID"]
    status = dict(
        line.split(":\t", 1)
        for line in m.run(["cat", f"/proc/{pid}/status"]).stdout.splitlines()
        if ":\t" in line
    )
    assert status["NoNewPrivs"].strip() == "1"
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    assert int(status["CapBnd"], 16) == 0
    assert m.run(["ps", "-o", "user=", "-p", pid]).stdout.strip() == "litefleet"
    probe = (
        "for d in /usr /etc /opt/litefleet /var/lib/litefleet /tmp; do "
        "if touch $d/.lf-probe 2>/dev/null; then rm -f $d/.lf-probe; echo $d rw; else echo $d ro; fi; done; "
        "ls -A /tmp | grep -c lf-host-side-marker || true"
    )
    m.run(["touch", "/tmp/lf-host-side-marker"])
    seen = _in_agent_namespace(device, pid, probe).split("\n")
    assert seen[:5] == ["/usr ro", "/etc ro", "/opt/litefleet ro", "/var/lib/litefleet rw", "/tmp rw"], seen
    assert seen[5] == "0", "the agent's /tmp is the system's: PrivateTmp= is not applied"
    if not m.spec.emulated:  # under emulation a test-only drop-in turns PrivateUsers= off
        assert m.run(["cat", f"/proc/{pid}/uid_map"]).stdout.split()[:3] != ["0", "0", "4294967295"]
    live = security_score(device, [UNIT])
    offline = security_score(device, ["--offline=true", f"/etc/systemd/system/{UNIT}"])
    device.scores = (live, offline)
    print(f"systemd-analyze security ({device.arch}): live {live}, offline {offline}")
    if not m.spec.emulated:
        assert abs(live - offline) <= 0.3, (live, offline)
        assert live <= 2.5


def security_score(device: Device, args: list[str]) -> float:
    out = device.machine.run(["systemd-analyze", "security", "--no-pager", *args], check=False).stdout
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert found, out[-2000:]
    return float(found.group(1))


# -- check 7: journald fields ------------------------------------------------------------------
def test_the_journal_carries_the_agents_fields_and_no_paho_chatter(device: Device) -> None:
    m = device.machine
    entries = m.journal_json(f"_SYSTEMD_UNIT={UNIT}", "LITEFLEET_EVENT=activated")
    assert entries, "no activated event with its fields in the journal"
    e = entries[-1]
    assert (e["LITEFLEET_MODEL"], e["LITEFLEET_VERSION"], e["LITEFLEET_DEVICE_ID"]) == (
        "digits",
        "1",
        DEVICE_ID,
    )
    assert e["PRIORITY"] == "6" and e["SYSLOG_IDENTIFIER"] == "litefleet-agent"
    assert "activated model=digits version=1" in e["MESSAGE"]
    every = m.journal_json(f"_SYSTEMD_UNIT={UNIT}")
    # the activation renewed the will (a disconnect and reconnect): paho's line stays below info
    chatter = [e["MESSAGE"] for e in every if "Client is not connected" in str(e.get("MESSAGE"))]
    assert not chatter, chatter


# -- check 8: reboot with the broker down ------------------------------------------------------
def test_reboots_without_the_broker_serve_offline_and_keep_the_trial(
    device: Device, digits_int8: Any
) -> None:
    m = device.machine
    assert device.watcher is not None
    device.push(digits_int8.tflite, 2)  # a new version, on trial until it has served well
    device.watcher.wait_active(DEVICE_ID, "digits", 2, timeout_s=300)
    device.broker_stop()
    x, want = golden(digits_int8)
    for _ in range(3):  # clean reboots during the trial
        state = m.reboot()
        assert state == "running", m.systemctl("--failed", "--no-legend", check=False).stdout
        shown = device.unit()
        assert shown["ActiveState"] == "active" and "waiting for the broker" in shown["StatusText"], shown
        np.testing.assert_array_equal(device.predict(x), want)
    doc = json.loads(m.run(["cat", "/var/lib/litefleet/state.json"]).stdout)
    digits = doc["models"]["digits"]
    assert digits["active"]["version"] == 2 and digits["trial_starts"] == 0, digits
    assert not digits["rejected"]
    # a daemon-reload (every apt upgrade does one) leaves the agent alone
    before = device.unit()
    cursor = m.cursor()
    m.systemctl("daemon-reload")
    after = device.unit()
    assert (after["MainPID"], after["NRestarts"], after["ActiveState"]) == (
        before["MainPID"],
        before["NRestarts"],
        "active",
    )
    assert "timed out" not in journal_since(device, cursor)
    # the broker comes back: the agent reconnects on its own
    device.broker_start()
    m.wait_unit(UNIT, lambda p: "connected to" in p.get("StatusText", ""), 120, "reconnected", "StatusText")
    device.watcher.wait_active(DEVICE_ID, "digits", 2, timeout_s=120)
    assert device.unit("MainPID")["MainPID"] == before["MainPID"]


# -- check 9: upgrade, uninstall, purge -----------------------------------------------------------
def test_upgrade_keeps_everything_and_purge_leaves_nothing(device: Device, tmp_path: Path) -> None:
    m = device.machine
    device.ensure_broker()
    # the operator makes a wheelhouse of the new release and runs its install.sh with the same options
    source = source_with_version(tmp_path / "src", "0.1.1")
    offline_wheelhouse(device.arch, device.xfer / "wheelhouse-0.1.1", m.rootfs.wheels, source=source)
    kept = "cd /etc/litefleet && sha256sum agent.toml root.json credentials/* 2>/dev/null"
    before = m.sh(kept, check=False).stdout
    state_before = json.loads(m.run(["cat", "/var/lib/litefleet/state.json"]).stdout)["models"]
    proc = device.install(installer="/media/litefleet/wheelhouse-0.1.1/systemd/install.sh")
    assert "litefleet upgraded: 0.1.0 -> 0.1.1" in proc.stdout, proc.stdout
    assert "kept the existing /etc/litefleet/agent.toml" in proc.stdout
    assert m.sh(kept, check=False).stdout == before
    device.wait_active(120)
    state_after = json.loads(m.run(["cat", "/var/lib/litefleet/state.json"]).stdout)["models"]
    assert state_after["digits"]["active"] == state_before["digits"]["active"]
    assert device.watcher is not None
    device.watcher.wait_for(
        lambda: (device.watcher.states.get(DEVICE_ID) or {}).get("agent_version") == "0.1.1",  # type: ignore[union-attr]
        120,
        "the upgraded agent's state",
    )
    # uninstall keeps configuration and state; purge removes everything the install made
    newer_install = "/media/litefleet/wheelhouse-0.1.1/systemd/install.sh"
    m.run(["sh", newer_install, "--uninstall"])
    assert m.run(["test", "-e", "/opt/litefleet"], check=False).returncode == 1
    assert m.run(["test", "-s", "/var/lib/litefleet/state.json"], check=False).returncode == 0
    assert device.unit("LoadState")["LoadState"] == "not-found"
    m.run(["sh", newer_install, "--uninstall", "--purge"])
    assert m.run(["getent", "passwd", "litefleet"], check=False).returncode == 2
    assert m.run(["getent", "group", "litefleet"], check=False).returncode == 2
    left = sorted(
        p
        for p in upper_files(device) - device.before_install
        if "litefleet" in p and not p.startswith("etc/systemd/system/litefleet-agent.service.d")
    )
    assert not left, left
    accounts = m.sh("cat /etc/passwd /etc/group /etc/shadow /etc/gshadow").stdout
    assert "litefleet" not in accounts
