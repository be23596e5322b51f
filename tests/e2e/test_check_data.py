"""A model without its card and golden vectors is not pushed by accident (issue 12, item 5).

The pre-activation check is a headline promise: a ``.tflite`` renamed away from its
``.card.json`` and ``.golden.npz`` used to be pushed and activated without a word.
Now ``litefleet push`` refuses it (exit 2, one line saying what the devices could not
check) unless told ``--no-check-data``, and the agent that activates such a release
says so at warning level, in its ``activated`` event and in its log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.harness import REPO_ROOT, AgentProcess, FleetWatcher


def litefleet_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``litefleet ARGS`` as a user runs it: its own process."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "converter", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_push_refuses_a_model_without_its_check_data_and_the_agent_warns(
    broker, tmp_path: Path, digits_int8
) -> None:
    repo = tmp_path / "repo"
    assert litefleet_cli("repo", "init", str(repo)).returncode == 0
    bare = tmp_path / "renamed.tflite"
    shutil.copy(digits_int8.tflite, bare)  # the card and golden vectors stay behind

    refused = litefleet_cli(
        "push", str(bare), "--repo", str(repo), "--name", "digits", "--broker", broker.url
    )
    assert refused.returncode == 2, refused
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    for needle in ("renamed.card.json", "renamed.golden.npz", "golden vectors", "--no-check-data"):
        assert needle in lines[0], (needle, lines[0])
    shown = json.loads(litefleet_cli("repo", "show", str(repo), "--json").stdout)
    assert shown["releases"] == []  # nothing was signed

    agent = AgentProcess(tmp_path, "pi-g", broker.url, repo / "root.json", log_level="info")
    watch = FleetWatcher(broker.port)
    try:
        agent.start()
        pushed = litefleet_cli(
            "push",
            str(bare),
            "--repo",
            str(repo),
            "--name",
            "digits",
            "--broker",
            broker.url,
            "--no-check-data",
        )
        assert pushed.returncode == 0, pushed.stderr
        assert "warning:" in pushed.stderr and "only that it runs once on zeros" in pushed.stderr
        watch.wait_active("pi-g", "digits", 1, timeout_s=60)
        ev = watch.wait_event("pi-g", "activated", version=1)
        assert ev["golden"] is False and "without golden vectors" in ev["warning"], ev
        warned = [ln for ln in agent.log().splitlines() if " WARNING " in ln and " activated " in ln]
        assert warned and "golden=false" in warned[0] and "warning=" in warned[0], agent.log()[-2000:]

        # the same model with its card and golden vectors: checked, and no warning
        complete = litefleet_cli(
            "push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits", "--broker", broker.url
        )
        assert complete.returncode == 0 and "warning" not in complete.stderr, complete.stderr
        ev = watch.wait_event("pi-g", "activated", version=2)
        assert ev["golden"] is True and "warning" not in ev, ev
        lines = [ln for ln in agent.log().splitlines() if " activated " in ln and " version=2 " in ln]
        assert lines and " INFO " in lines[0], agent.log()[-2000:]
    finally:
        agent.stop()
        watch.close()
