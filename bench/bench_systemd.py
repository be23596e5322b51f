"""The agent under a real systemd: boot to READY, restart after SIGKILL, watchdog restart.

    .venv/bin/python bench/bench_systemd.py [--arch amd64 arm64] [--runs 3]

Needs root and what tests/systemd needs (systemd-container, mmdebstrap, arch-test; the
cached rootfs is built on first use). Per architecture, one booted Debian machine
(``tests/systemd``: systemd 252 as PID 1 under systemd-nspawn; arm64 through qemu-user, so
**emulation, not Pi speed**), the agent installed by ``install.sh`` from a wheelhouse with the
digits int8 model active, and a baseline in the same machine and run: ``lf-baseline.service``,
the smallest ``Type=notify`` service (the system's python3 sends READY=1 and sleeps), with the
agent unit's ``Restart=on-failure`` and ``RestartSec=5s``. Times come from the host's and the
guest's shared ``CLOCK_MONOTONIC`` (systemd's ``ActiveEnterTimestampMonotonic``).

- boot to READY: nspawn started to the unit active (READY=1), the machine rebooted cleanly
  with the model installed and the broker up; the baseline's in the same boots;
- restart after SIGKILL: the kill to the unit active again, RestartSec= included;
- watchdog restart: SIGSTOP to the unit active again (WatchdogSec=30s, then SIGABRT and
  RestartSec=), once;
- hardening: ``systemd-analyze security`` of the live unit and ``--offline=true`` of its file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import describe
from tests.systemd.conftest import close_device, open_device, wheelhouse_for
from tests.systemd.device import DEVICE_ID, UNIT, Device
from tests.systemd.machine import Machine
from tests.systemd.rootfs import ensure_rootfs

BASELINE = "lf-baseline.service"
BASELINE_UNIT = """\
[Unit]
Description=bench baseline: the smallest Type=notify service

[Service]
Type=notify
ExecStart=/usr/bin/python3 -c "import os, socket, time; a = os.environ['NOTIFY_SOCKET']; \
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); \
s.sendto(b'READY=1', '\\\\0' + a[1:] if a.startswith('@') else a); time.sleep(1e9)"
Restart=on-failure
RestartSec=5s

[Install]
WantedBy=multi-user.target
"""


def now_us() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def active_since_us(m: Machine, unit: str) -> int:
    shown = m.show(unit, "ActiveState", "ActiveEnterTimestampMonotonic")
    return int(shown["ActiveEnterTimestampMonotonic"]) if shown["ActiveState"] == "active" else 0


def wait_active_after(m: Machine, unit: str, t0_us: int, timeout_s: float = 300) -> float:
    """Seconds from ``t0_us`` to ``unit`` becoming active (again) after it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        t = active_since_us(m, unit)
        if t > t0_us:
            return (t - t0_us) / 1e6
        time.sleep(0.1)
    raise AssertionError(f"{unit} not active again within {timeout_s} s:\n{m.journal(unit, lines=20)}")


def digits_model(work: Path) -> Path:
    from tests.support.models import convert_digits, digits_data, save_digits_cnn, save_digits_npz

    data = digits_data()
    keras = save_digits_cnn(work / "digits.keras", data)
    return convert_digits(
        keras,
        save_digits_npz(work / "cal.npz", data.x_train),
        save_digits_npz(work / "val.npz", data.x_test, data.y_test),
        work / "digits.tflite",
        "int8",
    ).tflite


