"""``litefleet rollout`` and ``push`` against a real Mosquitto, with synthetic devices.

The devices are :class:`tests.support.fake_fleet.FakeFleet`: they follow the repository's
signed targets and report metrics in the rollout schema (latency, output sketch, shadow
agreement), so the controller's whole path runs (broker, store, signing, publishing,
gates, decisions) in seconds. tests/e2e/test_rollout.py does the same with real agents.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import Rollout, canary_bucket
from converter.repo.repository import Repository
from converter.rollout.store import RolloutStore
from tests.support.fake_fleet import Behaviour, FakeFleet
from tests.support.harness import REPO_ROOT, litefleet, must, read_retained

MODEL = "m"
TFL = b"\x00\x00\x00\x00TFL3"


def model_file(folder: Path, tag: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{tag}.tflite"
    path.write_bytes(TFL + tag.encode() * 64)
    return path


def devices_by_bucket(n: int) -> list[str]:
    return sorted((f"dev-{i:02d}" for i in range(n)), key=lambda d: canary_bucket(d, MODEL))


def pct_selecting(ids: list[str], count: int) -> int:
    return int(canary_bucket(ids[count - 1], MODEL)) + 1


class Setup:
    def __init__(self, broker: Any, tmp: Path) -> None:
        self.broker = broker
        self.tmp = tmp
        self.repo = tmp / "repo"
        must("repo", "init", str(self.repo))
        must(
            "push",
            str(model_file(tmp / "m1", "v1")),
            "--repo",
            str(self.repo),
            "--name",
            MODEL,
            "--no-check-data",
            "--broker",
            broker.url,
        )

    def targets_version(self) -> int:
        return Repository.open(self.repo).targets.signed.version

    def rollout(self, *args: str, broker: bool = True) -> tuple[int, str, str]:
        extra = ("--broker", self.broker.url) if broker else ()
        return litefleet("rollout", *args, "--repo", str(self.repo), *extra)

    def start(self, tag: str, *args: str) -> tuple[int, str, str]:
        return self.with_model("start", tag, *args)

    def plan(self, tag: str, *args: str) -> tuple[int, str, str]:
        return self.with_model("plan", tag, *args)

    def with_model(self, command: str, tag: str, *args: str) -> tuple[int, str, str]:
        """``litefleet rollout COMMAND`` of a new model file named ``tag``, on this broker."""
        model = model_file(self.tmp / tag, tag)
        return litefleet(
            "rollout",
            command,
            str(model),
            "--repo",
            str(self.repo),
            "--name",
            MODEL,
            "--no-check-data",
            "--broker",
            self.broker.url,
            *args,
        )

    def releases(self) -> dict[int, Rollout]:
        return Repository.open(self.repo).model_releases(MODEL)


@pytest.fixture
def setup(broker: Any, tmp_path: Path) -> Setup:
    return Setup(broker, tmp_path)


@pytest.fixture
def fleet_of(setup: Setup) -> Iterator[Any]:
    fleets: list[FakeFleet] = []

    def make(n: int, behaviour: Any, **kw: Any) -> tuple[FakeFleet, list[str]]:
        ids = devices_by_bucket(n)
        fleet = FakeFleet(setup.broker.port, setup.repo, MODEL, ids, behaviour, start_version="1", **kw)
        fleets.append(fleet)
        return fleet, ids

    yield make
    for f in fleets:
        f.stop()


FAST = ("--bake", "2s", "--min-samples", "30", "--shadow-k", "2")


def test_bad_input_is_one_line_exit_2_and_nothing_signed(setup: Setup, fleet_of: Any) -> None:
    fleet_of(4, lambda v: Behaviour())
    before = setup.targets_version()
    cases = [
        (["--gate", "agreemnt>=0.9"], "unknown gate 'agreemnt'"),
        (["--gate", "agreement==0.9"], "NAME OP NUMBER"),
        (["--waves", "50,10,100"], "larger than the one before"),
        (["--waves", "10,50"], "must be 100"),
        (["--bake", "0s"], "above zero"),
        (["--bake", "soon"], "above zero"),
        (["--min-samples", "0"], "at least 1"),
        (["--name", "Bad Name"], "model name"),
        (["--target", "device:x"], "no waves"),
    ]
    for extra, says in cases:
        code, out, err = setup.start("v2", *extra)
        assert code == 2, (extra, out, err)
        assert says in err and err.count("\n") == 1, (extra, err)
    assert setup.targets_version() == before and not RolloutStore(setup.repo).names()
    assert not (setup.tmp / "v2").joinpath("nothing").exists()


def test_a_model_without_its_card_and_golden_vectors_is_refused_like_push(setup: Setup) -> None:
    before = setup.targets_version()
    args = ["--repo", str(setup.repo), "--name", MODEL, "--broker", setup.broker.url]
    code, _, err = litefleet("rollout", "start", str(model_file(setup.tmp / "v2", "v2")), *args)
    assert code == 2 and "no card (v2.card.json) and no golden vectors" in err and "--no-check-data" in err
    assert setup.targets_version() == before and not RolloutStore(setup.repo).names()


def test_a_first_wave_that_selects_no_known_device_is_refused(setup: Setup, fleet_of: Any) -> None:
    _, ids = fleet_of(3, lambda v: Behaviour())
    low = int(canary_bucket(ids[0], MODEL))  # a wave below every device's bucket
    if low < 1:
        pytest.skip("a device has bucket 0")
    before = setup.targets_version()
    code, _, err = setup.start("v2", "--waves", f"{low},100")
    assert code == 2 and "selects NONE of the 3 known devices" in err and "--allow-empty" in err
    assert setup.targets_version() == before and setup.releases() == {1: Rollout()}


def test_push_says_which_known_devices_a_rule_selects(setup: Setup, fleet_of: Any) -> None:
    _, ids = fleet_of(2, lambda v: Behaviour())
    pct = int(canary_bucket(ids[0], MODEL))  # selects neither of the two
    if pct < 1:
        pytest.skip("a device has bucket 0")
    out = must(
        "push",
        str(model_file(setup.tmp / "p", "p")),
        "--repo",
        str(setup.repo),
        "--name",
        MODEL,
        "--no-check-data",
        "--canary",
        str(pct),
        "--broker",
        setup.broker.url,
    )
    assert f"{MODEL} v2 for all (canary {pct} %): selects NONE of the 2 known devices" in out
    out = must(
        "push",
        str(model_file(setup.tmp / "q", "q")),
        "--repo",
        str(setup.repo),
        "--name",
        MODEL,
        "--no-check-data",
        "--broker",
        setup.broker.url,
    )
    assert f"selects 2 of 2 known devices: {', '.join(sorted(ids))}" in out


def test_every_retained_state_is_a_known_device_beyond_the_in_flight_window(setup: Setup) -> None:
    """The controller reads the device states behind the sync barrier. At QoS 1 Mosquitto
    sent only an in-flight window of them before it: 50 of these 150 were known, and 13 of
    20 real agents in a CI run, where a persistent session's queued events took slots first."""
    from tests.support.harness import publish_many
    from tests.support.payloads import state_payload

    ids = [f"dev-{i:03d}" for i in range(150)]
    states = [(f"litefleet/v1/devices/{d}/state", state_payload(device_id=d)) for d in ids]
    publish_many(setup.broker.port, [(t, p, True) for t, p in states])
    code, out, err = setup.plan("v2", "--json")
    assert code == 0, err
    assert json.loads(out)["known_devices"] == len(ids)


