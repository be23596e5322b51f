"""Network faults and a wrong clock, against a real Mosquitto and real agent processes.

While a 14 MB model downloads through a fault-injecting TCP proxy
(:class:`tests.support.tcp_proxy.FaultProxy`), the broker is SIGKILLed and restarted
again and again, or the connection is cut again and again; a small model goes
through a link with 300 ms latency each way that delivers one byte at a time.
Each time:

- the agent finishes the download and activates the new version;
- the old version answers every REST request meanwhile (a prober thread
  calls ``:predict`` and the status route all along: every answer is a 200,
  and the served version only ever goes from old to new);
- no model is ever half-active: at every fault, the state file's active and
  previous versions are signed ones whose files on disk hash to the signed
  SHA-256;
- a broker restart costs at most the window of chunks in flight.

The clock: libfaketime (Debian package ``faketime``) preloaded into the agent
changes every clock read of the agent process (``time()``, ``datetime.now()``;
the monotonic clock is left alone). Far in the future, all signed metadata has
expired: the agent refuses with reason ``expired`` and keeps serving; set right
again, it takes the new version. In the past (a Pi that booted believing it is
2001), metadata is still accepted: TUF has no "not before".
"""

from __future__ import annotations

import glob
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.files import file_sha256
from agent.protocol import DEFAULT_CHUNK_SIZE
from converter.broker.mosquitto import free_port
from tests.support.faults import Prober, check_state, dense_body
from tests.support.harness import AgentProcess, FleetWatcher, must
from tests.support.tcp_proxy import FaultProxy

WINDOW = 8


# -- the REST prober --------------------------------------------------------------------------------


def push(repo: Path, model: Path, url: str, name: str = "digits") -> None:
    must("push", str(model), "--repo", str(repo), "--name", name, "--broker", url)


@dataclass
class Rig:
    broker: Any
    repo: Path
    proxy: FaultProxy
    agent: AgentProcess
    watch: FleetWatcher
    http_port: int
    signed: dict[int, str]

    def push(self, model: Path) -> None:
        """Push straight to the broker (not through the proxy): the faults are the device's."""
        out = must("push", str(model), "--repo", str(self.repo), "--name", "m", "--broker", self.broker.url)
        version = int(out.split(" v", 1)[1].split(" ", 1)[0])
        self.signed[version] = file_sha256(model)

    def downloaded(self, version: int) -> int:
        return max(
            (
                e.get("bytes", 0)
                for e in self.watch.events_of("pi-1", "downloading")
                if e.get("version") == version
            ),
            default=0,
        )


@pytest.fixture
def rig(broker, tmp_path: Path, dense_models: list[Path]) -> Iterator[Rig]:
    """An agent serving the first dense model as v1, connected through a proxy."""
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    proxy = FaultProxy(broker.port)
    port = free_port()
    agent = AgentProcess(
        tmp_path, "pi-1", proxy.url, repo / "root.json", download_window=WINDOW, http=f"127.0.0.1:{port}"
    )
    watch = FleetWatcher(broker.port)
    r = Rig(broker, repo, proxy, agent, watch, port, {})
    try:
        r.push(dense_models[0])
        agent.start()
        watch.wait_active("pi-1", "m", 1, timeout_s=60)
        yield r
    finally:
        agent.stop()
        watch.close()
        proxy.close()


