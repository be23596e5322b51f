"""What a new rollout would be, decided before anything is signed (pure).

Guarantees:

* :func:`choose_versions` names the new version (the next one ever) and the previous one
  (the newest version signed for the whole target, which stays published as the way
  back), or raises :class:`~converter.errors.BadInputError` with one line when a rollout
  cannot start: no previous version to compare with, or a newer version still signed
  for part of the fleet;
* :func:`card_baseline` reads a card's ``output_baseline``: absent (an old card) is None,
  present but unusable is a BadInputError (the card is the operator's input).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from agent.protocol import Rollout
from converter.errors import BadInputError
from converter.monitor.sketches import parse_baseline


def choose_versions(name: str, releases: Mapping[int, Rollout], latest: int, target: str) -> tuple[int, int]:
    """``(version, previous)`` for a rollout of ``name`` to ``target``."""
    whole = [v for v, r in releases.items() if r.canary_pct >= 100 and r.target in ("all", target)]
    if not whole:
        raise BadInputError(
            f"{name} has no version signed for all of {target} to compare with and go back to; "
            f"publish the first version with `litefleet push` and roll out the next ones"
        )
    previous = max(whole)
    partial = sorted(v for v in releases if v > previous)
    if partial:
        r = releases[partial[-1]]
        raise BadInputError(
            f"{name} v{partial[-1]} is still signed for part of the fleet ({r.target}, canary "
            f"{r.canary_pct}%): finish it (`litefleet push --version {partial[-1]}` to 100 %) first"
        )
    return latest + 1, previous


def card_baseline(card: bytes | None, card_name: str = "the card") -> dict[str, Any] | None:
    """The card's ``output_baseline`` as it is written there, after checking it parses."""
    if card is None:
        return None
    try:
        doc = json.loads(card)
    except ValueError as exc:
        raise BadInputError(f"{card_name} is not JSON") from exc
    value = doc.get("output_baseline") if isinstance(doc, dict) else None
    if value is None:
        return None
    sketch, why = parse_baseline(value)
    if sketch is None:
        raise BadInputError(f"{card_name}: output_baseline is unusable ({why})")
    return dict(value)