def test_plan_names_the_devices_of_each_wave(setup: Setup, fleet_of: Any) -> None:
    _, ids = fleet_of(10, lambda v: Behaviour())
    first = pct_selecting(ids, 2)
    code, out, err = setup.plan("v2", "--waves", f"{first},100", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["version"], doc["previous"], doc["known_devices"]) == (2, 1, 10)
    assert doc["waves"][0]["selected"] == sorted(ids[:2]) and doc["waves"][1]["count"] == 10
    assert setup.releases() == {1: Rollout()}  # nothing signed


def test_a_good_version_is_promoted_through_every_wave(setup: Setup, fleet_of: Any) -> None:
    fleet, ids = fleet_of(10, lambda v: Behaviour(latency_ms=1.0, agreement=0.99), requests_per_tick=30)
    first = pct_selecting(ids, 2)
    fleet.start()
    code, out, err = setup.start("v2", "--waves", f"{first},60,100", *FAST, "--json")
    assert code == 0, err
    final = json.loads(out)
    assert final["state"] == "promoted" and final["version"] == 2 and final["reason"] is None
    assert [w["canary_pct"] for w in final["waves"]] == [first, 60, 100]
    assert final["waves"][0]["devices"]["canary"] >= 2 and final["waves"][0]["devices"]["control"] >= 1
    gates = final["waves"][0]["gates"]
    assert gates["agreement"]["verdict"] == "pass" and gates["agreement"]["samples"] >= 30
    assert gates["latency_p99_ratio"]["verdict"] == "pass" and gates["drift_js"]["verdict"] == "pass"
    assert setup.releases()[2] == Rollout("all", 100)  # no shadow on the last wave
    assert len(final["targets_versions"]) == 3 == len(set(final["targets_versions"]))
    wire = json.loads(read_retained(setup.broker.port, f"litefleet/v1/rollouts/{MODEL}") or b"{}")
    assert wire["state"] == "promoted" and wire["version"] == 2
    assert "promoted" in err  # the live view went to stderr (--json owns stdout)


