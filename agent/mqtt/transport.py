"""The small interface the rest of the agent uses to talk to the broker.

Only :mod:`agent.mqtt` (client, inflight, network) talks to paho; everything else (metrics outbox,
MQTT inference, the updater) takes a :class:`Publisher` in its constructor, so
tests can pass a recording fake and integration tests the real client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class Delivery(Protocol):
    def wait(self, timeout_s: float) -> bool:
        """True once the broker acknowledged (QoS 1) or the bytes were sent (QoS 0)."""
        ...


class Publisher(Protocol):
    @property
    def connected(self) -> bool: ...

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        content_type: str | None = None,
    ) -> Delivery:
        """Queue a message; raise :class:`agent.errors.TransportError` when not connected."""
        ...


class Subscriber(Protocol):
    @property
    def connected(self) -> bool: ...

    def subscribe_many(self, filters: list[str], handler: Callable[[Message], None], qos: int = 1) -> None:
        """Subscribe now and after every reconnect; ``handler`` runs on the network thread."""
        ...

    def unsubscribe(self, *topic_filters: str) -> None: ...


@dataclass(frozen=True)
class Message:
    """An incoming message, copied out of paho's object on paho's network thread."""

    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 0
    response_topic: str | None = None
    correlation_data: bytes | None = None
    content_type: str | None = None
    user_properties: tuple[tuple[str, str], ...] = field(default=())
