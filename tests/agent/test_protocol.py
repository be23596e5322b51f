"""The wire protocol's pure parts: topics, rollout rules, canary buckets, signed custom fields."""

from __future__ import annotations

import hashlib

import pytest

from agent.protocol import (
    ModelRelease,
    ProtocolError,
    Rollout,
    Topics,
    canary_bucket,
    choose_releases,
    chunk_count,
    chunk_hashes,
    consistent_target_file,
    parse_chunk_info,
    parse_release,
    split_chunks,
)


def test_topics_round_trip() -> None:
    t = Topics("fleet/a")
    assert t.metadata("timestamp.json") == "fleet/a/v1/repo/metadata/timestamp.json"
    assert t.metadata_filename(t.metadata("3.root.json")) == "3.root.json"
    assert t.metadata_filename("fleet/a/v1/repo/metadata/x/y.json") is None
    assert t.device_of(t.state("pi-7")) == ("pi-7", "state")
    assert t.device_of("fleet/a/v1/devices/pi-7/state/extra") is None
    assert (
        t.chunk("models/m/1/abc.model.tflite", 3) == "fleet/a/v1/repo/targets/models/m/1/abc.model.tflite/3"
    )


def test_reply_topics_only_for_this_device() -> None:
    t = Topics()
    assert t.reply_allowed("pi-1", t.reply("_lf-host-x", "pi-1"))
    assert t.reply_allowed("pi-1", t.reply("app", "pi-1") + "/more")
    assert not t.reply_allowed("pi-1", t.reply("app", "pi-2"))
    assert not t.reply_allowed("pi-1", "litefleet/v1/devices/pi-2/state")
    assert not t.reply_allowed("pi-1", "litefleet/v1/replies/+/pi-1")
    assert not t.reply_allowed("pi-1", "litefleet/v1/replies//pi-1")


def test_chunking_covers_every_byte() -> None:
    data = bytes(range(256)) * 41  # 10496 bytes
    chunks = split_chunks(data, 1000)
    assert b"".join(chunks) == data
    assert len(chunks) == chunk_count(len(data), 1000) == 11
    assert chunk_hashes(data, 1000)[0] == hashlib.sha256(data[:1000]).hexdigest()
    assert split_chunks(b"", 10) == [b""] and chunk_count(0, 10) == 1
    assert consistent_target_file("models/m/2/model.tflite", "ab") == "models/m/2/ab.model.tflite"


def test_chunk_info_must_agree_with_the_signed_length() -> None:
    data = b"x" * 2500
    custom = {"litefleet": {"chunk_size": 1000, "chunks": chunk_hashes(data, 1000)}}
    assert parse_chunk_info(custom, 2500).hashes == tuple(chunk_hashes(data, 1000))
    with pytest.raises(ProtocolError, match="3 chunk hashes for 5000 bytes"):
        parse_chunk_info(custom, 5000)
    with pytest.raises(ProtocolError, match="chunk size"):
        parse_chunk_info({"litefleet": {"chunk_size": 0, "chunks": []}}, 0)
    with pytest.raises(ProtocolError, match="hex"):
        parse_chunk_info({"litefleet": {"chunk_size": 1000, "chunks": ["X" * 64] * 3}}, 2500)
    with pytest.raises(ProtocolError, match="no valid chunk list"):
        parse_chunk_info({}, 10)


def test_rollout_rules() -> None:
    assert Rollout().selects("any", [], "m")
    assert Rollout("group:kitchen").selects("a", ["kitchen", "x"], "m")
    assert not Rollout("group:kitchen").selects("a", ["garage"], "m")
    assert Rollout("device:pi-3").selects("pi-3", [], "m")
    assert not Rollout("device:pi-3").selects("pi-4", [], "m")
    for bad in ("", "group:", "everyone", "device"):
        with pytest.raises(ProtocolError):
            Rollout(bad)
    for pct in (0, 101, 50.5, True):
        with pytest.raises(ProtocolError):
            Rollout("all", pct)  # type: ignore[arg-type]


