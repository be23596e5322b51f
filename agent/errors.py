"""The agent's exceptions, grouped by where the failure comes from.

The daemon loop catches :class:`LitefleetError` subclasses only; anything else
is a bug and is left to crash the process (systemd restarts it).
"""

from __future__ import annotations

from agent.reasons import Reason


class LitefleetError(Exception):
    """Base class of every error litefleet raises on purpose."""


class ConfigError(LitefleetError):
    """The agent's configuration is missing, malformed or inconsistent."""


class TransportError(LitefleetError):
    """The broker could not be reached, or refused an operation."""


class RuntimeUnavailableError(LitefleetError):
    """No usable TF Lite runtime is installed."""


class ModelLoadError(LitefleetError):
    """The runtime refused to load a model."""


class InferenceError(LitefleetError):
    """The runtime failed while running a model (not the caller's fault)."""


class BadRequestError(LitefleetError):
    """A caller's request is malformed: wrong shape, dtype, unknown model, too big."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ModelRejectedError(LitefleetError):
    """A release or the repository's metadata was refused and nothing changes.

    ``reason`` says why, as one of :class:`agent.reasons.Reason` (the wire word of
    docs/protocol.md section 6.3), and the message says it in words.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NoRepositoryError(LitefleetError):
    """Not a failure: the broker holds no repository metadata yet (nothing was ever pushed).

    The device is connected and synced and has nothing to fetch; a first push wakes it."""


class StorageError(LitefleetError):
    """The state folder could not be written (disk full, permissions)."""
