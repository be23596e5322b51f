"""systemd/install-host.sh staged (``--root``): its usage names every option it takes, and
the monitor unit serves the page and API with ``--http`` apart from ``--prometheus``."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

from converter.cli.main import build_parser
from tests.support.host_units import (
    INSTALL_HOST,
    LITEFLEET_PATH,
    SECURE_DIR,
    render_host_units,
    unit_settings,
)


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


def stage(root: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """install-host.sh under ``root`` with the paths render_host_units uses."""
    return subprocess.run(
        [
            *("sh", str(INSTALL_HOST), "--root", str(root), "--no-systemctl", "--user", "alice"),
            *("--litefleet", LITEFLEET_PATH, "--secure-dir", SECURE_DIR, *options),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_site_host_gets_the_site_broker_alone(tmp_path: Path) -> None:
    """--upstream: only the broker unit, as a site broker; a host that was central's loses
    central's other units; what a site host cannot have is refused before any change."""
    from converter.broker.sites import CentralDir

    root = tmp_path / "root"
    central_units = render_host_units(root)
    assert len(central_units) > 1
    url = "mqtts://hub.example.com:8883"
    # the uplink bundle is not there yet: refused, nothing touched
    out = stage(root, "--upstream", url)
    assert out.returncode == 2 and "uplink/site.json is missing" in out.stderr, out.stderr
    assert sorted(p.name for p in (root / "etc/systemd/system").iterdir()) == sorted(central_units)
    central = CentralDir(tmp_path / "central")
    central.ensure()
    central.add_site("north")
    shutil.copytree(central.site_dir("north"), root / SECURE_DIR.lstrip("/") / "uplink")
    for bad, said in (
        (["--upstream", url, "--repo", "/srv/repo"], "a site host has no repository"),
        (["--upstream", "mqtt://hub.example.com:1883"], "give mqtts://HOST:PORT"),
        (["--upstream", "mqtts://hub.example.com"], "give mqtts://HOST:PORT"),
    ):
        out = stage(root, *bad)
        assert out.returncode == 2 and said in out.stderr, (bad, out.stderr)
    out = stage(root, "--upstream", url, "--bind", "0.0.0.0", "--broker-args", "--uplink-keepalive-s 10")
    assert out.returncode == 0, out.stderr
    units = {p.name: p for p in (root / "etc/systemd/system").iterdir()}
    assert list(units) == ["litefleet-broker.service"]
    for gone in set(central_units) - set(units):
        assert f"removed {gone} (not part of this host any more)" in out.stdout, out.stdout
    assert (root / "etc/litefleet-host/units").read_text().split() == ["litefleet-broker.service"]
    assert (root / "usr/local/share/doc/litefleet/sites.md").is_file()
    settings = unit_settings(units["litefleet-broker.service"])
    args = build_parser().parse_args(shlex.split(settings["ExecStart"][0])[1:])
    assert (args.upstream, str(args.secure), args.bind, args.uplink_keepalive_s) == (
        url,
        SECURE_DIR,
        "0.0.0.0",
        10,
    )
    assert settings["ReadWritePaths"] == [SECURE_DIR]
    again = stage(root, "--upstream", url, "--bind", "0.0.0.0", "--broker-args", "--uplink-keepalive-s 10")
    assert "litefleet-broker.service unchanged" in again.stdout and "removed" not in again.stdout
    gone = subprocess.run(
        ["sh", str(INSTALL_HOST), "--root", str(root), "--no-systemctl", "--uninstall"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "removed litefleet-broker.service" in gone.stdout
    assert not (root / "etc/systemd/system/litefleet-broker.service").exists()
