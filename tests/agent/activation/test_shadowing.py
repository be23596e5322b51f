"""When the previous version runs as a shadow: the pure plan, and the manager that applies it
to real runners (real LiteRT models in a real store)."""

from __future__ import annotations

import gc
import hashlib
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest

from agent.activation.check import Isolation
from agent.activation.decisions import Candidate, DeviceState, Installed, ModelState
from agent.activation.manager import ModelManager
from agent.activation.shadowing import ShadowManager, ShadowPlan, plan_shadow
from agent.activation.store import ModelStore, StateFile
from agent.protocol import ModelRelease, Rollout
from agent.reasons import Reason, ShadowOff
from agent.serving.inference import ModelRunner
from agent.serving.registry import ActiveModel, ModelRegistry
from tests.support.tiny_models import TinyModels, models_for

V1, V2 = Installed(1, "a" * 64), Installed(2, "b" * 64)


def release(version: int, shadow_k: int = 0, pct: int = 100) -> ModelRelease:
    return ModelRelease("m", version, f"models/m/{version}/model.tflite", Rollout("all", pct, shadow_k))


def test_plan_follows_the_active_versions_own_rule() -> None:
    ms = ModelState(active=V2, previous=V1)
    assert plan_shadow(ms, release(2, 10, 5), 1000, 2000) == ShadowPlan(10, V1)
    assert plan_shadow(ms, release(2, 10, 5), 1000, 2000).runs
    assert plan_shadow(ms, release(2, 0, 100), 1000, 2000) == ShadowPlan()  # promoted: no shadow
    assert plan_shadow(ms, release(1, 10), 1000, 2000) == ShadowPlan()  # a rule for another version
    assert plan_shadow(ms, None, 1000, 2000) == ShadowPlan()  # no release for this device
    assert plan_shadow(ModelState(), release(2, 10), 1000, 2000) == ShadowPlan()  # nothing active
    no_prev = plan_shadow(ModelState(active=V2), release(2, 10), None, 2000)
    assert no_prev == ShadowPlan(10, None, ShadowOff.NO_PREVIOUS) and not no_prev.runs
    assert plan_shadow(ms, release(2, 10), None, 2000).off is ShadowOff.NO_PREVIOUS  # files gone
    assert plan_shadow(ms, release(2, 10), 2001, 2000) == ShadowPlan(10, V1, ShadowOff.MEMORY_BOUND)
    assert plan_shadow(ms, release(2, 10), 1, 0).off is ShadowOff.MEMORY_BOUND  # 0: never


@pytest.fixture(scope="session")
def tiny(request: pytest.FixtureRequest) -> TinyModels:
    return models_for(request)


class Device:
    """A store holding versions of model ``m``, a registry serving one, a shadow manager."""

    def __init__(self, root: Path, versions: dict[int, Path], *, max_bytes: int = 1 << 26) -> None:
        self.store = ModelStore(root)
        self.sha: dict[int, str] = {}
        for version, src in versions.items():
            staged = root / f"staged-{version}.tflite"
            shutil.copy(src, staged)
            self.sha[version] = hashlib.sha256(staged.read_bytes()).hexdigest()
            self.store.install("m", version, {"model": staged})
        self.registry = ModelRegistry()
        self.shadows = ShadowManager(registry=self.registry, store=self.store, max_bytes=max_bytes)

    def inst(self, version: int) -> Installed:
        return Installed(version, self.sha[version])

    def serve(self, version: int) -> ModelRunner:
        path = self.store.files("m", version)["model"]
        runner = ModelRunner.from_file(path, name="m", version=str(version))
        self.registry.activate(ActiveModel("m", str(version), self.sha[version], runner))
        return runner

    def state(self, active: int, previous: int | None) -> DeviceState:
        prev = self.inst(previous) if previous is not None else None
        return DeviceState({"m": ModelState(active=self.inst(active), previous=prev)})


def test_the_shadow_lives_while_the_rule_asks_and_is_released_after(tmp_path: Path, tiny: TinyModels) -> None:
    dev = Device(tmp_path, {1: tiny.int8, 2: tiny.float})
    active = dev.serve(2)
    state = dev.state(2, 1)
    dev.shadows.apply(state, {"m": release(2, shadow_k=2, pct=25)})
    shadow = dev.shadows.shadow_of("m")
    assert shadow is not None and shadow.runner is not None and active.tap is not None
    previous = weakref.ref(shadow.runner)
    x = np.random.default_rng(0).random((1, 8, 8, 1), dtype=np.float32)
    for _ in range(10):
        active.predict(x)
    assert dev.shadows.worker.wait_idle(30)
    report = active.stats.snapshot().shadow
    assert report is not None and (report["against"], report["k"], report["sampled"]) == ("1", 2, 5)
    assert report["compared"] == 5

    # the next wave keeps shadowing, with its own k: the same shadow, counters kept
    dev.shadows.apply(state, {"m": release(2, shadow_k=5, pct=50)})
    assert dev.shadows.shadow_of("m") is shadow and shadow.k == 5

    # the promotion re-targets v2 without shadow_k: the shadow goes, and its runner with it
    dev.shadows.apply(state, {"m": release(2, shadow_k=0, pct=100)})
    assert dev.shadows.shadow_of("m") is None and active.tap is None
    assert active.stats.snapshot().shadow is None and shadow.runner is None
    assert dev.shadows.worker.wait_idle(30)
    del shadow
    gc.collect()
    assert previous() is None, "the previous version's runner is still referenced"
    for _ in range(3):
        active.predict(x)  # serving goes on without a tap
    dev.shadows.close()


