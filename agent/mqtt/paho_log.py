"""paho's own log lines, as the agent's log shows them."""

from __future__ import annotations

import logging

PAHO_LOG = logging.getLogger("paho")


class _QuietNotConnected(logging.Filter):
    """paho logs "Client is not connected" at ERROR from its network loop's last turn after
    every disconnect, our own included (each will renewal, each shutdown). A lost connection
    is already reported by :class:`agent.mqtt.client.MqttClient` itself, so this line is
    demoted to DEBUG, and dropped unless the ``paho`` logger is enabled for DEBUG: the level
    check was made at ERROR before this filter ran, so relabelling alone would let it through
    at ``info``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and str(record.msg).startswith("Client is not connected"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return PAHO_LOG.isEnabledFor(logging.DEBUG)
        return True


def quiet_paho_log() -> None:
    """Install the filter on the ``paho`` logger (once, however often it is called)."""
    if not any(isinstance(f, _QuietNotConnected) for f in PAHO_LOG.filters):
        PAHO_LOG.addFilter(_QuietNotConnected())
