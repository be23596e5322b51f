"""Prometheus families of what the host side publishes: rollouts, sites, the repository's expiry.

:mod:`converter.monitor.prometheus` writes these after the device families; this
module only says which families exist (:data:`HOST_FAMILIES`) and fills them from a
snapshot (:func:`fill_host_families`).

Guarantees:

- Enum-like gauges list every known word: ``litefleet_rollout_state`` is 1 for the
  record's state and 0 for each other state of docs/protocol.md 6.4, and
  ``litefleet_rollout_gate_verdict`` likewise for the verdicts, so a query for
  ``state="aborted"`` finds a 0 before it finds a 1 (and ``changes()`` sees the switch).
- Label values come from records the monitor already bounded
  (:mod:`converter.monitor.rollouts`, :mod:`converter.monitor.sites`); the
  prometheus_client writer escapes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from converter.monitor.live import FleetSnapshot
from converter.monitor.rollouts import ROLLOUT_STATES, VERDICTS, RolloutView, devices_per_version
from converter.monitor.sites import SiteView

Labels = tuple[tuple[str, str], ...]


class FamilyLike(Protocol):
    def add(self, labels: Labels, value: float | int | bool | None, suffix: str = "") -> None: ...


# (name, type, help), in the order of the scrape
HOST_FAMILIES: tuple[tuple[str, str, str], ...] = (
    (
        "litefleet_model_devices",
        "gauge",
        "Devices whose retained state says they run this model version (any health).",
    ),
    (
        "litefleet_rollout_info",
        "gauge",
        "Always 1 per rollout record; the version rolled out, the previous one and the target as labels.",
    ),
    ("litefleet_rollout_state", "gauge", "1 for the rollout's state, 0 for every other state."),
    ("litefleet_rollout_wave", "gauge", "The current wave (0-based index into the rollout's waves)."),
    ("litefleet_rollout_waves", "gauge", "How many waves the rollout has (the last is 100 %)."),
    ("litefleet_rollout_canary_percent", "gauge", "The canary percentage of the current wave."),
    (
        "litefleet_rollout_devices",
        "gauge",
        "Devices of the current wave by role: canary, control (in the window), selected, known.",
    ),
    ("litefleet_rollout_gate_value", "gauge", "A gate's value in the current wave (absent while unknown)."),
    ("litefleet_rollout_gate_threshold", "gauge", "The threshold a gate's value is held to (op as label)."),
    (
        "litefleet_rollout_gate_verdict",
        "gauge",
        "1 for a gate's verdict (pass, fail, wait, off, skip), else 0.",
    ),
    ("litefleet_rollout_gate_samples", "gauge", "The samples behind a gate's value."),
    ("litefleet_rollout_started_timestamp_seconds", "gauge", "When the rollout started (unix time)."),
    (
        "litefleet_rollout_updated_timestamp_seconds",
        "gauge",
        "When the controller last wrote the rollout record (unix time).",
    ),
    ("litefleet_site_link_up", "gauge", "1 while the site's bridge to this broker is connected, else 0."),
    ("litefleet_site_status_timestamp_seconds", "gauge", "The site's own time of its newest status."),
    (
        "litefleet_repo_metadata_expiry_timestamp_seconds",
        "gauge",
        "When the newest retained metadata of each role expires (signed.expires, unix time).",
    ),
)


def _rollout(fam: Mapping[str, FamilyLike], r: RolloutView) -> None:
    model: Labels = (("model", r.name),)
    fam["litefleet_rollout_info"].add(
        (*model, ("version", r.version), ("previous", r.previous or ""), ("target", r.target or "")), 1
    )
    for state in (*ROLLOUT_STATES, *((r.state,) if r.state not in ROLLOUT_STATES else ())):
        fam["litefleet_rollout_state"].add((*model, ("state", state)), state == r.state)
    fam["litefleet_rollout_wave"].add(model, r.wave)
    fam["litefleet_rollout_waves"].add(model, len(r.waves))
    fam["litefleet_rollout_canary_percent"].add(model, r.canary_pct)
    for role, n in (
        ("canary", r.canary_devices),
        ("control", r.control_devices),
        ("selected", len(r.selected)),
        ("known", r.known_devices),
    ):
        fam["litefleet_rollout_devices"].add((*model, ("role", role)), n)
    for g in r.gates:
        gate: Labels = (*model, ("gate", g.name))
        fam["litefleet_rollout_gate_value"].add(gate, g.value)
        if g.threshold is not None:
            fam["litefleet_rollout_gate_threshold"].add((*gate, ("op", g.op or "")), g.threshold)
        for verdict in (*VERDICTS, *((g.verdict,) if g.verdict not in VERDICTS else ())):
            fam["litefleet_rollout_gate_verdict"].add((*gate, ("verdict", verdict)), verdict == g.verdict)
        fam["litefleet_rollout_gate_samples"].add(gate, g.samples)
    fam["litefleet_rollout_started_timestamp_seconds"].add(model, r.started)
    fam["litefleet_rollout_updated_timestamp_seconds"].add(model, r.updated)


def _site(fam: Mapping[str, FamilyLike], s: SiteView) -> None:
    labels: Labels = (("site", s.name),)
    fam["litefleet_site_link_up"].add(labels, s.link_up)
    fam["litefleet_site_status_timestamp_seconds"].add(labels, s.ts)


def fill_host_families(fam: Mapping[str, FamilyLike], snap: FleetSnapshot) -> None:
    """Fill every family of :data:`HOST_FAMILIES` from ``snap``."""
    states = [d.state for d in snap.devices if d.state is not None]
    models = sorted({m.name for st in states for m in st.models})
    for model in models:
        for version, ids in devices_per_version(states, model).items():
            fam["litefleet_model_devices"].add((("model", model), ("version", version)), len(ids))
    for r in snap.rollouts:
        _rollout(fam, r)
    for s in snap.sites:
        _site(fam, s)
    for role, expires in snap.repo_expiry.items():
        fam["litefleet_repo_metadata_expiry_timestamp_seconds"].add((("role", role),), expires)
