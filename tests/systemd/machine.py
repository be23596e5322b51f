"""A booted Debian machine with systemd as PID 1, for tests of the unit and the installers.

:class:`Machine` boots the cached rootfs of :mod:`.rootfs` with
``systemd-nspawn --boot --register=no --keep-unit`` (no host systemd or D-Bus here) under a
fresh overlayfs of its own, and runs commands inside with ``nsenter -t GUEST_PID1 -a``
(``systemd-run -M`` and ``machinectl`` need a host machined). It guarantees:

- the cached rootfs is never written: every change lands in the machine's own upper layer,
  and :meth:`Machine.reboot` powers the machine off cleanly and boots the same upper layer
  again, as a device reboots from its own disk;
- the network is a veth pair (``--network-veth``) and nothing else: the guest has its own
  loopback and ``host0`` with a fixed address (systemd-networkd in the guest configures it at
  boot; under emulation, where networkd fails, the host sets it right after boot), the host
  side ``ve-NAME`` has the other end of a /30 that no other machine of this host uses
  (claimed under ``/run/litefleet-systemd/net``). Host-side software (the broker,
  ``litefleet push``, the test's watchers) listens on :attr:`Link.host_ip`, exactly as a
  broker on the LAN: the guest reaches the host through this link only;
- an emulated guest (arm64) runs every process as the Pi 4's core (``QEMU_CPU``) and sees its
  ``/proc/cpuinfo``, and the agent's unit gets the test-only emulation drop-in of :mod:`.specs`;
- :meth:`close` powers off (or kills), unmounts and removes everything, and releases the
  address; a machine that fails to boot says why (the nspawn log's tail).

Thread ownership: a Machine is used from one thread (the test's).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .rootfs import Rootfs
from .specs import AGENT_EMULATION_DROPIN, CPUINFO

NET_CLAIMS = Path("/run/litefleet-systemd/net")
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT_S = 180.0


class MachineError(AssertionError):
    """The machine did not do what a step needs (boot, power off, a command)."""


@dataclass(frozen=True)
class Link:
    """The veth link: a /30 in 10.213.0.0/16, .1 on the host, .2 in the guest."""

    index: int

    @property
    def host_ip(self) -> str:
        return f"10.213.{self.index // 64}.{(self.index % 64) * 4 + 1}"

    @property
    def guest_ip(self) -> str:
        return f"10.213.{self.index // 64}.{(self.index % 64) * 4 + 2}"

    def network_file(self) -> str:
        """The guest's systemd-networkd configuration for ``host0``."""
        return (
            "# tests/systemd: the guest's end of the veth link to the host\n"
            "[Match]\nName=host0\n\n"
            f"[Network]\nAddress={self.guest_ip}/30\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n"
        )


def claim_link() -> Link:
    """A link index no live process of this host holds; released with :func:`release_link`."""
    NET_CLAIMS.mkdir(parents=True, exist_ok=True)
    for index in range(1, 64 * 250):
        path = NET_CLAIMS / str(index)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError, ValueError):
                owner = int(path.read_text() or "0")
                if owner and not Path(f"/proc/{owner}").exists():
                    path.unlink()  # its process is gone: take it on the next round
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return Link(index)
    raise MachineError("no free link address under 10.213.0.0/16")


def release_link(link: Link) -> None:
    (NET_CLAIMS / str(link.index)).unlink(missing_ok=True)


def _run(cmd: Sequence[str], *, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)