def test_broker_killed_and_restarted_five_times_mid_transfer(rig: Rig, dense_models: list[Path]) -> None:
    size = dense_models[1].stat().st_size
    rig.proxy.rate_bytes_s = 2e6  # ~7 s for the model: every restart lands mid-transfer
    rig.push(dense_models[1])
    time.sleep(2.5)  # past the broker's 2 s autosave: the retained chunks are on its disk
    prober = Prober(rig.http_port, dense_body()).start()
    restarts = 0
    try:
        for k in range(5):
            goal = size * (k + 1) / 7
            rig.watch.wait_for(lambda g=goal: rig.downloaded(2) >= g, 60, f"download past {goal:.0f} B")
            rig.broker.kill()  # SIGKILL: no goodbye, no final save
            restarts += 1
            check_state(rig.agent, rig.signed)
            assert rig.agent.alive()
            time.sleep(random.Random(k).uniform(0.2, 1.5))
            rig.broker.start()
            rig.watch.close()
            rig.watch = FleetWatcher(rig.broker.port)
        rig.proxy.rate_bytes_s = None
        rig.watch.wait_active("pi-1", "m", 2, timeout_s=120)
        prober.stop(seen="2")
    finally:
        prober.stop()
    prober.check("1", "2")
    check_state(rig.agent, rig.signed)
    verified = [e for e in rig.watch.events if e.get("event") == "verified" and e.get("version") == 2]
    assert verified, rig.watch.events[-10:]
    # what came over the wire: the model once, plus at most the window in flight at each restart
    assert size <= verified[-1]["bytes_received"] <= size + restarts * WINDOW * DEFAULT_CHUNK_SIZE, verified
    assert restarts == 5


def test_connections_cut_again_and_again(rig: Rig, dense_models: list[Path]) -> None:
    rig.proxy.rate_bytes_s = 2e6
    rig.push(dense_models[1])
    prober = Prober(rig.http_port, dense_body()).start()
    cuts = 0
    try:
        deadline = time.monotonic() + 120
        while rig.watch.active("pi-1") != ("m", "2") and cuts < 12 and time.monotonic() < deadline:
            time.sleep(random.uniform(0.3, 1.0))
            if rig.proxy.cut():
                cuts += 1
                check_state(rig.agent, rig.signed)
        # enough: let it finish (the loop went on cutting until its deadline, 2 min of the suite)
        rig.proxy.rate_bytes_s = None
        rig.watch.wait_active("pi-1", "m", 2, timeout_s=60)
        prober.stop(seen="2")
    finally:
        prober.stop()
    assert cuts >= 5, cuts
    prober.check("1", "2")
    check_state(rig.agent, rig.signed)
    assert rig.proxy.connections > cuts // 2  # it reconnected each time
    assert rig.agent.alive()


def test_slow_link_one_byte_at_a_time(broker, tmp_path: Path, digits_int8, digits_float32) -> None:
    """300 ms latency each way, and every byte in its own TCP segment, both directions."""
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    push(repo, digits_int8.tflite, broker.url)
    proxy = FaultProxy(broker.port)
    proxy.latency_s = 0.3
    proxy.slice_bytes = 1
    agent = AgentProcess(tmp_path, "pi-1", proxy.url, repo / "root.json")
    watch = FleetWatcher(broker.port)
    try:
        agent.start()
        watch.wait_active("pi-1", "digits", 1, timeout_s=120)
        push(repo, digits_float32.tflite, broker.url)
        watch.wait_active("pi-1", "digits", 2, timeout_s=120)
        assert proxy.bytes_down > Path(digits_float32.tflite).stat().st_size
        assert agent.alive()
    finally:
        agent.stop()
        watch.close()
        proxy.close()


# -- the agent's clock --------------------------------------------------------------------------------


def libfaketime() -> str | None:
    # not libfaketimeMT: its mutex, held by another thread at fork(), deadlocks the
    # agent's forked candidate check (the plain library has none; FAKETIME never changes)
    found = sorted(
        glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1")
    )
    return found[0] if found else None


