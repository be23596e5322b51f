"""Which known devices a rollout rule selects, said before anything is signed (pure).

The devices are those whose retained state the broker holds (``litefleet status`` shows
the same ones), with the groups they report; the rule is the one devices apply
(:meth:`agent.protocol.Rollout.selects`: target, then the canary bucket).

Guarantees:

* :func:`selected` and :func:`plan_waves` apply exactly the device's own rule, so what they
  say is what the devices will do (for the devices known now; a device that joins later
  follows the same rule);
* :func:`describe` is one line naming the count, and the devices by name up to a limit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agent.protocol import Rollout, canary_bucket

NAMES_SHOWN = 12


@dataclass(frozen=True)
class KnownDevice:
    device_id: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class WavePlan:
    canary_pct: int
    selected: tuple[str, ...]
    in_target: int


def selected(rule: Rollout, model: str, devices: Iterable[KnownDevice]) -> list[str]:
    return sorted(d.device_id for d in devices if rule.selects(d.device_id, d.groups, model))


def in_target(target: str, model: str, devices: Iterable[KnownDevice]) -> list[str]:
    return selected(Rollout(target, 100), model, devices)


def plan_waves(
    target: str, waves: Sequence[int], model: str, devices: Sequence[KnownDevice]
) -> list[WavePlan]:
    """For each wave, the known devices its rule selects (each wave keeps the earlier ones)."""
    total = len(in_target(target, model, devices))
    return [WavePlan(pct, tuple(selected(Rollout(target, pct), model, devices)), total) for pct in waves]


def names(ids: Sequence[str], limit: int = NAMES_SHOWN) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def describe(rule: Rollout, model: str, devices: Sequence[KnownDevice]) -> str:
    """``selects 2 of 20 known devices: dev-03, dev-11`` (or why none)."""
    chosen = selected(rule, model, devices)
    if not devices:
        return "no device has reported to this broker yet: the rule selects whichever devices match it later"
    if not chosen:
        targeted = in_target(rule.target, model, devices)
        why = (
            f"none of the {len(targeted)} in {rule.target} has a canary bucket below {rule.canary_pct}"
            if targeted
            else f"none of them is in {rule.target}"
        )
        return f"selects NONE of the {len(devices)} known devices ({why})"
    return f"selects {len(chosen)} of {len(devices)} known devices: {names(chosen)}"


def smallest_wave_with(target: str, model: str, devices: Sequence[KnownDevice], count: int) -> int | None:
    """The smallest canary percentage that selects at least ``count`` known devices."""
    buckets = sorted(canary_bucket(d, model) for d in in_target(target, model, devices))
    if len(buckets) < count:
        return None
    return min(100, int(buckets[count - 1]) + 1)
