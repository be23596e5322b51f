"""A rollout controller SIGKILLed at every step boundary and resumed: no double signing, no lost abort.

The controller runs as a real process (``python -m converter.cli.main rollout start``)
with ``LITEFLEET_CRASH_AT=<point>:<n>`` (:mod:`converter.crash_points`), which kills it
with SIGKILL the n-th time it reaches that point; ``rollout resume`` then has to finish
the rollout. Every targets metadata version in the repository must be accounted for: one
per step of the record, consecutive, the last one current and on the broker, and exactly
one signing per wave. The gates are off and no device is needed (``--allow-empty``): this
is about the controller's own state, the gates have their tests elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from converter.repo.repository import Repository
from converter.rollout.gates import GateName
from converter.rollout.record import RolloutRecord, RolloutState, StepKind
from converter.rollout.store import RolloutStore
from tests.support.harness import REPO_ROOT, must, read_retained

MODEL = "m"
POINTS = (
    "rollout-intent",
    "repo-metadata-written",
    "rollout-signed",
    "rollout-published",
    "rollout-recorded",
)
GATES_OFF = [arg for g in GateName for arg in ("--gate", f"{g.value}=off")]

pytestmark = pytest.mark.slow


def cli(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> Any:
    cmd = [sys.executable, "-m", "converter.cli.main", *args]
    full = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=120)


def prepared(broker: Any, tmp: Path) -> tuple[Path, Path, int]:
    repo = tmp / "repo"
    must("repo", "init", str(repo))
    for tag in ("v1", "v2"):
        (tmp / f"{tag}.tflite").write_bytes(b"\0\0\0\0TFL3" + tag.encode() * 100)
    must(
        "push",
        str(tmp / "v1.tflite"),
        "--repo",
        str(repo),
        "--name",
        MODEL,
        "--broker",
        broker.url,
        "--no-check-data",
    )
    return repo, tmp / "v2.tflite", Repository.open(repo).targets.signed.version


def accounted(repo: Path, broker: Any, base: int) -> RolloutRecord:
    """The record, after checking every targets version since ``base`` belongs to one step."""
    record = RolloutStore(repo).load(MODEL)
    assert record is not None and record.state.terminal
    versions = [s.targets_version for s in record.steps]
    assert versions == list(range(base + 1, base + 1 + len(versions))), record.steps
    current = Repository.open(repo)
    assert current.targets.signed.version == versions[-1]
    on_disk = sorted(int(p.name.split(".")[0]) for p in (repo / "metadata").glob("*.targets.json"))
    assert on_disk[-1] == versions[-1]  # no signed version beyond the recorded ones
    assert not current.state.pending_metadata and not current.state.pending_uploads
    retained = read_retained(broker.port, "litefleet/v1/repo/metadata/timestamp.json")
    assert retained == (repo / "metadata" / "timestamp.json").read_bytes()  # and it is published
    return record


@pytest.mark.parametrize("nth", [1, 2, 3])
@pytest.mark.parametrize("point", POINTS)
def test_killed_while_promoting_and_resumed(broker: Any, tmp_path: Path, point: str, nth: int) -> None:
    repo, model, base = prepared(broker, tmp_path)
    args = ["--repo", str(repo), "--broker", broker.url]
    start = cli(
        "rollout",
        "start",
        str(model),
        "--name",
        MODEL,
        "--no-check-data",
        *args,
        "--waves",
        "10,50,100",
        "--bake",
        "1s",
        "--allow-empty",
        *GATES_OFF,
        env={"LITEFLEET_CRASH_AT": f"{point}:{nth}"},
    )
    assert start.returncode == -signal.SIGKILL, (start.returncode, start.stdout, start.stderr)
    resumed = cli("rollout", "resume", MODEL, *args, "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["state"] == "promoted"
    record = accounted(repo, broker, base)
    assert record.state is RolloutState.PROMOTED
    assert [(s.kind, s.wave) for s in record.steps] == [(StepKind.SIGN_WAVE, w) for w in range(3)]
    assert [s.recovered for s in record.steps].count(True) <= 1
    assert Repository.open(repo).model_releases(MODEL)[2].canary_pct == 100


@pytest.mark.parametrize(
    "point", ["rollout-intent", "repo-metadata-written", "rollout-signed", "rollout-published"]
)
def test_killed_while_aborting_and_resumed(broker: Any, tmp_path: Path, point: str) -> None:
    repo, model, base = prepared(broker, tmp_path)
    args = ["--repo", str(repo), "--broker", broker.url]
    # the 2nd time the point is reached is the abort (the 1st is wave 0)
    proc = cli(
        "rollout",
        "start",
        str(model),
        "--name",
        MODEL,
        "--no-check-data",
        *args,
        "--waves",
        "10,100",
        "--bake",
        "1h",
        "--allow-empty",
        *GATES_OFF,
        env={"LITEFLEET_CRASH_AT": f"{point}:2"},
        wait=False,
    )
    store = RolloutStore(repo)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rec = store.load(MODEL)
        if rec is not None and rec.state is RolloutState.BAKING:
            break
        time.sleep(0.1)
    asked = cli("rollout", "abort", MODEL, "--repo", str(repo), "--wait", "2s")
    assert "asked the process driving rollout" in asked.stdout, asked.stderr
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    rec = store.load(MODEL)
    assert rec is not None and rec.state is RolloutState.ABORTING  # the intent survived the kill
    resumed = cli("rollout", "resume", MODEL, *args)
    assert resumed.returncode == 1 and "aborted: aborted by the operator" in resumed.stderr
    record = accounted(repo, broker, base)
    assert [(s.kind, s.wave) for s in record.steps] == [(StepKind.SIGN_WAVE, 0), (StepKind.ABORT, None)]
    assert set(Repository.open(repo).model_releases(MODEL)) == {1}
