"""Activation carried out with the real runtime: trials, rollbacks, crash loops, damaged files.

The model here is a real TF Lite GATHER: it answers for indices 0-3 (its golden
vectors use those) and fails in the runtime for any other index, which is how
a model that passed its checks can still fail in its first real uses.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.activation import decisions as act
from agent.activation.check import Isolation
from agent.activation.decisions import Installed
from agent.activation.manager import ModelManager
from agent.activation.store import ModelStore, StateFile
from agent.delivery.updater import Candidate
from agent.errors import InferenceError
from agent.protocol import ModelRelease, Rollout
from agent.reasons import Reason
from agent.serving.registry import ModelRegistry

_BUILD = r"""
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf
for k, out in enumerate(sys.argv[1:]):
    table = tf.constant(np.arange(40, dtype=np.float32).reshape(4, 10) + 100 * k)
    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1], tf.int32)], autograph=False)
        def f(self, i):
            return tf.gather(table, i)
    m = M()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([m.f.get_concrete_function()], m)
    open(out, "wb").write(conv.convert())
"""


@pytest.fixture(scope="module")
def gather_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("gather")
    paths = [folder / f"gather{k}.tflite" for k in range(2)]
    subprocess.run([sys.executable, "-c", _BUILD, *map(str, paths)], check=True, capture_output=True)
    return paths


def golden_for(k: int) -> bytes:
    x = np.arange(4, dtype=np.int32)
    y = np.arange(40, dtype=np.float32).reshape(4, 10) + 100 * k
    buf = io.BytesIO()
    np.savez(buf, input_0=x, output_0=y, atol_0=np.float64(1e-6))
    return buf.getvalue()


class Fleet:
    def __init__(self, root: Path, models: list[Path]) -> None:
        self.root = root
        self.models = models
        self.events: list[tuple[str, dict]] = []
        self.registry = ModelRegistry()
        self.manager = self.new_manager()

    def new_manager(self, **kw: object) -> ModelManager:
        self.registry = ModelRegistry()
        opts = {"probation_inferences": 5, "probation_s": 3600.0, "max_crash_restarts": 2}
        opts.update(kw)
        return ModelManager(
            store=ModelStore(self.root),
            state_file=StateFile(self.root / "state.json"),
            registry=self.registry,
            event=lambda kind, **f: self.events.append((kind, f)),
            **opts,
        )  # type: ignore[arg-type]

    def candidate(self, version: int) -> Candidate:
        src = self.models[(version - 1) % 2]
        staged = self.root / f"staged-{version}"
        staged.mkdir()
        (staged / "m").write_bytes(src.read_bytes())
        (staged / "g").write_bytes(golden_for((version - 1) % 2))
        store = ModelStore(self.root)
        store.install("gather", version, {"model": staged / "m", "golden": staged / "g"})
        sha = hashlib.sha256(src.read_bytes()).hexdigest()
        rel = ModelRelease("gather", version, f"models/gather/{version}/model.tflite", Rollout())
        return Candidate(rel, Installed(version, sha), store.files("gather", version))

    def serve(self, index: int) -> np.ndarray:
        return self.registry.get("gather").runner.predict(np.array([index], np.int32))[0]

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]


@pytest.fixture
def fleet(tmp_path: Path, gather_models: list[Path]) -> Fleet:
    return Fleet(tmp_path / "state", gather_models)


def test_trial_passes_then_a_failing_version_is_rolled_back(fleet: Fleet) -> None:
    m = fleet.manager
    m.start()
    assert m.consider(fleet.candidate(1))
    for i in range(5):
        fleet.serve(i % 4)
    m.poll_trials()
    assert fleet.kinds() == ["activated", "marked_good"]
    assert m.consider(fleet.candidate(2))
    assert fleet.serve(1)[0][0] == 110.0  # v2 serves
    for _ in range(3):  # real traffic the golden vectors did not cover
        with pytest.raises(InferenceError):
            fleet.serve(7)
    m.poll_trials()
    assert fleet.kinds()[-1] == "rolled_back"
    assert fleet.events[-1][1]["reason"] == "inference_errors"
    assert fleet.serve(1)[0][0] == 10.0  # v1 again, without a gap
    state = StateFile(fleet.root / "state.json").load().get("gather")
    assert state.active is not None and state.active.version == 1
    assert state.is_rejected(2, state.rejected[-1].sha256)
    m.cleanup()
    assert sorted(p.name for p in (fleet.root / "models" / "gather").iterdir()) == ["1"]


def test_restarts_during_a_trial_roll_back_a_crash_loop(fleet: Fleet) -> None:
    m = fleet.manager
    m.start()
    m.consider(fleet.candidate(1))
    for _ in range(5):
        fleet.serve(0)
    m.poll_trials()  # v1 is marked good
    m.consider(fleet.candidate(2))
    for restart in range(3):  # the agent dies before v2 is marked good, again and again
        fleet.events.clear()
        m = fleet.new_manager()
        m.start()
        if restart < 2:
            assert fleet.serve(0)[0][0] == 100.0
    assert fleet.kinds() == ["rolled_back"]
    assert fleet.events[0][1]["reason"] == "crash_loop"
    assert fleet.serve(0)[0][0] == 0.0


def test_clean_stops_during_a_trial_keep_the_model(fleet: Fleet) -> None:
    """Three reboots (each a clean stop, recorded in the state file) within a new model's
    trial: it stays active and on trial; then a crash counts as before."""
    m = fleet.manager
    m.start()
    m.consider(fleet.candidate(1))  # the first version: nothing to roll back to
    for _ in range(3):
        m.record_clean_stop()
        fleet.events.clear()
        m = fleet.new_manager()
        m.start()
        assert fleet.kinds() == [] and fleet.serve(0)[0][0] == 0.0
    state = StateFile(fleet.root / "state.json").load()
    assert state.clean_stop is False  # consumed by the start that followed it
    gather = state.get("gather")
    assert gather.active is not None and gather.active.version == 1 and gather.trial_starts == 0
    for _ in range(3):  # now crashes: no mark, each start counts
        m = fleet.new_manager()
        m.start()
    assert fleet.kinds() == ["rolled_back"] and fleet.events[0][1]["reason"] == "crash_loop"


def test_a_damaged_active_model_falls_back_at_start(fleet: Fleet) -> None:
    m = fleet.manager
    m.start()
    m.consider(fleet.candidate(1))
    m.consider(fleet.candidate(2))
    active = fleet.root / "models" / "gather" / "2" / "model.tflite"
    data = bytearray(active.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)  # a bad block on the SD card
    active.write_bytes(bytes(data))
    fleet.events.clear()
    m = fleet.new_manager()
    m.start()
    assert fleet.kinds() == ["rolled_back"]
    assert fleet.serve(2)[0][0] == 20.0


def test_in_process_check_marks_the_candidate_first(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a child process, the state file names the candidate while it is checked,
    so a crash during the check rejects it at the next start."""
    m = fleet.new_manager(isolation=Isolation.NONE)
    m.start()
    seen: list[object] = []
    real = m._load_runner

    def spy(name: str, inst: Installed, **kw: bool):  # type: ignore[no-untyped-def]
        seen.append(StateFile(fleet.root / "state.json").load().get(name).checking)
        return real(name, inst, **kw)

    monkeypatch.setattr(m, "_load_runner", spy)
    m.consider(fleet.candidate(1))
    assert seen and seen[0] is not None and seen[0].version == 1  # type: ignore[attr-defined]
    assert StateFile(fleet.root / "state.json").load().get("gather").checking is None


