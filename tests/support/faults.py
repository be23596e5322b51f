"""Helpers of the fault, resilience and soak tests: reading an agent's state, probing it over
REST while it is hurt."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from agent.files import file_sha256
from tests.support.harness import AgentProcess, http_json

N_IN = 3500  # the dense_models fixture (conftest.py): a [1, 3500] float input


def read_state(agent: AgentProcess) -> dict:
    try:
        return json.loads((agent.state_dir / "state.json").read_text())
    except FileNotFoundError:
        return {}


def check_served_model(agent: AgentProcess, signed: dict[int, str]) -> None:
    """What the state file says is active exists whole on disk and was signed."""
    state = read_state(agent)
    for name, ms in state.get("models", {}).items():
        for role in ("active", "previous"):
            inst = ms.get(role)
            if inst is None:
                continue
            assert signed.get(inst["version"]) == inst["sha256"], (role, inst, signed)
            path = agent.state_dir / "models" / name / str(inst["version"]) / "model.tflite"
            assert file_sha256(path) == inst["sha256"], f"{role} v{inst['version']} on disk is not whole"


@dataclass
class Prober:
    """Calls the agent's REST API every ``interval_s`` from its own thread."""

    port: int
    body: bytes
    model: str = "m"
    interval_s: float = 0.05
    statuses: list[int] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Prober:
        self._thread = threading.Thread(target=self._run, daemon=True, name="prober")
        self._thread.start()
        return self

    def stop(self, seen: str | None = None, timeout_s: float = 10.0) -> None:
        """Stop probing; with ``seen``, first give the prober time to see that version answer
        (the agent reports "active" over MQTT a moment before the next probe can see it)."""
        deadline = time.monotonic() + timeout_s
        while seen is not None and (not self.versions or self.versions[-1] != seen):
            if time.monotonic() > deadline or self._thread is None or not self._thread.is_alive():
                break
            time.sleep(0.02)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _call(self, path: str, body: bytes | None) -> tuple[int, Any]:
        return http_json(f"http://127.0.0.1:{self.port}{path}", body)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                code, _ = self._call(f"/v1/models/{self.model}:predict", self.body)
                self.statuses.append(code)
                code, doc = self._call(f"/v1/models/{self.model}", None)
                if code == 200:
                    v = doc["model_version_status"][0]["version"]
                    if not self.versions or self.versions[-1] != v:
                        self.versions.append(v)
            except (OSError, ValueError) as exc:
                self.failures.append(repr(exc))
            self._stop.wait(self.interval_s)

    def check(self, old: str, new: str) -> None:
        """Every answer was a 200, and the version went old -> new, never anything else."""
        assert not self.failures, self.failures[:5]
        assert self.statuses and set(self.statuses) == {200}, sorted(set(self.statuses))
        assert self.versions in ([old, new], [new]), self.versions


def dense_body() -> bytes:
    return json.dumps({"instances": [[0.01] * N_IN]}).encode()


def check_state(agent: AgentProcess, signed: dict[int, str]) -> None:
    """Whatever the state file says is active or previous was signed and is whole on disk.
    The agent may be running: a version it just replaced may be deleted between reading
    the state and reading the file, so a missing file counts only if the state is unchanged."""
    path = agent.state_dir / "state.json"
    for _ in range(20):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return
        missing = False
        for name, ms in json.loads(text).get("models", {}).items():
            for role in ("active", "previous"):
                inst = ms.get(role)
                if inst is None:
                    continue
                assert signed.get(inst["version"]) == inst["sha256"], (role, inst, signed)
                model = agent.state_dir / "models" / name / str(inst["version"]) / "model.tflite"
                try:
                    assert file_sha256(model) == inst["sha256"], (
                        f"{role} v{inst['version']} on disk is not whole"
                    )
                except FileNotFoundError:
                    missing = True
        if not missing:
            return
        if path.read_text() == text:
            raise AssertionError(f"the state names a model that is not on disk: {text}")
    raise AssertionError("the state kept changing")
