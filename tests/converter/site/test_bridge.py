"""The site's bridge configuration (pure): MQTT 5, no TLS in Mosquitto, topic lines from
``Topics``, and every topic it carries up or down granted to the site at central."""

from __future__ import annotations

import pytest

from agent.protocol import Topics
from converter.broker.acl import Grant, site_grants
from converter.site.bridge import BridgeSettings, bridge_lines, bridge_topic_lines

B = "litefleet/v1"


def allowed(grants: tuple[Grant, ...], access: str, topic: str) -> bool:
    return any(g.allows(access, topic) for g in grants)


def test_the_bridge_speaks_plain_mqtt5_to_the_relay_with_a_clean_session() -> None:
    lines = bridge_lines(Topics(), BridgeSettings("a", 41234, keepalive_s=15, retry_base_s=1, retry_max_s=10))
    assert "address 127.0.0.1:41234" in lines
    assert "bridge_protocol_version mqttv50" in lines
    assert "cleansession true" in lines
    assert "remote_clientid _site-a" in lines and "local_clientid _lf-bridge-a" in lines
    assert f"notification_topic {B}/sites/a/bridge" in lines
    assert "keepalive_interval 15" in lines and "restart_timeout 1 10" in lines
    # TLS to central is the relay's job: a TLS failure inside a 2.0.11 bridge hangs the broker
    assert not [
        line for line in lines if line.startswith(("bridge_cafile", "bridge_certfile", "bridge_insecure"))
    ]


def test_topic_lines_repository_down_reports_up_nothing_both_ways() -> None:
    lines = bridge_topic_lines(Topics(), "a")
    assert lines == [
        f"topic {B}/repo/# in 1",
        f"topic {B}/devices/+/infer in 1",
        f"topic {B}/devices/+/state out 1",
        f"topic {B}/devices/+/events out 1",
        f"topic {B}/devices/+/metrics out 1",
        f"topic {B}/replies/# out 1",
        f"topic {B}/sites/a/status out 1",
    ]
    assert not [line for line in lines if " both " in line]


@pytest.mark.parametrize("prefix", ["litefleet", "acme/fleet"])
def test_what_the_bridge_carries_is_what_central_grants_the_site(prefix: str) -> None:
    """Each ``out`` line, for one of the site's devices, is a write central allows the site;
    each ``in`` line a read. A topic added to ``Topics.device_outbound`` follows in both."""
    topics = Topics(prefix)
    grants = site_grants(topics, "a", ["dev-a1"])
    for line in bridge_topic_lines(topics, "a"):
        _, pattern, direction, qos = line.split()
        assert qos == "1"
        topic = pattern.replace("+", "dev-a1").replace("#", "_lf-host-x/dev-a1/1")
        access = "write" if direction == "out" else "read"
        assert allowed(grants, access, topic), (line, topic)
    assert allowed(grants, "write", topics.site("a", "bridge"))  # Mosquitto's notification and will