def measure(arch: str, runs: int, model: Path, work: Path) -> dict[str, Any]:
    rootfs = ensure_rootfs(arch)
    wheels = wheelhouse_for(arch, rootfs, work)
    machines: list[Machine] = []

    def new_machine(a: str, *, binds: dict[Path, str] | None = None) -> Machine:
        m = Machine(
            rootfs,
            Path(tempfile.mkdtemp(prefix=f"lf-bench-{a}-")),
            binds={wheels: "/media/wheelhouse", **(binds or {})},
        )
        machines.append(m)
        m.boot()
        return m

    device: Device = open_device(arch, new_machine)
    out: dict[str, Any] = {"arch": arch}
    try:
        device.install()
        m = device.machine
        (m.path("/etc/systemd/system") / BASELINE).write_text(BASELINE_UNIT)
        m.systemctl("daemon-reload")
        m.systemctl("enable", "--now", BASELINE)
        device.push(model, 1)
        assert device.watcher is not None
        device.watcher.wait_active(DEVICE_ID, "digits", 1, timeout_s=300)
        boot: dict[str, list[float]] = {UNIT: [], BASELINE: []}
        for _ in range(runs):
            m.poweroff()
            t0 = now_us()
            m.boot()
            for unit in boot:
                boot[unit].append(wait_active_after(m, unit, t0))
        kill: dict[str, list[float]] = {UNIT: [], BASELINE: []}
        for _ in range(runs):
            for unit in kill:
                pid = m.show(unit, "MainPID")["MainPID"]
                t0 = now_us()
                m.run(["kill", "-KILL", pid])
                kill[unit].append(wait_active_after(m, unit, t0))
            m.systemctl("reset-failed", UNIT, check=False)  # the start limit counts these
        pid = m.show(UNIT, "MainPID")["MainPID"]
        t0 = now_us()
        m.run(["kill", "-STOP", pid])
        watchdog = wait_active_after(m, UNIT, t0, timeout_s=600)
        live = m.run(["systemd-analyze", "security", "--no-pager", UNIT], check=False).stdout
        offline = m.run(
            ["systemd-analyze", "security", "--no-pager", "--offline=true", f"/etc/systemd/system/{UNIT}"],
            check=False,
        ).stdout
        out.update(boot=boot, kill=kill, watchdog=watchdog, live=score(live), offline=score(offline))
    finally:
        close_device(device)
        for extra in machines:
            extra.close()
    return out


def score(text: str) -> str:
    for line in text.splitlines():
        if "Overall exposure level" in line:
            return line.split(": ", 1)[1].strip()
    return "?"


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s ({min(xs):.2f}-{max(xs):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", nargs="+", default=["amd64", "arm64"])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lf-bench-systemd-"))
    print(f"# machine: {describe('ai-edge-litert', 'numpy', 'paho-mqtt', 'tuf')}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, runs {args.runs}, median (min-max)")
    model = digits_model(work)
    rows = [measure(arch, args.runs, model, work) for arch in args.arch]
    print(
        "\n| measure | "
        + " | ".join(r["arch"] + (" (emulation)" if r["arch"] != "amd64" else "") for r in rows)
        + " |"
    )
    print("|---|" + "---|" * len(rows))

    def line(what: str, cell: Any) -> None:
        print(f"| {what} | " + " | ".join(cell(r) for r in rows) + " |")

    line("boot to READY=1, agent (digits int8 installed)", lambda r: med(r["boot"][UNIT]))
    line("boot to READY=1, baseline notify service", lambda r: med(r["boot"][BASELINE]))
    line(
        "boot: agent / baseline (medians)",
        lambda r: f"{statistics.median(r['boot'][UNIT]) / statistics.median(r['boot'][BASELINE]):.2f}x",
    )
    line("SIGKILL to active again, agent (RestartSec=5s included)", lambda r: med(r["kill"][UNIT]))
    line("SIGKILL to active again, baseline", lambda r: med(r["kill"][BASELINE]))
    line(
        "restart: agent / baseline (medians)",
        lambda r: f"{statistics.median(r['kill'][UNIT]) / statistics.median(r['kill'][BASELINE]):.2f}x",
    )
    line(
        "SIGSTOP to active again (WatchdogSec=30s after the last ping; RestartSec=5s; start), 1 run",
        lambda r: f"{r['watchdog']:.1f} s",
    )
    line("systemd-analyze security, live unit", lambda r: r["live"])
    line("systemd-analyze security --offline=true, the unit file", lambda r: r["offline"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
