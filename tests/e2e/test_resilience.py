"""Delivery through failures: broker restarts, dropped links, agents killed mid-flight, crash loops."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from agent.files import file_sha256
from agent.protocol import DEFAULT_CHUNK_SIZE
from tests.support.faults import check_served_model, read_state
from tests.support.harness import AgentProcess, FleetWatcher, must
from tests.support.tcp_proxy import FaultProxy

WINDOW = 8


def test_broker_killed_halfway_through_a_14mb_model(
    broker, tmp_path: Path, digits_int8, dense_models: list[Path]
) -> None:
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "m", "--broker", broker.url)
    proxy = FaultProxy(broker.port)
    watch = FleetWatcher(broker.port)
    agent = AgentProcess(tmp_path, "pi-1", proxy.url, repo / "root.json", download_window=WINDOW)
    try:
        agent.start()
        watch.wait_active("pi-1", "m", 1, timeout_s=60)
        size = dense_models[0].stat().st_size
        proxy.rate_bytes_s = 2e6  # about 7 s for the model
        must("push", str(dense_models[0]), "--repo", str(repo), "--name", "m", "--broker", broker.url)
        time.sleep(2.5)  # past the broker's 2 s autosave: the retained chunks are on its disk
        watch.wait_for(
            lambda: any(
                e.get("event") == "downloading" and e.get("version") == 2 and e.get("bytes", 0) >= size * 0.4
                for e in watch.events
            ),
            30,
            "the download to pass 40 %",
        )
        broker.kill()  # SIGKILL: no goodbye, no final save
        time.sleep(1.0)
        broker.start()
        watch.close()
        watch = FleetWatcher(broker.port)
        watch.wait_active("pi-1", "m", 2, timeout_s=90)
        # events are not retained: the one sent while our watcher reconnected is in the agent's log
        line = next(ln for ln in agent.log().splitlines() if " verified " in ln and " version=2 " in ln)
        received = int(line.split(" bytes_received=")[1].split()[0])
        # the model once, plus at most the window that was in flight when the broker died
        assert size <= received <= size + WINDOW * DEFAULT_CHUNK_SIZE, (received, size)
        assert agent.alive()
    finally:
        agent.stop()
        watch.close()
        proxy.close()


def test_agent_killed_mid_download_resumes_without_refetching(
    broker, tmp_path: Path, dense_models: list[Path]
) -> None:
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    must("push", str(dense_models[0]), "--repo", str(repo), "--name", "m", "--broker", broker.url)
    size = dense_models[0].stat().st_size
    proxy = FaultProxy(broker.port)
    proxy.rate_bytes_s = 4e6
    agent = AgentProcess(tmp_path, "pi-1", proxy.url, repo / "root.json", download_window=WINDOW)
    watch = FleetWatcher(broker.port)
    try:
        agent.start()
        watch.wait_for(
            lambda: any(
                e.get("event") == "downloading" and e.get("bytes", 0) >= size * 0.4 for e in watch.events
            ),
            30,
            "the download to pass 40 %",
        )
        agent.kill()
        part = next((agent.state_dir / "downloads").glob("*.part"))
        assert part.stat().st_size > 0
        proxy.rate_bytes_s = None
        agent.start()
        watch.wait_active("pi-1", "m", 1, timeout_s=60)
        ev = [e for e in watch.events if e.get("event") == "verified"][-1]
        present = ev["chunks_present"]
        assert present * DEFAULT_CHUNK_SIZE >= size * 0.3, ev
        # the second process fetched only what was missing (plus at most one window)
        assert ev["bytes_received"] <= size - present * DEFAULT_CHUNK_SIZE + WINDOW * DEFAULT_CHUNK_SIZE, ev
        assert not list((agent.state_dir / "downloads").iterdir())
    finally:
        agent.stop()
        watch.close()
        proxy.close()


@pytest.mark.slow
def test_sigkill_at_random_points_fifty_times(
    broker, tmp_path: Path, digits_int8, dense_models: list[Path]
) -> None:
    """Kill -9 the agent at random moments of download and activation; after every restart the
    model it serves is whole and is one the signed metadata named."""
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    proxy = FaultProxy(broker.port)
    proxy.rate_bytes_s = 20e6  # a 14 MB model takes ~0.7 s: kills land in download and checks
    agent = AgentProcess(
        tmp_path, "pi-1", proxy.url, repo / "root.json", download_window=WINDOW, probation_s=0.5
    )
    signed: dict[int, str] = {}
    models = [dense_models[0], dense_models[1]]
    rng = random.Random(1234)
    version = 0

    def push_next() -> None:
        nonlocal version
        model = models[version % 2]
        must("push", str(model), "--repo", str(repo), "--name", "m", "--broker", broker.url)
        version += 1
        signed[version] = file_sha256(model)

    push_next()
    watch = FleetWatcher(broker.port)
    kills = 0
    activations_seen = 0
    seen_boots: set[str] = set()
    try:
        while kills < 50:
            agent.start()
            time.sleep(rng.uniform(0.1, 2.5))
            agent.kill()
            kills += 1
            check_served_model(agent, signed)
            if kills % 5 == 0:
                # this restart runs until it reports: what it serves is what the state file says
                agent.start()
                watch.wait_for(
                    lambda: (
                        (watch.states.get("pi-1") or {}).get("boot") not in seen_boots
                        and (watch.states.get("pi-1") or {}).get("online") is True
                    ),
                    60,
                    "the restarted agent to report",
                )
                st = watch.states["pi-1"]
                seen_boots.add(st["boot"])
                if st["models"]:
                    reported = st["models"]["m"]
                    assert signed[reported["version"]] == reported["sha256"]
                agent.kill()
                check_served_model(agent, signed)
            state = read_state(agent)
            active = (state.get("models", {}).get("m") or {}).get("active")
            if active and active["version"] == version:
                activations_seen += 1
                push_next()  # keep the agent busy downloading and activating
        # finally let it settle and serve the newest version
        agent.start()
        watch.wait_active("pi-1", "m", version, timeout_s=120)
        check_served_model(agent, signed)
        assert activations_seen >= 3, f"only {activations_seen} activations in {kills} kills"
    finally:
        agent.stop()
        watch.close()
        proxy.close()


def test_a_crash_loop_rollback_is_reported_though_decided_before_connecting(
    broker, tmp_path: Path, digits_int8
) -> None:
    """An agent that ends uncleanly while a version is on trial rolls it back at a start-up,
    before its first connection: that rolled_back event (the rollout controller aborts on
    it, docs/rollouts.md) must still reach the broker once the agent connects."""
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    agent = AgentProcess(
        tmp_path,
        "pi-cl",
        broker.url,
        repo / "root.json",
        probation_s=3600.0,
        probation_inferences=1_000_000,
        max_crash_restarts=2,
    )
    watch = FleetWatcher(broker.port)
    try:
        agent.start()
        must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits", "--broker", broker.url)
        watch.wait_active("pi-cl", "digits", 1, timeout_s=60)
        for _ in range(3):  # three unclean ends on trial: the third start rolls it back
            boot = watch.states["pi-cl"]["boot"]
            agent.kill()
            agent.start()
            watch.wait_for(
                lambda boot=boot: (
                    (watch.states.get("pi-cl") or {}).get("boot") not in (None, boot)
                    and watch.states["pi-cl"]["online"] is True
                ),
                60,
                "the agent back online",
            )
        watch.wait_for(lambda: bool(watch.events_of("pi-cl", "rolled_back")), 30, "the rolled_back event")
        (ev,) = watch.events_of("pi-cl", "rolled_back")
        assert (ev["reason"], ev["version"], ev["model"]) == ("crash_loop", 1, "digits"), ev
        assert ev["boot"] == watch.states["pi-cl"]["boot"]  # the start-up that decided it
        # the state says it too, after its error has cleared: why the device runs nothing
        watch.wait_for(
            lambda: (watch.states.get("pi-cl") or {}).get("error") is None, 60, "the error cleared"
        )
        assert watch.states["pi-cl"]["refused"] == {"digits": {"version": 1, "reason": "crash_loop"}}
        table = must("status", "--broker", broker.url)
        assert "pi-cl refused digits v1 (crash_loop) and runs no version of it" in table, table
    finally:
        agent.stop()
        watch.close()


def test_restart_isolation_a_model_that_hangs_the_agent_is_rejected_by_its_restart(
    broker, tmp_path: Path, digits_int8
) -> None:
    """check_isolation = "restart": the agent checks candidates itself (no child). A model
    that never returns holds the check past check_timeout_s of CPU; the agent then ends with
    status 70 (a failure: systemd's Restart=on-failure starts it again), and that start
    rejects the model, reports it, and serves the version before it."""
    from tests.support.models import _never_returning_model

    hang = tmp_path / "hang" / "hang.tflite"
    hang.parent.mkdir()
    _never_returning_model(hang)
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    agent = AgentProcess(
        tmp_path, "pi-rs", broker.url, repo / "root.json", check_isolation="restart", check_timeout_s=2.0
    )
    watch = FleetWatcher(broker.port)
    try:
        agent.start()
        must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "m", "--broker", broker.url)
        watch.wait_active("pi-rs", "m", 1, timeout_s=60)
        must("push", str(hang), "--repo", str(repo), "--name", "m", "--broker", broker.url, "--no-check-data")
        assert agent.proc is not None
        code = agent.proc.wait(120)
        assert code == 70, agent.log()[-2000:]
        assert "the candidate's check used more than 2 s of CPU time" in agent.log()
        assert agent.state_file()["models"]["m"]["checking"]["version"] == 2
        if not os.environ.get("INVOCATION_ID"):  # not a systemd service, not under runit: said at start
            assert "nothing seems to start it again" in agent.log()
        agent.proc = None
        agent.start()  # what the unit's Restart=on-failure does
        ev = watch.wait_event("pi-rs", "rejected", timeout_s=60, version=2)
        assert ev["reason"] == "crashed", ev
        watch.wait_for(lambda: watch.active("pi-rs") == ("m", "1"), 30, "version 1 serving again")
        assert agent.alive()
        state = agent.state_file()["models"]["m"]
        assert state["checking"] is None and [r["version"] for r in state["rejected"]] == [2]
    finally:
        agent.stop()
        watch.close()
