"""Host-side exceptions. The CLI maps them to exit codes: bad input 2, failure 1."""

from __future__ import annotations

from agent.errors import LitefleetError


class BadInputError(LitefleetError):
    """The user's input (a file, a flag, data) is wrong: exit code 2."""


class ConversionError(LitefleetError):
    """TensorFlow could not convert or quantize the model: exit code 1."""


class RepositoryError(LitefleetError):
    """The model repository (keys, metadata) is missing or inconsistent."""