def test_a_model_replaced_after_its_isolated_check_is_checked_again(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent serves the bytes its check child passed without checking them twice; if
    the file is no longer the one the child checked, the agent checks it in full."""
    from agent.activation import manager as manager_module

    real = manager_module.check_isolated
    swapped: list[Path] = []

    def check_then_swap(model: Path, *args: object, **kwargs: object) -> bool | None:
        passed = real(model, *args, **kwargs)  # type: ignore[arg-type]
        other = model.with_name("other.tflite")
        other.write_bytes(fleet.models[1].read_bytes())  # outputs 100 more than its golden vectors
        other.replace(model)
        swapped.append(model)
        return passed

    m = fleet.manager
    m.start()
    monkeypatch.setattr(manager_module, "check_isolated", check_then_swap)
    assert not m.consider(fleet.candidate(1))
    assert swapped and fleet.kinds() == ["rejected"]
    assert fleet.events[0][1]["reason"] == "golden"
    assert "gather" not in fleet.registry.names()


class _Stuck(Exception):
    """Stands for the agent's exit in the tests below (on_stuck must not return)."""


def _stuck(why: str):  # type: ignore[no-untyped-def]
    raise _Stuck(why)


def test_restart_isolation_checks_in_the_agent_on_a_bounded_thread(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check_isolation = "restart": no child; the state file names the candidate while a
    thread of the agent checks it, and the very runner it checked serves."""
    m = fleet.new_manager(isolation=Isolation.RESTART, on_stuck=_stuck)
    m.start()
    seen: list[tuple[str, object]] = []
    real = m._load_runner

    def spy(name: str, inst: Installed, **kw: bool):  # type: ignore[no-untyped-def]
        mark = StateFile(fleet.root / "state.json").load().get(name).checking
        seen.append((threading.current_thread().name, mark))
        return real(name, inst, **kw)

    monkeypatch.setattr(m, "_load_runner", spy)
    monkeypatch.setattr(
        "agent.activation.manager.check_isolated",
        lambda *a, **k: pytest.fail("restart isolation forked a check child"),
    )
    assert m.consider(fleet.candidate(1))
    assert [name for name, _ in seen] == ["model-check"]
    mark = seen[0][1]
    assert isinstance(mark, Installed) and mark.version == 1
    assert StateFile(fleet.root / "state.json").load().get("gather").checking is None
    assert fleet.serve(2)[0][0] == 20.0
    assert fleet.kinds() == ["activated"]


def test_restart_isolation_refuses_a_candidate_that_fails_its_golden_vectors(fleet: Fleet) -> None:
    m = fleet.new_manager(isolation=Isolation.RESTART, on_stuck=_stuck)
    m.start()
    assert m.consider(fleet.candidate(1))
    bad = fleet.candidate(2)
    golden = bad.files["golden"]
    golden.chmod(0o600)
    golden.write_bytes(golden_for(0))  # version 1's outputs: version 2 answers 100 more
    assert not m.consider(bad)
    assert fleet.kinds()[-1] == "rejected" and fleet.events[-1][1]["reason"] == "golden"
    state = StateFile(fleet.root / "state.json").load().get("gather")
    assert state.checking is None and state.active is not None and state.active.version == 1
    assert fleet.serve(2)[0][0] == 20.0  # version 1 serves on


def test_a_check_stuck_in_the_agent_ends_it_and_the_restart_rejects_the_model(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check that never returns (here: Python spinning; in life, a model's endless loop in
    the runtime) is past its CPU bound: the agent must end (on_stuck), with the candidate
    named in the state file, so that the next start rejects it and serves the version before."""
    m = fleet.new_manager(isolation=Isolation.RESTART, on_stuck=_stuck, check_timeout_s=0.5)
    m.start()
    assert m.consider(fleet.candidate(1))
    release = threading.Event()

    def spin(name: str, inst: Installed, **kw: bool):  # type: ignore[no-untyped-def]
        give_up = time.monotonic() + 60  # a broken bound fails the test instead of hanging it
        while not release.is_set() and time.monotonic() < give_up:
            pass
        raise RuntimeError("the check was never found stuck")

    monkeypatch.setattr(m, "_load_runner", spin)
    try:
        with pytest.raises(_Stuck, match=r"more than 0.5 s of CPU time"):
            m.consider(fleet.candidate(2))
    finally:
        release.set()
    mark = StateFile(fleet.root / "state.json").load().get("gather").checking
    assert mark is not None and mark.version == 2
    fleet.events.clear()
    restarted = fleet.new_manager(isolation=Isolation.RESTART, on_stuck=_stuck)
    restarted.start()
    assert fleet.kinds() == ["rejected"] and fleet.events[0][1]["reason"] == "crashed"
    assert fleet.events[0][1]["version"] == 2
    assert fleet.serve(2)[0][0] == 20.0


def test_an_end_during_an_in_process_check_is_the_candidates_not_the_trials(fleet: Fleet) -> None:
    """Three agent ends in a row, each while a candidate of another model was checked in the
    agent (restart isolation): each candidate is rejected, and the version on trial is not
    charged a crash for any of them (three would have rolled it back as a crash loop)."""
    m = fleet.manager
    m.start()
    assert m.consider(fleet.candidate(1))  # on trial from here on
    sha = hashlib.sha256(fleet.models[0].read_bytes()).hexdigest()
    for version in (1, 2, 3):
        state = StateFile(fleet.root / "state.json")
        doc = state.load()
        other = act.begin_check(doc.get("other"), Installed(version, sha))
        state.save(doc.with_model("other", other))  # the agent died checking "other" v<version>
        fleet.events.clear()
        m = fleet.new_manager()
        m.start()
        assert [(k, f["model"], f["reason"]) for k, f in fleet.events] == [("rejected", "other", "crashed")]
        gather = m.state.get("gather")
        assert gather.active is not None and gather.active.version == 1
        assert gather.trial_starts == 0, gather
    assert fleet.serve(2)[0][0] == 20.0


def test_refusals_name_the_newest_refused_release_newer_than_the_active_one(fleet: Fleet) -> None:
    """What the state message's ``refused`` says: why the device is not on the newest
    version, for as long as that holds; a newer activation ends it."""
    m = fleet.manager
    m.start()
    assert m.refusals() == {}
    assert m.consider(fleet.candidate(1))
    bad = fleet.candidate(2)
    bad.files["golden"].chmod(0o600)
    bad.files["golden"].write_bytes(golden_for(0))  # version 2 answers 100 more
    assert not m.consider(bad)
    assert m.refusals() == {"gather": {"version": 2, "reason": "golden"}}
    assert m.consider(fleet.candidate(3))  # newer than the refusal: nothing to explain
    assert m.refusals() == {}
    m.roll_back("gather", Reason.INFERENCE_ERRORS, "errors in its first uses")
    assert m.refusals() == {"gather": {"version": 3, "reason": "inference_errors"}}