def faketime_env(spec: str) -> dict[str, str]:
    lib = libfaketime()
    if lib is None:
        pytest.skip("libfaketime is not installed (apt-get install -y faketime)")
    # the monotonic clock stays real: only the wall clock (what expiry is checked against) moves
    return {"LD_PRELOAD": lib, "FAKETIME": spec, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def wall_clock_of(watch: FleetWatcher, device: str) -> float:
    """The agent's own idea of the time, from its latest retained state (``ts``)."""
    return float(watch.states[device]["ts"])


def test_clock_far_in_the_future_refuses_everything_as_expired(
    broker, tmp_path: Path, digits_int8, digits_float32
) -> None:
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    port = free_port()
    agent = AgentProcess(tmp_path, "pi-1", broker.url, repo / "root.json", http=f"127.0.0.1:{port}")
    watch = FleetWatcher(broker.port)
    try:
        push(repo, digits_int8.tflite, broker.url)
        agent.start()
        watch.wait_active("pi-1", "digits", 1, timeout_s=60)
        agent.stop()
        # 400 days on: past every role's expiry (timestamp 14 d ... root 365 d)
        agent.start(env=faketime_env("+400d"))
        ev = watch.wait_event("pi-1", "rejected", timeout_s=60, reason="expired")
        assert ev["ts"] > time.time() + 399 * 86400, "the agent's clock was not moved"
        push(repo, digits_float32.tflite, broker.url)
        time.sleep(3)  # the new timestamp triggers a refresh: refused as well
        watch.wait_for(lambda: "expired" in str(watch.states["pi-1"].get("error")), 30, "error: expired")
        assert watch.active("pi-1") == ("digits", "1")
        assert agent.state_file()["models"]["digits"]["active"]["version"] == 1
        assert not (agent.state_dir / "models" / "digits" / "2").exists()
        prober = Prober(port, json.dumps({"instances": [[[[0.5]] * 8] * 8]}).encode(), model="digits")
        prober.start()
        time.sleep(1.0)
        prober.stop()
        assert prober.statuses and set(prober.statuses) == {200}, prober.statuses[:10]
        assert agent.alive()
        # the clock is set right (NTP): the next start takes v2
        agent.stop()
        agent.start()
        watch.wait_active("pi-1", "digits", 2, timeout_s=60)
    finally:
        agent.stop()
        watch.close()


def test_clock_in_the_past_still_works(broker, tmp_path: Path, digits_int8, digits_float32) -> None:
    """A Pi without a battery-backed clock boots believing it is 2001: TUF metadata has
    no "not before", so delivery works (only freeze protection is weaker meanwhile)."""
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    agent = AgentProcess(tmp_path, "pi-1", broker.url, repo / "root.json")
    watch = FleetWatcher(broker.port)
    try:
        push(repo, digits_int8.tflite, broker.url)
        agent.start(env=faketime_env("@2001-01-01 00:00:00"))
        watch.wait_active("pi-1", "digits", 1, timeout_s=60)
        assert wall_clock_of(watch, "pi-1") < 1_000_000_000 + 86400 * 2  # 2001-09-09 is 1e9
        push(repo, digits_float32.tflite, broker.url)
        watch.wait_active("pi-1", "digits", 2, timeout_s=60)
        assert not watch.events_of("pi-1", "rejected")
    finally:
        agent.stop()
        watch.close()


# -- the agent killed while a check child hangs ------------------------------------------------------

_HANGING_CHECK = r"""
import sys, time
from pathlib import Path
import agent.activation.check as cc
cc._child_check = lambda *a: time.sleep(600)  # a child that hangs without using CPU
print("checking", flush=True)
cc.check_isolated(Path("m.tflite"), None, None, threads=1, runtime="auto", timeout_s=60)
"""


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:  # that thread ended since the listing (seen under load)
            continue
    return out


def test_a_check_child_does_not_outlive_a_killed_agent() -> None:
    """The agent SIGKILLed (OOM, the watchdog, a power button) while its candidate check
    hangs: the check child must end too. It lived on (RLIMIT_CPU never fires for a child
    that does not run) -- found when a deadlocked child outlived its agent in these tests."""
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", _HANGING_CHECK],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"checking\n"
        deadline = time.monotonic() + 10
        while not (kids := _children(proc.pid)):
            assert time.monotonic() < deadline, "no check child"
            time.sleep(0.05)
        child = kids[0]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while Path(f"/proc/{child}").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
            assert time.monotonic() < deadline, "the check child outlived the agent"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
