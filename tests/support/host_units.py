"""The host units as systemd/install-host.sh renders them, staged under a folder (``--root``).

Guarantees:

* :func:`render_host_units` runs the real installer (``--root DIR --no-systemctl``) on a real
  repository made by ``litefleet repo init``: what it returns is what an operator's
  ``/etc/systemd/system`` would hold;
* :func:`unit_settings` reads a unit file as systemd lists its assignments (one key may repeat).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_HOST = REPO_ROOT / "systemd" / "install-host.sh"
LITEFLEET = Path(sys.executable).parent / "litefleet"
# the paths an operator would give: the repository and the broker in their home
SECURE_DIR = "/home/alice/fleet/broker"
REPO_DIR = "/home/alice/fleet/repo"
LITEFLEET_PATH = "/home/alice/venv/bin/litefleet"


def render_host_units(root: Path, *options: str) -> dict[str, Path]:
    """Install the host units under ``root``; unit name -> rendered file."""
    repo = root / REPO_DIR.lstrip("/")
    repo.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(LITEFLEET), "repo", "init", str(repo)], check=True, capture_output=True, timeout=120)
    command = root / LITEFLEET_PATH.lstrip("/")
    command.parent.mkdir(parents=True, exist_ok=True)
    command.symlink_to(LITEFLEET)
    subprocess.run(
        [
            "sh",
            str(INSTALL_HOST),
            "--root",
            str(root),
            "--no-systemctl",
            "--user",
            "alice",
            "--litefleet",
            LITEFLEET_PATH,
            "--secure-dir",
            SECURE_DIR,
            "--repo",
            REPO_DIR,
            *options,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return {p.name: p for p in sorted((root / "etc/systemd/system").iterdir())}


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Key=value`` assignments of a unit file, every section together, in order."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out
