"""systemd/install-host.sh staged (``--root``): its usage names every option it takes, and
the monitor unit serves the page and API with ``--http`` apart from ``--prometheus``."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from converter.cli.main import build_parser
from tests.support.host_units import INSTALL_HOST, SECURE_DIR, render_host_units, unit_settings


def test_help_lists_every_option_and_every_unit() -> None:
    script = INSTALL_HOST.read_text()
    taken = set(re.findall(r"^\s+(--[a-z-]+)(?:\|-h)?\)", script, re.MULTILINE))
    assert {"--http", "--prometheus", "--repo"} <= taken
    out = subprocess.run(["sh", str(INSTALL_HOST), "--help"], capture_output=True, text=True, check=True)
    listed = set(re.findall(r"^\s+(--[a-z-]+)", out.stdout, re.MULTILINE))
    assert taken - {"--no-systemctl"} <= listed, taken - listed
    assert "--no-systemctl" in out.stdout
    templates = sorted(p.name for p in (INSTALL_HOST.parent).glob("litefleet-*.*"))
    for name in templates:
        if name not in ("litefleet-agent.service", "litefleet-resign.service"):  # the timer runs it
            assert name in out.stdout, name


def test_monitor_unit_serves_the_page_on_http_and_metrics_on_prometheus(tmp_path: Path) -> None:
    default = unit_settings(render_host_units(tmp_path / "a")["litefleet-monitor.service"])
    args = build_parser().parse_args(shlex.split(default["ExecStart"][0])[1:])
    assert (args.prometheus, args.http) == ("127.0.0.1:9464", "127.0.0.1:8080")
    assert str(args.secure_dir) == SECURE_DIR
    chosen = render_host_units(tmp_path / "b", "--http", "0.0.0.0:8081", "--prometheus", "[::1]:9500")
    args = build_parser().parse_args(
        shlex.split(unit_settings(chosen["litefleet-monitor.service"])["ExecStart"][0])[1:]
    )
    assert (args.prometheus, args.http) == ("[::1]:9500", "0.0.0.0:8081")


def test_a_missing_http_value_is_bad_usage(tmp_path: Path) -> None:
    out = subprocess.run(
        ["sh", str(INSTALL_HOST), "--root", str(tmp_path), "--http"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "--http needs a value" in out.stderr
    assert not (tmp_path / "etc").exists()
