"""Carry out a rollout's signing step on the repository and the broker, idempotently.

A step is written down as the record's ``intent`` before it starts (by the caller);
:meth:`StepSigner.carry_out` then reads the repository's signed state *afresh* and signs
only what is not signed yet:

* ``sign_wave N``: the version's model target must carry wave N's rule. Already so: nothing
  is signed (a controller killed after signing and before recording). Not signed at all
  (wave 0): the staged files are signed with the rule. Another rule: a re-target;
* ``abort``: the version must be out of the signed targets. Still there: it is removed, and
  every device that took it goes back to the newest version its rule selects (the previous
  one, which stays published).

Then anything ``repo.json`` says is not yet on the broker is published, and the record
gets the step with the targets metadata version the repository is at.

Crash points (:mod:`converter.crash_points`, tests only): ``rollout-intent`` (intent on
disk, nothing signed), ``repo-metadata-written`` (inside the repository's commit),
``rollout-signed`` (signed, not published), ``rollout-published`` (published, the record
not yet updated), ``rollout-recorded`` (the step recorded).

Guarantees:

* signing is idempotent: carrying out the same intent twice, or after a crash at any of
  the points above, signs each change once;
* every repository change of the rollout happens under the repository's signing lock
  (:func:`converter.repo.lock.signing_lock`), so two rollouts (or a rollout and a ``push``) never
  write ``repo.json`` at the same time;
* the staged model's SHA-256 must be the one recorded at start: a file replaced in between
  is refused, never signed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from converter.crash_points import crash_point
from converter.errors import RepositoryError
from converter.repo.lock import signing_lock
from converter.repo.publish import RepoPublisher
from converter.repo.repository import ReleaseResult, Repository
from converter.repo.targets import PublishPlan
from converter.rollout.decide import after_step
from converter.rollout.record import RolloutRecord, StepKind
from converter.rollout.store import RolloutStore

logger = logging.getLogger(__name__)


class StepSigner:
    """Signs and publishes rollout steps. ``publisher`` is None to sign without publishing
    (the repository then says what awaits ``litefleet repo publish``)."""

    def __init__(
        self,
        repo_dir: Path,
        store: RolloutStore,
        publisher: Callable[[], RepoPublisher | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.repo_dir = repo_dir
        self.store = store
        self._publisher = publisher
        self._clock = clock

    def carry_out(self, record: RolloutRecord) -> RolloutRecord:
        """The record after its intent is signed, published and recorded as a step."""
        intent = record.intent
        if intent is None:
            return record
        crash_point("rollout-intent")
        with signing_lock(self.repo_dir):
            repo = Repository.open(self.repo_dir)
            if intent.kind is StepKind.ABORT:
                result = self._abort(repo, record)
            else:
                result = self._sign_wave(repo, record, intent.wave or 0)
            crash_point("rollout-signed")
            self._publish(repo, result.plan if result is not None else PublishPlan())
            crash_point("rollout-published")
            version = repo.targets.signed.version
        logger.info(
            "rollout %s v%s: %s%s -> targets v%d%s",
            record.name,
            record.version,
            intent.kind,
            f" {intent.wave}" if intent.wave is not None else "",
            version,
            " (found signed)" if result is None else "",
        )
        return after_step(record, version, self._clock(), recovered=result is None)

    def _sign_wave(self, repo: Repository, record: RolloutRecord, wave: int) -> ReleaseResult | None:
        rule = record.spec.rule(wave)
        current = repo.model_releases(record.name).get(record.version)
        if current == rule:
            return None
        if current is not None:
            return repo.retarget(record.name, record.version, rule)
        if wave != 0:
            raise RepositoryError(
                f"{record.name} v{record.version} is no longer in the repository (removed by hand?); "
                f"abort the rollout with `litefleet rollout abort {record.name}`"
            )
        files = self.store.staged_files(record.name)
        if hashlib.sha256(files.model).hexdigest() != record.model_sha256:
            raise RepositoryError(f"the staged model of rollout {record.name} changed since it started")
        return repo.add_release(
            record.name,
            files.model,
            card=files.card,
            golden=files.golden,
            version=record.version,
            rollout=rule,
        )

    def _abort(self, repo: Repository, record: RolloutRecord) -> ReleaseResult | None:
        if record.version not in repo.model_releases(record.name):
            return None
        return repo.remove_release(record.name, record.version)

    def _publish(self, repo: Repository, plan: PublishPlan) -> None:
        pending = bool(repo.state.pending_metadata or repo.state.pending_uploads)
        if not pending and not plan.clear_targets:
            return
        publisher = self._publisher()
        if publisher is None:
            return
        publisher.apply(
            plan,
            repo.pending_uploads(plan.uploads),
            repo.current_metadata(),
            repo.retained_metadata_names(),
        )
        repo.mark_published()
