"""The repository's state as records: ``repo.json`` and the targets' custom fields.

Old repositories must keep opening: the documents below are exactly what the
first releases wrote (``repo.json`` with the unused ``published_metadata``; a
model target's custom fields in that key order).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from agent.protocol import ModelRelease, Rollout, parse_release
from converter.errors import BadInputError, RepositoryError
from converter.repo.repository import Repository
from converter.repo.state import ExpiryDays, RepoState, RoleVersions, parse_state
from converter.repo.targets import ReleaseFiles, SignedTarget, new_target, plan_release

SHA = "ab" * 32
# repo.json as litefleet 0.1.0 wrote it after `repo init` and one push
OLD_REPO_JSON = {
    "format": 1,
    "expiry_days": {"root": 365, "targets": 90, "snapshot": 30, "timestamp": 14},
    "chunk_size": 262144,
    "versions": {"root": 1, "targets": 2, "snapshot": 2},
    "models": {"digits": {"latest": 1}},
    "pending_uploads": ["models/digits/1/model.tflite"],
    "published_metadata": [],
    "pending_metadata": ["1.root.json", "2.snapshot.json", "2.targets.json", "timestamp.json"],
}
# the signed custom fields of a model target as litefleet 0.1.0 wrote them
OLD_MODEL_CUSTOM = {
    "litefleet": {
        "kind": "model",
        "name": "digits",
        "version": 1,
        "rollout": {"target": "group:kitchen", "canary_pct": 50},
        "published": "2026-01-02T03:04:05+00:00",
        "card": "models/digits/1/card.json",
        "chunk_size": 4,
        "chunks": [SHA, SHA],
    }
}


def test_old_repo_json_parses_and_round_trips() -> None:
    state = parse_state(OLD_REPO_JSON)
    assert state.versions == RoleVersions(1, 2, 2)
    assert state.expiry_days == ExpiryDays(365, 90, 30, 14)
    assert state.latest_version("digits") == 1 and state.latest_version("other") == 0
    assert state.pending_uploads == ("models/digits/1/model.tflite",)
    again = state.to_json()
    # every key the first releases read is written back the same; the dead one is gone
    assert {k: v for k, v in OLD_REPO_JSON.items() if k != "published_metadata"} == again
    assert parse_state(json.loads(json.dumps(again))) == state


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 2}, "unknown repository format 2"),
        ({"versions": {"root": 1, "targets": 2}}, "missing 'snapshot'"),
        ({"versions": {"root": 1, "targets": "2", "snapshot": 2}}, "versions.targets must be an integer"),
        ({"chunk_size": True}, "chunk_size must be an integer"),
        ({"models": {"digits": {"latest": 1.5}}}, "models.digits.latest must be an integer"),
        ({"models": []}, "models must be an object"),
        ({"pending_uploads": "x"}, "pending_uploads must be a list"),
    ],
)
def test_a_damaged_repo_json_says_what_is_wrong(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_state({**OLD_REPO_JSON, **change})


def test_open_reports_a_damaged_repo_json_in_one_line(tmp_path: Path) -> None:
    Repository.init(tmp_path / "r")
    doc = json.loads((tmp_path / "r" / "repo.json").read_text())
    del doc["versions"]["targets"]
    (tmp_path / "r" / "repo.json").write_text(json.dumps(doc))
    with pytest.raises(RepositoryError, match=r"repo\.json: missing 'targets'$"):
        Repository.open(tmp_path / "r")


def test_a_repository_with_an_old_repo_json_opens_and_takes_a_push(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r")
    repo.add_release("digits", b"TFL3" * 10)
    old = dict(OLD_REPO_JSON, chunk_size=repo.state.chunk_size)
    (tmp_path / "r" / "repo.json").write_text(json.dumps(old, indent=1))
    reopened = Repository.open(tmp_path / "r")
    assert [u.path for u in reopened.pending_uploads()] == ["models/digits/1/model.tflite"]
    result = reopened.add_release("digits", b"TFL3" * 11)
    assert result.version == 2
    written = json.loads((tmp_path / "r" / "repo.json").read_text())
    assert written["models"] == {"digits": {"latest": 2}}
    assert written["versions"] == {"root": 1, "targets": 3, "snapshot": 3}
    assert "published_metadata" not in written


def test_old_custom_fields_parse_once_and_are_written_back_the_same() -> None:
    tf = TargetFile(8, {"sha256": SHA}, "models/digits/1/model.tflite", {"custom": OLD_MODEL_CUSTOM})
    target = SignedTarget.from_target_file(tf)
    assert target.release == parse_release(tf.path, OLD_MODEL_CUSTOM)
    assert target.release == ModelRelease(
        "digits", 1, "models/digits/1/model.tflite", Rollout("group:kitchen", 50), "models/digits/1/card.json"
    )
    assert (target.kind, target.chunks.chunk_size, target.published) == (
        "model",
        4,
        OLD_MODEL_CUSTOM["litefleet"]["published"],
    )
    assert target.custom() == OLD_MODEL_CUSTOM
    assert SignedTarget.from_target_file(target.to_target_file()) == target


def test_a_target_without_valid_custom_fields_is_a_damaged_repository() -> None:
    bad = dict(OLD_MODEL_CUSTOM["litefleet"], chunks=[SHA])  # 8 bytes in chunks of 4 need 2
    tf = TargetFile(8, {"sha256": SHA}, "models/digits/1/model.tflite", {"custom": {"litefleet": bad}})
    with pytest.raises(RepositoryError, match="damaged: 1 chunk hashes for 8 bytes"):
        SignedTarget.from_target_file(tf)


def test_new_targets_round_trip() -> None:
    card = new_target("models/m/2/card.json", b"{}", 4)
    assert card.release is None and card.kind == "card" and card.custom()["litefleet"]["chunks"]
    assert SignedTarget.from_target_file(card.to_target_file()) == card


def _plan(catalog: dict[str, SignedTarget], **kw: object) -> object:
    args: dict[str, object] = {
        "name": "m",
        "files": ReleaseFiles(b"model"),
        "latest": max((t.release.version for t in catalog.values() if t.release), default=0),
        "version": None,
        "rollout": Rollout(),
        "chunk_size": 4,
        "now": "2026-01-01T00:00:00+00:00",
    }
    args.update(kw)
    return plan_release(catalog, **args)  # type: ignore[arg-type]


def test_plan_release_is_pure_and_keeps_what_was_signed() -> None:
    first = _plan({}, files=ReleaseFiles(b"model", card=b"{}"))
    assert [t.path for t in first.put] == ["models/m/1/model.tflite", "models/m/1/card.json"]
    assert [u.path for u in first.uploads] == [t.path for t in first.put]
    catalog = {t.path: t for t in first.put}
    # the same files with a new rollout: only the model target changes, its date stays
    again = _plan(
        catalog,
        files=ReleaseFiles(b"model", card=b"{}"),
        version=1,
        rollout=Rollout("group:g"),
        now="2027-01-01T00:00:00+00:00",
    )
    (model,) = again.put
    assert again.uploads == () and model.release is not None and model.release.rollout == Rollout("group:g")
    assert model.published == "2026-01-01T00:00:00+00:00" and model.sha256 == first.put[0].sha256
    assert _plan(catalog, files=ReleaseFiles(b"model", card=b"{}"), version=1).unchanged
    with pytest.raises(BadInputError, match=r"different card\.json"):
        _plan(catalog, files=ReleaseFiles(b"model", card=b"[]"), version=1)
    with pytest.raises(BadInputError, match="different model file"):
        _plan(catalog, files=ReleaseFiles(b"other"), version=1)
    with pytest.raises(BadInputError, match="model name"):
        _plan(catalog, name="Bad Name")
    # v2 and v3 for all devices: v1 (with its card) is dropped, and never comes back
    catalog.update({t.path: t for t in _plan(catalog, files=ReleaseFiles(b"v2")).put})
    third = _plan(catalog, files=ReleaseFiles(b"v3"))
    assert third.removed_versions == (1,)
    assert sorted(t.path for t in third.drop) == ["models/m/1/card.json", "models/m/1/model.tflite"]
    with pytest.raises(BadInputError, match="never go back"):
        _plan({}, latest=3, version=1)


def test_state_changes_are_new_records() -> None:
    state = RepoState(ExpiryDays(), 4)
    signed = state.with_signed(
        targets=2,
        snapshot=2,
        metadata=["2.targets.json"],
        uploads=["a", "b"],
        target_paths=["a"],
        latest={"m": 1},
    )
    assert state.versions == RoleVersions() and state.pending_uploads == ()
    assert signed.pending_uploads == ("a",) and signed.latest == {"m": 1}
    assert signed.published().pending_metadata == () and signed.published().versions.targets == 2
