"""The notify protocol against a real AF_UNIX datagram socket (path and
abstract), the pure parts, and the no-systemd no-op."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.service.sdnotify import Notifier, format_message, socket_address, watchdog_interval_s


class Listener:
    """What systemd does: a datagram socket that receives our messages."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(2.0)

    def recv(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def nothing_pending(self) -> bool:
        self.sock.settimeout(0.05)
        try:
            self.sock.recv(4096)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(2.0)
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[tuple[Listener, str]]:
    path = str(tmp_path / "notify.sock")
    listener = Listener(path)
    yield listener, path
    listener.close()


def test_pure_parts() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abc") == b"\0abc"
    assert socket_address("") is None and socket_address("vsock:2:1") is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}, 1) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}, 7) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}, 7) is None
    assert format_message(READY=1, STATUS="a\nb") == b"READY=1\nSTATUS=a b"


def test_ready_status_stopping_over_a_real_socket(path_listener: tuple[Listener, str]) -> None:
    listener, path = path_listener
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.status("connecting to mqtt://broker:1883")
    assert listener.recv() == {"STATUS": "connecting to mqtt://broker:1883"}
    assert n.ready("serving digits v3")
    assert listener.recv() == {"READY": "1", "MAINPID": str(os.getpid()), "STATUS": "serving digits v3"}
    assert n.extend_timeout(90)
    assert listener.recv() == {"EXTEND_TIMEOUT_USEC": "90000000"}
    assert n.stopping()
    assert listener.recv() == {"STOPPING": "1"}
    n.close()


def test_abstract_socket() -> None:
    name = f"litefleet-test-{uuid.uuid4().hex}"
    listener = Listener(b"\0" + name.encode())
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert listener.recv()["READY"] == "1"
    finally:
        listener.close()


def test_a_live_loop_extends_the_start_timeout_until_ready(path_listener: tuple[Listener, str]) -> None:
    listener, path = path_listener
    now = [0.0]
    n = Notifier({"NOTIFY_SOCKET": path}, clock=lambda: now[0], start_extension_s=30)
    assert not n.watchdog()  # no WatchdogSec: WATCHDOG=1 is not sent, but...
    assert listener.recv() == {"EXTEND_TIMEOUT_USEC": "30000000"}
    now[0] += 5
    n.watchdog()
    assert listener.nothing_pending()  # at most every 10 s
    now[0] += 5
    n.watchdog()
    assert listener.recv() == {"EXTEND_TIMEOUT_USEC": "30000000"}
    n.ready()
    listener.recv()
    now[0] += 60
    n.watchdog()
    assert listener.nothing_pending()  # started: no more extensions


def test_watchdog_is_rate_limited_to_half_the_interval(path_listener: tuple[Listener, str]) -> None:
    listener, path = path_listener
    now = [100.0]
    n = Notifier(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())},
        clock=lambda: now[0],
    )
    n.ready()
    listener.recv()
    assert n.watchdog_interval_s == 10.0
    assert n.watchdog()
    assert listener.recv() == {"WATCHDOG": "1"}
    now[0] += 4.9
    assert not n.watchdog() and listener.nothing_pending()
    now[0] += 0.2
    assert n.watchdog()
    assert listener.recv() == {"WATCHDOG": "1"}
    assert n.watchdog(force=True)


def test_watchdog_for_another_process_is_ignored(path_listener: tuple[Listener, str]) -> None:
    listener, path = path_listener
    n = Notifier(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, pid=2, start_extension_s=0
    )
    assert n.watchdog_interval_s is None and not n.watchdog()
    assert listener.nothing_pending()


def test_without_systemd_everything_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval_s is None
    assert not n.ready() and not n.status("x") and not n.watchdog() and not n.stopping()
    n.close()


def test_a_vanished_socket_is_not_an_error(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled
    assert not n.ready()  # logged at debug level, nothing raised
    listener = Listener(str(tmp_path / "gone.sock"))  # systemd came back (or was late)
    try:
        assert n.status("hello")
        assert listener.recv() == {"STATUS": "hello"}
    finally:
        listener.close()


def test_unset_environment_keeps_children_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "s"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    n = Notifier(unset_environment=True)
    assert n.enabled and n.watchdog_interval_s == 1.0
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