class Machine:
    """One machine: its overlay in ``workdir``, booted by :meth:`boot`."""

    def __init__(self, rootfs: Rootfs, workdir: Path, *, binds: Mapping[Path, str] | None = None) -> None:
        self.rootfs = rootfs
        self.spec = rootfs.spec
        self.workdir = workdir
        self.binds = dict(binds or {})
        self.link = claim_link()
        self.name = f"lf{os.getpid() % 100000}x{self.link.index}"[:12]
        self.host_if = f"ve-{self.name}"
        self.upper = workdir / "upper"
        self.merged = workdir / "merged"
        self.log_path = workdir / "nspawn.log"
        self.boots = 0
        self._nspawn: subprocess.Popen[bytes] | None = None
        self.guest_pid: int | None = None
        for d in (self.upper, workdir / "work", self.merged):
            d.mkdir(parents=True, exist_ok=True)
        if not (rootfs.root / "etc/hosts").exists():
            # what the Debian installer writes (mmdebstrap does not): "localhost" must resolve
            self._write("etc/hosts", "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n")
        if self.spec.emulated:
            self._write(
                "etc/systemd/system/litefleet-agent.service.d/50-litefleet-emulation.conf",
                AGENT_EMULATION_DROPIN,
            )
            # systemd-networkd fails under qemu-user ("Protocol not supported": netlink);
            # masked here, the guest's address is set from outside after boot
            for unit in ("systemd-networkd.service", "systemd-networkd.socket"):
                link = self.upper / "etc/systemd/system" / unit
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to("/dev/null")
        else:
            self._write("etc/systemd/network/10-nspawn-test.network", self.link.network_file())

    def _write(self, guest_path: str, text: str) -> None:
        """A file in the upper layer (before boot: the guest sees it from the start)."""
        path = self.upper / guest_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    # -- power ----------------------------------------------------------------------------
    def boot(self) -> str:
        """Boot and wait until start-up is over; returns ``systemctl is-system-running``
        (``running``, or ``degraded`` when a unit failed)."""
        if self._nspawn is not None:
            raise MachineError("already running")
        mount = _run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={self.rootfs.root},upperdir={self.upper},workdir={self.workdir / 'work'}",
                str(self.merged),
            ]
        )
        if mount.returncode != 0:
            raise MachineError(f"overlay mount failed: {mount.stderr.strip()}")
        cmd = [
            "systemd-nspawn",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--network-veth",
            "--link-journal=no",
            "--console=pipe",
            f"--machine={self.name}",
            "-D",
            str(self.merged),
        ]
        for src, dst in self.binds.items():
            cmd.append(f"--bind-ro={src}:{dst}")
        if self.spec.emulated:
            cmd.append(f"--setenv=QEMU_CPU={self.spec.qemu_cpu}")
        log = open(self.log_path, "ab")  # noqa: SIM115
        try:
            log.write(f"--- boot {self.boots + 1}: {' '.join(cmd)}\n".encode())
            log.flush()
            self._nspawn = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        finally:
            log.close()
        self.boots += 1
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        self.guest_pid = self._wait_guest_pid(deadline)
        self._link_up(deadline)
        if self.spec.emulated:
            # the Pi's cpuinfo for commands run with nsenter (nspawn cannot bind over /proc:
            # it mounts /proc after the custom binds); the agent's unit gets its own drop-in
            self.run(["mount", "--bind", f"/{CPUINFO}", "/proc/cpuinfo"])
        state = ""
        while time.monotonic() < deadline:
            left = max(1.0, deadline - time.monotonic())
            try:
                proc = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=left)
            except subprocess.TimeoutExpired:
                break
            state = proc.stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.2)  # "starting" while the manager is not up yet
        jobs = self.run(["systemctl", "list-jobs", "--no-pager"], check=False)
        raise MachineError(
            f"{self.name} did not finish booting within {BOOT_TIMEOUT_S:g} s ({state or 'no answer'}); "
            f"jobs still running:\n{jobs.stdout}{jobs.stderr}\n{self.nspawn_log()}"
        )

    def _wait_guest_pid(self, deadline: float) -> int:
        assert self._nspawn is not None
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise MachineError(f"systemd-nspawn exited ({self._nspawn.returncode}):\n{self.nspawn_log()}")
            # the child that is PID 1 in its own namespace: nspawn forks short-lived helpers too
            for child in _run(["pgrep", "-P", str(self._nspawn.pid)]).stdout.split():
                with contextlib.suppress(OSError):
                    status = Path(f"/proc/{child}/status").read_text()
                    nspid = next(
                        line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")
                    )
                    if len(nspid) > 1 and nspid[-1] == "1":
                        return int(child)
            time.sleep(0.05)
        raise MachineError(f"no guest PID 1 under nspawn:\n{self.nspawn_log()}")

    def _link_up(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if _run(["ip", "link", "show", self.host_if]).returncode == 0:
                break
            time.sleep(0.05)
        else:
            raise MachineError(f"{self.host_if} did not appear")
        commands = [
            ["ip", "addr", "add", f"{self.link.host_ip}/30", "dev", self.host_if],
            ["ip", "link", "set", self.host_if, "up"],
        ]
        if self.spec.emulated:  # the host's own ip, in the guest's network namespace only
            inside = ["nsenter", "-t", str(self.guest_pid), "-n", "ip"]
            commands += [
                [*inside, "addr", "add", f"{self.link.guest_ip}/30", "dev", "host0"],
                [*inside, "link", "set", "host0", "up"],
            ]
        for cmd in commands:
            proc = _run(cmd)
            if proc.returncode != 0:
                raise MachineError(f"{' '.join(cmd)}: {proc.stderr.strip()}")

    def poweroff(self, timeout_s: float = 120.0) -> None:
        """``systemctl poweroff`` inside, then wait for nspawn to exit (a clean stop of every
        service, the agent's included)."""
        if self._nspawn is None:
            return
        self.run(["systemctl", "poweroff"], check=False)
        try:
            self._nspawn.wait(timeout_s)
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise MachineError(f"{self.name} did not power off within {timeout_s:g} s") from exc
        self._after_exit()

    def kill(self) -> None:
        """Pull the plug: SIGKILL to nspawn (the guest's processes die with its namespace)."""
        if self._nspawn is None:
            return
        if self._nspawn.poll() is None:
            self._nspawn.send_signal(signal.SIGKILL)
            self._nspawn.wait(60)
        self._after_exit()

    def _after_exit(self) -> None:
        self._nspawn = None
        self.guest_pid = None
        if _run(["umount", str(self.merged)]).returncode != 0:
            _run(["umount", "-l", str(self.merged)])

    def reboot(self) -> str:
        """Power off cleanly and boot the same disk (upper layer) again."""
        self.poweroff()
        return self.boot()

    @property
    def running(self) -> bool:
        return self._nspawn is not None and self._nspawn.poll() is None

    def close(self) -> None:
        try:
            if self.running:
                with contextlib.suppress(MachineError):
                    self.poweroff(60)
            self.kill()
        finally:
            release_link(self.link)
            shutil.rmtree(self.workdir, ignore_errors=True)

    def nspawn_log(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- inside ---------------------------------------------------------------------------
    def command(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
        """The host command that runs ``args`` inside, as root, with a clean environment."""
        if self.guest_pid is None:
            raise MachineError(f"{self.name} is not running")
        base = {"PATH": GUEST_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
        if self.spec.emulated:
            base["QEMU_CPU"] = str(self.spec.qemu_cpu)
        base.update(env or {})
        return [
            "nsenter",
            "-t",
            str(self.guest_pid),
            "-a",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in base.items()),
            *args,
        ]

    def run(
        self,
        args: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.command(args, env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input,
        )
        if check and proc.returncode != 0:
            raise MachineError(
                f"{' '.join(args)} exited {proc.returncode} in {self.name}:\n"
                f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
            )
        return proc

    def host_pid(self, guest_pid: int | str) -> int:
        """The host's PID of the guest's process ``guest_pid``."""
        assert self.guest_pid is not None
        ns = os.readlink(f"/proc/{self.guest_pid}/ns/pid")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns/pid") != ns:
                    continue
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("NSpid:") and line.split()[-1] == str(guest_pid):
                        return int(entry.name)
        raise MachineError(f"no process {guest_pid} in {self.name}")

    def run_as_seen_by(
        self, guest_pid: int | str, args: Sequence[str], *, namespaces: str = "-m"
    ) -> subprocess.CompletedProcess[str]:
        """``args`` run as root in ``namespaces`` of the guest's process ``guest_pid`` (by the
        host's nsenter: an emulated one cannot enter a mount namespace under qemu-user)."""
        env = ["env", "-i", f"PATH={GUEST_PATH}", "LANG=C.UTF-8"]
        if self.spec.emulated:
            env.append(f"QEMU_CPU={self.spec.qemu_cpu}")
        cmd = ["nsenter", "-t", str(self.host_pid(guest_pid)), namespaces, *env, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)

    def sh(self, script: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-c", script], **kwargs)

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", *args], check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show UNIT -p P,...`` as a dict."""
        out = self.systemctl("show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_unit(
        self, unit: str, predicate: Any, timeout_s: float, what: str, *props: str
    ) -> dict[str, str]:
        """Poll ``systemctl show`` until ``predicate(props)`` holds; the last props on failure."""
        names = props or ("ActiveState", "SubState", "MainPID", "NRestarts", "Result", "StatusText")
        deadline = time.monotonic() + timeout_s
        while True:
            shown = self.show(unit, *names)
            if predicate(shown):
                return shown
            if time.monotonic() >= deadline:
                raise MachineError(
                    f"timed out after {timeout_s:g} s waiting for {unit}: {what}; last {shown}\n"
                    + self.journal(unit, lines=30)
                )
            time.sleep(0.2)

    def cursor(self) -> str:
        """The journal's current position (for :meth:`journal_json` ``after``)."""
        out = self.run(["journalctl", "-n", "0", "--show-cursor", "-q"]).stdout
        return out.strip().rsplit("cursor: ", 1)[-1]

    def journal(self, unit: str | None = None, *, lines: int = 200, after: str | None = None) -> str:
        args = ["journalctl", "--no-pager", "-o", "short-monotonic", "-n", str(lines)]
        if unit:
            args += ["-u", unit]
        if after:
            args.append(f"--after-cursor={after}")
        return self.run(args, check=False).stdout

    def journal_json(self, *matches: str, after: str | None = None) -> list[dict[str, Any]]:
        """Entries as journald stores them (every field), e.g. ``journal_json("_SYSTEMD_UNIT=x")``."""
        args = ["journalctl", "--no-pager", "-o", "json", *matches]
        if after:
            args.append(f"--after-cursor={after}")
        out = self.run(args, check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def path(self, guest_path: str) -> Path:
        """A guest file, read from the host (the running machine's merged tree)."""
        return self.merged / guest_path.lstrip("/")
