"""Issue 10 end to end: 20 real agents, one real Mosquitto, live REST traffic, the rollout controller.

The fleet: 20 ``python -m agent run`` processes (metrics every second, REST on loopback)
serving the digits CNN v1, and a traffic thread per device posting held-out digits to its
``:predict`` at ~10 requests/s for the whole module. The controller runs as a real
``litefleet rollout`` process (its CPU time and peak memory are reported at the end), in
waves chosen from the devices' canary buckets so that the first wave holds 3 devices.

* (a) a version as accurate as v1 but ~50x slower (the same CNN behind identity
  convolutions) aborts in the first wave on latency; its canaries are back on v1, and no
  device outside the first wave ever downloaded it (events, state folders);
* (b) a version trained on permuted labels (it passes its own golden vectors) aborts on
  live agreement (shadow evaluation on the canaries);
* (c) a version retrained with another seed is promoted through every wave to 100 %;
* (d) the same again, with the controller SIGKILLed after its first promotion and resumed
  with ``rollout resume``: the same end, one signing per wave, every targets version
  accounted for.

(b), (c) and (d) need the agent side of issue 10 (output sketches, shadow agreement); (a)
needs only the latency histograms agents already report (``-k latency`` runs it alone).
Marked ``slow``; 3 min 39 s on 2 cores (with the agent side merged), ~100 s of it making the
models and starting the fleet.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.files import file_sha256
from agent.protocol import canary_bucket
from converter.broker.mosquitto import free_port
from converter.repo.repository import Repository
from converter.rollout.record import RolloutState, StepKind
from converter.rollout.store import RolloutStore
from tests.support.harness import REPO_ROOT, AgentProcess, FleetWatcher, must, soak_report

pytestmark = pytest.mark.slow

MODEL = "digits"
DEVICES = 20
RATE_PER_DEVICE = 10.0
BAKE = "20s"
# the same gates for every scenario. 20 agents, their traffic and the controller share 2
# cores here, so the p99 of a 0.05 ms inference is scheduling noise of ~0.5-1.5 ms:
# measured, the canary/control ratio of two equal models read 0.45-2.1 once settled (2.1
# in a second wave, 10 devices having just loaded the new version; 3.1 when a resumed
# controller counted canaries that had switched a moment before it started, before it
# settled too), while one device's p99 from a few dozen requests before the switch against
# the same device under the rollout's load moved by 8-14x (latency_p99_self is off here
# for that reason; tests/converter/rollout has it). v2 read ratios of 64-241. With a
# busy-loop process beside the test, a retrained (equal-cost) v4 read 5.46 (p99 1.1 ms vs
# 0.20 ms) and was aborted at the old bound of 5: the bound is 20, between the two.
GATES = (
    "--min-samples",
    "30",
    "--shadow-k",
    "5",
    "--gate",
    "latency_p99_ratio<=20",
    "--gate",
    "latency_p99_self=off",
)


def vm_hwm_kb(pid: int) -> int:
    """Peak resident memory of a running process (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def waves_seen(out: str) -> list[dict[str, Any]]:
    """Per wave of a final record: its percentage, outcome, devices and gate values."""
    try:
        final = json.loads(out)
    except ValueError:
        return []
    return [
        {
            "pct": w["canary_pct"],
            "outcome": w["outcome"],
            "canary": w["devices"].get("canary"),
            "control": w["devices"].get("control"),
            **{k: (g["value"], g["samples"]) for k, g in w["gates"].items() if g["value"] is not None},
        }
        for w in final.get("waves", [])
    ]


def device_ids() -> list[str]:
    return sorted((f"pi-{i:02d}" for i in range(DEVICES)), key=lambda d: canary_bucket(d, MODEL))


def waves(ids: list[str]) -> str:
    """First wave: the 3 lowest buckets; second: the 10 lowest; then everyone."""
    first = int(canary_bucket(ids[2], MODEL)) + 1
    second = max(first + 1, int(canary_bucket(ids[9], MODEL)) + 1)
    return f"{first},{second},100"


@dataclass
class Traffic:
    """Held-out digits posted to every device's REST API, ~RATE_PER_DEVICE per second each."""

    ports: dict[str, int]
    inputs: Any
    stop: threading.Event = field(default_factory=threading.Event)
    answers: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Traffic:
        for device, port in self.ports.items():
            t = threading.Thread(target=self._loop, args=(device, port), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def _loop(self, device: str, port: int) -> None:
        rng = random.Random(device)
        conn: http.client.HTTPConnection | None = None
        pause = 1.0 / RATE_PER_DEVICE
        while not self.stop.wait(pause * rng.uniform(0.5, 1.5)):
            i = rng.randrange(len(self.inputs))
            body = json.dumps({"instances": self.inputs[i : i + 1].tolist()})
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request(
                    "POST", f"/v1/models/{MODEL}:predict", body, {"Content-Type": "application/json"}
                )
                resp = conn.getresponse()
                resp.read()
                self.answers[(device, resp.status)] += 1
            except (OSError, http.client.HTTPException):
                self.failures[device] += 1
                if conn is not None:
                    conn.close()
                conn = None

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)


@dataclass
class Fleet:
    tmp: Path
    broker: Any
    repo: Path
    agents: dict[str, AgentProcess]
    watch: FleetWatcher
    traffic: Traffic
    ids: list[str]
    waves: str
    costs: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[int, tuple[Any, Any, float]] = field(default_factory=dict)

    def active(self, device: str) -> str | None:
        return (self.watch.states.get(device) or {}).get("version")

    def wait_all_on(self, version: int, timeout_s: float = 90) -> None:
        try:
            self.watch.wait_for(
                lambda: all(self.active(d) == str(version) for d in self.ids),
                timeout_s,
                f"every device on v{version}",
            )
        except AssertionError as exc:
            dead = {d: a.log()[-600:] for d, a in self.agents.items() if not a.alive()}
            raise AssertionError(f"{exc}\nagents that exited: {dead}") from None

    def rollout(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """A controller process; its output goes to files (a pipe could fill and stall it)."""
        cmd = [
            sys.executable,
            "-m",
            "converter.cli.main",
            "rollout",
            *args,
            "--repo",
            str(self.repo),
            "--broker",
            self.broker.url,
        ]
        full = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
        n = len(self.outputs)
        out = open(self.tmp / f"controller-{n}.out", "w+")  # noqa: SIM115 (read back by finish)
        err = open(self.tmp / f"controller-{n}.err", "w+")  # noqa: SIM115
        proc = subprocess.Popen(cmd, env=full, stdout=out, stderr=err, text=True)
        self.outputs[proc.pid] = (out, err, time.monotonic())
        return proc

    def finish(self, proc: subprocess.Popen[str], what: str, timeout_s: float = 300) -> tuple[int, str, str]:
        """Wait for a controller process; record its CPU time and peak memory."""
        started = time.monotonic()
        deadline = started + timeout_s
        peak_kb = 0
        cpu_s: float | None = None
        while proc.returncode is None:  # Popen's kill() and poll() may have reaped it already
            peak_kb = max(peak_kb, vm_hwm_kb(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                cpu_s = round(usage.ru_utime + usage.ru_stime, 2)
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{what}: the controller did not finish in {timeout_s} s")
            time.sleep(0.2)
        *files, launched = self.outputs.pop(proc.pid)
        for f in files:
            f.seek(0)
        out, err = files[0].read(), files[1].read()
        for f in files:
            f.close()
        self.costs.append(
            {
                "run": what,
                "wall_s": round(time.monotonic() - launched, 1),
                "cpu_s": cpu_s,
                # VmHWM while it ran (ru_maxrss of a child counts the forked test process too)
                "peak_rss_mb": round(peak_kb / 1024, 1) if peak_kb else None,
                "exit": proc.returncode,
                "waves": waves_seen(out),
            }
        )
        return proc.returncode, out, err

    def start(self, model: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return self.rollout(
            "start",
            str(model),
            "--name",
            MODEL,
            "--waves",
            self.waves,
            "--bake",
            BAKE,
            *GATES,
            "--json",
            *extra,
            env=env,
        )

    def versions_seen(self, device: str) -> set[int]:
        return {
            int(e["version"])
            for e in self.watch.events_of(device)
            if e.get("model") == MODEL
            and e.get("event") in ("downloading", "verified", "activated")
            and "version" in e
        }


@pytest.fixture(scope="module")
def models(
    tmp_path_factory: pytest.TempPathFactory, digits_files: dict[str, Path], digits_data: Any
) -> dict[str, Path]:
    from tests.support.models import convert_digits
    from tests.support.rollout_models import slow_twin, trained

    folder = tmp_path_factory.mktemp("rollout_models")
    sources = {
        "v1": digits_files["keras"],
        "slow": slow_twin(digits_files["keras"], folder / "slow.keras"),
        "permuted": trained(digits_data, folder / "permuted.keras", seed=7, permute=True),
        "seed1": trained(digits_data, folder / "seed1.keras", seed=1),
        "seed2": trained(digits_data, folder / "seed2.keras", seed=2),
    }
    out = {}
    for tag, keras_path in sources.items():
        converted = convert_digits(
            keras_path,
            digits_files["calibration"],
            digits_files["validation"],
            folder / tag / "digits.tflite",
            "none",
        )
        out[tag] = converted.tflite
    return out


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path], digits_data: Any
) -> Iterator[Fleet]:
    from converter.broker.mosquitto import BrokerConfig, BrokerProcess

    tmp = tmp_path_factory.mktemp("rollout_e2e")
    broker = BrokerProcess(BrokerConfig(data_dir=tmp / "broker"))
    broker.start()
    repo = tmp / "repo"
    must("repo", "init", str(repo))
    must("push", str(models["v1"]), "--repo", str(repo), "--name", MODEL, "--broker", broker.url)
    ids = device_ids()
    ports = {d: free_port() for d in ids}
    agents = {
        d: AgentProcess(
            tmp,
            d,
            broker.url,
            repo / "root.json",
            http=f"127.0.0.1:{ports[d]}",
            metrics_interval_s=1.0,
            log_level="info",
        )
        for d in ids
    }
    watch = FleetWatcher(broker.port)
    traffic = Traffic(ports, digits_data.x_test)
    f = Fleet(tmp, broker, repo, agents, watch, traffic, ids, waves(ids))
    try:
        for a in agents.values():
            a.start()
        f.wait_all_on(1, timeout_s=180)
        traffic.start()
        yield f
    finally:
        traffic.close()
        for a in agents.values():
            a.stop()
        watch.close()
        broker.kill()
        soak_report(
            "rollout_e2e",
            devices=DEVICES,
            answers=sum(traffic.answers.values()),
            non_200=sum(n for (_, status), n in traffic.answers.items() if status != 200),
            transport_failures=sum(traffic.failures.values()),
            controller=f.costs,
            test_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        )


def first_wave(fleet: Fleet) -> list[str]:
    pct = int(fleet.waves.split(",")[0])
    return [d for d in fleet.ids if canary_bucket(d, MODEL) < pct]


def check_aborted(fleet: Fleet, out: str, err: str, gate: str) -> int:
    final = json.loads(out)
    version = int(final["version"])
    assert final["state"] == "aborted" and final["reason"].startswith(gate), final
    assert len(final["waves"]) == 1  # the first wave, never further
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"litefleet: rollout {MODEL} v{version} aborted: {gate}"), line
    canaries = first_wave(fleet)
    for d in canaries:
        fleet.watch.wait_active(d, MODEL, int(final["previous"]), 60)
    assert version not in Repository.open(fleet.repo).model_releases(MODEL)
    outside = [d for d in fleet.ids if d not in canaries]
    for d in outside:
        assert version not in fleet.versions_seen(d), d
        state_dir = fleet.agents[d].state_dir
        assert not (state_dir / "models" / MODEL / str(version)).exists(), d
    took = [d for d in canaries if version in fleet.versions_seen(d)]
    assert took, "no canary took the new version"
    return version


def test_a_slower_version_aborts_in_the_first_wave_on_latency(fleet: Fleet, models: dict[str, Path]) -> None:
    code, out, err = fleet.finish(fleet.start(models["slow"]), "a: slow v2")
    assert code == 1, err[-3000:]
    version = check_aborted(fleet, out, err, "latency_p99_ratio")
    outside = [d for d in fleet.ids if d not in first_wave(fleet)]
    sha = file_sha256(models["slow"])
    for d in outside:  # not even a partial download of the slow model's file
        assert not (fleet.agents[d].state_dir / "downloads" / f"{sha}.part").exists()
    gates = json.loads(out)["waves"][0]["gates"]
    assert gates["latency_p99_ratio"]["value"] > 20, gates
    assert version >= 2


def test_a_version_trained_on_permuted_labels_aborts_on_agreement(
    fleet: Fleet, models: dict[str, Path]
) -> None:
    code, out, err = fleet.finish(fleet.start(models["permuted"]), "b: permuted labels")
    assert code == 1, err[-3000:]
    check_aborted(fleet, out, err, "agreement")
    gates = json.loads(out)["waves"][0]["gates"]
    assert gates["agreement"]["value"] < 0.5 and gates["agreement"]["samples"] >= 30


def check_promoted(fleet: Fleet, out: str) -> int:
    final = json.loads(out)
    assert final["state"] == "promoted" and final["reason"] is None, final
    version = int(final["version"])
    assert [w["canary_pct"] for w in final["waves"]] == [int(p) for p in fleet.waves.split(",")]
    for wave in final["waves"][:-1]:
        assert wave["outcome"] == "passed"
        assert all(g["verdict"] in ("pass", "skip", "off") for g in wave["gates"].values()), wave["gates"]
        assert wave["gates"]["latency_p99_ratio"]["verdict"] == "pass"
        assert wave["devices"]["canary"] >= 3
    assert Repository.open(fleet.repo).model_releases(MODEL)[version].canary_pct == 100
    fleet.wait_all_on(version)
    return version


def test_a_retrained_version_is_promoted_through_every_wave(fleet: Fleet, models: dict[str, Path]) -> None:
    code, out, err = fleet.finish(fleet.start(models["seed1"]), "c: retrained, uninterrupted")
    assert code == 0, err[-3000:]
    check_promoted(fleet, out)


def test_a_controller_killed_mid_rollout_and_resumed_reaches_the_same_end(
    fleet: Fleet, models: dict[str, Path]
) -> None:
    base = Repository.open(fleet.repo).targets.signed.version
    store = RolloutStore(fleet.repo)
    earlier = store.load(MODEL)  # the last test's rollout, promoted: not this one
    proc = fleet.start(models["seed2"])
    # generous: the first wave bakes 20 s but may wait up to its max wait for samples, and
    # a loaded machine slows all of it
    deadline = time.monotonic() + 480
    rec = None
    while time.monotonic() < deadline and proc.poll() is None:  # after the first promotion,
        rec = store.load(MODEL)  # while wave 2 bakes (a controller that ended never gets there)
        if rec is not None and earlier is not None and rec.started == earlier.started:
            rec = None  # this rollout has not written its record yet
        elif rec is not None and ((rec.wave == 1 and rec.state is RolloutState.BAKING) or rec.state.terminal):
            break  # there, or it will never get there (say why below)
        time.sleep(0.2)
    if rec is None or rec.wave != 1 or rec.state is not RolloutState.BAKING:
        proc.kill()
        _, _, err = fleet.finish(proc, "d: never reached wave 2")
        raise AssertionError(f"the rollout never reached its second wave: {rec}", err[-3000:])
    proc.send_signal(signal.SIGKILL)
    code, _, _ = fleet.finish(proc, "d: killed")
    assert code == -signal.SIGKILL
    code, out, err = fleet.finish(fleet.rollout("resume", MODEL, "--json"), "d: resumed")
    assert code == 0, err[-3000:]
    check_promoted(fleet, out)
    record = store.load(MODEL)
    assert record is not None
    assert [(s.kind, s.wave) for s in record.steps] == [(StepKind.SIGN_WAVE, w) for w in range(3)]
    assert [s.targets_version for s in record.steps] == [base + 1, base + 2, base + 3]
    assert Repository.open(fleet.repo).targets.signed.version == base + 3
