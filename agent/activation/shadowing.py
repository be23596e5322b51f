"""When a device runs its previous model version as a shadow, and the bookkeeping of doing so.

:func:`plan_shadow` decides, purely, from the device's activation state, the release the
signed metadata chooses for it and the previous version's file size: a shadow is wanted while
the ACTIVE version's own signed rule has ``shadow_k`` (docs/protocol.md 4.1), and it runs when
the previous version is on disk and its model file is at most ``shadow_max_bytes``.
:class:`ShadowManager` applies the plan after every refresh and every activation: it loads the
previous version's runner (without statistics: its answers are no traffic), attaches a
:class:`agent.serving.shadow.Shadow` as the active runner's tap and its report to the active
version's statistics, and detaches and drops it when the plan says so.

Guarantees:

- A shadow exists only while the active version's rule asks for one: a re-target without
  ``shadow_k``, a newer version, a rollback or a deactivation detaches it, and the previous
  version's runner is released then (memory back; the daemon trims the heap after refreshes).
- At most one shadow per model name, and its memory is bounded by ``shadow_max_bytes`` of model
  file plus the worker's queue bound. A plan that cannot run says why in the metrics
  (``{"off": <agent.reasons.ShadowOff>}``) and costs nothing on the request path.
- Nothing here raises into the daemon: a previous version that fails to load is ``load_failed``
  (tried once per active/previous pair, not at every refresh).
- Thread: the main thread only (the daemon's work loop).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.activation.decisions import DeviceState, Installed, ModelState
from agent.activation.store import ModelStore
from agent.errors import LitefleetError
from agent.protocol import ModelRelease
from agent.reasons import ShadowOff
from agent.serving.inference import ModelRunner
from agent.serving.registry import ActiveModel, ModelRegistry
from agent.serving.shadow import Shadow, ShadowCounts, ShadowWorker, compatible

logger = logging.getLogger(__name__)

# 64 MiB of model file: MobileNetV2 fp32 is 14 MB, a 512 MB Pi keeps room for two of them
DEFAULT_SHADOW_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ShadowPlan:
    """What the rule and the disk ask for one model name."""

    k: int = 0  # 0: no shadow asked for
    against: Installed | None = None  # the previous version to run
    off: ShadowOff | None = None  # asked for, but cannot run

    @property
    def runs(self) -> bool:
        return self.k >= 2 and self.against is not None and self.off is None


def plan_shadow(
    ms: ModelState, release: ModelRelease | None, previous_bytes: int | None, max_bytes: int
) -> ShadowPlan:
    """The shadow one model name should have (pure).

    ``release`` is the release the signed metadata chooses for this device (None: none);
    ``previous_bytes`` the size of the previous version's model file (None: not on disk).
    """
    active = ms.active
    if active is None or release is None or release.version != active.version:
        return ShadowPlan()
    k = release.rollout.shadow_k
    if k < 2:
        return ShadowPlan()
    if ms.previous is None or previous_bytes is None:
        return ShadowPlan(k, None, ShadowOff.NO_PREVIOUS)
    if previous_bytes > max_bytes:
        return ShadowPlan(k, ms.previous, ShadowOff.MEMORY_BOUND)
    return ShadowPlan(k, ms.previous)


@dataclass
class _Attached:
    """One model name's shadow state as applied: a live shadow, or an ``off`` report."""

    runner: ModelRunner  # the active runner it is attached to
    against: int | None
    shadow: Shadow | None = None
    off: ShadowOff | None = None


Loader = Callable[..., ModelRunner]


