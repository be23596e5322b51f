"""``litefleet broker --secure SITE --upstream URL`` as a process: the watchdog's decision
(pure), a hung Mosquitto (SIGSTOP: alive, port open, silent) killed and restarted with its
retained messages, Mosquitto dying with its supervisor, and bad flags as one-line errors."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from converter.site.watchdog import Watchdog, run_with_deadline
from tests.support.sites import REPO_ROOT, Central, SiteBroker, retained, start_central, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
    reason="mosquitto is not installed",
)
B = "litefleet/v1"


def test_three_misses_in_a_row_make_a_hang_and_one_answer_resets_them() -> None:
    w = Watchdog(lambda: True, interval_s=1, misses=3)
    assert [w.record(ok) for ok in (False, False, True, False, False)] == [False] * 5
    assert w.record(False) and w.hung.is_set()
    w.pause()
    w.reset()
    assert not w.hung.is_set() and w.misses == 0
    w.pause()
    assert not w.record(False) and w.misses == 0  # a paused watchdog counts nothing


def test_a_probe_that_never_returns_is_a_miss() -> None:
    stuck = __import__("threading").Event()
    assert not run_with_deadline(lambda: stuck.wait(30), 0.2)
    assert not run_with_deadline(lambda: 1 / 0 == 0, 1)
    assert run_with_deadline(lambda: True, 1)
    stuck.set()


@pytest.fixture
def central(tmp_path: Path) -> Iterator[Central]:
    c = start_central(tmp_path, {"a": ["dev-a1"]})
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def site(tmp_path: Path, central: Central) -> Iterator[SiteBroker]:
    s = SiteBroker(tmp_path, "a", central, ["dev-a1"])
    try:
        yield s
    finally:
        s.kill()


def saved_after(site: SiteBroker, offset: int) -> bool:
    return b"Saving in-memory database" in site.log_file.read_bytes()[offset:]


def test_a_hung_site_broker_is_killed_and_restarted_with_its_retained_messages(
    central: Central, site: SiteBroker
) -> None:
    site.start("--watchdog-s", "1")
    site.wait_status(lambda s: s.get("link") == "up", 30, "link up")
    host = central.host()
    assert host.publish(f"{B}/repo/metadata/timestamp.json", b"ts-1", retain=True).value in (0, 0x10)
    host.close()
    local = site.host()
    wait_until(
        lambda: retained(local, f"{B}/repo/#").get(f"{B}/repo/metadata/timestamp.json") == b"ts-1", 10, "ts"
    )
    local.close()
    offset = site.log_file.stat().st_size
    wait_until(lambda: saved_after(site, offset), 10, "an autosave after the message arrived")
    old = site.mosquitto_pid()
    os.kill(old, signal.SIGSTOP)  # alive, port open, answers nothing: what a hang looks like
    try:
        st = site.wait_status(lambda s: s.get("broker_restarts") == 1, 30, "the watchdog's restart")
    finally:
        if os.path.exists(f"/proc/{old}"):
            os.kill(old, signal.SIGCONT)
    assert "hung" in st["last_restart_reason"] and st["mosquitto_pid"] != old
    wait_until(
        lambda: not Path(f"/proc/{old}").exists() or "Z" in Path(f"/proc/{old}/stat").read_text().split()[2],
        5,
        "old gone",
    )
    local = site.host()
    try:
        assert retained(local, f"{B}/repo/#") == {f"{B}/repo/metadata/timestamp.json": b"ts-1"}
    finally:
        local.close()
    assert site.proc is not None and site.proc.poll() is None
    site.wait_status(lambda s: s.get("link") == "up" and s.get("sessions", 0) >= 2, 30, "the bridge back")


def test_mosquitto_dies_with_a_killed_supervisor_and_the_site_starts_again(site: SiteBroker) -> None:
    site.start()
    pid = site.mosquitto_pid()
    assert site.proc is not None
    site.proc.kill()
    site.proc.wait()
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 5, "mosquitto to die with its supervisor")
    site.start()  # no "a broker runs already", no port in use
    assert site.mosquitto_pid() != pid


def test_a_broker_that_keeps_dying_ends_the_command_with_exit_1(site: SiteBroker) -> None:
    """Five restarts within two minutes are the supervisor's to make; the sixth death is the
    service manager's business: exit 1, one line."""
    site.start()
    for n in range(1, 7):
        pid = site.mosquitto_pid()
        os.kill(pid, signal.SIGKILL)
        if n <= 5:
            site.wait_status(
                lambda s, n=n, pid=pid: s.get("broker_restarts") == n and s["mosquitto_pid"] != pid,
                30,
                f"restart {n}",
            )
    assert site.proc is not None
    assert site.proc.wait(30) == 1
    err = (site.dir.root / "supervisor.log").read_text().strip().splitlines()
    assert err[-1].startswith("litefleet: error: mosquitto exited") and "giving up" in err[-1], err[-3:]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "converter", *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )


def test_bad_site_flags_are_one_line_errors_and_create_nothing(tmp_path: Path, central: Central) -> None:
    bundle = central.dir.site_dir("a")
    new = tmp_path / "new-site"
    site = ["--secure", str(new), "--upstream", "mqtts://localhost:1", "--uplink", str(bundle)]
    cases = [
        (["--upstream", "mqtts://localhost:1"], "only apply with --secure"),
        (
            ["--secure", str(new), "--upstream", "mqtt://localhost:1", "--uplink", str(bundle)],
            "must be mqtts://",
        ),
        (
            ["--secure", str(new), "--upstream", "mqtts://u:p@localhost:1", "--uplink", str(bundle)],
            "must be mqtts://",
        ),
        (["--secure", str(new), "--upstream", "mqtts://localhost:1"], "not a site uplink bundle"),
        (["--secure", str(new), "--uplink", str(bundle)], "only applies with --upstream"),
        ([*site, "--prefix", "x"], "topic prefix"),
        ([*site, "--watchdog-s", "0.1"], "--watchdog-s"),
        ([*site, "--uplink-keepalive-s", "60"], "--uplink-keepalive-s must be between 5 and 30"),
    ]
    for args, message in cases:
        r = cli("broker", *args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not new.exists()