def test_the_counters_never_go_down_within_a_boot(tmp_path: Path, tiny: TinyModels) -> None:
    """A shadow that stops and starts again on the same active version (a re-target without
    shadow_k, then one with it) goes on counting: consumers difference consecutive messages."""
    dev = Device(tmp_path, {1: tiny.int8, 2: tiny.float})
    active = dev.serve(2)
    state = dev.state(2, 1)
    x = np.random.default_rng(1).random((1, 8, 8, 1), dtype=np.float32)
    dev.shadows.apply(state, {"m": release(2, shadow_k=2, pct=25)})
    for _ in range(6):
        active.predict(x)
    dev.shadows.apply(state, {"m": release(2)})  # paused: no shadow
    for _ in range(6):
        active.predict(x)  # not sampled
    dev.shadows.apply(state, {"m": release(2, shadow_k=2, pct=50)})
    first = dev.shadows.shadow_of("m")
    for _ in range(4):
        active.predict(x)
    assert dev.shadows.worker.wait_idle(30) and first is not None
    report = active.stats.snapshot().shadow
    assert report is not None and report["sampled"] == 3 + 2 and report["errors"] == 0
    # samples still queued when the shadow stopped count as dropped: the sum holds
    assert report["compared"] + report["dropped"] == 5 and report["compared"] >= 2
    dev.shadows.close()


@pytest.mark.parametrize("case", ["memory_bound", "no_previous", "load_failed", "incompatible"])
def test_a_shadow_that_cannot_run_says_why(case: str, tmp_path: Path, tiny: TinyModels) -> None:
    previous_model = tiny.two_out if case == "incompatible" else tiny.int8
    max_bytes = 10 if case == "memory_bound" else 1 << 26
    dev = Device(tmp_path, {1: previous_model, 2: tiny.float}, max_bytes=max_bytes)
    if case == "load_failed":
        dev.store.files("m", 1)["model"].write_bytes(b"TFL3 but not a model")
    active = dev.serve(2)
    state = dev.state(2, None if case == "no_previous" else 1)
    dev.shadows.apply(state, {"m": release(2, shadow_k=10, pct=5)})
    assert active.stats.snapshot().shadow == {"off": case}
    assert active.tap is None and dev.shadows.shadow_of("m") is None
    assert not dev.shadows.worker.running  # no thread for a shadow that does not run
    # the rule without shadow_k clears the report too
    dev.shadows.apply(state, {"m": release(2)})
    assert active.stats.snapshot().shadow is None


def test_an_activation_or_a_rollback_ends_the_shadow(tmp_path: Path, tiny: TinyModels) -> None:
    dev = Device(tmp_path, {1: tiny.int8, 2: tiny.float, 3: tiny.float})
    manager = ModelManager(
        store=dev.store,
        state_file=StateFile(tmp_path / "state.json"),
        registry=dev.registry,
        isolation=Isolation.NONE,
        shadows=dev.shadows,
    )
    manager.consider(Candidate(release(1), dev.inst(1), dev.store.files("m", 1)))
    manager.consider(Candidate(release(2, 3), dev.inst(2), dev.store.files("m", 2)))
    manager.apply_shadows({"m": release(2, 3)})
    v2 = dev.registry.get("m").runner
    assert dev.shadows.shadow_of("m") is not None and v2.tap is not None
    # v3 arrives: v2's shadow ends with v2
    manager.consider(Candidate(release(3), dev.inst(3), dev.store.files("m", 3)))
    assert dev.shadows.shadow_of("m") is None and v2.tap is None and v2.stats.snapshot().shadow is None
    manager.apply_shadows({"m": release(3, 4)})  # v3 shadowed by v2 (its previous now)
    shadow = dev.shadows.shadow_of("m")
    assert shadow is not None and shadow.against == "2"
    manager.roll_back("m", Reason.INFERENCE_ERRORS, "errors in its first uses")
    assert dev.registry.get("m").version == "2" and dev.shadows.shadow_of("m") is None
    dev.shadows.close()


def test_every_off_reason_is_documented() -> None:
    docs = Path(__file__).resolve().parents[3] / "docs"
    for page in ("agent-api.md", "protocol.md"):
        text = (docs / page).read_text()
        missing = [w.value for w in ShadowOff if f"`{w.value}`" not in text]
        assert missing == [], f"docs/{page} does not name {missing}"
