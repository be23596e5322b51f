"""Why a device refused a release or the repository's metadata, or rolled a model back.

This module owns the vocabulary: every ``reason`` word the agent puts in a ``rejected`` or
``rolled_back`` event, in the state message's ``error`` and in its state file comes from
:class:`Reason`, and nowhere else is one spelled. docs/protocol.md section 6.3 lists the same
words (a test compares the two in both directions). The host side (the monitor, rollout
tooling) imports it to read reasons.

Guarantees:

- A :class:`Reason` is a ``str``: ``Reason.GOLDEN == "golden"``, ``json.dumps`` and
  ``f"{reason}"`` give the wire word, so the wire is the same as before the enum existed.
- :data:`PERMANENT` is the set docs/protocol.md marks "remembered": a release refused for one
  of them is written to the state file and never tried again (a newer version is). Every
  other reason is retried at the next refresh.
- :func:`parse_reason` never raises: a word this version does not know (from an older or
  newer agent's state file, or a check child that said something odd) comes back as None.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Every rejection and rollback reason. Grouped as in docs/protocol.md section 6.3."""

    # -- the repository's metadata (python-tuf's verdicts) -------------------------------------
    BAD_SIGNATURE = "bad_signature"  # not signed by a threshold of the right keys
    ROLLBACK = "rollback"  # older than what the device already trusts
    EXPIRED = "expired"  # past its expiry (a freeze attack, or a wrong clock)
    # a metadata file's length or hash differs from what the role above it says (mix-and-match);
    # a *target* file's bytes are HASH: the doc promises both words, for two different files
    MISMATCH = "mismatch"
    TOO_LARGE = "too_large"  # metadata over its length limit, or a release over max_model_bytes
    INVALID_METADATA = "invalid_metadata"  # unreadable or malformed metadata
    MISSING_METADATA = "missing_metadata"  # a file the metadata names is not on the broker

    # -- the signed release itself ---------------------------------------------------------------
    INVALID_TARGET = "invalid_target"  # its custom fields or signed hash are malformed
    MISSING_TARGET = "missing_target"  # it references a file that is not signed

    # -- the bytes on the broker, and the device's disk -----------------------------------------
    CHUNK_HASH = "chunk_hash"  # a chunk differs from its signed SHA-256
    CHUNK_SIZE = "chunk_size"  # a chunk has another size than the signed one
    HASH = "hash"  # the whole downloaded file differs from its signed length or hashes
    STORAGE = "storage"  # the device's disk refused the download

    # -- the checks before activation (agent.activation.check) ----------------------------------
    LOAD = "load"  # the runtime cannot load the model
    CARD = "card"  # the card is malformed or describes another file
    SIGNATURE = "signature"  # the model's inputs/outputs differ from its card's
    GOLDEN = "golden"  # the model does not reproduce its golden vectors
    INFERENCE = "inference"  # the model fails running them
    CRASHED = "crashed"  # the check process died (a signal), or the agent died during the check
    TIMEOUT = "timeout"  # the check took too long

    # -- rollbacks of an active model on trial ---------------------------------------------------
    INFERENCE_ERRORS = "inference_errors"  # runtime errors in its first uses
    CRASH_LOOP = "crash_loop"  # the agent restarted too often during its trial

    @property
    def permanent(self) -> bool:
        """Whether a release refused for this reason is remembered (never tried again)."""
        return self in PERMANENT


# what a refusal for these says is about the signed release itself: no retry can change it.
# (too_large: a release over max_model_bytes; metadata over its limit is refused before any
# release is chosen, so nothing is remembered for it.)
PERMANENT: frozenset[Reason] = frozenset(
    {
        Reason.TOO_LARGE,
        Reason.INVALID_TARGET,
        Reason.MISSING_TARGET,
        Reason.LOAD,
        Reason.CARD,
        Reason.SIGNATURE,
        Reason.GOLDEN,
        Reason.INFERENCE,
        Reason.CRASHED,
        Reason.TIMEOUT,
        Reason.INFERENCE_ERRORS,
        Reason.CRASH_LOOP,
    }
)


class SkipReason(StrEnum):
    """Why a ``skipped`` event passes over a newer version (docs/protocol.md section 6.2)."""

    OTHER_TARGET = "other_target"  # its rollout rule does not select this device


class ShadowOff(StrEnum):
    """Why a version whose rule asks for a shadow runs without one: the metrics message's
    ``shadow.off`` (docs/agent-api.md, "Shadow evaluation")."""

    NO_PREVIOUS = "no_previous"  # no previous version of the model on this device
    MEMORY_BOUND = "memory_bound"  # the previous version's file is over shadow_max_bytes
    LOAD_FAILED = "load_failed"  # the previous version no longer loads
    INCOMPATIBLE = "incompatible"  # its inputs or outputs cannot be compared with the active's


def parse_reason(word: object) -> Reason | None:
    """The :class:`Reason` spelled ``word``, or None for anything else."""
    if not isinstance(word, str):
        return None
    try:
        return Reason(word)
    except ValueError:
        return None