@pytest.mark.parametrize(
    ("bad", "gate"),
    [
        (Behaviour(latency_ms=1.0, agreement=0.2), "agreement"),
        (Behaviour(latency_ms=30.0, agreement=1.0), "latency_p99"),  # _ratio or _self: both fail
        (Behaviour(latency_ms=1.0, agreement=1.0, classes=(1.0,) + (0.0,) * 9), "drift_js"),
    ],
)
def test_a_bad_version_aborts_in_the_first_wave_and_devices_go_back(
    setup: Setup, fleet_of: Any, bad: Behaviour, gate: str
) -> None:
    fleet, ids = fleet_of(10, lambda v: bad if v == "2" else Behaviour(latency_ms=1.0), requests_per_tick=30)
    first = pct_selecting(ids, 2)
    fleet.start()
    gates = [] if gate == "drift_js" else ["--gate", "drift_js=off"]
    code, out, err = setup.start("v2", "--waves", f"{first},60,100", *FAST, *gates)
    assert code == 1, (out, err)
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"litefleet: rollout {MODEL} v2 aborted: {gate}") and "go back to v1" in line
    assert setup.releases() == {1: Rollout()}
    deadline = time.monotonic() + 10
    while any(d.active != "1" for d in fleet.devices) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(d.active == "1" for d in fleet.devices)
    took = {dev for dev, version in fleet.downloads if version == "2"}
    assert took and took <= set(ids[:2])  # only the first wave ever took v2
    record = RolloutStore(setup.repo).load(MODEL)
    assert record is not None and record.state.value == "aborted" and len(record.steps) == 2


def test_junk_from_a_device_is_ignored_and_counted(setup: Setup, fleet_of: Any) -> None:
    fleet, ids = fleet_of(6, lambda v: Behaviour(agreement=0.99), requests_per_tick=30)
    junk = fleet.devices[-1]
    real = junk.metrics_payload

    def broken() -> bytes:
        doc = json.loads(real())
        doc["models"][0]["outputs"] = {"kind": "classes", "n": -3, "classes": "lots"}
        doc["models"][0]["histogram_ms"] = [[1e300, 10**30]]
        return json.dumps(doc).encode()

    junk.metrics_payload = broken  # type: ignore[method-assign]
    fleet.start()
    code, out, err = setup.start("v2", "--waves", f"{pct_selecting(ids, 2)},100", *FAST, "--json")
    assert code == 0, err
    assert json.loads(out)["ignored"].get(junk.device_id, 0) > 0


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "converter.cli.main", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=timeout,
    )


def test_detached_rollout_driven_by_the_service_with_pause_resume_and_abort(
    setup: Setup, fleet_of: Any
) -> None:
    fleet, ids = fleet_of(6, lambda v: Behaviour(), requests_per_tick=0)  # no traffic: gates wait
    fleet.start()
    code, out, err = setup.start(
        "v2", "--waves", f"{pct_selecting(ids, 2)},100", "--bake", "1s", "--max-wait", "2s", "--detach"
    )
    assert code == 0 and "litefleet rollout service" in out, err
    code, _, err = setup.start("v3", "--bake", "1s")  # one rollout per model at a time
    assert code == 2 and "is not finished" in err
    service = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "converter.cli.main",
            "rollout",
            "service",
            "--repo",
            str(setup.repo),
            "--broker",
            setup.broker.url,
        ],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    store = RolloutStore(setup.repo)

    def wait_state(*states: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = store.load(MODEL)
            if rec is not None and rec.state.value in states:
                return rec
            time.sleep(0.1)
        raise AssertionError(f"rollout never reached {states}: {store.load(MODEL)}")

    try:
        held = wait_state("holding")  # signed, watched, not enough traffic
        assert "not enough traffic" in (held.reason or "") and setup.releases()[2].canary_pct < 100
        assert store.driver_pid(MODEL) == service.pid
        code, out, _ = setup.rollout("status", "--json", broker=False)
        status = json.loads(out)[0]
        assert status["state"] == "holding" and status["driver_pid"] == service.pid
        assert setup.rollout("pause", MODEL, broker=False)[0] == 0
        wait_state("paused")
        assert setup.rollout("resume", MODEL)[0] == 0
        wait_state("baking", "holding")
        code, out, err = setup.rollout("abort", MODEL)
        assert code == 0 and "aborted: aborted by the operator" in out, err
        assert setup.releases() == {1: Rollout()}
        wire = json.loads(read_retained(setup.broker.port, f"litefleet/v1/rollouts/{MODEL}") or b"{}")
        assert wire["state"] == "aborted"
    finally:
        service.send_signal(signal.SIGTERM)
        output = service.communicate(timeout=30)[0]
    assert service.returncode == 0, output
    assert f"driving rollout {MODEL} v2" in output  # a service's log says what it does, at info
