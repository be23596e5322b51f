"""The retained state message of a real in-process Agent: the model it names and the figures it
gives come from the same model, whatever order the models were activated in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent.activation.decisions import Candidate, Installed
from agent.files import file_sha256
from agent.protocol import ModelRelease, Rollout
from agent.service.config import load_config
from agent.service.daemon import Agent
from tests.support.harness import must
from tests.support.tiny_models import TinyModels, models_for


@pytest.fixture(scope="module")
def tiny_models(request: pytest.FixtureRequest) -> TinyModels:
    return models_for(request)


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    """An Agent that is built but never started: nothing here needs the broker."""
    must("repo", "init", str(tmp_path / "repo"))
    cfg = load_config(
        None,
        {
            "device_id": "pi-pair",
            "broker": "mqtt://127.0.0.1:1",
            "state_dir": str(tmp_path / "state"),
            "trusted_root": str(tmp_path / "repo" / "root.json"),
            "http": "",
        },
    )
    return Agent(cfg)


def activate(agent: Agent, name: str, version: int, model: Path, tmp: Path) -> None:
    """Install ``model`` as NAME vVERSION and let the real manager check and activate it."""
    src = tmp / f"{name}-{version}.tflite"
    shutil.copy(model, src)
    sha = file_sha256(src)
    agent.store.install(name, version, {"model": src})
    release = ModelRelease(name, version, f"{name}/{version}/model.tflite", Rollout())
    cand = Candidate(release, Installed(version, sha), agent.store.files(name, version))
    assert agent.manager.consider(cand), agent.manager.last_error


def test_state_pairs_the_named_model_with_its_own_latency(
    agent: Agent, tiny_models: TinyModels, tmp_path: Path
) -> None:
    # activated in the order b, a: the state names a (the first by name)
    activate(agent, "b", 7, tiny_models.float, tmp_path)
    activate(agent, "a", 3, tiny_models.int8, tmp_path)
    assert agent.registry.names() == ["a", "b"]
    # distinct, known latencies: a answers in 1 ms, b in 40 ms
    a, b = agent.registry.get("a").runner.stats, agent.registry.get("b").runner.stats
    for _ in range(5):
        a.record_ok(1_000_000)
    for _ in range(9):
        b.record_ok(40_000_000)

    doc = json.loads(agent._state_payload(online=True))

    assert (doc["model"], doc["version"]) == ("a", "3")
    assert doc["latency_ms_p50"] == pytest.approx(1.0, rel=0.07)  # histogram: within 6.25 %
    assert doc["latency_ms_p50"] == round(a.snapshot().quantile_ms(0.5) or 0.0, 3)
    # the device-wide count: every active model's answered requests (docs/protocol.md 6.1)
    assert doc["inferences"] == 14
    assert doc["models"]["b"]["version"] == 7


def test_state_without_a_model_has_no_figures(agent: Agent) -> None:
    doc = json.loads(agent._state_payload(online=False))
    assert doc["model"] is None and doc["version"] is None
    assert doc["latency_ms_p50"] is None and doc["inferences"] == 0
    assert doc["status"] == "offline" and doc["online"] is False
