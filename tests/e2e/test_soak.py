"""The long soak (``scripts/soak.sh``; marker ``soak``, skipped by the default suite).

1. **500 SIGKILLs** of the agent at random moments of downloading, checking and
   activating 14 MB models (``LITEFLEET_SOAK_KILLS``, default 500), with the
   broker SIGKILLed and restarted under it every 25 kills. After every restart:
   the REST API answers ``:predict`` with the model the state file names (or,
   before the first activation, says there is none); the state file's active and
   previous versions are signed and whole on disk; every 10 kills the agent runs
   until it reports, and the model it reports is the signed one. The same logic
   as ``test_delivery_resilience.py::test_sigkill_at_random_points_fifty_times``
   (its helpers are reused), ten times longer and with inference checked.
2. **Broker restarts and cut connections**, over and over while versions keep
   coming (``LITEFLEET_SOAK_FAULTS``, default 50 broker restarts and 200 cuts):
   every version is activated, the old one answered every REST call meanwhile.

Each test appends a JSON line with its figures to ``$LITEFLEET_SOAK_REPORT``
(scripts/soak.sh prints them and docs/reliability.md records the last run).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from agent.files import file_sha256
from converter.broker.mosquitto import free_port
from tests.support.faults import Prober, check_served_model, check_state, dense_body, read_state
from tests.support.harness import AgentProcess, FleetWatcher, http_json, must, soak_report
from tests.support.tcp_proxy import FaultProxy

pytestmark = pytest.mark.soak

WINDOW = 8


def predict(port: int, timeout_s: float = 10.0) -> tuple[int, Any]:
    return http_json(f"http://127.0.0.1:{port}/v1/models/m:predict", dense_body(), timeout_s=timeout_s)


def wait_serving(agent: AgentProcess, port: int, timeout_s: float = 60.0) -> bool:
    """Poll REST until it answers. The agent makes its start-up decisions (crash-loop
    rollback, re-checking the active model) and writes them before it serves, so the
    answer must agree with the state file: a model active -> :predict is a 200 with one
    prediction of 1000 values; none -> 404. True when a model answered."""
    started = time.monotonic()
    while True:
        before = (read_state(agent).get("models", {}).get("m") or {}).get("active")
        try:
            code, doc = predict(port)
        except OSError:
            code, doc = 0, None  # not listening yet
        if code:
            after = (read_state(agent).get("models", {}).get("m") or {}).get("active")
            if code == 200:  # a model answered: the state names one
                assert after, (code, doc)
                assert len(doc["predictions"]) == 1 and len(doc["predictions"][0]) == 1000
            else:  # none: the state named none when the request was made
                assert code == 404 and not before, (code, doc, before)
            return code == 200
        assert time.monotonic() - started < timeout_s, "the REST API never answered"
        time.sleep(0.05)


def test_soak_sigkill_during_download_and_activation(
    broker, tmp_path: Path, dense_models: list[Path]
) -> None:
    kills_wanted = int(os.environ.get("LITEFLEET_SOAK_KILLS", "500"))
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    proxy = FaultProxy(broker.port)
    proxy.rate_bytes_s = 20e6  # a 14 MB model takes ~0.7 s: kills land in download and checks
    port = free_port()
    agent = AgentProcess(
        tmp_path,
        "pi-1",
        proxy.url,
        repo / "root.json",
        download_window=WINDOW,
        probation_s=0.5,
        http=f"127.0.0.1:{port}",
        log_level="info",
    )
    signed: dict[int, str] = {}
    rng = random.Random(int(os.environ.get("LITEFLEET_SOAK_SEED", "4242")))
    version = 0

    def push_next() -> None:
        nonlocal version
        model = dense_models[version % 2]
        must("push", str(model), "--repo", str(repo), "--name", "m", "--broker", broker.url)
        version += 1
        signed[version] = file_sha256(model)

    push_next()
    watch = FleetWatcher(broker.port)
    kills = broker_restarts = reports = answered = activations = crash_loops = 0
    seen_boots: set[str] = set()
    started = time.monotonic()
    try:
        while kills < kills_wanted:
            agent.start()
            answered += wait_serving(agent, port)  # the restart serves at once what it has
            if kills % 25 == 24:
                # the broker dies under the running agent too. Mosquitto saves retained
                # messages every 2 s, so a push just before may be lost on the broker: a device
                # that saw it then refuses the older files as a rollback (and keeps serving)
                # until the host publishes again -- here at once, as a cron job would.
                time.sleep(rng.uniform(0.0, 0.8))
                broker.kill()
                time.sleep(rng.uniform(0.1, 1.0))
                broker.start()
                broker_restarts += 1
                must("repo", "publish", str(repo), "--broker", broker.url)
                watch.close()
                watch = FleetWatcher(broker.port)
            time.sleep(rng.uniform(0.0, 2.0))
            agent.kill()
            kills += 1
            check_served_model(agent, signed)
            if kills % 10 == 0:
                # this restart runs until it reports: what it serves is what it was signed as
                agent.start()

                def new_boot_online(w: FleetWatcher = watch) -> bool:
                    st = w.states.get("pi-1") or {}
                    return st.get("boot") not in seen_boots and st.get("online") is True

                watch.wait_for(new_boot_online, 90, "the restarted agent to report")
                st = watch.states["pi-1"]
                seen_boots.add(st["boot"])
                if st["models"]:
                    reported = st["models"]["m"]
                    assert signed[reported["version"]] == reported["sha256"]
                reports += 1
                agent.kill()
                check_served_model(agent, signed)
            ms = read_state(agent).get("models", {}).get("m") or {}
            active = ms.get("active")
            if active and active["version"] == version:
                activations += 1
                push_next()  # keep it busy downloading and activating
            elif any(r["version"] == version for r in ms.get("rejected", [])):
                # killed during its trial too often: rolled back (crash_loop), never retried
                crash_loops += 1
                push_next()
        agent.start()
        watch.wait_active("pi-1", "m", version, timeout_s=180)
        assert wait_serving(agent, port)
        check_served_model(agent, signed)
    finally:
        agent.stop()
        watch.close()
        proxy.close()
    soak_report(
        "sigkill",
        kills=kills,
        restarts_serving=answered,
        agent_reports=reports,
        crash_loops=crash_loops,
        broker_restarts=broker_restarts,
        activations=activations,
        versions=version,
        minutes=round((time.monotonic() - started) / 60, 1),
    )
    assert activations >= kills_wanted // 20, f"only {activations} activations in {kills} kills"


def test_soak_broker_restarts_and_cut_connections(broker, tmp_path: Path, dense_models: list[Path]) -> None:
    faults_wanted = int(os.environ.get("LITEFLEET_SOAK_FAULTS", "50"))
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    proxy = FaultProxy(broker.port)
    port = free_port()
    agent = AgentProcess(
        tmp_path,
        "pi-1",
        proxy.url,
        repo / "root.json",
        download_window=WINDOW,
        http=f"127.0.0.1:{port}",
        log_level="info",
    )
    signed: dict[int, str] = {}
    rng = random.Random(int(os.environ.get("LITEFLEET_SOAK_SEED", "4242")))
    watch = FleetWatcher(broker.port)
    restarts = cuts = 0
    versions = 1
    started = time.monotonic()
    try:
        must("push", str(dense_models[0]), "--repo", str(repo), "--name", "m", "--broker", broker.url)
        signed[1] = file_sha256(dense_models[0])
        agent.start()
        watch.wait_active("pi-1", "m", 1, timeout_s=60)
        while restarts < faults_wanted or cuts < 4 * faults_wanted:
            assert versions < 10 * faults_wanted + 20, (versions, restarts, cuts)
            versions += 1
            model = dense_models[(versions - 1) % 2]
            proxy.rate_bytes_s = 2e6  # ~7 s for the model: the faults land mid-transfer
            prober = Prober(port, dense_body()).start()
            must("push", str(model), "--repo", str(repo), "--name", "m", "--broker", broker.url)
            pushed = time.monotonic()
            signed[versions] = file_sha256(model)
            try:
                deadline = time.monotonic() + 180
                while watch.active("pi-1") != ("m", str(versions)):
                    assert time.monotonic() < deadline, f"v{versions} never activated"
                    time.sleep(rng.uniform(0.3, 1.2))
                    # (a broker SIGKILL only once the push is past Mosquitto's 2 s autosave:
                    # the loss of a fresher push is test_soak_sigkill's business)
                    if rng.random() < 0.25 and restarts < faults_wanted and time.monotonic() - pushed > 2.5:
                        broker.kill()
                        time.sleep(rng.uniform(0.1, 1.0))
                        broker.start()
                        restarts += 1
                        watch.close()
                        watch = FleetWatcher(broker.port)
                    elif proxy.cut():
                        cuts += 1
                    check_state(agent, signed)  # (the agent runs: check_served_model would race it)
                    if time.monotonic() > deadline - 60:
                        proxy.rate_bytes_s = None  # let this one finish
                prober.stop(seen=str(versions))
            finally:
                prober.stop()
            prober.check(str(versions - 1), str(versions))
            proxy.rate_bytes_s = None
        assert agent.alive()
        check_state(agent, signed)
    finally:
        agent.stop()
        watch.close()
        proxy.close()
    soak_report(
        "broker_restarts_and_cuts",
        broker_restarts=restarts,
        cuts=cuts,
        versions_activated=versions,
        minutes=round((time.monotonic() - started) / 60, 1),
    )
