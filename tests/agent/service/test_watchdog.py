"""The systemd watchdog: the agent feeds it while its work loop runs, and only then.

A real ``AF_UNIX`` datagram socket stands in for systemd's notify socket
(``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` as systemd sets them for
``WatchdogSec=``), and a real agent process talks to it. The tests show:

- ``WATCHDOG=1`` comes more often than ``WatchdogSec=`` requires, from
  ``READY=1`` on, including all through a long (throttled) 14 MB download and
  while a candidate model's check runs for seconds in its child process;
- when the work loop stalls for real, the pings stop while the rest of the
  process still serves (REST answers): the stall is made by freezing only the
  agent's main thread, which runs the work loop, with ``ptrace``
  (``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT``, a thread-directed stop; no hook in
  the agent);
- what systemd does then -- ``SIGABRT`` once ``WatchdogSec=`` passed without a
  ping, and a restart because the unit says ``Restart=on-failure`` -- brings
  the agent back serving its model. There is no systemd manager in this
  sandbox (PID 1 is not systemd, and a user manager would take over the
  machine's cgroups), so :class:`WatchdogSupervisor` plays that part with
  systemd's documented rule; the unit's own settings are checked to be the ones
  that rule needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from converter.broker.mosquitto import free_port
from tests.support.harness import AgentProcess, FleetWatcher, must
from tests.support.tcp_proxy import FaultProxy

REPO = Path(__file__).resolve().parents[3]
UNIT = REPO / "systemd" / "litefleet-agent.service"


class NotifySocket:
    """systemd's side of the notify protocol: receives and timestamps datagrams."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._cond = threading.Condition()
        self._closed = False
        threading.Thread(target=self._run, daemon=True, name="notify-socket").start()

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                self.messages.append((time.monotonic(), fields))
                self._cond.notify_all()

    def env(self, watchdog_s: float) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(int(watchdog_s * 1e6))}

    def times(self, key: str, since: float = 0.0) -> list[float]:
        with self._cond:
            return [t for t, f in self.messages if key in f and t >= since]

    def wait_for(self, key: str, since: float = 0.0, timeout_s: float = 60.0) -> float:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for t, f in self.messages:
                    if key in f and t >= since:
                        return t
                left = deadline - time.monotonic()
                assert left > 0, f"no {key} within {timeout_s} s: {self.messages[-5:]}"
                self._cond.wait(left)

    def max_gap(self, key: str, start: float, end: float) -> float:
        """The longest time without ``key`` between ``start`` and ``end``."""
        ts = [start, *[t for t in self.times(key) if start <= t <= end], end]
        return max(b - a for a, b in itertools.pairwise(ts))

    def close(self) -> None:
        self._closed = True
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()


def rest_ok(port: int, path: str = "/healthz", timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as resp:
            return resp.status == 200
    except OSError:
        return False


# -- freezing one thread ----------------------------------------------------------------------------

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
WALL = 0x40000000  # __WALL: wait for a thread that is not our child


class ThreadFreezer:
    """Stops exactly one thread of another process (the rest runs on) with ptrace.
    All calls must come from the same thread of ours (ptrace's tracer is a thread)."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        self.libc.ptrace.restype = ctypes.c_long
        self.tid: int | None = None

    def _ptrace(self, request: int, tid: int) -> None:
        if self.libc.ptrace(request, tid, None, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"ptrace({request:#x}, {tid}): {os.strerror(err)}")

    def freeze(self, tid: int) -> None:
        self._ptrace(PTRACE_SEIZE, tid)
        self.tid = tid
        self._ptrace(PTRACE_INTERRUPT, tid)
        os.waitpid(tid, WALL)

    def thaw(self) -> None:
        if self.tid is not None:
            with contextlib.suppress(OSError):
                self._ptrace(PTRACE_DETACH, self.tid)
            self.tid = None


# -- systemd's rule, played by the test -----------------------------------------------------------


class WatchdogSupervisor:
    """What systemd does for ``Type=notify``, ``WatchdogSec=W``, ``Restart=on-failure``:
    after READY=1, if W passes without WATCHDOG=1 it sends SIGABRT (WatchdogSignal=),
    and a service that died that way is started again (after RestartSec=)."""

    def __init__(self, agent: AgentProcess, notify: NotifySocket, watchdog_s: float) -> None:
        self.agent = agent
        self.notify = notify
        self.watchdog_s = watchdog_s

    def start(self) -> float:
        started = time.monotonic()
        self.agent.start(env=self.notify.env(self.watchdog_s))
        return started

    def deadline_missed(self, since: float) -> bool:
        last = max(self.notify.times("WATCHDOG", since) or [since])
        return time.monotonic() - last > self.watchdog_s

    def abort(self) -> int:
        """systemd's WatchdogSignal=: SIGABRT to the agent; returns its pid. (The restart
        is :meth:`start`, which the test calls once it has reaped the aborted process.)"""
        proc = self.agent.proc
        assert proc is not None
        proc.send_signal(signal.SIGABRT)
        return proc.pid


def check_unit_restarts_on_watchdog() -> float:
    """The packaged unit has what systemd's rule needs; returns its WatchdogSec= in seconds."""
    text = UNIT.read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    # systemd.service(5): on-failure restarts "when ... a watchdog timeout occurs"
    assert settings["Restart"] in ("on-failure", "on-abnormal", "on-watchdog", "always")
    assert settings["WatchdogSec"].endswith("s")
    return float(settings["WatchdogSec"][:-1])


