"""How an agent's configuration becomes its MQTT connection settings (pure)."""

from __future__ import annotations

from agent.mqtt.client import ConnectionSettings
from agent.protocol import Topics
from agent.service.config import AgentConfig


def connection_settings(cfg: AgentConfig, will_payload: bytes) -> ConnectionSettings:
    """The broker, identity and credentials of ``cfg``; the will goes on the device's state topic."""
    addr = cfg.broker_address
    return ConnectionSettings(
        host=addr.host,
        port=addr.port,
        client_id=cfg.device_id,
        tls=addr.tls,
        ca_file=str(cfg.credential_path(cfg.ca_file)) if cfg.ca_file else None,
        cert_file=str(cfg.credential_path(cfg.cert_file)) if cfg.cert_file else None,
        key_file=str(cfg.credential_path(cfg.key_file)) if cfg.key_file else None,
        username=addr.username or cfg.username or None,
        password=cfg.password(),
        will_topic=Topics(cfg.topic_prefix).state(cfg.device_id),
        will_payload=will_payload,
    )