def test_canary_buckets_are_stable_spread_and_nested() -> None:
    ids = [f"dev-{i}" for i in range(2000)]
    buckets = [canary_bucket(d, "digits") for d in ids]
    assert buckets == [canary_bucket(d, "digits") for d in ids]  # stable
    assert all(0 <= b < 100 for b in buckets)
    share = sum(b < 50 for b in buckets) / len(ids)
    assert 0.45 < share < 0.55  # spread evenly
    # raising a canary from 10 % to 50 % keeps the first 10 % in
    ten = {d for d in ids if Rollout("all", 10).selects(d, [], "digits")}
    fifty = {d for d in ids if Rollout("all", 50).selects(d, [], "digits")}
    assert ten < fifty
    # documented formula
    digest = hashlib.sha256(b"digits/dev-1").digest()
    assert canary_bucket("dev-1", "digits") == (int.from_bytes(digest[:8], "big") % 10000) / 100


def _custom(name: str, version: int, target: str = "all", pct: int = 100) -> dict:
    return {
        "litefleet": {
            "kind": "model",
            "name": name,
            "version": version,
            "rollout": {"target": target, "canary_pct": pct},
            "card": f"models/{name}/{version}/card.json",
        }
    }


def test_parse_release_checks_what_the_path_says() -> None:
    rel = parse_release("models/m/2/model.tflite", _custom("m", 2, "group:g"))
    assert rel == ModelRelease(
        "m", 2, "models/m/2/model.tflite", Rollout("group:g"), "models/m/2/card.json", None
    )
    assert parse_release("models/m/2/card.json", {"litefleet": {"kind": "card"}}) is None
    with pytest.raises(ProtocolError, match="does not match"):
        parse_release("models/m/3/model.tflite", _custom("m", 2))
    bad = _custom("m", 2)
    bad["litefleet"]["card"] = "models/other/1/card.json"
    with pytest.raises(ProtocolError, match="outside its folder"):
        parse_release("models/m/2/model.tflite", bad)
    with pytest.raises(ProtocolError):
        parse_release("models/M!/2/model.tflite", _custom("M!", 2))


def test_choose_newest_version_that_selects_the_device() -> None:
    rels = [
        parse_release(f"models/m/{v}/model.tflite", _custom("m", v, t))
        for v, t in ((1, "all"), (2, "group:kitchen"), (3, "device:pi-9"))
    ]
    rels.append(parse_release("models/n/1/model.tflite", _custom("n", 1)))
    pick = choose_releases([r for r in rels if r], "pi-1", ["kitchen"])
    assert {k: v.version for k, v in pick.items()} == {"m": 2, "n": 1}
    pick = choose_releases([r for r in rels if r], "pi-9", [])
    assert pick["m"].version == 3
    pick = choose_releases([r for r in rels if r], "pi-2", [])
    assert pick["m"].version == 1


def test_shadow_k_is_optional_signed_and_never_fatal() -> None:
    """An old agent reads only target and canary_pct; this one also shadow_k, which turns
    shadowing off when malformed but never refuses the release (docs/protocol.md 4.1)."""
    assert Rollout("all", 25, 10).to_dict() == {"target": "all", "canary_pct": 25, "shadow_k": 10}
    assert Rollout("all", 25).to_dict() == {"target": "all", "canary_pct": 25}  # as before
    for bad in (1, -3, 1_000_001, 2.5, True, "10"):
        with pytest.raises(ProtocolError):
            Rollout("all", 25, bad)  # type: ignore[arg-type]

    def rule(**ro: object) -> ModelRelease:
        custom = _custom("m", 2)
        custom["litefleet"]["rollout"] = {"target": "all", "canary_pct": 5, **ro}
        rel = parse_release("models/m/2/model.tflite", custom)
        assert rel is not None and rel.rollout.canary_pct == 5
        return rel

    assert rule().rollout.shadow_k == 0
    assert rule(shadow_k=10).rollout.shadow_k == 10
    assert rule(shadow_k=2).rollout.shadow_k == 2
    for malformed in (0, 1, -1, 10**9, 2.0, True, "10", None, [10], {"k": 10}):
        assert rule(shadow_k=malformed).rollout.shadow_k == 0
    # keys this version does not know are ignored too (a newer host may sign more)
    assert rule(shadow_k=3, bake_s=600).rollout == Rollout("all", 5, 3)
