"""The model card: what a converted model claims to be, and checks of those claims.

``litefleet convert`` writes ``OUT.card.json`` with :meth:`ModelCard.to_json`;
the agent reads it with :func:`parse_card` and, before activating a model,
checks with :func:`check_signature` that the interpreter's inputs and outputs
are the ones the card promises. Parsing is strict: a card that is not what
this module writes raises :class:`agent.errors.ModelRejectedError`.

One exception, on purpose: ``output_baseline`` (the output sketch of the
converted model on the converter's data, :mod:`agent.output_sketch`) is
informational and optional. Cards without it (written before it existed) load
as before; a baseline this version cannot read (malformed, or a kind a newer
converter writes) becomes ``output_baseline = None`` and stays in ``extra``, so
the card still loads and writes back unchanged, and never costs a model its
activation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.errors import ModelRejectedError
from agent.reasons import Reason

CARD_FORMAT = "litefleet.card/1"
BASELINE_KEY = "output_baseline"
MAX_CARD_BYTES = 1 << 20


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor as the runtime reports it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    # per-tensor or per-channel quantization; empty lists for float tensors
    scale: tuple[float, ...] = ()
    zero_point: tuple[int, ...] = ()
    # -1 marks a dimension that may vary (usually the batch)
    shape_signature: tuple[int, ...] = ()

    @property
    def quantized(self) -> bool:
        return bool(self.scale) and self.dtype in ("int8", "uint8", "int16")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["shape_signature"] = list(self.shape_signature)
        d["quantization"] = (
            {"scale": list(self.scale), "zero_point": list(self.zero_point)} if self.scale else None
        )
        del d["scale"], d["zero_point"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        q = d.get("quantization") or {}
        return cls(
            name=str(d["name"]),
            shape=tuple(int(x) for x in d["shape"]),
            dtype=str(d["dtype"]),
            scale=tuple(float(x) for x in q.get("scale", ())),
            zero_point=tuple(int(x) for x in q.get("zero_point", ())),
            shape_signature=tuple(int(x) for x in d.get("shape_signature") or d["shape"]),
        )

    @classmethod
    def from_details(cls, details: dict[str, Any]) -> TensorSpec:
        """Build from one entry of ``interpreter.get_input_details()``."""
        qp = details.get("quantization_parameters") or {}
        scales = tuple(float(x) for x in qp.get("scales", ()))
        zps = tuple(int(x) for x in qp.get("zero_points", ()))
        if not scales:
            s, z = details.get("quantization", (0.0, 0))
            if s:
                scales, zps = (float(s),), (int(z),)
        sig = details.get("shape_signature")
        return cls(
            name=str(details["name"]),
            shape=tuple(int(x) for x in details["shape"]),
            dtype=details["dtype"].__name__
            if hasattr(details["dtype"], "__name__")
            else str(details["dtype"]),
            scale=scales,
            zero_point=zps,
            shape_signature=tuple(int(x) for x in sig)
            if sig is not None
            else tuple(int(x) for x in details["shape"]),
        )


@dataclass(frozen=True)
class ModelCard:
    """Parsed ``*.card.json``. ``metrics`` and ``extra`` are informational."""

    mode: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tflite_sha256: str = ""
    tflite_size_bytes: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    golden: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # the sketch's JSON document as written (read it with agent.output_sketch.Sketch.from_json)
    output_baseline: dict[str, Any] | None = None

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "format": CARD_FORMAT,
            "mode": self.mode,
            "tflite": {"sha256": self.tflite_sha256, "size_bytes": self.tflite_size_bytes},
            "source": self.source,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "metrics": self.metrics,
            "golden": self.golden,
            **self.extra,
        }
        if self.output_baseline is not None:
            doc[BASELINE_KEY] = self.output_baseline
        return json.dumps(doc, indent=2, sort_keys=False) + "\n"


_KNOWN = {"format", "mode", "tflite", "source", "inputs", "outputs", "metrics", "golden"}


def _baseline(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The card's output baseline when it is a sketch this version reads, else None."""
    from agent.output_sketch import Sketch, SketchError

    raw = doc.get(BASELINE_KEY)
    if raw is None:
        return None
    try:
        return Sketch.from_json(raw).to_json()
    except SketchError:
        return None


def parse_card(data: bytes) -> ModelCard:
    """Parse a card's bytes; raise :class:`ModelRejectedError` (reason ``card``)."""
    if len(data) > MAX_CARD_BYTES:
        raise ModelRejectedError(Reason.CARD, f"model card is larger than {MAX_CARD_BYTES} bytes")
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.get("format") != CARD_FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, expected {CARD_FORMAT!r}")
        tfl = doc.get("tflite") or {}
        baseline = _baseline(doc)
        return ModelCard(
            mode=str(doc["mode"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in doc["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in doc["outputs"]),
            tflite_sha256=str(tfl.get("sha256", "")),
            tflite_size_bytes=int(tfl.get("size_bytes", 0)),
            source=dict(doc.get("source") or {}),
            metrics=dict(doc.get("metrics") or {}),
            golden=dict(doc.get("golden") or {}),
            extra={k: v for k, v in doc.items() if k not in _KNOWN and not (k == BASELINE_KEY and baseline)},
            output_baseline=baseline,
        )
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        # AttributeError: an object where a field should be (quantization: null, tflite: 3);
        # OverflowError: int(1e999)
        raise ModelRejectedError(Reason.CARD, f"model card is malformed: {exc}") from exc


def _describe(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"{t.name}{list(t.shape)}:{t.dtype}" for t in specs)


def check_signature(card: ModelCard, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
    """Raise :class:`ModelRejectedError` (reason ``signature``) unless the runtime's
    tensors match the card's in count, shape, dtype and quantization."""
    for role, claimed, actual in (("inputs", card.inputs, inputs), ("outputs", card.outputs, outputs)):
        if len(claimed) != len(actual) or any(
            c.shape != a.shape
            or c.dtype != a.dtype
            or len(c.scale) != len(a.scale)
            or any(abs(x - y) > 1e-6 * max(abs(x), 1e-12) for x, y in zip(c.scale, a.scale, strict=True))
            or c.zero_point != a.zero_point
            for c, a in zip(claimed, actual, strict=False)
        ):
            raise ModelRejectedError(
                Reason.SIGNATURE,
                f"model {role} do not match its card: card says {_describe(claimed)}, "
                f"model has {_describe(actual)}",
            )
