"""Activation decisions, as pure functions over plain data.

The device's whole activation state is a :class:`DeviceState`; every change
is a function from the old state to a new one, which the caller writes with
:meth:`agent.activation.store.StateFile.save` *before* it acts on it. No file, clock,
socket or thread in here.

The life of a model version on a device::

    candidate --check ok--> active (on trial) --good--> active
        |                        |  inference errors / crash loop
        +--check failed--> rejected  <--+  (previous version active again)

* A candidate is checked (load, signature against its card, golden vectors)
  before anything changes; while an in-process check runs, ``checking`` names
  it, so a crash during the check rejects it on the next start.
* Activation keeps the old active version as ``previous``.
* A new active version is on trial until it has served well (see
  :class:`agent.service.config.AgentConfig`'s probation settings). Every start-up
  during the trial that follows an unclean end (a crash, a kill, a watchdog abort, a
  power cut) counts; more than ``max_crash_restarts`` of them means the model crashes
  the agent, and it is rolled back. A clean stop (``systemctl stop``, a reboot) is
  recorded in the state (:attr:`DeviceState.clean_stop`) and the start after it does
  not count.
* A rejected (version, sha256) is never tried again; a newer version is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from agent.protocol import ModelRelease
from agent.reasons import Reason

STATE_FORMAT = 1
MAX_REJECTIONS = 20


@dataclass(frozen=True)
class Installed:
    version: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Installed:
        return cls(int(d["version"]), str(d["sha256"]))


@dataclass(frozen=True)
class Rejection:
    version: int
    sha256: str
    # a Reason's word; kept as the text the state file holds, which an older or newer
    # agent may have written with a word this version does not know
    reason: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "sha256": self.sha256,
            "reason": self.reason,
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Rejection:
        return cls(int(d["version"]), str(d["sha256"]), str(d["reason"]), str(d["message"]))


@dataclass(frozen=True)
class ModelState:
    active: Installed | None = None
    previous: Installed | None = None
    # None: the active version is known good; n: start-ups so far under trial
    trial_starts: int | None = None
    checking: Installed | None = None
    rejected: tuple[Rejection, ...] = ()

    def is_rejected(self, version: int, sha256: str) -> Rejection | None:
        for r in self.rejected:
            if r.version == version and r.sha256 == sha256:
                return r
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "active": self.active.to_dict() if self.active else None,
            "previous": self.previous.to_dict() if self.previous else None,
            "trial_starts": self.trial_starts,
            "checking": self.checking.to_dict() if self.checking else None,
            "rejected": [r.to_dict() for r in self.rejected],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelState:
        def opt(key: str) -> Installed | None:
            return Installed.from_dict(d[key]) if d.get(key) else None

        trial = d.get("trial_starts")
        return cls(
            active=opt("active"),
            previous=opt("previous"),
            trial_starts=None if trial is None else int(trial),
            checking=opt("checking"),
            rejected=tuple(Rejection.from_dict(r) for r in d.get("rejected") or ()),
        )


@dataclass(frozen=True)
class DeviceState:
    models: Mapping[str, ModelState] = field(default_factory=dict)
    # True only between a clean stop and the next start: the agent's last run ended as
    # asked (SIGTERM handled, goodbye said), so that start is no crash. An older agent
    # ignores the key.
    clean_stop: bool = False

    @classmethod
    def empty(cls) -> DeviceState:
        return cls({})

    def get(self, name: str) -> ModelState:
        return self.models.get(name, ModelState())

    def with_model(self, name: str, ms: ModelState) -> DeviceState:
        models = dict(self.models)
        models[name] = ms
        return replace(self, models=models)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "models": {n: m.to_dict() for n, m in sorted(self.models.items())},
            "clean_stop": self.clean_stop,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeviceState:
        if d.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown state format {d.get('format')!r}")
        models = {str(n): ModelState.from_dict(m) for n, m in d["models"].items()}
        return cls(models, clean_stop=d.get("clean_stop") is True)

    def keep_versions(self) -> dict[str, set[int]]:
        """Versions whose files must stay on disk."""
        keep: dict[str, set[int]] = {}
        for name, ms in self.models.items():
            keep[name] = {i.version for i in (ms.active, ms.previous, ms.checking) if i}
        return keep


class Plan(Enum):
    KEEP = "keep"  # this exact version is active already
    SKIP_REJECTED = "skip_rejected"  # tried before and refused
    INSTALL = "install"


def plan_release(ms: ModelState, version: int, sha256: str) -> Plan:
    """What to do about the release the signed metadata assigns to this device."""
    if ms.active is not None and ms.active.version == version and ms.active.sha256 == sha256:
        return Plan.KEEP
    if ms.is_rejected(version, sha256):
        return Plan.SKIP_REJECTED
    return Plan.INSTALL


def begin_check(ms: ModelState, candidate: Installed) -> ModelState:
    return replace(ms, checking=candidate)


def reject(ms: ModelState, candidate: Installed, reason: Reason, message: str) -> ModelState:
    rejected = (*ms.rejected, Rejection(candidate.version, candidate.sha256, reason, message))
    return replace(ms, checking=None, rejected=rejected[-MAX_REJECTIONS:])


def activate(ms: ModelState, candidate: Installed) -> ModelState:
    """``candidate`` passed its checks: it becomes active, on trial."""
    previous = ms.previous
    if ms.active is not None and ms.active.version != candidate.version:
        previous = ms.active
    if previous is not None and previous.version == candidate.version:
        previous = None
    return replace(ms, active=candidate, previous=previous, trial_starts=0, checking=None)


def mark_good(ms: ModelState) -> ModelState:
    return replace(ms, trial_starts=None)


def roll_back(ms: ModelState, reason: Reason, message: str) -> ModelState:
    """The active version failed: reject it and make the previous one active.
    With no previous version the model name is left without an active model."""
    if ms.active is None:
        return ms
    failed = ms.active
    rejected = (*ms.rejected, Rejection(failed.version, failed.sha256, reason, message))
    return replace(
        ms,
        active=ms.previous,
        previous=None,
        trial_starts=None,
        checking=None,
        rejected=rejected[-MAX_REJECTIONS:],
    )


class StartAction(Enum):
    NONE = "none"
    ROLLED_BACK = "rolled_back"
    REJECTED_CHECK = "rejected_check"


def on_start(
    ms: ModelState, max_crash_restarts: int, *, after_clean_stop: bool = False
) -> tuple[ModelState, StartAction]:
    """The agent (re)starts. A check that was running crashed the agent; a
    version on trial gets one more start-up counted unless the last run ended
    cleanly (``after_clean_stop``), and is rolled back when it has seen too many."""
    if ms.checking is not None:
        cand = ms.checking
        return (
            reject(ms, cand, Reason.CRASHED, "the agent stopped while checking this model"),
            StartAction.REJECTED_CHECK,
        )
    if ms.trial_starts is not None and ms.active is not None and not after_clean_stop:
        starts = ms.trial_starts + 1
        if starts > max_crash_restarts:
            return (
                roll_back(
                    ms,
                    Reason.CRASH_LOOP,
                    f"the agent ended uncleanly {starts} times before this model was marked good",
                ),
                StartAction.ROLLED_BACK,
            )
        return replace(ms, trial_starts=starts), StartAction.NONE
    return ms, StartAction.NONE


@dataclass(frozen=True)
class Probation:
    """Counts of a model on trial since it became active."""

    ok: int
    errors: int
    age_s: float


class Verdict(Enum):
    """The judgement on a model on trial."""

    GOOD = "good"  # mark it good: the trial is over
    BAD = "bad"  # roll it back
    WAIT = "wait"  # keep watching


def judge_trial(
    p: Probation, *, good_after_inferences: int, good_after_s: float, max_errors: int = 3
) -> Verdict:
    """The :class:`Verdict` on a model on trial.

    Only runtime failures count as errors (a caller's bad request does not).
    Good: at most one error per ten successes, and either enough successes or
    the trial time is over. Bad: ``max_errors`` errors at a worse rate, or the
    trial time over at a worse rate.
    """
    rate_ok = p.errors * 10 <= p.ok
    if p.errors >= max_errors and not rate_ok:
        return Verdict.BAD
    if rate_ok and (p.ok >= good_after_inferences or p.age_s >= good_after_s):
        return Verdict.GOOD
    if p.age_s >= good_after_s and not rate_ok:
        return Verdict.BAD
    return Verdict.WAIT


@dataclass(frozen=True)
class Candidate:
    """A verified, installed model version waiting for its activation checks."""

    release: ModelRelease
    installed: Installed
    files: dict[str, Path]
