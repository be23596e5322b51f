"""Which model runner serves each model name right now.

The activation code swaps a name's runner in one assignment under a lock, so a
request is always answered by either the old model or the new one: never by a
half-loaded one, never by none. Readers take no lock beyond a dict lookup.
Listeners (metrics, REST status) are told of every change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from agent.errors import BadRequestError
from agent.serving.inference import ModelRunner


@dataclass(frozen=True)
class ActiveModel:
    name: str
    version: str
    sha256: str
    runner: ModelRunner


Listener = Callable[[str, "ActiveModel | None"], None]


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, ActiveModel] = {}
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def activate(self, model: ActiveModel) -> ActiveModel | None:
        """Make ``model`` the one serving its name; return the one it replaced."""
        with self._lock:
            old = self._models.get(model.name)
            new = dict(self._models)
            new[model.name] = model
            self._models = new  # readers see the old dict or the new one
        for listener in self._listeners:
            listener(model.name, model)
        return old

    def deactivate(self, name: str) -> None:
        with self._lock:
            new = dict(self._models)
            new.pop(name, None)
            self._models = new
        for listener in self._listeners:
            listener(name, None)

    def get(self, name: str, version: str | None = None) -> ActiveModel:
        """The active model of ``name``; raises :class:`BadRequestError` (404) when
        there is none or it is not ``version``."""
        model = self._models.get(name)
        if model is None:
            raise BadRequestError(f"no model named {name!r} is active", status=404)
        if version is not None and version != model.version:
            raise BadRequestError(
                f"model {name!r} version {version} is not active (active: {model.version})",
                status=404,
            )
        return model

    def names(self) -> list[str]:
        return sorted(self._models)

    def snapshot(self) -> dict[str, ActiveModel]:
        return dict(self._models)
