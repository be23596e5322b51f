"""``systemd/install.sh`` on a Raspberry Pi's userland, as far as emulation allows.

The script runs on the host with ``--root`` pointing at a throwaway copy of the arm64 (Pi 4)
rootfs and ``--python`` at that rootfs's own ``python3.11`` (its qemu trampoline), so the
venv is made by the Pi's Python (Debian's ``python3.11-venv``: ensurepip with Debian's pip
23.0.1) and pip, running emulated, installs litefleet and the aarch64 wheels offline from
the userland's wheel cache. systemd itself is not there (``--no-systemctl``); what the unit
would start, the venv's ``litefleet-agent``, is run and must serve a model.

Emulation limits, and what is done about them:
- the script's own commands (``sh``, ``uname``, ``getconf``, ``install``...) are the host's:
  qemu runs any exec'd program natively, so ``uname -m`` says ``x86_64``. The machine is given
  with ``LITEFLEET_UNAME_M``/``LITEFLEET_USERLAND_BITS``, which install.sh reads for this;
- qemu's ``-L`` redirects only paths that exist in the rootfs: a file the guest creates under
  ``/var/lib/litefleet`` would land in the host's ``/var/lib/litefleet``. The installed agent
  therefore gets ``--state-dir`` (a flag over its installed ``agent.toml``);
- the venv's ``bin/python`` links to the trampoline (a host script), where a Pi's would link
  to ``/usr/bin/python3.11``, and paths are the copy's host paths, not ``/opt/litefleet``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.service.config import load_config
from converter.broker.mosquitto import free_port
from tests.support.harness import FleetWatcher, must

from .emulated_agent import Rest
from .userland import REPO_ROOT, Userland

pytestmark = pytest.mark.pi

INSTALL = REPO_ROOT / "systemd" / "install.sh"
UNIT = REPO_ROOT / "systemd" / "litefleet-agent.service"
PREFIX = "opt/litefleet"


def build_wheel(dest: Path) -> Path:
    """litefleet as a wheel, built offline on the host from a copy of the sources (the
    working tree is shared: no build/ or egg-info is written into it)."""
    src = dest / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, src / name)
    for package in ("agent", "converter"):
        shutil.copytree(REPO_ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "-w",
            str(dest / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (dest / "dist").glob("litefleet-*.whl")
    return wheel


def host_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment for install.sh and the programs it starts (nothing of the host's
    Python settings reaches the emulated one)."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "PYTHONNOUSERSITE": "1",
        "PIP_NO_CACHE_DIR": "1",
        **extra,
    }


def install(
    pi: Userland, env: dict[str, str], *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = [
        "sh",
        str(INSTALL),
        "--root",
        str(pi.root),
        "--no-systemctl",
        "--python",
        str(pi.root / "usr/bin/python3.11-qemu"),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def layout(root: Path) -> dict[str, tuple[int, str]]:
    """What install.sh wrote outside the venv: mode and content hash per path."""
    out: dict[str, tuple[int, str]] = {}
    for top in ("etc/litefleet", "etc/systemd/system/litefleet-agent.service", "var/lib/litefleet"):
        base = root / top
        for p in [base, *sorted(base.rglob("*"))] if base.is_dir() else [base]:
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            out[str(p.relative_to(root))] = (stat.S_IMODE(p.stat().st_mode), digest)
    return out


_VENV_PROBE = r"""
import importlib.metadata as md, json, platform, sys
import agent, ai_edge_litert.interpreter, numpy
dists = {}
for d in ("litefleet", "ai-edge-litert", "numpy", "paho-mqtt", "tuf", "tflite-runtime", "tensorflow"):
    try:
        dists[d] = md.version(d)
    except md.PackageNotFoundError:
        pass
print(json.dumps({"machine": platform.machine(), "prefix": sys.prefix, "agent": agent.__file__,
                  "numpy": numpy.__file__, "path": sys.path, "dists": dists}))
