"""A device and its operator: the agent installed in a booted :class:`.machine.Machine` by
``systemd/install.sh`` from a wheelhouse, and the host side (broker, repository, a watcher)
on the host end of the machine's link.

amd64 goes the operator's secure path: ``litefleet broker --secure`` (the real CLI, as a host
process bound to the link's address), ``litefleet device add ID --bundle``, and
``install.sh --credentials BUNDLE`` (TLS with a client certificate, secrets through
``LoadCredential=``). arm64 under emulation cannot load credentials (see :mod:`.specs`), so it
uses a plain broker on the link and ``install.sh --device-id --broker --trusted-root``.
"""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converter.broker.mosquitto import BrokerConfig, BrokerProcess, wait_for_port
from tests.support.harness import FleetWatcher, must

from .machine import Machine

UNIT = "litefleet-agent.service"
INSTALL = "/media/wheelhouse/systemd/install.sh"
DEVICE_ID = "pi-systemd"
GUEST_REST = Path(__file__).with_name("guest_rest.py")


class SecureBrokerCli:
    """``litefleet broker --secure DIR --bind IP --san IP`` as the operator runs it."""

    def __init__(self, secure_dir: Path, bind: str, log: Path) -> None:
        self.secure_dir = secure_dir
        self.bind = bind
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    def start(self) -> None:
        first = not self.secure_dir.exists()
        cmd = [sys.executable, "-m", "converter", "broker", "--secure", str(self.secure_dir)]
        cmd += ["--bind", self.bind, "--san", self.bind]
        if first:
            cmd += ["--port", "0"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        from converter.broker.secure import SecureDir

        secure = SecureDir(self.secure_dir)
        deadline = time.monotonic() + 60
        while not secure.paths.registry.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"litefleet broker did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        registry = secure.load()
        self.port = registry.ports.host
        if not (
            wait_for_port(self.bind, registry.ports.cert, 30) and wait_for_port(self.bind, self.port, 30)
        ):
            raise AssertionError(f"litefleet broker did not start:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        self.proc = None


@dataclass
class Device:
    """One installed device and the host side that serves it."""

    arch: str
    machine: Machine
    workdir: Path  # host side: repo/, broker/, xfer/ (the guest's /media/litefleet)
    secure: bool
    broker: Any = None
    watcher: FleetWatcher | None = None
    install_output: str = ""
    pushed: list[int] = field(default_factory=list)
    # the machine's upper layer before the install (what a purge must come back to)
    before_install: set[str] = field(default_factory=set)
    # systemd-analyze security: (live, offline)
    scores: tuple[float, float] | None = None

    @property
    def repo(self) -> Path:
        return self.workdir / "repo"

    @property
    def xfer(self) -> Path:
        return self.workdir / "xfer"

    @property
    def secure_dir(self) -> Path:
        return self.workdir / "broker"

    # -- host side -----------------------------------------------------------------------
    def start_host_side(self) -> None:
        self.xfer.mkdir(parents=True, exist_ok=True)
        if not self.repo.exists():
            must("repo", "init", str(self.repo))
        host_ip = self.machine.link.host_ip
        if self.secure:
            self.broker = SecureBrokerCli(self.secure_dir, host_ip, self.workdir / "broker.log")
        else:
            self.broker = BrokerProcess(BrokerConfig(data_dir=self.workdir / "plain-broker", host=host_ip))
        self.broker_start()

    def broker_start(self) -> None:
        self.broker.start()
        if self.watcher is None:
            if self.secure:
                self.watcher = FleetWatcher(secure_dir=self.secure_dir)
            else:
                self.watcher = FleetWatcher(self.broker.port, host=self.machine.link.host_ip)

    def broker_stop(self) -> None:
        self.broker.stop()

    def ensure_broker(self) -> None:
        """The broker running (a check before may have failed with it stopped)."""
        proc = getattr(self.broker, "proc", None)
        if proc is None or proc.poll() is not None:
            self.broker_start()

    def broker_args(self) -> list[str]:
        if self.secure:
            return ["--secure-dir", str(self.secure_dir)]
        return ["--broker", f"mqtt://{self.machine.link.host_ip}:{self.broker.port}"]

    def install_args(self) -> list[str]:
        """install.sh's options for this device, as the operator gives them."""
        if self.secure:
            bundle = self.xfer / "bundle"
            if not bundle.exists():
                must(
                    "device",
                    "add",
                    DEVICE_ID,
                    "--secure",
                    str(self.secure_dir),
                    "--bundle",
                    str(bundle),
                    "--trusted-root",
                    str(self.repo / "root.json"),
                )
            return ["--credentials", "/media/litefleet/bundle"]
        (self.xfer / "root.json").write_bytes((self.repo / "root.json").read_bytes())
        return [
            "--device-id",
            DEVICE_ID,
            "--broker",
            f"mqtt://{self.machine.link.host_ip}:{self.broker.port}",
            "--trusted-root",
            "/media/litefleet/root.json",
        ]

    def install(
        self, *extra: str, installer: str = INSTALL, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = self.machine.run(["sh", installer, *self.install_args(), *extra], check=False, timeout=900)
        if check:
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    def push(self, model: Path, version: int) -> None:
        must(
            "push",
            str(model),
            "--repo",
            str(self.repo),
            "--name",
            "digits",
            "--version",
            str(version),
            *self.broker_args(),
        )
        self.pushed.append(version)

    # -- the unit ----------------------------------------------------------------------------
    def unit(self, *props: str) -> dict[str, str]:
        return self.machine.show(
            UNIT, *(props or ("ActiveState", "SubState", "MainPID", "NRestarts", "StatusText", "Result"))
        )

    def wait_active(self, timeout_s: float, *, other_than_pid: str | None = None) -> dict[str, str]:
        def ok(p: dict[str, str]) -> bool:
            return (
                p.get("ActiveState") == "active"
                and p.get("MainPID", "0") != "0"
                and p.get("MainPID") != other_than_pid
            )

        return self.machine.wait_unit(
            UNIT, ok, timeout_s, "active with a new main PID" if other_than_pid else "active"
        )

    # -- REST from inside --------------------------------------------------------------------
    def rest(self, *args: str) -> tuple[int, bytes]:
        """``guest_rest.py ARGS`` inside the machine (the system's python3, stdlib only)."""
        script = self.xfer / "guest_rest.py"
        if not script.exists():
            script.write_bytes(GUEST_REST.read_bytes())
        proc = self.machine.run(
            ["python3", "/media/litefleet/guest_rest.py", *args], check=False, timeout=120
        )
        assert proc.returncode in (0, 3), proc.stderr[-2000:]
        doc = json.loads(proc.stdout)
        return int(doc["status"]), base64.b64decode(doc["body"])

    def predict(self, x: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        np.save(buf, x, allow_pickle=False)
        (self.xfer / "x.npy").write_bytes(buf.getvalue())
        status, body = self.rest("predict", "digits", "/media/litefleet/x.npy")
        assert status == 200, body[:500]
        got: np.ndarray = np.load(io.BytesIO(body), allow_pickle=False)
        return got

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        if self.broker is not None:
            self.broker.stop()
