"""The simulator's CPU gate: each simulated device verifies TUF metadata and checks and
activates a candidate only while it holds one of the fleet's permits, so that a thousand
devices activating at once leave the shared network thread its share of the interpreter
(agent.service.simulate says why). In-process, three devices, a real broker and model."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from agent.service.config import load_config
from agent.service.simulate import SimulatedFleet
from tests.support.harness import must, push, watching, write_agent_config


class RecordingGate:
    """A gate that records which threads passed through it."""

    def __init__(self) -> None:
        self._sem = threading.Semaphore(1)
        self._lock = threading.Lock()
        self.entries: dict[str, int] = {}

    def __enter__(self) -> RecordingGate:
        self._sem.acquire()
        with self._lock:
            name = threading.current_thread().name
            self.entries[name] = self.entries.get(name, 0) + 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._sem.release()


def test_each_device_verifies_and_activates_under_the_shared_gate(
    broker, tmp_path: Path, digits_int8
) -> None:
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    cfg = load_config(
        write_agent_config(
            tmp_path / "template.toml",
            device_id="gate",
            broker=broker.url,
            state_dir=str(tmp_path / "state"),
            trusted_root=str(repo / "root.json"),
            metrics_interval_s=3600.0,
            log_level="warning",
        )
    )
    fleet = SimulatedFleet(cfg, 3)
    gate = RecordingGate()
    fleet.cpu_gate = gate  # type: ignore[assignment]
    with watching(broker.port) as watch:
        fleet.start()
        try:
            push(digits_int8.tflite, repo, broker.url)
            for device_id in fleet.ids:
                watch.wait_active(device_id, "digits", 1, timeout_s=120)
        finally:
            fleet.stop()
    # every device's own work thread went through the gate: the TUF workflow, then the check
    assert sorted(gate.entries) == [f"sim:{i}" for i in fleet.ids], gate.entries
    assert all(n >= 2 for n in gate.entries.values()), gate.entries
