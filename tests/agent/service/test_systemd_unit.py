"""The systemd unit (hardening score, the settings the agent relies on) and
install.sh run for real in a temporary root (no pip, no systemctl)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.service.config import load_config

REPO = Path(__file__).resolve().parents[3]
UNIT = REPO / "systemd" / "litefleet-agent.service"
INSTALL = REPO / "systemd" / "install.sh"


def unit_settings() -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values (a key may repeat, as systemd allows)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_unit_has_the_lifecycle_the_agent_relies_on() -> None:
    s = unit_settings()
    svc, unit = s["Service"], s["Unit"]
    assert svc["Type"] == ["notify"] and svc["NotifyAccess"] == ["main"]
    assert svc["Restart"] == ["on-failure"]
    assert re.fullmatch(r"\d+s", svc["WatchdogSec"][0])
    assert "StartLimitIntervalSec" in unit and "StartLimitBurst" in unit
    assert svc["LoadCredential"] == ["litefleet:/etc/litefleet/credentials"]
    agent_bin = "/opt/litefleet/venv/bin/litefleet-agent"
    assert svc["ExecStart"] == [f"{agent_bin} run --config /etc/litefleet/agent.toml"]
    assert svc["StateDirectory"] == ["litefleet"] and svc["User"] == ["litefleet"]
    assert "ProcSubset" not in svc  # LiteRT needs /proc/cpuinfo, the metrics /proc/stat


def test_hardening_exposure_is_at_most_2_5() -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    out = subprocess.run(
        [tool, "security", "--offline=true", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert match, out.stdout + out.stderr
    assert float(match.group(1)) <= 2.5


def test_litert_runs_under_memory_deny_write_execute(request: pytest.FixtureRequest) -> None:
    """The unit sets MemoryDenyWriteExecute=yes; the kernel's PR_SET_MDWE is the same rule."""
    code = r"""
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(77)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit(3)  # the rule is not in force: the test would prove nothing
except OSError:
    pass
import numpy as np
from agent.serving.runtime import load_interpreter
from agent.serving.inference import ModelRunner
runner = ModelRunner(load_interpreter(sys.argv[1], threads=2))
print(runner.predict(np.zeros((2, 8, 8, 1), np.float32))[0].shape)
"""
    from tests.support.tiny_models import models_for

    models = models_for(request)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(models.int8)], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    if proc.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "(2, 10)"


