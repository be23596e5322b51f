"""The device's retained state message (``devices/<id>/state``): its vocabulary and its figures.

Pure: the daemon hands in what it knows (the active models, their serving statistics, its
status) and gets the document back; nothing here reads a clock, a socket or a thread's
state. docs/protocol.md section 6.1 describes the same message. The host side reads the
status words through :class:`DeviceStatus`.

Guarantees:

- :class:`DeviceStatus` is a ``str``: its values are the wire words, unchanged.
- One rule picks the model that stands for the device (:func:`standing_model`: the first
  active model by name), and every per-model figure of the message (``model``, ``version``,
  ``latency_ms_p50``) comes from that one model. ``inferences`` is the device's figure: the
  answered requests of every active model.
- The will (:func:`will_document`) holds nothing an activation changes (no ``models``
  key, ``model`` and ``version`` null), so it never needs renewing: the agent sets it once
  per connection and never reconnects to replace it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from agent.serving.stats import StatsSnapshot


class DeviceStatus(StrEnum):
    """What a device is doing, as the state message's ``status`` says it."""

    STARTING = "starting"
    IDLE = "idle"  # no model
    DOWNLOADING = "downloading"
    CHECKING = "checking"  # a candidate's checks are running
    SERVING = "serving"
    OFFLINE = "offline"  # the will message, and the goodbye of a clean stop


@dataclass(frozen=True)
class Served:
    """The serving figures the state message carries."""

    inferences: int  # answered requests of every active model
    latency_ms_p50: float | None  # of the standing model; None before its first answer


def standing_model(active: Mapping[str, Any]) -> str | None:
    """The model that stands for the device in one-row views: the first active one by name."""
    return min(active, default=None)


def served(standing: str | None, snapshots: Mapping[str, StatsSnapshot]) -> Served:
    """The figures of ``snapshots`` (model name -> its statistics), the p50 of ``standing``'s."""
    own = snapshots.get(standing) if standing is not None else None
    p50 = own.quantile_ms(0.5) if own is not None else None
    return Served(
        inferences=sum(s.ok for s in snapshots.values()),
        latency_ms_p50=round(p50, 3) if p50 is not None else None,
    )


def state_document(
    *,
    device_id: str,
    online: bool,
    status: DeviceStatus,
    error: str | None,
    models: Mapping[str, Mapping[str, Any]],
    snapshots: Mapping[str, StatsSnapshot],
    groups: Sequence[str],
    repo_version: int | None,
    agent_version: str,
    boot: str,
    ts: float,
    site: str = "",
    refused: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The state message (``site``: the site broker the device uses, docs/sites.md; null
    for a device of the central one). ``models``: name -> ``{"version", "sha256", "trial"}`` of every
    active model; ``snapshots``: name -> statistics of the runners serving now; ``refused``:
    name -> ``{"version", "reason"}`` of the newest release refused, newer than the active one."""
    name = standing_model(models)
    figures = served(name, snapshots)
    return {
        "device_id": device_id,
        "online": online,
        "model": name,
        "version": str(models[name]["version"]) if name is not None else None,
        "status": status if online else DeviceStatus.OFFLINE,
        "error": error,
        "models": dict(models),
        "refused": dict(refused or {}),
        "groups": list(groups),
        "site": site or None,
        "repo_version": repo_version,
        "agent_version": agent_version,
        "boot": boot,
        "inferences": figures.inferences,
        "latency_ms_p50": figures.latency_ms_p50,
        "ts": round(ts, 3),
    }


def will_document(*, device_id: str, boot: str, ts: float) -> dict[str, Any]:
    """The will message: the broker publishes it, retained, on the state topic when the
    connection ends without a goodbye. Only what the agent knows when it connects (``ts``)
    and nothing an activation changes; the absent ``models`` key tells consumers that this
    state does not say which model the device ran (docs/protocol.md 6.1)."""
    return {
        "device_id": device_id,
        "online": False,
        "status": DeviceStatus.OFFLINE,
        "boot": boot,
        "ts": round(ts, 3),
        "model": None,
        "version": None,
    }
