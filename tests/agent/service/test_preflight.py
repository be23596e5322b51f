"""Every file an agent config names is checked before anything starts (issue 12, item 1).

``litefleet-agent check-config`` and ``run`` are run as processes, as an operator runs them:
a missing or unusable ``ca_file``, ``cert_file``, ``key_file``, ``password_file`` or
``trusted_root`` is one line naming the key and the path, exit code 2, and never a
traceback from :mod:`ssl`. Before this, ``check-config`` said ``ok`` and ``run`` died with
``FileNotFoundError`` from ``ssl.create_default_context``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from converter.broker.secure import SecureDir
from converter.repo.repository import Repository

AGENT = [sys.executable, "-m", "agent"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A repository root and a secure broker folder with a certificate and a password device."""
    tmp = tmp_path_factory.mktemp("preflight")
    Repository.init(tmp / "repo")
    sd = SecureDir(tmp / "broker")
    sd.add_device("pi-a")
    sd.add_device("pi-p", auth="password")
    return {
        "root": tmp / "repo" / "root.json",
        "pi-a": sd.paths.device_dir("pi-a"),
        "pi-p": sd.paths.device_dir("pi-p"),
    }


def agent(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    environ.update(env or {})
    return subprocess.run(
        [*AGENT, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=120, check=False
    )


def write_config(path: Path, device_dir: Path, root: Path, **changes: str) -> Path:
    """The agent.toml of ``device_dir`` plus state_dir and trusted_root, with ``changes``."""
    doc: dict[str, str] = tomllib.loads((device_dir / "agent.toml").read_text())
    doc |= {"state_dir": str(path.parent / "state"), "trusted_root": str(root), **changes}
    path.write_text("".join(f'{k} = "{v}"\n' for k, v in doc.items()))
    return path


def assert_one_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("litefleet-agent: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def both(
    config: Path, *extra: str, cwd: Path, env: dict[str, str] | None = None
) -> list[subprocess.CompletedProcess[str]]:
    """check-config, then run (which must refuse before it starts: no broker is running)."""
    return [agent(cmd, "--config", str(config), *extra, cwd=cwd, env=env) for cmd in ("check-config", "run")]


def test_the_device_add_folder_runs_as_it_is(setup: dict[str, Path], tmp_path: Path) -> None:
    """The agent.toml `device add` leaves in its folder names the files beside it."""
    for device in ("pi-a", "pi-p"):
        copy = tmp_path / device
        shutil.copytree(setup[device], copy)  # "copy the folder onto the device"
        args = ("--trusted-root", str(setup["root"]), "--state-dir", str(tmp_path / f"state-{device}"))
        ok = agent("check-config", "--config", str(copy / "agent.toml"), *args, cwd=tmp_path)
        assert ok.returncode == 0 and ": ok (device " in ok.stdout, ok.stderr


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        # what the systemd snippet names, outside systemd: no $CREDENTIALS_DIRECTORY
        ("ca_file", "litefleet_ca.pem", "looked in the config file's folder"),
        ("ca_file", "/nonexistent/ca.pem", "no such file"),
        ("cert_file", "litefleet_client.pem", "no such file"),
        ("key_file", "/nonexistent/client.key", "no such file"),
        ("trusted_root", "/nonexistent/root.json", "no such file"),
    ],
)
def test_a_missing_file_is_one_line_naming_key_and_path(
    setup: dict[str, Path], tmp_path: Path, key: str, value: str, needle: str
) -> None:
    config = write_config(tmp_path / "agent.toml", setup["pi-a"], setup["root"], **{key: value})
    # relative names are looked up beside the config file: copy the real files there
    for f in setup["pi-a"].iterdir():
        if f.name != "agent.toml":
            shutil.copy(f, tmp_path / f.name)
    for result in both(config, cwd=tmp_path):
        assert_one_line(result, key, value.lstrip("/").split("/")[-1], needle)


def test_the_installed_layout_checks_by_hand(setup: dict[str, Path], tmp_path: Path) -> None:
    """install.sh writes credential names the unit hands over (``litefleet_F`` for the file F
    of /etc/litefleet/credentials); `check-config` run by hand, without the unit's
    $CREDENTIALS_DIRECTORY, finds the same files in the config folder's credentials/."""
    names = {"ca_file": "ca.pem", "cert_file": "pi-a.pem", "key_file": "pi-a.key"}
    config = write_config(
        tmp_path / "agent.toml",
        setup["pi-a"],
        setup["root"],
        **{key: f"litefleet_{name}" for key, name in names.items()},
    )
    (tmp_path / "credentials").mkdir()
    for name in names.values():
        shutil.copy(setup["pi-a"] / name, tmp_path / "credentials" / name)
    ok = agent("check-config", "--config", str(config), cwd=tmp_path)  # no $CREDENTIALS_DIRECTORY
    assert ok.returncode == 0 and ": ok (device " in ok.stdout, ok.stderr
    # a file missing there is named with every place looked in
    (tmp_path / "credentials" / "pi-a.key").unlink()
    for result in both(config, cwd=tmp_path):
        assert_one_line(result, "key_file litefleet_pi-a.key: no such file", "the unit's credentials folder")


