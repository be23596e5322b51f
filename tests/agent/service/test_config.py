"""agent.toml: strict keys, types, cross-field checks, overrides, credentials."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.service.config import ConfigError, load_config, parse_broker_url

BASE = """
device_id = "pi-1"
broker = "mqtt://127.0.0.1:1883"
state_dir = "/var/lib/litefleet"
trusted_root = "/etc/litefleet/root.json"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_minimal_config_and_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.device_id == "pi-1" and cfg.groups == () and cfg.http == "127.0.0.1:8501"
    assert cfg.http_address == ("127.0.0.1", 8501)
    assert cfg.broker_address.port == 1883 and not cfg.broker_address.tls
    assert cfg.shadow_max_bytes == 64 * 1024 * 1024
    assert load_config(write(tmp_path, BASE + "shadow_max_bytes = 0\n")).shadow_max_bytes == 0  # never


def test_flags_override_the_file(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, BASE + 'groups = ["a"]\n'), {"groups": "b,c", "http": "", "device_id": None}
    )
    assert cfg.groups == ("b", "c") and cfg.http_address is None and cfg.device_id == "pi-1"


@pytest.mark.parametrize(
    "extra, message",
    [
        ("colour = 'red'\n", "unknown key"),
        ("threads = 0\n", "threads"),
        ("threads = 'two'\n", "expected an integer"),
        ("runtime = 'onnx'\n", "runtime"),
        ("http = 'localhost'\n", "host:port"),
        ("groups = 'a b'\n", "group"),
        ("metrics_interval_s = -1\n", "positive"),
        ("topic_prefix = 'a/#'\n", "wildcards"),
        ("site = 'North/1'\n", "site broker's name"),
        ("cert_file = 'c.pem'\n", "go together"),
        ("ca_file = 'ca.pem'\n", "not mqtts"),
        ("shadow_max_bytes = -1\n", "shadow_max_bytes must not be negative"),
        ("shadow_max_bytes = '64M'\n", "shadow_max_bytes.*expected an integer"),
        ("shadow_max_bytes = 1.5\n", "shadow_max_bytes.*expected an integer"),
        ("check_isolation = 'none'\n", "check_isolation must be fork or restart, got 'none'"),
    ],
)
def test_bad_values_are_one_clear_error(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, BASE + extra))


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "device_id = \n"))
    with pytest.raises(ConfigError, match=r"missing required key.*trusted_root"):
        load_config(write(tmp_path, BASE.replace('trusted_root = "/etc/litefleet/root.json"', "")))
    with pytest.raises(ConfigError, match="device_id"):
        load_config(write(tmp_path, BASE.replace('"pi-1"', '"pi 1/#"')))


def test_broker_urls() -> None:
    a = parse_broker_url("mqtts://dev%40x:s3cret@broker.lan")
    assert (a.host, a.port, a.tls, a.username, a.password) == ("broker.lan", 8883, True, "dev@x", "s3cret")
    assert "s3cret" not in str(a) and "s3cret" not in repr(a)
    for bad in ("http://x", "mqtt://", "mqtt://h:99999", "mqtt://h/path"):
        with pytest.raises(ConfigError):
            parse_broker_url(bad)


def test_password_from_systemd_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "litefleet_mqtt_password").write_text("hunter2\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = load_config(
        write(
            tmp_path,
            BASE.replace("mqtt://", "mqtts://")
            + 'username = "pi-1"\npassword_file = "litefleet_mqtt_password"\n',
        )
    )
    assert cfg.password() == "hunter2"
    with pytest.raises(ConfigError, match="not both"):
        load_config(write(tmp_path, BASE.replace("mqtt://", "mqtt://u:p@") + 'password_file = "x"\n'))