class ShadowManager:
    """Applies :func:`plan_shadow` to the registry's active runners (main thread only)."""

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        store: ModelStore,
        worker: ShadowWorker | None = None,
        max_bytes: int = DEFAULT_SHADOW_MAX_BYTES,
        threads: int = 1,
        runtime: str = "auto",
        load: Loader = ModelRunner.from_file,
    ) -> None:
        self.registry = registry
        self.store = store
        self.worker = worker or ShadowWorker()
        self.max_bytes = max_bytes
        self.threads = threads
        self.runtime = runtime
        self._load = load
        self._attached: dict[str, _Attached] = {}
        # (name, active version, previous version) that failed to load: not tried again
        self._failed: set[tuple[str, int, int]] = set()
        # each active runner's shadow counters, kept while the runner lives
        self._counts: weakref.WeakKeyDictionary[ModelRunner, ShadowCounts] = weakref.WeakKeyDictionary()

    def shadow_of(self, name: str) -> Shadow | None:
        att = self._attached.get(name)
        return att.shadow if att is not None else None

    def apply(self, state: DeviceState, chosen: Mapping[str, ModelRelease]) -> None:
        """Bring every model name's shadow in line with its plan (after a refresh)."""
        active = self.registry.snapshot()
        for name in sorted(set(active) | set(self._attached)):
            model = active.get(name)
            if model is None:
                self.detach(name)
                continue
            ms = state.get(name)
            plan = plan_shadow(ms, chosen.get(name), self._file_size(name, ms.previous), self.max_bytes)
            self._apply_one(name, model, plan)

    def detach(self, name: str) -> None:
        """Drop ``name``'s shadow or ``off`` report, if any (an activation, a rollback)."""
        att = self._attached.pop(name, None)
        if att is None:
            return
        att.runner.stats.shadow = None
        if att.shadow is not None:
            if att.runner.tap == att.shadow.offer:
                att.runner.set_tap(None)
            att.shadow.close()
            logger.info("shadow of %s by v%s stopped", name, att.against)

    def close(self) -> None:
        for name in list(self._attached):
            self.detach(name)
        self.worker.stop()

    # -- internals -------------------------------------------------------------------------------
    def _file_size(self, name: str, inst: Installed | None) -> int | None:
        if inst is None:
            return None
        try:
            return Path(self.store.files(name, inst.version)["model"]).stat().st_size
        except (LitefleetError, KeyError, OSError):
            return None

    def _apply_one(self, name: str, model: ActiveModel, plan: ShadowPlan) -> None:
        att = self._attached.get(name)
        against = plan.against.version if plan.against is not None else None
        same = att is not None and att.runner is model.runner and att.against == against
        if plan.k < 2:
            self.detach(name)
            return
        if same and att is not None and att.shadow is not None and plan.runs:
            att.shadow.set_k(plan.k)
            return
        if same and att is not None and att.off is not None and att.off == plan.off:
            return
        self.detach(name)
        if plan.runs and plan.against is not None:
            self._start(name, model, plan.k, plan.against)
        else:
            self._off(name, model, against, plan.off or ShadowOff.NO_PREVIOUS)

    def _off(self, name: str, model: ActiveModel, against: int | None, why: ShadowOff) -> None:
        report: dict[str, Any] = {"off": why.value}
        model.runner.stats.shadow = lambda: dict(report)
        self._attached[name] = _Attached(model.runner, against, off=why)
        logger.info("%s v%s: shadow asked for but off (%s)", name, model.version, why)

    def _start(self, name: str, model: ActiveModel, k: int, prev: Installed) -> None:
        key = (name, int(model.version), prev.version)
        if key in self._failed:
            self._off(name, model, prev.version, ShadowOff.LOAD_FAILED)
            return
        try:
            path = self.store.files(name, prev.version)["model"]
            runner = self._load(
                path,
                threads=self.threads,
                runtime=self.runtime,
                name=name,
                version=str(prev.version),
                record_stats=False,
            )
        except (LitefleetError, KeyError, OSError, ValueError) as exc:
            logger.warning("%s: previous v%s does not load as a shadow: %s", name, prev.version, exc)
            self._failed.add(key)
            self._off(name, model, prev.version, ShadowOff.LOAD_FAILED)
            return
        why = compatible(model.runner, runner)
        if why is not None:
            logger.info("%s: v%s cannot shadow v%s: %s", name, prev.version, model.version, why)
            self._off(name, model, prev.version, ShadowOff.INCOMPATIBLE)
            return
        self.worker.start()
        counts = self._counts.setdefault(model.runner, ShadowCounts())
        shadow = Shadow(active=model.runner, runner=runner, k=k, submit=self.worker.submit, counts=counts)
        model.runner.stats.shadow = shadow.report
        model.runner.set_tap(shadow.offer)
        self._attached[name] = _Attached(model.runner, prev.version, shadow=shadow)
        logger.info("%s v%s shadowed by v%s on 1 in %d calls", name, model.version, prev.version, k)
