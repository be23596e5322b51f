"""Carries out activation decisions: checks candidates, swaps runners, rolls back.

The decisions are :mod:`agent.activation.decisions`'s pure functions; this module
applies them in a safe order: compute the new state, write it atomically,
then act (load, swap in the registry, delete files). The old model keeps
serving until the new one has passed every check and is loaded, so there is
never a gap. All methods run on the daemon's main thread.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, NoReturn

from agent.activation import decisions as act
from agent.activation.check import (
    Isolation,
    check_bounded,
    check_isolated,
    file_identity,
    load_checked,
    load_unchecked,
)
from agent.activation.shadowing import ShadowManager
from agent.activation.store import ModelStore, StateFile
from agent.errors import ModelRejectedError, StorageError
from agent.protocol import ModelRelease
from agent.reasons import Reason
from agent.serving.inference import ModelRunner
from agent.serving.registry import ActiveModel, ModelRegistry

logger = logging.getLogger(__name__)

# the agent's exit status when a check it ran itself is stuck past its bounds (EX_SOFTWARE):
# a failure, so systemd's Restart=on-failure starts it again, and that start rejects the model
EXIT_STUCK_CHECK = 70

EventFn = Callable[..., None]

NO_GOLDEN_WARNING = (
    "activated without golden vectors: only checked that it loads and runs once on zeros, "
    "not that its outputs are right (push it with its .golden.npz)"
)


@dataclass
class _Trial:
    since: float  # monotonic time of activation
    ok0: int  # runner counters when the trial began
    err0: int


class ModelManager:
    def __init__(
        self,
        *,
        store: ModelStore,
        state_file: StateFile,
        registry: ModelRegistry,
        threads: int = 1,
        runtime: str = "auto",
        max_crash_restarts: int = 2,
        probation_inferences: int = 20,
        probation_s: float = 60.0,
        isolation: Isolation = Isolation.FORK,
        check_timeout_s: float = 120.0,
        event: EventFn | None = None,
        clock: Callable[[], float] = time.monotonic,
        tick: Callable[[], None] | None = None,
        shadows: ShadowManager | None = None,
        on_stuck: Callable[[str], NoReturn] | None = None,
    ) -> None:
        self.store = store
        self.state_file = state_file
        self.registry = registry
        self.threads = threads
        self.runtime = runtime
        self.max_crash_restarts = max_crash_restarts
        self.probation_inferences = probation_inferences
        self.probation_s = probation_s
        self.isolation = isolation
        self._on_stuck = on_stuck or _exit_stuck
        self.check_timeout_s = check_timeout_s
        self._event = event or (lambda kind, **kw: None)
        self._clock = clock
        # called while a candidate's check runs in its child (feeds systemd's watchdog)
        self._tick = tick
        # the previous versions running as shadows (docs/agent-api.md, "Shadow evaluation")
        self.shadows = shadows
        self.state = act.DeviceState.empty()
        self._trials: dict[str, _Trial] = {}
        self.last_error: tuple[str, str] | None = None

    # -- helpers ---------------------------------------------------------------------
    def _save(self, state: act.DeviceState) -> None:
        self.state_file.save(state)
        self.state = state

    def _load_runner(self, name: str, inst: act.Installed, *, verified: bool = False) -> ModelRunner:
        """Load and check an installed version. ``verified``: its file was checked against
        the signed SHA-256 moments ago (a candidate just downloaded), so the card is compared
        with that hash instead of hashing the file again (a start-up hashes it: the disk may
        have changed it since)."""
        files = self.store.files(name, inst.version)
        runner = load_checked(
            files["model"],
            files.get("card"),
            files.get("golden"),
            threads=self.threads,
            runtime=self.runtime,
            name=name,
            version=str(inst.version),
            model_sha256=inst.sha256 if verified else None,
        )
        runner.stats.reset()  # the golden self-checks are not traffic
        return runner

    def _serve(self, name: str, inst: act.Installed, runner: ModelRunner) -> None:
        self.registry.activate(ActiveModel(name, str(inst.version), inst.sha256, runner))
        if self.shadows is not None:  # the shadow watched the version just replaced
            self.shadows.detach(name)

    def apply_shadows(self, chosen: Mapping[str, ModelRelease]) -> None:
        """Start, keep or stop each model's shadow as the releases chosen for this device ask
        (after a refresh: ``chosen`` is :attr:`agent.delivery.updater.RefreshResult.chosen`)."""
        if self.shadows is not None:
            self.shadows.apply(self.state, chosen)

    def _begin_trial(self, name: str, runner: ModelRunner) -> None:
        ok, err = _counters(runner)
        self._trials[name] = _Trial(self._clock(), ok, err)

    # -- start-up ------------------------------------------------------------------------
    def start(self) -> None:
        """Load the state file, apply crash-loop decisions, load every active model."""
        state = self.state_file.load()
        # an end while a candidate was checked in the agent (check_isolation = "restart") is
        # put down to that candidate, which is rejected below: the versions on trial are not
        # charged a crash for it (a check that hung ends the agent on purpose)
        clean = state.clean_stop or any(ms.checking is not None for ms in state.models.values())
        # from here on a crash must count: the mark goes with this start's first save
        state = replace(state, clean_stop=False)
        for name in sorted(state.models):
            ms, action = act.on_start(state.get(name), self.max_crash_restarts, after_clean_stop=clean)
            state = state.with_model(name, ms)
            if action is act.StartAction.ROLLED_BACK:
                rej = ms.rejected[-1]
                self._event(
                    "rolled_back",
                    model=name,
                    version=rej.version,
                    reason=rej.reason,
                    message=rej.message,
                    to_version=ms.active.version if ms.active else None,
                )
                self.last_error = (rej.reason, rej.message)
            elif action is act.StartAction.REJECTED_CHECK:
                rej = ms.rejected[-1]
                self._event(
                    "rejected", model=name, version=rej.version, reason=rej.reason, message=rej.message
                )
                self.last_error = (rej.reason, rej.message)
        self._save(state)
        for name in sorted(state.models):
            self._start_model(name)
        self.cleanup()

    def _start_model(self, name: str) -> None:
        """Load the active version of ``name``; if it no longer loads, fall back."""
        while True:
            ms = self.state.get(name)
            if ms.active is None:
                return
            try:
                runner = self._load_runner(name, ms.active)
            except (ModelRejectedError, StorageError, OSError, KeyError) as exc:
                reason = exc.reason if isinstance(exc, ModelRejectedError) else Reason.LOAD
                message = f"installed model no longer loads: {exc}"
                failed = ms.active
                self._save(self.state.with_model(name, act.roll_back(ms, reason, message)))
                self._event("rolled_back", model=name, version=failed.version, reason=reason, message=message)
                self.last_error = (reason, message)
                continue
            self._serve(name, ms.active, runner)
            if ms.trial_starts is not None:
                self._begin_trial(name, runner)
            return

    def record_clean_stop(self) -> None:
        """The agent is stopping as asked: the next start is not a crash (durable: it is
        written like every state change, before the process exits)."""
        self._save(replace(self.state, clean_stop=True))

    # -- candidates -------------------------------------------------------------------------
    def consider(self, cand: act.Candidate) -> bool:
        """Check ``cand`` and make it active; False (and an event) when it is refused."""
        name, inst = cand.release.name, cand.installed
        files = cand.files
        try:
            passed = None
            identity = None
            if self.isolation is Isolation.FORK:
                identity = file_identity(files["model"])
                passed = check_isolated(
                    files["model"],
                    files.get("card"),
                    files.get("golden"),
                    threads=self.threads,
                    runtime=self.runtime,
                    timeout_s=self.check_timeout_s,
                    tick=self._tick,
                    # the download verified the file against the signed hash moments ago
                    model_sha256=inst.sha256,
                )
            if passed is None:
                # in-process: mark it first, so a crash here rejects it on restart
                self._save(self.state.with_model(name, act.begin_check(self.state.get(name), inst)))
            if passed and file_identity(files["model"]) == identity:
                # the child loaded and checked these very bytes with this runtime: checking
                # them again here cost 4 ms (digits) and 25-35 ms (MobileNetV2 int8) per
                # activation, measured with 10 agents (bench/bench_activation.py)
                runner = load_unchecked(
                    files["model"],
                    threads=self.threads,
                    runtime=self.runtime,
                    name=name,
                    version=str(inst.version),
                )
            elif self.isolation is Isolation.RESTART:
                runner = check_bounded(
                    lambda: self._load_runner(name, inst, verified=True),
                    cpu_s=self.check_timeout_s,
                    on_stuck=self._on_stuck,
                    tick=self._tick,
                )
            else:
                # in-process (NONE, or no fork here): the download verified the file moments
                # ago; a file that changed after the child passed it is hashed and checked anew
                runner = self._load_runner(name, inst, verified=passed is None)
        except ModelRejectedError as exc:
            self._refuse(name, inst, exc.reason, str(exc))
            return False
        old = self.state.get(name).active
        self._save(self.state.with_model(name, act.activate(self.state.get(name), inst)))
        self._serve(name, inst, runner)
        self._begin_trial(name, runner)
        golden = files.get("golden") is not None
        self._event(
            "activated",
            model=name,
            version=inst.version,
            sha256=inst.sha256,
            previous=old.version if old else None,
            golden=golden,
            # the pre-activation check is a promise: say so when it could not be kept
            **({} if golden else {"warning": NO_GOLDEN_WARNING}),
        )
        self.last_error = None
        return True

    def refuse(self, name: str, version: int, sha256: str, reason: Reason, message: str) -> None:
        """Record a candidate that failed before it could be checked (download, size)."""
        self._refuse(name, act.Installed(version, sha256), reason, message)

    def _refuse(self, name: str, inst: act.Installed, reason: Reason, message: str) -> None:
        ms = act.reject(self.state.get(name), inst, reason, message)
        self._save(self.state.with_model(name, ms))
        self._event("rejected", model=name, version=inst.version, reason=reason, message=message)
        self.last_error = (reason, message)

    # -- trials --------------------------------------------------------------------------------
    def poll_trials(self) -> None:
        """Judge every model on trial: mark it good or roll it back."""
        for name in list(self._trials):
            ms = self.state.get(name)
            current = self.registry.snapshot().get(name)
            if ms.trial_starts is None or current is None:
                self._trials.pop(name, None)
                continue
            trial = self._trials[name]
            ok, err = _counters(current.runner)
            verdict = act.judge_trial(
                act.Probation(ok - trial.ok0, err - trial.err0, self._clock() - trial.since),
                good_after_inferences=self.probation_inferences,
                good_after_s=self.probation_s,
            )
            if verdict is act.Verdict.GOOD:
                self._save(self.state.with_model(name, act.mark_good(ms)))
                self._trials.pop(name)
                self._event("marked_good", model=name, version=ms.active.version if ms.active else None)
            elif verdict is act.Verdict.BAD:
                self._trials.pop(name)
                self.roll_back(
                    name,
                    Reason.INFERENCE_ERRORS,
                    f"{err - trial.err0} inference errors in its first "
                    f"{ok - trial.ok0 + err - trial.err0} uses",
                )

    def roll_back(self, name: str, reason: Reason, message: str) -> None:
        ms = self.state.get(name)
        failed = ms.active
        if failed is None:
            return
        new_ms = act.roll_back(ms, reason, message)
        self._save(self.state.with_model(name, new_ms))
        self.last_error = (reason, message)
        if new_ms.active is None:
            self.registry.deactivate(name)
            if self.shadows is not None:
                self.shadows.detach(name)
        else:
            self._start_model(name)
        self._event(
            "rolled_back",
            model=name,
            version=failed.version,
            reason=reason,
            message=message,
            to_version=new_ms.active.version if new_ms.active else None,
        )
        self.cleanup()

    def cleanup(self) -> None:
        """Delete model versions the state no longer needs (call after a batch of
        :meth:`consider` calls: candidates not yet considered are not protected)."""
        try:
            removed = self.store.cleanup(self.state.keep_versions())
        except OSError as exc:
            logger.warning("cleanup of %s failed: %s", self.store.root, exc)
            return
        if removed:
            logger.debug("removed %s", ", ".join(removed))

    def refusals(self) -> dict[str, dict[str, Any]]:
        """name -> {version, reason} of the newest release this device refused (rejected or
        rolled back) when it is newer than what the device runs: why it is not on the
        version the repository offers, which outlives the state's ``error`` (that clears at
        the next good refresh). Shown in the state message (docs/protocol.md 6.1)."""
        out: dict[str, dict[str, Any]] = {}
        for name, ms in sorted(self.state.models.items()):
            if not ms.rejected:
                continue
            last = max(ms.rejected, key=lambda r: r.version)
            if ms.active is None or last.version > ms.active.version:
                out[name] = {"version": last.version, "reason": last.reason}
        return out

    def summary(self) -> dict[str, Any]:
        """name -> {version, status} for the state topic."""
        out: dict[str, Any] = {}
        for name, ms in sorted(self.state.models.items()):
            if ms.active is None:
                continue
            out[name] = {
                "version": ms.active.version,
                "sha256": ms.active.sha256,
                "trial": ms.trial_starts is not None,
            }
        return out


def _exit_stuck(why: str) -> NoReturn:
    """A check running in the agent is stuck in the runtime (check_isolation = "restart"):
    end the agent, as a crash would. The state file names the candidate (``checking``), so
    the restart rejects it and serves the version before it."""
    logger.critical("the candidate's check %s; the agent ends so that its restart rejects the model", why)
    logging.shutdown()
    os._exit(EXIT_STUCK_CHECK)


def _counters(runner: ModelRunner) -> tuple[int, int]:
    """(answered, runtime failures) of a runner so far."""
    snap = runner.stats.snapshot()
    return snap.ok, snap.errors
