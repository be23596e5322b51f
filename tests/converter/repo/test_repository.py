"""The host's TUF repository: versions, pruning, re-targeting, keys, and what it asks to publish."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.protocol import Rollout
from converter.errors import BadInputError, RepositoryError
from converter.repo.repository import Repository
from converter.repo.targets import versions_to_keep


def test_versions_to_keep() -> None:
    all_ = Rollout()
    grp = Rollout("group:g")
    assert versions_to_keep({1: all_}) == {1}
    assert versions_to_keep({1: all_, 2: all_, 3: all_}) == {2, 3}
    # a group-only or canary version keeps the version all devices run
    assert versions_to_keep({1: all_, 2: all_, 3: grp}) == {1, 2, 3}
    assert versions_to_keep({1: all_, 2: Rollout("all", 50)}) == {1, 2}
    assert versions_to_keep({1: grp, 2: grp}) == {1, 2}


def test_init_writes_private_keys_and_a_trusted_root(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r", keys=2, threshold=2)
    keys = list((tmp_path / "r" / "keys").rglob("*.pem"))
    assert len(keys) == 8
    assert all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)
    assert stat.S_IMODE((tmp_path / "r").stat().st_mode) == 0o700
    first = (tmp_path / "r" / "metadata" / "1.root.json").read_bytes()
    assert (tmp_path / "r" / "root.json").read_bytes() == first
    assert repo.root.signed.roles["targets"].threshold == 2
    with pytest.raises(BadInputError, match="not empty"):
        Repository.init(tmp_path / "r")
    with pytest.raises(BadInputError):
        Repository.init(tmp_path / "r2", keys=1, threshold=2)


def test_init_refuses_a_file_and_keeps_it(tmp_path: Path) -> None:
    f = tmp_path / "r"
    f.write_text("x")
    with pytest.raises(BadInputError, match="exists and is not a folder"):
        Repository.init(f)
    assert f.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_init_into_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    Repository.init(tmp_path / "r")
    assert stat.S_IMODE((tmp_path / "r").stat().st_mode) == 0o700
    assert Repository.open(tmp_path / "r").root.signed.version == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_releases_versions_and_publish_plans(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r")
    r1 = repo.add_release("m", b"TFL3" * 1000, card=b"{}", golden=b"PK")
    assert (r1.version, r1.targets_version) == (1, 2)
    assert [u.path for u in r1.plan.uploads] == [
        "models/m/1/model.tflite",
        "models/m/1/card.json",
        "models/m/1/golden.npz",
    ]
    assert [n for n, _ in r1.plan.metadata] == ["2.targets.json", "2.snapshot.json", "timestamp.json"]
    r2 = repo.add_release("m", b"v2")
    r3 = repo.add_release("m", b"v3")
    assert r3.version == 3 and r3.removed_versions == [1]
    assert len(r3.plan.clear_targets) == 3  # model, card, golden of v1
    assert "2.targets.json" in r3.plan.clear_metadata
    assert r2.plan.clear_targets == []
    # versions never go back, and a version's content never changes
    with pytest.raises(BadInputError, match="never go back"):
        repo.add_release("m", b"v1 again", version=1)
    with pytest.raises(BadInputError, match="different model file"):
        repo.add_release("m", b"other", version=3)
    # the same file and version with a new rollout only re-targets it: no upload
    again = repo.add_release("m", b"v3", version=3, rollout=Rollout("group:g"))
    assert again.plan.uploads == [] and again.version == 3
    assert repo.model_releases("m")[3] == Rollout("group:g")
    same = repo.add_release("m", b"v3", version=3, rollout=Rollout("group:g"))
    assert same.unchanged
    # reopened from disk, the state is the same
    again_repo = Repository.open(tmp_path / "r")
    assert again_repo.model_releases("m") == repo.model_releases("m")
    assert again_repo.next_version("m") == 4


def test_pending_uploads_survive_a_failed_publish(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r")
    repo.add_release("m", b"one")
    reopened = Repository.open(tmp_path / "r")
    assert [u.path for u in reopened.pending_uploads()] == ["models/m/1/model.tflite"]
    reopened.mark_published()
    assert Repository.open(tmp_path / "r").pending_uploads() == []


def test_signing_needs_the_threshold_of_keys(tmp_path: Path) -> None:
    Repository.init(tmp_path / "r", keys=2, threshold=2)
    victim = sorted((tmp_path / "r" / "keys" / "targets").iterdir())[0]
    os.unlink(victim)
    repo = Repository.open(tmp_path / "r")
    with pytest.raises(RepositoryError, match="only 1 of the 2 targets keys"):
        repo.add_release("m", b"x")


def test_open_refuses_what_is_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="repo init"):
        Repository.open(tmp_path)


def test_a_failed_init_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from converter.repo import repository as repo_mod

    calls = {"n": 0}
    real = repo_mod.atomic_write

    def fail_late(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 6:  # after the keys, while writing metadata
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(repo_mod, "atomic_write", fail_late)
    with pytest.raises(OSError):
        Repository.init(tmp_path / "r")
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_a_system_error_in_one_line(tmp_path: Path) -> None:
    from tests.support.harness import litefleet

    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _out, err = litefleet("repo", "init", str(blocker / "repo"))
    assert code in (1, 2) and err.count("\n") == 1 and "Traceback" not in err
