"""litefleet-rollout.service as systemd/install-host.sh renders it: the command it runs is
ours, its lifecycle and hardening."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from converter.cli.main import build_parser
from converter.cli.rollout import run_service
from tests.support.host_units import (
    LITEFLEET_PATH,
    REPO_DIR,
    SECURE_DIR,
    render_host_units,
    unit_settings,
)


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_host_units(tmp_path_factory.mktemp("host"))["litefleet-rollout.service"]


def test_exec_start_is_a_valid_service_command_as_the_operator(unit: Path) -> None:
    s = unit_settings(unit)
    assert not re.search(r"@[A-Z_]+@", unit.read_text()), unit.read_text()  # every placeholder filled
    argv = shlex.split(s["ExecStart"][0])
    assert argv[0] == LITEFLEET_PATH
    args = build_parser().parse_args(argv[1:])
    assert args.func is run_service
    assert str(args.repo) == REPO_DIR and str(args.secure_dir) == SECURE_DIR and args.broker is None
    assert s["User"] == ["alice"]
    assert (
        s["Type"] == ["notify"]
        and s["NotifyAccess"] == ["main"]
        and s["Restart"] == ["on-failure"]
        and re.fullmatch(r"\d+s", s["WatchdogSec"][0])
    )
    # it signs into the repository and nowhere else; the operator's home stays readable
    assert s["ProtectSystem"] == ["strict"] and s["ReadWritePaths"] == [REPO_DIR]
    assert s["ProtectHome"] == ["read-only"]
    assert "RemoveIPC" not in s  # the operator's own IPC objects are not the unit's to remove


def test_hardening_exposure_is_at_most_2_5(unit: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    out = subprocess.run(
        [tool, "security", "--offline=true", str(unit)], capture_output=True, text=True, timeout=60
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert match, out.stdout + out.stderr
    assert float(match.group(1)) <= 2.5
