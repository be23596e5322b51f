"""The site's prune: the pure plan against a real signed repository's metadata, then the I/O
against two real Mosquittos (a "central" that took pushes while a "site" kept what it had)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from agent.mqtt.client import ConnectionSettings, MqttClient
from agent.protocol import Topics, chunk_count
from converter.broker.mosquitto import BrokerConfig, BrokerProcess
from converter.repo.repository import Repository
from converter.site.prune import plan_prune, prune_site, retained_view
from tests.support.harness import must, publish_many
from tests.support.secure import connect
from tests.support.sites import retained

TOPICS = Topics()


def model_bytes(size: int) -> bytes:
    return b"\0\0\0\0TFL3" + os.urandom(size - 8)


def central_view(repo: Repository) -> dict[str, bytes]:
    """What the host leaves retained after a push (protocol 3.1, 4.4, 5.3), computed from
    the repository's own publish rules, not from the prune's."""
    view = {TOPICS.metadata(n): (repo.md_dir / n).read_bytes() for n in repo.retained_metadata_names()}
    for up in repo.all_uploads():
        for i in range(chunk_count(len(up.data), up.chunk_size)):
            view[TOPICS.chunk(up.file, i)] = b"chunk"
    return view


def metadata_only(view: dict[str, bytes]) -> dict[str, bytes]:
    return {t: p for t, p in view.items() if TOPICS.metadata_filename(t) is not None}


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo")


def test_what_central_cleared_during_the_outage_is_stale_and_nothing_else(repo: Repository) -> None:
    repo.add_release("m", model_bytes(600_000), card=b"{}", golden=b"PK" * 10)
    before = central_view(repo)  # what the site had when its uplink was cut
    repo.add_release("m", model_bytes(600_000))
    r3 = repo.add_release("m", model_bytes(600_000))
    assert r3.removed_versions == [1]
    now = central_view(repo)
    junk = {TOPICS.metadata("junk.json"): b"x", TOPICS.chunk("models/x/1/abc.model.tflite", 0): b"y"}
    site = {**before, **now, **junk}  # the reconnect re-sent what central has; clears never came
    plan = plan_prune(TOPICS, site, metadata_only(now))
    assert set(plan.stale) == set(site) - set(now)
    assert plan.note is None
    # v1's three targets (model in 3 chunks, card, golden) and the metadata older than the previous
    v1_chunks = [t for t in plan.stale if "/models/m/1/" in t]
    assert len(v1_chunks) == 3 + 1 + 1, v1_chunks
    assert TOPICS.metadata("junk.json") in plan.stale
    stale_metadata = {TOPICS.metadata_filename(t) for t in plan.stale} - {None, "junk.json"}
    assert stale_metadata and all(int(n.split(".")[0]) < 3 for n in stale_metadata if n)


def test_nothing_is_cleared_against_a_central_without_a_repository(repo: Repository) -> None:
    repo.add_release("m", model_bytes(1000))
    site = central_view(repo)
    meta = metadata_only(site)
    for central in (
        {},
        {t: b"" for t in meta},
        {t: p for t, p in meta.items() if not t.endswith("timestamp.json")},
    ):
        plan = plan_prune(TOPICS, site, central)
        assert plan.stale == () and plan.note and "no timestamp.json" in plan.note


def test_unreadable_newest_targets_clears_metadata_but_no_chunk(repo: Repository) -> None:
    repo.add_release("m", model_bytes(1000))
    site = central_view(repo)
    central = metadata_only(site)
    newest = max(
        (t for t in central if t.endswith(".targets.json")),
        key=lambda t: int(t.rsplit("/", 1)[1].split(".")[0]),
    )
    central[newest] = b"{not json"
    site[TOPICS.metadata("junk.json")] = b"x"
    plan = plan_prune(TOPICS, site, central)
    assert plan.stale == (TOPICS.metadata("junk.json"),)
    assert plan.note and "no chunk cleared" in plan.note


def test_topics_outside_the_repository_trees_are_left_alone(repo: Repository) -> None:
    repo.add_release("m", model_bytes(1000))
    site = central_view(repo)
    odd = [f"{TOPICS.base}/repo/other/x", f"{TOPICS.base}/repo/metadata/a/b"]
    plan = plan_prune(TOPICS, [*site, *odd], metadata_only(site))
    assert plan.stale == ()


# -- against real brokers ---------------------------------------------------------------


def client(port: int) -> MqttClient:
    c = MqttClient(ConnectionSettings(host="127.0.0.1", port=port, client_id=f"t-{uuid.uuid4().hex[:8]}"))
    c.connect(10)
    return c


def test_retained_view_sees_more_retained_messages_than_the_in_flight_window(broker: BrokerProcess) -> None:
    """300 retained messages, the broker's in-flight window is 50: all 300 are in the view
    the sync barrier closes (QoS 0: nothing waits behind the barrier's SUBACK)."""
    publish_many(broker.port, [(f"{TOPICS.base}/repo/targets/f/{i}", b"%d" % i, True) for i in range(300)])
    c = client(broker.port)
    try:
        view = retained_view(c, TOPICS.repo_filter, 10)
    finally:
        c.stop()
    assert len(view) == 300 and view[f"{TOPICS.base}/repo/targets/f/299"] == b"299"


def test_prune_site_makes_the_site_hold_exactly_what_central_holds(
    tmp_path: Path, broker: BrokerProcess
) -> None:
    central = broker
    site = BrokerProcess(BrokerConfig(data_dir=tmp_path / "site"))
    site.start()
    try:
        repo = tmp_path / "repo"
        must("repo", "init", str(repo))
        models = []
        for i in range(3):
            m = tmp_path / f"m{i}.tflite"
            m.write_bytes(model_bytes(400_000))
            models.append(m)
        # bytes, not models: only the retained topics matter here
        push = ("--repo", str(repo), "--name", "m", "--broker", central.url, "--no-check-data")
        must("push", str(models[0]), *push)
        old = copy_retained(central.port, site.port)  # the site before its uplink was cut
        for m in models[1:]:
            must("push", str(m), *push)
        copy_retained(central.port, site.port)  # the reconnect's re-send: no clears
        publish_many(site.port, [(TOPICS.metadata("junk.json"), b"junk", True)])
        s, c = client(site.port), client(central.port)
        try:
            plan = prune_site(s, c, TOPICS)
        finally:
            s.stop()
            c.stop()
        now = snapshot(central.port)
        assert snapshot(site.port) == now
        assert set(plan.stale) == (set(old) - set(now)) | {TOPICS.metadata("junk.json")}
        assert any("/models/m/1/" in t for t in plan.stale)
    finally:
        site.kill()


def snapshot(port: int) -> dict[str, bytes]:
    c = connect(port, ca=None, tls=False)
    try:
        return retained(c, TOPICS.repo_filter)
    finally:
        c.close()


def copy_retained(src: int, dst: int) -> dict[str, bytes]:
    view = snapshot(src)
    publish_many(dst, [(t, p, True) for t, p in view.items()])
    return view
