"""Put a repository change on the broker: metadata, target chunks, then clean-up.

Order: new root versions first, then targets, snapshot and last the
timestamp (the file devices watch), each acknowledged before the next; then
the chunks of new targets, all retained with QoS 1. Devices start fetching as
soon as the timestamp arrives and receive the chunks as they are published
(their chunk subscriptions are open), so the upload and the fleet's downloads
overlap instead of following each other.

A push that dies half-way is harmless: devices keep serving their model and
wait for the missing chunks (then back off and retry); ``repo.json`` records
what is not yet published, and the next push or ``litefleet repo publish``
completes it. Retained messages of versions the repository dropped are
cleared (zero-length retained messages) only after everything new is in place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from agent.errors import TransportError
from agent.mqtt.client import RETAINED_READ_QOS, MqttClient
from agent.mqtt.transport import Message
from agent.protocol import Topics, split_chunks
from converter.repo.targets import PublishPlan, TargetUpload

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
ACK_TIMEOUT_S = 60.0
# chunks handed to paho before waiting for acknowledgements (bounds host memory)
PUBLISH_WINDOW = 64


class RepoPublisher:
    def __init__(self, client: MqttClient, topics: Topics) -> None:
        self.client = client
        self.topics = topics

    def _wait(self, deliveries: Sequence[tuple[str, Any]]) -> None:
        for topic, d in deliveries:
            if not d.wait(ACK_TIMEOUT_S):
                refused = getattr(d, "refused_reason", None)
                if refused:
                    raise TransportError(
                        f"the broker refused {topic}: {refused} (is this the host identity?)"
                    )
                raise TransportError(f"the broker did not acknowledge {topic}")

    def upload(self, uploads: list[TargetUpload], progress: ProgressFn | None = None) -> int:
        """Publish every chunk of ``uploads`` retained; returns bytes sent."""
        total = sum(len(u.data) for u in uploads)
        done = 0
        inflight: list[tuple[str, object, int]] = []
        for up in uploads:
            for i, chunk in enumerate(split_chunks(up.data, up.chunk_size)):
                topic = self.topics.chunk(up.file, i)
                inflight.append((topic, self.client.publish(topic, chunk, qos=1, retain=True), len(chunk)))
                if len(inflight) >= PUBLISH_WINDOW:
                    topic0, d0, n0 = inflight.pop(0)
                    self._wait([(topic0, d0)])
                    done += n0
                    if progress:
                        progress(done, total)
        for topic, d, n in inflight:
            self._wait([(topic, d)])
            done += n
            if progress:
                progress(done, total)
        return total

    def publish_metadata(self, files: list[tuple[str, bytes]]) -> None:
        deliveries = []
        for name, data in files:
            topic = self.topics.metadata(name)
            deliveries.append((topic, self.client.publish(topic, data, qos=1, retain=True)))
            if name == "timestamp.json" or name.endswith(".root.json"):
                # root before the rest, timestamp after everything it points to
                self._wait(deliveries)
                deliveries = []
        self._wait(deliveries)

    def sweep_metadata(self, keep: set[str], timeout_s: float = 10.0) -> list[str]:
        """Clear every retained metadata file the repository does not know: junk or
        an attacker's ``N+1.root.json`` would otherwise stop devices from updating
        (a root that fails to verify aborts the update, as TUF requires)."""
        seen: set[str] = set()

        def handle(msg: Message) -> None:  # paho thread
            name = self.topics.metadata_filename(msg.topic)
            if name is not None and msg.payload:
                seen.add(name)

        self.client.subscribe(self.topics.metadata_filter, handle, qos=RETAINED_READ_QOS)
        self.client.sync()
        if not self.client.wait_synced(timeout_s):
            raise TransportError("the broker did not answer the metadata subscription")
        self.client.unsubscribe(self.topics.metadata_filter)
        stray = sorted(seen - keep)
        deliveries = []
        for name in stray:
            topic = self.topics.metadata(name)
            deliveries.append((topic, self.client.publish(topic, b"", qos=1, retain=True)))
        self._wait(deliveries)
        if stray:
            logger.warning(
                "cleared %d retained metadata files the repository does not know: %s",
                len(stray),
                ", ".join(n[:40] for n in stray[:10]),
            )
        return stray

    def clear(self, plan: PublishPlan) -> int:
        deliveries = []
        for file, count in plan.clear_targets:
            for i in range(count):
                topic = self.topics.chunk(file, i)
                deliveries.append((topic, self.client.publish(topic, b"", qos=1, retain=True)))
        for name in plan.clear_metadata:
            topic = self.topics.metadata(name)
            deliveries.append((topic, self.client.publish(topic, b"", qos=1, retain=True)))
        self._wait(deliveries)
        return len(deliveries)

    def apply(
        self,
        plan: PublishPlan,
        uploads: list[TargetUpload],
        metadata: list[tuple[str, bytes]],
        keep_metadata: set[str],
        progress: ProgressFn | None = None,
    ) -> None:
        self.publish_metadata(metadata)
        self.upload(uploads, progress)
        self.clear(plan)
        self.sweep_metadata(keep_metadata)