def test_a_missing_password_file(setup: dict[str, Path], tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.toml", setup["pi-p"], setup["root"], password_file="gone")
    shutil.copy(setup["pi-p"] / "ca.pem", tmp_path / "ca.pem")
    for result in both(config, cwd=tmp_path):
        assert_one_line(result, "password_file gone: no such file", f"the config file's folder ({tmp_path})")


def test_files_that_are_not_what_they_claim(setup: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    config = write_config(tmp_path / "agent.toml", setup["pi-a"], setup["root"], ca_file="garbage.pem")
    for f in ("pi-a.pem", "pi-a.key"):
        shutil.copy(setup["pi-a"] / f, tmp_path / f)
    for result in both(config, cwd=tmp_path):
        assert_one_line(result, "ca_file", str(tmp_path / "garbage.pem"), "not a usable CA certificate")
    # a certificate with another device's key
    other = tmp_path / "other.key"
    from converter.broker.certs import new_key, pem_key

    other.write_bytes(pem_key(new_key()))
    shutil.copy(setup["pi-a"] / "ca.pem", tmp_path / "ca.pem")
    config = write_config(tmp_path / "agent.toml", setup["pi-a"], setup["root"], key_file=str(other))
    for result in both(config, cwd=tmp_path):
        assert_one_line(result, "cert_file", "key_file", str(other))
    # a trusted_root that is not TUF root metadata
    config = write_config(
        tmp_path / "agent.toml", setup["pi-a"], setup["root"], trusted_root=str(tmp_path / "ca.pem")
    )
    for result in both(config, cwd=tmp_path):
        assert_one_line(result, "trusted_root", str(tmp_path / "ca.pem"))


def test_credentials_directory_is_looked_in_and_named(setup: dict[str, Path], tmp_path: Path) -> None:
    """Under systemd (``$CREDENTIALS_DIRECTORY`` set) the credential names of the systemd
    snippet resolve there; a missing one names that folder."""
    creds = tmp_path / "creds"
    creds.mkdir()
    for mine, device in (("ca.pem", "ca.pem"), ("pi-a.pem", "client.pem"), ("pi-a.key", "client.key")):
        shutil.copy(setup["pi-a"] / mine, creds / f"litefleet_{device}")
    names = {
        "ca_file": "litefleet_ca.pem",
        "cert_file": "litefleet_client.pem",
        "key_file": "litefleet_client.key",
    }
    config = write_config(tmp_path / "agent.toml", setup["pi-a"], setup["root"], **names)
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    ok = agent("check-config", "--config", str(config), cwd=tmp_path, env=env)
    assert ok.returncode == 0, ok.stderr
    (creds / "litefleet_client.key").unlink()
    for result in both(config, cwd=tmp_path, env=env):
        assert_one_line(result, "key_file", "litefleet_client.key", f"$CREDENTIALS_DIRECTORY ({creds})")


def test_restart_isolation_without_a_supervisor_is_warned_about(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    """check_isolation = "restart" relies on a restart; an agent started by hand gets a warning,
    one under systemd (INVOCATION_ID) or runit (its parent is runsv) does not, and fork never."""
    from agent.service.config import load_config
    from agent.service.preflight import restarted_by, supervision_warning

    base = {
        "device_id": "pi-w",
        "broker": "mqtt://127.0.0.1:1",
        "state_dir": str(tmp_path / "state"),
        "trusted_root": str(setup["root"]),
    }
    restart = load_config(None, {**base, "check_isolation": "restart"})
    fork = load_config(None, base)
    assert restarted_by({"INVOCATION_ID": "0f3c"}, "bash") == "systemd"
    assert restarted_by({}, "runsv") == "runit"
    assert restarted_by({}, "bash") is None
    advice = supervision_warning(restart, {}, "bash")
    assert advice is not None and 'Use "fork"' in advice
    assert supervision_warning(restart, {"INVOCATION_ID": "0f3c"}, "bash") is None
    assert supervision_warning(restart, {}, "runsv") is None
    assert supervision_warning(fork, {}, "bash") is None
