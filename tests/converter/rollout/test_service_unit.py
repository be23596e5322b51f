"""systemd/litefleet-rollout.service: the command it runs is ours, its lifecycle and hardening."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from converter.cli.main import build_parser
from converter.cli.rollout import run_service

UNIT = Path(__file__).resolve().parents[3] / "systemd" / "litefleet-rollout.service"


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_exec_start_with_the_default_environment_is_a_valid_service_command() -> None:
    s = settings()
    env = {}
    for item in s["Environment"]:
        key, _, value = item.strip('"').partition("=")
        env[key] = value
    cmd = s["ExecStart"][0]
    # systemd: ${VAR} is one word, $VAR is split on whitespace
    cmd = re.sub(r"\$\{(\w+)\}", lambda m: shlex.quote(env[m.group(1)]), cmd)
    cmd = re.sub(r"\$(\w+)", lambda m: env[m.group(1)], cmd)
    argv = shlex.split(cmd)
    assert argv[0] == "/opt/litefleet/venv/bin/litefleet"
    args = build_parser().parse_args(argv[1:])
    assert args.func is run_service
    assert str(args.repo) == "/var/lib/litefleet-host/repo" and args.broker == "mqtt://127.0.0.1:1883"
    assert (
        s["Type"] == ["notify"]
        and s["Restart"] == ["on-failure"]
        and re.fullmatch(r"\d+s", s["WatchdogSec"][0])
    )
    assert s["EnvironmentFile"] == ["-/etc/litefleet/rollout.env"]
    assert s["StateDirectory"] == ["litefleet-host"]


def test_hardening_exposure_is_at_most_2_5() -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    out = subprocess.run(
        [tool, "security", "--offline=true", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert match, out.stdout + out.stderr
    assert float(match.group(1)) <= 2.5
