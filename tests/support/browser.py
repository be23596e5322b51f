"""A real browser for tests of pages: Debian's Chromium, headless, and a proxy that records
every request the page makes off this host."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

# what works here (2 vCPU VM, as root, no D-Bus, no GPU): no sandbox, no background traffic
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
)


# hosts Chromium 156 contacts on its own, with FLAGS, whatever page it loads (seen through
# RecordingProxy: --disable-component-update and --disable-background-networking do not
# stop these); no page of ours names them
CHROMIUM_OWN_HOSTS = frozenset({"update.googleapis.com", "accounts.google.com", "clients2.google.com"})


def chromium() -> str:
    """The Chromium binary; skipped where it is missing, except under CI
    (``scripts/setup.sh`` ``setup_test_tools`` installs it there)."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI"):
        pytest.fail("chromium is missing: scripts/setup.sh setup_test_tools installs it")
    pytest.skip("chromium is not installed (apt-get install chromium)")


class RecordingProxy:
    """An HTTP proxy that answers nothing and records the first line of each request
    (``CONNECT host:443 ...`` or ``GET http://...``): anything a page fetches off-host."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"{host}:{port}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    first = conn.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
                except OSError:
                    first = "(no request line)"
                self.requests.append(first)
                with contextlib.suppress(OSError):
                    conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    @property
    def hosts(self) -> list[str]:
        """The host of each request (``CONNECT host:443``, ``GET http://host/...``)."""
        out = []
        for line in self.requests:
            parts = line.split()
            target = parts[1] if len(parts) > 1 else ""
            if "://" in target:
                target = target.split("://", 1)[1]
            out.append(target.split("/", 1)[0].rsplit(":", 1)[0])
        return out

    def page_hosts(self) -> list[str]:
        """:attr:`hosts` without Chromium's own services, which it calls whatever the page
        (measured with Chromium 156 and :data:`FLAGS`: the component updater, the network
        time service and the account service, each at most once per start)."""
        return [h for h in self.hosts if h not in CHROMIUM_OWN_HOSTS]

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(5)


def run_chromium(url: str, *args: str, proxy: RecordingProxy | None = None, timeout_s: float = 120) -> str:
    """Run headless Chromium on ``url`` with ``args`` (``--dump-dom``, ``--screenshot=F``, ...)
    in a fresh profile; its stdout. Off-host requests go to ``proxy`` (loopback is direct)."""
    binary = chromium()
    with tempfile.TemporaryDirectory(prefix="lf-chromium-") as profile:
        cmd = [binary, *FLAGS, f"--user-data-dir={profile}"]
        if proxy is not None:
            cmd.append(f"--proxy-server=http://{proxy.address}")
        done = subprocess.run(
            [*cmd, *args, url], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def keep_artifact(path: Path) -> Path:
    """Copy ``path`` to ``$LITEFLEET_ARTIFACTS`` when set (a folder CI or a person keeps)."""
    where = os.environ.get("LITEFLEET_ARTIFACTS")
    if not where:
        return path
    target = Path(where) / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    return target