# -- the tests ---------------------------------------------------------------------------------------------


def test_waiting_for_a_check_child_ticks_every_second() -> None:
    """Fast: the parent's wait for a candidate-check child calls tick() while it waits."""
    from agent.activation.check import _read_all

    read_fd, write_fd = os.pipe()
    ticks: list[float] = []

    def child() -> None:
        time.sleep(2.5)
        os.write(write_fd, b'{"ok": true}')
        os.close(write_fd)

    threading.Thread(target=child, daemon=True).start()
    try:
        assert _read_all(read_fd, 10.0, lambda: ticks.append(time.monotonic())) == b'{"ok": true}'
    finally:
        os.close(read_fd)
    assert len(ticks) >= 3
    assert max(b - a for a, b in itertools.pairwise(ticks)) < 1.5


def test_pings_while_healthy_and_all_through_a_long_download(
    broker, tmp_path: Path, notify: NotifySocket, digits_int8, dense_models: list[Path]
) -> None:
    watchdog_s = 6.0  # the agent sends every watchdog_s / 2 at most; systemd wants one per watchdog_s
    big = dense_models[0]
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "m", "--broker", broker.url)
    proxy = FaultProxy(broker.port)
    agent = AgentProcess(tmp_path, "pi-1", proxy.url, repo / "root.json")
    watch = FleetWatcher(broker.port)
    try:
        agent.start(env=notify.env(watchdog_s))
        ready = notify.wait_for("READY")
        watch.wait_active("pi-1", "m", 1)
        time.sleep(watchdog_s)  # idle: the loop ticks on its own
        proxy.rate_bytes_s = 1e6  # ~14 s for the model
        must("push", str(big), "--repo", str(repo), "--name", "m", "--broker", broker.url)
        watch.wait_active("pi-1", "m", 2, timeout_s=90)
        end = time.monotonic()
        downloading = [e for e in watch.events_of("pi-1", "downloading") if e["version"] == 2]
        assert len(downloading) >= 8, "the download was not long"
        gap = notify.max_gap("WATCHDOG", ready, end)
        assert gap < watchdog_s, f"{gap:.1f} s without WATCHDOG=1, WatchdogSec={watchdog_s}"
        assert len(notify.times("WATCHDOG", ready)) >= (end - ready) / watchdog_s
    finally:
        agent.stop()
        watch.close()
        proxy.close()


def test_pings_go_on_while_a_candidate_check_runs_for_seconds(
    broker, tmp_path: Path, notify: NotifySocket, digits_int8
) -> None:
    """A model that never returns is checked until the kernel ends its child with
    SIGXCPU (check_timeout_s of CPU). Meanwhile the agent is healthy and must say so:
    otherwise systemd kills it before the check ends, and after the restart it checks the
    same model again -- a restart loop that ends with the unit failed (StartLimitBurst=)
    and no agent serving at all."""
    from tests.support.models import _never_returning_model

    watchdog_s = 4.0
    hang = tmp_path / "hang" / "hang.tflite"
    hang.parent.mkdir()
    _never_returning_model(hang)
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "m", "--broker", broker.url)
    agent = AgentProcess(tmp_path, "pi-1", broker.url, repo / "root.json", check_timeout_s=8.0)
    watch = FleetWatcher(broker.port)
    try:
        agent.start(env=notify.env(watchdog_s))
        ready = notify.wait_for("READY")
        watch.wait_active("pi-1", "m", 1)
        must("push", str(hang), "--repo", str(repo), "--name", "m", "--broker", broker.url, "--no-check-data")
        ev = watch.wait_event("pi-1", "rejected", timeout_s=60, reason="crashed")
        assert "SIGXCPU" in ev["message"]
        end = time.monotonic()
        gap = notify.max_gap("WATCHDOG", ready, end)
        assert gap < watchdog_s, f"{gap:.1f} s without WATCHDOG=1 during the check"
        assert watch.active("pi-1") == ("m", "1") and agent.alive()
    finally:
        agent.stop()
        watch.close()


