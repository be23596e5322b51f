"""The site broker's bridge to central, as Mosquitto configuration lines (pure).

Guarantees:

* the bridge speaks MQTT 5 (the inference API needs response topics and
  correlation data; a 3.1.1 bridge strips them) in plain text to the relay on
  the site's loopback, never TLS itself: a TLS failure inside a Mosquitto 2.0.11
  bridge can hang the whole broker (docs/sites.md, "Why a relay");
* every topic line comes from :class:`agent.protocol.Topics`: the repository and
  inference requests come down, what devices write about themselves
  (:meth:`~agent.protocol.Topics.device_outbound`), their replies and the site's
  own status go up, each at QoS 1, and no topic goes both ways (no loop);
* ``cleansession true``: with a persistent session, every connect attempt during
  an outage queued one more copy of every retained device state at central
  (18 per device for a 60 s outage, measured); the price is that what reaches the
  site while the uplink is down never reaches central, so agents hold their events
  and metrics meanwhile (:mod:`agent.telemetry.uplink`).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.protocol import Topics
from converter.broker.registry import site_identity

BRIDGE_CONNECTION = "litefleet-uplink"


def bridge_client_id(site: str) -> str:
    """The bridge's client id at the site broker (a leading ``_`` is never a device id)."""
    return f"_lf-bridge-{site}"


@dataclass(frozen=True)
class BridgeSettings:
    site: str
    relay_port: int
    # the bridge's MQTT keep-alive: a silent link (nothing reset) is noticed after 1.5x this
    keepalive_s: int = 15
    # reconnect delays: Mosquitto's "decorrelated jitter" from base up to cap. Every
    # attempt during an outage is one TLS connect to central by the relay; 1,000 sites
    # at a 10 s cap are ~100 attempts/s at central
    retry_base_s: int = 1
    retry_max_s: int = 10


def bridge_topic_lines(topics: Topics, site: str) -> list[str]:
    """``topic PATTERN in|out 1`` lines: what crosses the bridge, and which way."""
    down = [topics.repo_filter, *topics.device_inbound("+")]
    up = [*topics.device_outbound("+"), topics.replies_filter, topics.site(site, "status")]
    return [f"topic {t} in 1" for t in down] + [f"topic {t} out 1" for t in up]


def bridge_lines(topics: Topics, settings: BridgeSettings) -> list[str]:
    """The ``connection`` block appended to the site broker's configuration."""
    s = settings
    return [
        "# the uplink to central: plain MQTT 5 to litefleet's relay on loopback, which speaks",
        "# TLS to central with the site's certificate (docs/sites.md)",
        f"connection {BRIDGE_CONNECTION}",
        f"address 127.0.0.1:{s.relay_port}",
        "bridge_protocol_version mqttv50",
        # central's certificate listener forces the client id to the certificate's CN anyway
        f"remote_clientid {site_identity(s.site)}",
        f"local_clientid {bridge_client_id(s.site)}",
        "cleansession true",
        "notifications true",
        f"notification_topic {topics.site(s.site, 'bridge')}",
        f"keepalive_interval {int(s.keepalive_s)}",
        f"restart_timeout {int(s.retry_base_s)} {int(s.retry_max_s)}",
        *bridge_topic_lines(topics, s.site),
    ]
