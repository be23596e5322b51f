"""A publish in flight (:meth:`agent.mqtt.client.MqttClient.publish` returns one)."""

from __future__ import annotations

import paho.mqtt.client as paho


class PublishInFlight:
    """A publish in flight. ``wait`` is True only when the broker accepted it: with
    MQTT 5 a refused publish (an ACL says no) is acknowledged with a failure
    reason code (>= 0x80), which counts as not delivered."""

    def __init__(self, info: paho.MQTTMessageInfo, refused: dict[int, str]) -> None:
        self._info = info
        self._refused = refused

    def wait(self, timeout_s: float) -> bool:
        try:
            self._info.wait_for_publish(timeout_s)
        except (RuntimeError, ValueError):
            return False  # the connection went away before the broker acknowledged
        return self._info.is_published() and self._info.mid not in self._refused

    @property
    def refused_reason(self) -> str | None:
        return self._refused.get(self._info.mid)