def test_a_stalled_work_loop_stops_the_pings_and_systemd_restarts_the_agent(
    broker, tmp_path: Path, notify: NotifySocket, digits_int8
) -> None:
    unit_watchdog_s = check_unit_restarts_on_watchdog()
    assert unit_watchdog_s >= 10
    watchdog_s = 3.0  # the unit's 30 s, scaled down for the test
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "m", "--broker", broker.url)
    port = free_port()
    agent = AgentProcess(tmp_path, "pi-1", broker.url, repo / "root.json", http=f"127.0.0.1:{port}")
    supervisor = WatchdogSupervisor(agent, notify, watchdog_s)
    freezer = ThreadFreezer()
    watch = FleetWatcher(broker.port)
    try:
        supervisor.start()
        ready = notify.wait_for("READY")
        watch.wait_active("pi-1", "m", 1)
        time.sleep(2 * watchdog_s)
        assert notify.max_gap("WATCHDOG", ready, time.monotonic()) < watchdog_s  # healthy: pinging
        assert agent.proc is not None
        pid = agent.proc.pid
        # stall the work loop (the main thread) and nothing else
        for _ in range(10):
            freezer.freeze(pid)
            if rest_ok(port):
                break  # frozen outside the GIL: the other threads run on
            freezer.thaw()
            time.sleep(0.2)
        else:
            pytest.fail("could not freeze the work loop alone")
        frozen_at = time.monotonic()
        while not supervisor.deadline_missed(frozen_at):
            time.sleep(0.1)
            assert time.monotonic() - frozen_at < 4 * watchdog_s, "pings went on with the loop frozen"
        # the process is alive and still serves: only the watchdog can tell it is stuck
        assert agent.alive() and rest_ok(port) and rest_ok(port, "/v1/models/m")
        assert not notify.times("WATCHDOG", frozen_at + 0.5)
        # systemd: SIGABRT, then Restart=on-failure
        dead_pid = supervisor.abort()
        freezer.thaw()
        assert agent.proc is not None
        code = agent.proc.wait(30)
        assert code == -signal.SIGABRT, code
        agent.proc = None
        restarted = supervisor.start()
        notify.wait_for("READY", since=restarted)
        assert agent.proc is not None and agent.proc.pid != dead_pid
        deadline = time.monotonic() + 30
        while not rest_ok(port, "/v1/models/m") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rest_ok(port, "/v1/models/m")
        time.sleep(2 * watchdog_s)
        assert (
            notify.max_gap("WATCHDOG", notify.wait_for("READY", since=restarted), time.monotonic())
            < watchdog_s
        )
        assert agent.state_file()["models"]["m"]["active"]["version"] == 1
    finally:
        freezer.thaw()
        agent.stop()
        watch.close()


def test_ready_comes_without_the_broker_and_status_follows_it(tmp_path: Path, notify: NotifySocket) -> None:
    """A device that boots without its broker serves at once: READY=1 with a STATUS= line
    saying it waits for the broker, then STATUS= says connected once the broker is there
    (before, READY=1 waited for the broker and the unit stayed "activating")."""
    from converter.broker.mosquitto import BrokerConfig, BrokerProcess

    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    port = free_port()  # nothing listens there yet
    rest_port = free_port()
    agent = AgentProcess(
        tmp_path, "pi-offline", f"mqtt://127.0.0.1:{port}", repo / "root.json", http=f"127.0.0.1:{rest_port}"
    )
    broker = BrokerProcess(BrokerConfig(data_dir=tmp_path / "broker", port=port))
    try:
        agent.start(env=notify.env(30.0))
        ready = notify.wait_for("READY")
        status = next(f["STATUS"] for t, f in notify.messages if t == ready)
        assert status == f"idle (no model yet); waiting for the broker mqtt://127.0.0.1:{port}"
        assert rest_ok(rest_port)
        broker.start()
        deadline = time.monotonic() + 60
        while not any("connected to" in f.get("STATUS", "") for _, f in notify.messages):
            assert time.monotonic() < deadline, notify.messages[-5:]
            time.sleep(0.1)
    finally:
        agent.stop()
        broker.stop()
