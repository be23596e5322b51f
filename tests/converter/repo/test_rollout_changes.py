"""The repository changes a rollout makes: re-target a version, remove one; the shadow field."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.protocol import ProtocolError, Rollout, choose_releases, parse_release
from converter.errors import BadInputError
from converter.repo.repository import Repository

TFL = b"\x00\x00\x00\x00TFL3" + b"m" * 100


def test_rollout_shadow_field_on_the_wire() -> None:
    assert Rollout("all", 5).to_dict() == {"target": "all", "canary_pct": 5}  # unchanged bytes
    assert Rollout("all", 5, 10).to_dict() == {"target": "all", "canary_pct": 5, "shadow_k": 10}
    for bad in (1, -2, True, 2.5, "10"):
        with pytest.raises(ProtocolError):
            Rollout("all", 5, bad)  # type: ignore[arg-type]
    custom = {
        "litefleet": {
            "kind": "model",
            "name": "m",
            "version": 2,
            "rollout": {"target": "all", "canary_pct": 5, "shadow_k": 10, "future_field": 1},
        }
    }
    rel = parse_release("models/m/2/model.tflite", custom)
    assert rel is not None and rel.rollout == Rollout("all", 5, 10)


def test_retarget_and_remove_are_idempotent_and_move_devices_back(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r")
    repo.add_release("m", TFL + b"1", rollout=Rollout())
    repo.add_release("m", TFL + b"2", rollout=Rollout("all", 5, 10))
    v = repo.targets.signed.version
    assert repo.retarget("m", 2, Rollout("all", 5, 10)).unchanged
    assert repo.targets.signed.version == v  # nothing signed

    result = repo.retarget("m", 2, Rollout("all", 50, 10))
    assert not result.unchanged and result.plan.uploads == [] and repo.targets.signed.version == v + 1
    assert Repository.open(tmp_path / "r").model_releases("m") == {1: Rollout(), 2: Rollout("all", 50, 10)}

    removed = repo.remove_release("m", 2)
    assert removed.removed_versions == [2] and {f for f, _ in removed.plan.clear_targets}
    assert repo.model_releases("m") == {1: Rollout()}
    assert repo.remove_release("m", 2).unchanged  # again: nothing to do
    assert repo.targets.signed.version == v + 2
    # every device that took v2 is assigned v1 again
    releases = [t.release for t in repo.catalog.values() if t.release is not None]
    assert all(choose_releases(releases, f"d{i}", ())["m"].version == 1 for i in range(20))
    # and v2's number is never used again
    assert repo.next_version("m") == 3
    with pytest.raises(BadInputError, match="removed"):
        repo.add_release("m", TFL + b"2", version=2)
    with pytest.raises(BadInputError, match="not in the repository"):
        repo.retarget("m", 2, Rollout())


def test_promoting_to_all_keeps_the_previous_version_as_the_way_back(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r")
    for i in (1, 2):
        repo.add_release("m", TFL + bytes([i]), rollout=Rollout())
    repo.add_release("m", TFL + b"3", rollout=Rollout("all", 10, 10))
    assert set(repo.model_releases("m")) == {1, 2, 3}
    result = repo.retarget("m", 3, Rollout("all", 100))
    assert set(repo.model_releases("m")) == {2, 3} and result.removed_versions == [1]
