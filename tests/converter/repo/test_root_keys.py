"""Offline root keys and expiry warnings (issue 12, items 9 and 7), as a user runs the commands.

``repo init --root-keys DIR`` writes the root keys into DIR (removable media), nowhere in
the repository; ``repo rotate`` and ``repo resign`` ask for that folder only when root must
be signed (a rotation; root's expiry near), with one clear line when it is missing. The
clock moves with ``faketime`` (Debian's libfaketime), as a host would live through a year.
``repo show`` and ``status`` warn when a signed expiry is near.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata

from tests.support.cli import argv, environment
from tests.support.cli import litefleet as lf

pytestmark = pytest.mark.skipif(shutil.which("faketime") is None, reason="faketime is not installed")


def at(days: int, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``litefleet ARGS`` with the clock ``days`` ahead."""
    return subprocess.run(
        ["faketime", f"+{days} days", *argv("litefleet", args)],
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def show(repo: Path, cwd: Path, days: int = 0) -> dict:
    out = at(days, "repo", "show", str(repo), "--json", cwd=cwd)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return result.stderr.strip().splitlines()


def one_line(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = stderr_lines(result)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def root_chain_verifies(repo: Path) -> int:
    """Each root version is signed by a threshold of the previous one's root keys and of its
    own (what a device checks walking the chain); returns the newest version."""
    n = 1
    prev = Metadata.from_file(str(repo / "metadata" / "1.root.json"))
    while (repo / "metadata" / f"{n + 1}.root.json").exists():
        nxt = Metadata.from_file(str(repo / "metadata" / f"{n + 1}.root.json"))
        prev.verify_delegate("root", nxt)
        nxt.verify_delegate("root", nxt)
        prev, n = nxt, n + 1
    return n


def test_root_keys_live_offline_and_are_asked_for_only_to_sign_root(tmp_path: Path) -> None:
    usb = tmp_path / "usb" / "litefleet-root"
    created = lf("repo", "init", "repo", "--root-keys", str(usb), cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert f"root keys:    {usb / 'root'}" in created.stdout
    repo = tmp_path / "repo"
    assert not list((repo / "keys").rglob("*.pem")) or all(
        p.parent.name != "root" for p in (repo / "keys").rglob("*.pem")
    )
    keys = list((usb / "root").glob("*.pem"))
    assert len(keys) == 1 and keys[0].stat().st_mode & 0o777 == 0o600 and usb.stat().st_mode & 0o777 == 0o700
    assert show(repo, tmp_path)["root_keys"] == "offline"

    # online work does not ask for them: re-signing targets, snapshot and timestamp
    resigned = lf("repo", "resign", "repo", cwd=tmp_path)
    assert resigned.returncode == 0 and stderr_lines(resigned) == [], resigned.stderr
    # a rotation signs root: one line saying which flag gives the keys
    one_line(lf("repo", "rotate", "repo", "targets", cwd=tmp_path), 2, "kept offline", "--root-keys DIR")
    rotated = lf("repo", "rotate", "repo", "targets", "--root-keys", str(usb), cwd=tmp_path)
    assert rotated.returncode == 0 and "root v2" in rotated.stdout, rotated.stderr
    rotated = lf("repo", "rotate", "repo", "root", "--root-keys", str(usb), cwd=tmp_path)
    assert rotated.returncode == 0 and "root v3" in rotated.stdout and str(usb / "retired") in rotated.stdout
    new_keys = list((usb / "root").glob("*.pem"))
    assert len(new_keys) == 1 and new_keys != keys and (usb / "retired" / f"root-{keys[0].name}").exists()
    assert all(p.parent.name != "root" for p in (repo / "keys").rglob("*.pem"))
    assert root_chain_verifies(repo) == 3

    # 300 days on, root (365 days) is within its window: resign says so and signs the rest
    late = at(300, "repo", "resign", "repo", cwd=tmp_path)
    one_line(late, 0, "warning: the root metadata expires on", "--root-keys DIR")
    assert show(repo, tmp_path, 300)["warnings"], "repo show does not warn"
    signed = at(300, "repo", "resign", "repo", "--root-keys", str(usb), cwd=tmp_path)
    assert signed.returncode == 0 and "root v4 expires" in signed.stdout and stderr_lines(signed) == [], (
        signed
    )
    assert root_chain_verifies(repo) == 4
    assert show(repo, tmp_path, 300)["warnings"] == []
    # a year after that, root has expired: the rest is re-signed, the command fails
    one_line(at(700, "repo", "resign", "repo", cwd=tmp_path), 1, "error: the root metadata expired on")


def test_root_keys_folder_must_be_its_own(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    one_line(
        lf("repo", "init", "r1", "--root-keys", "full", cwd=tmp_path), 2, "--root-keys full", "not an empty"
    )
    one_line(lf("repo", "init", "r2", "--root-keys", "r2/root", cwd=tmp_path), 2, "a folder of its own")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_online_root_keys_are_re_signed_by_resign_when_near(tmp_path: Path) -> None:
    """Without --root-keys at init the root keys are in keys/root: resign renews root itself."""
    assert lf("repo", "init", "repo", cwd=tmp_path).returncode == 0
    repo = tmp_path / "repo"
    signed = at(300, "repo", "resign", "repo", cwd=tmp_path)
    assert signed.returncode == 0 and "root v2 expires" in signed.stdout and stderr_lines(signed) == [], (
        signed
    )
    assert root_chain_verifies(repo) == 2


def test_repo_show_and_status_warn_before_the_timestamp_expires(tmp_path: Path, broker) -> None:
    assert lf("repo", "init", "repo", cwd=tmp_path).returncode == 0
    published = lf("repo", "publish", "repo", "--broker", broker.url, cwd=tmp_path)
    assert published.returncode == 0, published.stderr
    quiet = [lf("repo", "show", "repo", cwd=tmp_path), lf("status", "--broker", broker.url, cwd=tmp_path)]
    assert all(r.returncode == 0 and stderr_lines(r) == [] for r in quiet), quiet
    # 12 days on, the 14-day timestamp has 2 days left: within the 3-day window
    for cmd in (("repo", "show", "repo"), ("status", "--broker", broker.url)):
        late = at(12, *cmd, cwd=tmp_path)
        assert late.returncode == 0, late.stderr
        line = one_line(late, 0, "warning: the timestamp metadata expires on", "litefleet repo resign")
        assert "in 2 days" in line or "in 47 hours" in line or "in 48 hours" in line, line
    # expired: status says devices refuse the repository
    one_line(at(15, "status", "--broker", broker.url, cwd=tmp_path), 0, "timestamp metadata expired on")
