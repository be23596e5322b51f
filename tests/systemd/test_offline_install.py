"""The documented offline installs under a real systemd (issue 13, item 4): a Pi with no route to
the package index installs from a checkout copied onto it, with the wheelhouse as its only index.

Before, the wheelhouse held the agent's wheels only and pip, building litefleet from the
checkout in an isolated environment, stopped at "No matching distribution found for
setuptools>=68" (bookworm's venv has setuptools 66.1); scripts/wheelhouse.sh now carries the
build requirements too. (Installing from the wheelhouse itself is what test_agent_unit.py does.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .specs import REPO_ROOT

pytestmark = pytest.mark.systemd

LITEFLEET = str(Path(sys.executable).parent / "litefleet")
CHECKOUT = ("pyproject.toml", "README.md", "agent", "converter", "systemd", "docs")


def test_install_from_a_checkout_offline_with_the_wheelhouse_as_index(
    new_machine: Any, tmp_path: Path
) -> None:
    m = new_machine("amd64")
    src = m.path("/root/litefleet")  # copied in, as onto a Pi's SD card
    src.mkdir(parents=True)
    for name in CHECKOUT:
        copy = shutil.copytree if (REPO_ROOT / name).is_dir() else shutil.copy2
        copy(REPO_ROOT / name, src / name)  # type: ignore[operator]
    for cache in src.rglob("__pycache__"):
        shutil.rmtree(cache)
    proc = m.run(
        [
            "sh",
            "/root/litefleet/systemd/install.sh",
            "--device-id",
            "pi-checkout",
            "--broker",
            "mqtt://broker.lan:1883",
            "--pip-args",
            "--no-index --find-links /media/wheelhouse/wheels",
            "--no-start",
        ],
        check=False,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "installed litefleet 0.1.0" in proc.stdout
    # no root.json given: installed and enabled, not started, and it says why
    assert "installed, not started: missing trusted_root /etc/litefleet/root.json" in proc.stdout
    origin = m.sh(
        "cat /opt/litefleet/venv/lib/python3.11/site-packages/litefleet-*.dist-info/direct_url.json"
    )
    assert '"url": "file:///root/litefleet"' in origin.stdout  # built from the checkout, not a wheel
    m.run(["/opt/litefleet/venv/bin/python", "-c", "import agent.service.daemon, ai_edge_litert.interpreter"])
    check = [
        "/opt/litefleet/venv/bin/litefleet-agent",
        "check-config",
        "--config",
        "/etc/litefleet/agent.toml",
    ]
    # check-config checks every file the configuration names: one line, exit 2, until it is there
    missing = m.run(check, check=False)
    assert missing.returncode == 2, missing
    assert (
        missing.stderr.strip()
        == "litefleet-agent: error: trusted_root /etc/litefleet/root.json: no such file"
    )
    subprocess.run([LITEFLEET, "repo", "init", str(tmp_path / "repo")], check=True, capture_output=True)
    shutil.copy2(tmp_path / "repo" / "root.json", m.path("/etc/litefleet/root.json"))
    assert "ok (device pi-checkout" in m.run(check).stdout
