"""Rollout records as the monitor reads them, and the fleet's devices per model version (pure).

The rollout controller (issue 10) publishes one retained JSON record per model on
``<prefix>/v1/rollouts/<name>`` (docs/protocol.md 6.4, design in docs/rollouts.md);
:func:`parse_rollout` turns it into a :class:`RolloutView`. The monitor keeps the newest
per model for the page and ``/metrics`` and every record in its history, so gate values
can be drawn over time.

Guarantees:

- Parsing never raises: a record without a valid name, version, state, wave and waves is
  :class:`converter.monitor.payloads.Malformed` with a short reason; optional fields that
  are missing or of the wrong type are ``None`` (or empty), unknown fields are ignored.
- The name is the topic's: a record naming another model is malformed, so one
  model's record can never overwrite another's view.
- Text from the record is cut to a bounded length and the gate, state and verdict words
  to ``[a-z0-9_]``, so nothing in a record can blow up a label set or the page.
- :func:`devices_per_version` counts only what devices say in their retained state.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from converter.monitor.payloads import Malformed, StateRecord

# docs/protocol.md 6.4; the controller (converter.rollout.record.RolloutState) owns the words
ROLLOUT_STATES = ("planned", "baking", "promoting", "paused", "holding", "aborting", "aborted", "promoted")
TERMINAL_STATES = frozenset({"aborted", "promoted"})
# a gate's verdict (converter.rollout.gates.Verdict)
VERDICTS = ("pass", "fail", "wait", "off", "skip")
GATE_OPS = ("<=", ">=", "<", ">")
# a record lists the devices a wave selects: ~12 bytes each
MAX_RECORD_BYTES = 1024 * 1024
MAX_GATES = 32
MAX_SELECTED = 10_000
_WORD = re.compile(r"^[a-z0-9_]{1,48}$")


@dataclass(frozen=True)
class GateReading:
    """One gate of the current wave as the controller last judged it."""

    name: str
    verdict: str
    value: float | None = None
    threshold: float | None = None
    op: str | None = None
    samples: int | None = None
    detail: str | None = None


@dataclass(frozen=True)
class RolloutView:
    """One retained rollout record (the newest of a model's rollout)."""

    name: str
    version: str
    state: str
    wave: int
    waves: tuple[int, ...]
    previous: str | None = None
    canary_pct: int | None = None
    target: str | None = None
    started: float | None = None
    updated: float | None = None
    wave_started: float | None = None
    bake_s: float | None = None
    canary_devices: int | None = None
    control_devices: int | None = None
    known_devices: int | None = None
    selected: tuple[str, ...] = ()
    gates: tuple[GateReading, ...] = ()
    ignored: tuple[tuple[str, int], ...] = ()
    reason: str | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class RolloutCleared:
    """A zero-length retained record: the controller removed the model's rollout."""

    name: str


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _int(value: Any) -> int | None:
    f = _num(value)
    return int(f) if f is not None and f >= 0 and f == int(f) else None


def _version(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit() and len(value) <= 12):
        return str(value)
    return None


def _text(value: Any, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) and value else None


def _gate(name: Any, doc: Any) -> GateReading | None:
    if not isinstance(name, str) or not _WORD.match(name) or not isinstance(doc, Mapping):
        return None
    verdict = doc.get("verdict")
    if not isinstance(verdict, str) or not _WORD.match(verdict):
        return None
    op = doc.get("op")
    return GateReading(
        name=name,
        verdict=verdict,
        value=_num(doc.get("value")),
        threshold=_num(doc.get("threshold")),
        op=op if op in GATE_OPS else None,
        samples=_int(doc.get("samples")),
        detail=_text(doc.get("detail"), 200),
    )


def _devices(doc: Any) -> tuple[int | None, int | None, int | None, tuple[str, ...]]:
    d = doc if isinstance(doc, Mapping) else {}
    selected = d.get("selected")
    names = (
        tuple(s[:64] for s in selected[:MAX_SELECTED] if isinstance(s, str) and s)
        if isinstance(selected, list)
        else ()
    )
    return _int(d.get("canary")), _int(d.get("control")), _int(d.get("known")), names


def parse_rollout(topic_name: str, payload: bytes) -> RolloutView | RolloutCleared | Malformed:
    """The record retained on ``rollouts/<topic_name>``, or why it cannot be used."""
    if not payload:
        return RolloutCleared(topic_name)
    if len(payload) > MAX_RECORD_BYTES:
        return Malformed("rollouts", topic_name, f"record of {len(payload)} bytes is too large")
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return Malformed("rollouts", topic_name, "not JSON")
    if not isinstance(doc, dict):
        return Malformed("rollouts", topic_name, "not a JSON object")
    if doc.get("name") != topic_name:
        return Malformed("rollouts", topic_name, "name differs from the topic's")
    version, state = _version(doc.get("version")), doc.get("state")
    wave, waves = _int(doc.get("wave")), doc.get("waves")
    if version is None or not isinstance(state, str) or not _WORD.match(state):
        return Malformed("rollouts", topic_name, "no valid version and state")
    pcts = tuple(p for p in (_int(w) for w in waves) if p is not None) if isinstance(waves, list) else ()
    if wave is None or not pcts or len(pcts) != len(waves or ()) or wave >= len(pcts):
        return Malformed("rollouts", topic_name, "no valid wave and waves")
    gates_doc = doc.get("gates")
    gates = (
        tuple(g for g in (_gate(k, v) for k, v in list(gates_doc.items())[:MAX_GATES]) if g is not None)
        if isinstance(gates_doc, dict)
        else ()
    )
    ignored_doc = doc.get("ignored")
    ignored = (
        tuple((str(k)[:64], n) for k, v in sorted(ignored_doc.items()) if (n := _int(v)) is not None)
        if isinstance(ignored_doc, dict)
        else ()
    )
    canary, control, known, selected = _devices(doc.get("devices"))
    return RolloutView(
        name=topic_name,
        version=version,
        state=state,
        wave=wave,
        waves=pcts,
        previous=_version(doc.get("previous")),
        canary_pct=_int(doc.get("canary_pct")),
        target=_text(doc.get("target"), 80),
        started=_num(doc.get("started")),
        updated=_num(doc.get("updated")),
        wave_started=_num(doc.get("wave_started")),
        bake_s=_num(doc.get("bake_s")),
        canary_devices=canary,
        control_devices=control,
        known_devices=known,
        selected=selected,
        gates=gates,
        ignored=ignored,
        reason=_text(doc.get("reason"), 512),
    )


def devices_per_version(states: Iterable[StateRecord], model: str) -> dict[str, list[str]]:
    """version -> the devices whose retained state says they run it, for one model
    (a device with no such model is left out)."""
    out: dict[str, list[str]] = {}
    for st in states:
        for m in st.models:
            if m.name == model:
                out.setdefault(m.version, []).append(st.device_id)
    return {v: sorted(ids) for v, ids in sorted(out.items(), key=lambda kv: _version_key(kv[0]))}


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 62, version)
