"""The site's prune: clear the retained repository messages central no longer has.

Mosquitto's MQTT 5 bridge re-sends central's retained messages on every
reconnect, so whatever central added or changed during an outage reaches the
site. What central *cleared* during the outage does not: the 2.0.11 bridge
keeps no session at central (it sends no session expiry), so nothing queues
the clears, and the re-send only carries what still exists (measured: every
stale chunk and metadata file stayed; docs/sites.md). After each reconnect
the site therefore compares its retained ``repo/#`` with central's metadata and
clears the difference.

Guarantees:

* :func:`plan_prune` is pure: the site's retained repository topics and central's
  retained metadata in, the topics to clear out;
* a topic is kept when central holds it as metadata, or when it is a chunk of a
  target listed in central's *newest* ``N.targets.json`` (that file lists every
  version still published, protocol 4.4; an older targets file stays for devices
  mid-refresh, but the chunks only it names were cleared at central);
* it never clears against an empty or unreadable view: no ``timestamp.json`` at
  central means nothing is cleared; a newest targets file that cannot be read
  means no chunk is cleared;
* race-safe order (:func:`prune_site`): the site's view is read first, central's
  second, and only topics in the site's view are cleared, so anything arriving
  during the check stays, and anything central added meanwhile is in its view.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.errors import TransportError
from agent.mqtt.client import MqttClient
from agent.mqtt.transport import Message
from agent.protocol import ProtocolError, Topics, consistent_target_file, parse_chunk_info

logger = logging.getLogger(__name__)

TARGETS_RE = re.compile(r"^([0-9]+)\.targets\.json$")


@dataclass(frozen=True)
class PrunePlan:
    stale: tuple[str, ...]
    # why less than everything was checked (None: the whole repository was compared)
    note: str | None = None


def newest_targets(topics: Topics, central_metadata: Mapping[str, bytes]) -> bytes | None:
    """The payload of the highest ``N.targets.json`` among central's metadata topics."""
    best: tuple[int, bytes] | None = None
    for topic, payload in central_metadata.items():
        name = topics.metadata_filename(topic)
        m = TARGETS_RE.match(name or "")
        if m and payload and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), payload)
    return best[1] if best else None


def chunk_topics(topics: Topics, targets_json: bytes) -> set[str] | None:
    """Every chunk topic of every target a signed targets file lists; None when the file
    cannot be read as one (signatures are the devices' business, not the prune's)."""
    try:
        targets = json.loads(targets_json)["signed"]["targets"]
        out: set[str] = set()
        for path, info in targets.items():
            sha = str(info["hashes"]["sha256"])
            chunks = parse_chunk_info(info.get("custom") or {}, int(info["length"]))
            file = consistent_target_file(str(path), sha)
            out.update(topics.chunk(file, i) for i in range(len(chunks.hashes)))
        return out
    except (ValueError, KeyError, TypeError, AttributeError, ProtocolError):
        return None


def plan_prune(
    topics: Topics, site_topics: Iterable[str], central_metadata: Mapping[str, bytes]
) -> PrunePlan:
    """What to clear at the site (see the module docstring)."""
    held = {t: p for t, p in central_metadata.items() if p}
    if topics.metadata("timestamp.json") not in held:
        return PrunePlan((), "central holds no repository (no timestamp.json): nothing cleared")
    newest = newest_targets(topics, held)
    chunks = chunk_topics(topics, newest) if newest is not None else None
    chunk_head = topics.chunk("", 0).removesuffix("/0")  # "<base>/repo/targets/"
    stale = []
    for t in sorted(set(site_topics)):
        if t in held:
            continue
        if t.startswith(chunk_head):
            if chunks is None or t in chunks:
                continue
        elif topics.metadata_filename(t) is None:
            continue  # outside the repository's two trees: not the prune's business
        stale.append(t)
    note = None if chunks is not None else "central's newest targets metadata is unreadable: no chunk cleared"
    return PrunePlan(tuple(stale), note)


# -- I/O ------------------------------------------------------------------------------


def retained_view(client: MqttClient, topic_filter: str, timeout_s: float) -> dict[str, bytes]:
    """Topic -> payload of every retained message under ``topic_filter`` as the broker
    holds it once the sync barrier (protocol 3.3) passed. Subscribed at QoS 0: QoS 1
    deliveries beyond the broker's in-flight window wait behind the barrier's SUBACK
    (that is how ``status`` saw 20 of 100 devices), QoS 0 ones do not."""
    view: dict[str, bytes] = {}
    lock = threading.Lock()

    def handle(msg: Message) -> None:  # paho's thread; a live change after the retained copy wins
        with lock:
            if msg.payload:
                view[msg.topic] = msg.payload
            else:
                view.pop(msg.topic, None)

    client.subscribe(topic_filter, handle, qos=0)
    try:
        client.sync()
        if not client.wait_synced(timeout_s):
            raise TransportError(f"no answer to the subscription {topic_filter} within {timeout_s:g} s")
    finally:
        client.unsubscribe(topic_filter)
    with lock:
        return dict(view)


def prune_site(
    site: MqttClient, central: MqttClient, topics: Topics, *, timeout_s: float = 30.0
) -> PrunePlan:
    """Read the site's repository, then central's metadata, and clear at the site what
    :func:`plan_prune` says. Both clients must be connected."""
    site_view = retained_view(site, topics.repo_filter, timeout_s)
    central_view = retained_view(central, topics.metadata_filter, timeout_s)
    plan = plan_prune(topics, site_view, central_view)
    deliveries = [(t, site.publish(t, b"", qos=1, retain=True)) for t in plan.stale]
    for topic, d in deliveries:
        if not d.wait(timeout_s):
            raise TransportError(f"the site broker did not acknowledge clearing {topic}")
    if plan.stale:
        logger.info("prune: cleared %d retained messages central no longer has", len(plan.stale))
    if plan.note:
        logger.warning("prune: %s", plan.note)
    return plan