# -- install.sh in a temporary root ------------------------------------------------------------
def install(
    root: Path, *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = ["sh", str(INSTALL), "--root", str(root), "--python", sys.executable, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder outside the venv with its mode and content hash."""
    out: dict[str, tuple[int, str]] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if rel.startswith("opt/litefleet/venv/"):
            continue
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        out[rel] = (stat.S_IMODE(p.stat().st_mode), digest)
    return out


def test_install_creates_the_layout_and_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    trusted = tmp_path / "root.json"
    trusted.write_text('{"signed": {}}')
    first = install(
        root,
        "--no-pip",
        "--no-systemctl",
        "--device-id",
        "pi-7",
        "--broker",
        "mqtt://hub.local:1883",
        "--trusted-root",
        str(trusted),
    )
    layout = tree(root)
    for folder, mode in (
        ("etc/litefleet", 0o755),
        ("etc/litefleet/credentials", 0o700),
        ("var/lib/litefleet", 0o700),
    ):
        assert layout[folder][0] == mode, folder
    assert layout["etc/litefleet/agent.toml"][0] == 0o640
    assert (root / "opt/litefleet/venv/bin/python").exists()
    assert (root / "etc/systemd/system/litefleet-agent.service").read_text() == UNIT.read_text()
    assert (root / "etc/litefleet/root.json").read_text() == trusted.read_text()
    assert "machine" in first.stdout
    cfg = load_config(root / "etc/litefleet/agent.toml")  # the template passes the strict loader
    assert (cfg.device_id, cfg.broker, str(cfg.state_dir)) == (
        "pi-7",
        "mqtt://hub.local:1883",
        "/var/lib/litefleet",
    )
    # again: nothing changes, and the operator's edits survive
    conf = root / "etc/litefleet/agent.toml"
    conf.write_text(conf.read_text().replace("threads = 1", "threads = 4"))
    edited = tree(root)
    second = install(root, "--no-pip", "--no-systemctl")
    assert tree(root) == edited
    assert "kept the existing /etc/litefleet/agent.toml" in second.stdout
    # a changed option is applied and said, an unchanged one said to be kept; edits survive
    third = install(
        root, "--no-pip", "--no-systemctl", "--device-id", "pi-8", "--broker", "mqtt://hub.local:1883"
    )
    assert "agent.toml: device_id changed: pi-7 -> pi-8" in third.stdout
    assert "agent.toml: broker kept (mqtt://hub.local:1883)" in third.stdout
    cfg = load_config(conf)
    assert (cfg.device_id, cfg.threads) == ("pi-8", 4)
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640
    other_root = tmp_path / "other.json"
    other_root.write_text('{"signed": {"version": 2}}')
    fourth = install(root, "--no-pip", "--no-systemctl", "--trusted-root", str(other_root))
    assert "kept the existing /etc/litefleet/root.json" in fourth.stdout
    assert (root / "etc/litefleet/root.json").read_text() == trusted.read_text()


def test_install_picks_the_runtime_for_the_machine(tmp_path: Path) -> None:
    def lines(machine: str, bits: str = "64") -> list[str]:
        out = install(
            tmp_path / f"{machine}-{bits}",
            "--dry-run",
            "--no-systemctl",
            "--device-id",
            "pi-1",
            env={"LITEFLEET_UNAME_M": machine, "LITEFLEET_USERLAND_BITS": bits},
        ).stdout
        return out.splitlines()

    def pip_line(machine: str, bits: str = "64") -> str:
        return next(line for line in lines(machine, bits) if "pip install" in line)

    def venv_line(machine: str, bits: str = "64") -> str:
        return next(line for line in lines(machine, bits) if " -m venv " in line)

    assert pip_line("x86_64").endswith(" ai-edge-litert")
    assert pip_line("aarch64").endswith(" ai-edge-litert")
    assert "--system-site-packages" not in venv_line("aarch64")
    # 32-bit ARM: tflite-runtime, with Debian's numpy seen through the venv
    # (PyPI has no armv7 numpy wheels)
    for machine, bits in (("armv7l", "32"), ("aarch64", "32")):
        assert pip_line(machine, bits).endswith(" tflite-runtime")
        assert "--system-site-packages" in venv_line(machine, bits)
    assert f"pip install --upgrade --disable-pip-version-check {REPO}" in pip_line("x86_64")
    bad = install(
        tmp_path / "mips", "--dry-run", "--no-systemctl", env={"LITEFLEET_UNAME_M": "mips"}, check=False
    )
    assert bad.returncode == 1 and "no LiteRT runtime is known for mips" in bad.stderr


def test_armv6_is_refused_in_one_line_before_anything_is_written(tmp_path: Path) -> None:
    bad = install(
        tmp_path / "root", "--no-pip", "--device-id", "pi-0", env={"LITEFLEET_UNAME_M": "armv6l"}, check=False
    )
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == [
        "litefleet install: error: ARMv6 (armv6l: Raspberry Pi 1, Zero, Zero W) is not supported: "
        "no LiteRT build exists for it"
    ]
    assert not (tmp_path / "root").exists()


def test_install_drives_systemctl_and_starts_only_with_a_trusted_root(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "systemctl.log"
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    root = tmp_path / "root"
    first = install(root, "--no-pip", "--device-id", "pi-1", env=env)
    assert log.read_text().splitlines() == ["daemon-reload", "enable litefleet-agent.service"]
    assert "installed, not started: missing trusted_root /etc/litefleet/root.json" in first.stdout
    (root / "etc/litefleet/root.json").write_text("{}")
    install(root, "--no-pip", env=env)
    assert log.read_text().splitlines()[-1] == "restart litefleet-agent.service"
    install(root, "--uninstall", env=env)
    assert "disable --now litefleet-agent.service" in log.read_text()


def test_uninstall_keeps_configuration_and_purge_removes_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    install(root, "--no-pip", "--no-systemctl", "--device-id", "pi-1")
    (root / "var/lib/litefleet/state.json").write_text("{}")
    install(root, "--uninstall", "--no-systemctl")
    assert not (root / "opt/litefleet").exists()
    assert not (root / "etc/systemd/system/litefleet-agent.service").exists()
    assert (root / "etc/litefleet/agent.toml").exists() and (root / "var/lib/litefleet/state.json").exists()
    install(root, "--uninstall", "--purge", "--no-systemctl")
    assert not (root / "etc/litefleet").exists() and not (root / "var/lib/litefleet").exists()


def test_install_refuses_nonsense(tmp_path: Path) -> None:
    bad = install(tmp_path, "--prefix", "/usr", check=False)
    assert bad.returncode == 2 and "--prefix" in bad.stderr
    bad = install(tmp_path / "r", "--no-pip", check=False)  # no device id, no bundle, no config
    assert bad.returncode == 2 and "give --device-id ID or --credentials DIR" in bad.stderr
    assert "raspberrypi" in bad.stderr and not (tmp_path / "r").exists()
    bad = install(tmp_path / "r", "--no-pip", "--device-id", "pi 1", check=False)
    assert bad.returncode == 2 and "device id 'pi 1'" in bad.stderr
    bad = install(tmp_path, "--frobnicate", check=False)
    assert bad.returncode == 2 and "unknown option --frobnicate" in bad.stderr
    assert subprocess.run(["sh", "-n", str(INSTALL)]).returncode == 0


def test_help_prints_the_usage_with_every_option(tmp_path: Path) -> None:
    out = subprocess.run(["sh", str(INSTALL), "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("Usage: sudo install.sh [OPTIONS]")
    parsed = set(re.findall(r"^\s+(--[a-z-]+)(?:\|-h\|--help)?\)", INSTALL.read_text(), re.M))
    assert len(parsed) >= 18, parsed
    documented = set(re.findall(r"^\s+(--[a-z-]+)", out, re.M))
    assert parsed <= documented, parsed - documented
    assert "set -eu" not in out  # the usage, not the script's own lines


def device_bundle(tmp_path: Path, device_id: str, *, password: bool = False, renew: bool = False) -> Path:
    """What `litefleet device add ID --secure DIR --bundle OUT --trusted-root root.json` writes."""
    from tests.support.harness import must

    secure, repo = tmp_path / "broker", tmp_path / "repo"
    if not repo.exists():
        must("repo", "init", str(repo))
    out = tmp_path / f"bundle-{device_id}-{'pw' if password else 'cert'}{'-renew' if renew else ''}"
    args = ["device", "add", device_id, "--secure", str(secure), "--bundle", str(out)]
    args += ["--trusted-root", str(repo / "root.json")]
    must(*args, *(["--password"] if password else []), *(["--renew"] if renew else []))
    return out


def test_a_credentials_bundle_makes_a_tls_complete_install(tmp_path: Path) -> None:
    bundle = device_bundle(tmp_path, "pi-tls")
    assert sorted(p.name for p in (bundle / "credentials").iterdir()) == [
        "ca.pem",
        "client.key",
        "client.pem",
    ]
    root = tmp_path / "root"
    first = install(root, "--no-pip", "--no-systemctl", "--credentials", str(bundle))
    creds = root / "etc/litefleet/credentials"
    for name in ("ca.pem", "client.key", "client.pem"):
        assert (creds / name).read_bytes() == (bundle / "credentials" / name).read_bytes()
        assert stat.S_IMODE((creds / name).stat().st_mode) == 0o600
        assert f"credential {name} added" in first.stdout
    assert (root / "etc/litefleet/root.json").read_bytes() == (bundle / "root.json").read_bytes()
    cfg = load_config(root / "etc/litefleet/agent.toml")
    assert cfg.device_id == "pi-tls" and cfg.broker_address.tls
    assert (cfg.ca_file, cfg.cert_file, cfg.key_file) == (
        "litefleet_ca.pem",
        "litefleet_client.pem",
        "litefleet_client.key",
    )
    assert "installed (systemd left alone" in first.stdout  # every file it names is there
    # the same device's identity moves to a password: the bundle replaces it whole
    pw = device_bundle(tmp_path, "pi-tls", password=True, renew=True)
    second = install(root, "--no-pip", "--no-systemctl", "--credentials", str(pw))
    assert "credential client.key removed (not in the new bundle)" in second.stdout
    assert "credential mqtt-password added" in second.stdout and "credential ca.pem kept" in second.stdout
    assert "agent.toml: cert_file removed (was litefleet_client.pem)" in second.stdout
    cfg = load_config(root / "etc/litefleet/agent.toml")
    assert (cfg.cert_file, cfg.username, cfg.password_file) == ("", "pi-tls", "litefleet_mqtt-password")
    assert sorted(p.name for p in creds.iterdir()) == ["ca.pem", "mqtt-password"]
    # a bundle for another device with a contradicting --device-id is refused before any change
    other = device_bundle(tmp_path, "pi-other")
    bad = install(
        root, "--no-pip", "--no-systemctl", "--credentials", str(other), "--device-id", "pi-x", check=False
    )
    assert bad.returncode == 2 and "differs from the bundle's device id pi-other" in bad.stderr


def test_a_site_brokers_bundle_tells_the_device_its_site(tmp_path: Path) -> None:
    """``device add`` in a site's folder (its uplink bundle copied in, as docs/sites.md says)
    writes ``site = NAME``; install.sh --credentials carries it into agent.toml, and a bundle
    without it (the device moved to a central broker) takes it out."""
    from converter.broker.secure import SecureDir
    from converter.broker.sites import CentralDir

    central = CentralDir(tmp_path / "central")
    central.ensure()
    central.add_site("north")
    SecureDir(tmp_path / "broker").ensure()
    shutil.copytree(central.site_dir("north"), tmp_path / "broker" / "uplink")
    root = tmp_path / "root"
    install(root, "--no-pip", "--no-systemctl", "--credentials", str(device_bundle(tmp_path, "pi-n1")))
    assert load_config(root / "etc/litefleet/agent.toml").site == "north"
    shutil.rmtree(tmp_path / "broker" / "uplink")
    moved = device_bundle(tmp_path, "pi-n1", renew=True)
    second = install(root, "--no-pip", "--no-systemctl", "--credentials", str(moved))
    assert "agent.toml: site removed" in second.stdout, second.stdout
    assert load_config(root / "etc/litefleet/agent.toml").site == ""


def test_a_configuration_that_cannot_connect_is_not_started(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "systemctl.log"
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "systemctl").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    bundle = device_bundle(tmp_path, "pi-half")
    (bundle / "credentials" / "client.key").unlink()  # a bundle copied without its key
    root = tmp_path / "root"
    bad = install(root, "--no-pip", "--credentials", str(bundle), env=env, check=False)
    assert bad.returncode == 2 and "names key_file 'litefleet_client.key'" in bad.stderr
    assert not (root / "etc/litefleet/agent.toml").exists()
    # installed by hand with the key missing from the credentials folder: not started
    good = device_bundle(tmp_path, "pi-half2")
    install(root, "--no-pip", "--no-start", "--credentials", str(good), env=env)
    (root / "etc/litefleet/credentials/client.key").unlink()
    out = install(root, "--no-pip", env=env).stdout
    assert (
        "installed, not started: missing key_file /etc/litefleet/credentials/client.key "
        "(credential litefleet_client.key)" in out
    )
    assert "restart" not in log.read_text()