"""


def test_install_sh_makes_a_working_agent_venv_in_the_arm64_userland(
    arm64_userland: Userland,
    broker: Any,
    digits_int8: Any,
    tmp_path: Path,
) -> None:
    wheel = build_wheel(tmp_path / "wheel")
    pi = arm64_userland.scratch_copy(tmp_path / "pi")
    try:
        _install_use_reinstall_uninstall(pi, arm64_userland, broker, digits_int8, wheel, tmp_path)
    finally:
        shutil.rmtree(tmp_path / "pi", ignore_errors=True)  # a 150 MB venv
    # the cached userland the other tests use is untouched
    assert not (arm64_userland.root / PREFIX).exists()
    assert not (arm64_userland.root / "etc/litefleet").exists()


def _install_use_reinstall_uninstall(
    pi: Userland, cached: Userland, broker: Any, digits_int8: Any, wheel: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    env = host_env(tmp_path / "home", LITEFLEET_UNAME_M="aarch64", LITEFLEET_USERLAND_BITS="64")
    args = [
        "--source",
        str(wheel),
        "--pip-args",
        f"--no-index --find-links {cached.home / 'wheels'}",
        "--device-id",
        "pi-installed",
        "--broker",
        broker.url,
        "--trusted-root",
        str(repo / "root.json"),
    ]

    first = install(pi, env, *args)
    assert "machine aarch64: runtime ai-edge-litert" in first.stdout

    # the venv: made by the Pi's python3.11, holding exactly the pinned aarch64 wheels
    venv = pi.root / PREFIX / "venv"
    lines = (venv / "pyvenv.cfg").read_text().splitlines()
    cfg = dict(line.split(" = ", 1) for line in lines if " = " in line)
    assert cfg["version"].startswith("3.11.") and cfg["include-system-site-packages"] == "false"
    probe = subprocess.run(
        [str(venv / "bin/python"), "-c", _VENV_PROBE],
        env=host_env(tmp_path / "home"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    pins = dict(pin.split("==") for pin in cached.spec.wheels)
    assert info["machine"] == "aarch64"
    assert info["prefix"] == str(venv)
    site = str(venv / "lib/python3.11/site-packages")
    assert info["agent"].startswith(site) and info["numpy"].startswith(site)
    assert not any("dist-packages" in p for p in info["path"])  # nothing of the system's
    assert info["dists"] == {
        "litefleet": "0.1.0",
        "ai-edge-litert": pins["ai-edge-litert"],
        "numpy": pins["numpy"],
        "paho-mqtt": pins["paho-mqtt"],
        "tuf": pins["tuf"],
    }

    # the files it writes, with their modes
    files = layout(pi.root)
    assert files["etc/litefleet"][0] == 0o755
    assert files["etc/litefleet/credentials"][0] == 0o700
    assert files["var/lib/litefleet"][0] == 0o700
    assert files["etc/litefleet/agent.toml"][0] == 0o640
    trusted = hashlib.sha256((repo / "root.json").read_bytes()).hexdigest()
    assert files["etc/litefleet/root.json"] == (0o644, trusted)
    unit = (pi.root / "etc/systemd/system/litefleet-agent.service").read_text()
    assert unit == UNIT.read_text()
    assert f"ExecStart=/{PREFIX}/venv/bin/litefleet-agent run --config /etc/litefleet/agent.toml" in unit
    assert (venv / "bin/litefleet-agent").exists()
    conf = load_config(pi.root / "etc/litefleet/agent.toml")
    assert (conf.device_id, conf.broker, str(conf.state_dir), str(conf.trusted_root)) == (
        "pi-installed",
        broker.url,
        "/var/lib/litefleet",
        "/etc/litefleet/root.json",
    )

    # what the unit would run: the venv's litefleet-agent with the installed agent.toml
    # (its trusted root read at /etc/litefleet/root.json inside the userland)
    _run_installed_agent(pi, venv, repo, broker, digits_int8, tmp_path)

    # again: nothing changes (the operator's edit to agent.toml survives), pip finds it all there
    toml = pi.root / "etc/litefleet/agent.toml"
    toml.write_text(toml.read_text().replace("threads = 1", "threads = 2"))
    before = layout(pi.root)
    dists = sorted(p.name for p in (venv / "lib/python3.11/site-packages").glob("*.dist-info"))
    second = install(pi, env, *args)
    assert "venv /opt/litefleet/venv exists" in second.stdout
    assert "kept the existing /etc/litefleet/agent.toml" in second.stdout
    assert "litefleet is already installed with the same version" in second.stdout + second.stderr
    assert layout(pi.root) == before
    assert sorted(p.name for p in (venv / "lib/python3.11/site-packages").glob("*.dist-info")) == dists
    assert load_config(toml).threads == 2

    # uninstall keeps configuration and state; --purge removes them
    install(pi, env, "--uninstall")
    assert not (pi.root / PREFIX).exists()
    assert not (pi.root / "etc/systemd/system/litefleet-agent.service").exists()
    assert toml.exists() and (pi.root / "var/lib/litefleet").is_dir()
    install(pi, env, "--uninstall", "--purge")
    assert not (pi.root / "etc/litefleet").exists() and not (pi.root / "var/lib/litefleet").exists()
    assert (pi.root / "usr/bin/python3.11").exists()  # the system's Python stays


def _run_installed_agent(
    pi: Userland, venv: Path, repo: Path, broker: Any, digits_int8: Any, tmp_path: Path
) -> None:
    must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits", "--broker", broker.url)
    port = free_port()
    log_path = tmp_path / "installed-agent.log"
    watch = FleetWatcher(broker.port)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                str(venv / "bin/litefleet-agent"),
                "run",
                "--config",
                str(pi.root / "etc/litefleet/agent.toml"),
                # a new file under /var/lib/litefleet would be created on the host (qemu -L)
                "--state-dir",
                str(tmp_path / "installed-state"),
                "--http",
                f"127.0.0.1:{port}",
            ],
            env=host_env(tmp_path / "home"),
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    rest = None
    try:
        watch.wait_for(
            lambda: (
                watch.active("pi-installed") == ("digits", "1")
                or proc.poll() is not None
                or any(e["event"] == "rejected" for e in watch.events_of("pi-installed"))
            ),
            300,
            "the installed agent to serve digits v1",
        )
        assert watch.active("pi-installed") == ("digits", "1"), log_path.read_text()[-3000:]
        rest = Rest(port)
        with np.load(digits_int8.golden) as golden:
            codes, want = golden["input_0"], golden["output_0"]
        got = rest.predict_npy("digits", codes)
        np.testing.assert_array_equal(got, want)  # arm64 LiteRT == the host LiteRT that made them
    finally:
        if rest is not None:
            rest.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        watch.close()
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    assert "Traceback" not in log_path.read_text()
    assert (tmp_path / "installed-state/state.json").exists()


def test_install_sh_on_32_bit_pi_os_picks_tflite_runtime_and_needs_python3_venv(
    armhf_userland: Userland,
    tmp_path: Path,
) -> None:
    """The armhf userland has no python3.11-venv (a Raspberry Pi OS Lite install may lack it):
    with ``--root`` the script may not apt-get it, so it stops and says what to install,
    having picked tflite-runtime and checked the Pi's Python is one tflite-runtime has wheels for."""
    pi = armhf_userland.scratch_copy(tmp_path / "pi")
    env = host_env(tmp_path / "home", LITEFLEET_UNAME_M="armv7l")
    proc = install(pi, env, "--source", "litefleet", check=False)
    assert "machine armv7l: runtime tflite-runtime" in proc.stdout
    assert proc.returncode == 1
    assert "cannot make virtual environments (apt-get install -y python3-venv)" in proc.stderr
    # it stopped before writing anything
    assert not (pi.root / PREFIX).exists() and not (pi.root / "etc/litefleet").exists()
