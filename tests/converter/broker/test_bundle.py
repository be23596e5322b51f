"""``litefleet device add ID --secure DIR --bundle OUT``: the folder install.sh --credentials takes."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

from tests.support.harness import litefleet, must


def test_the_bundle_holds_the_device_side_names_and_nothing_is_half_made(tmp_path: Path) -> None:
    secure, repo = tmp_path / "broker", tmp_path / "repo"
    must("repo", "init", str(repo))
    out = must(
        "device", "add", "pi-b", "--secure", str(secure), "--bundle", str(tmp_path / "b"),
        "--trusted-root", str(repo / "root.json"),
    )  # fmt: skip
    assert "install.sh --credentials b/" in out
    bundle = tmp_path / "b"
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (bundle / "credentials").iterdir()}
    assert modes == {"ca.pem": 0o644, "client.pem": 0o644, "client.key": 0o600}
    doc = tomllib.loads((bundle / "agent.toml").read_text())
    assert doc["device_id"] == "pi-b" and doc["broker"].startswith("mqtts://")
    assert (doc["ca_file"], doc["cert_file"], doc["key_file"]) == (
        "litefleet_ca.pem",
        "litefleet_client.pem",
        "litefleet_client.key",
    )
    assert (bundle / "root.json").read_bytes() == (repo / "root.json").read_bytes()
    # a target with content is refused before the device is created (exit 2, one line)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    code, _, err = litefleet(
        "device", "add", "pi-c", "--secure", str(secure), "--bundle", str(tmp_path / "full")
    )
    assert code == 2 and err.count("\n") == 1 and "is not an empty folder" in err
    assert "pi-c" not in must("device", "list", "--secure", str(secure))
    code, _, err = litefleet(
        "device", "add", "pi-d", "--secure", str(secure), "--bundle", str(tmp_path / "d"),
        "--trusted-root", str(tmp_path / "nope.json"),
    )  # fmt: skip
    assert code == 2 and "--trusted-root" in err and not (tmp_path / "d").exists()
    code, _, err = litefleet("device", "add", "pi-e", "--secure", str(secure), "--trusted-root", "x")
    assert code == 2 and "--trusted-root goes with --bundle" in err
