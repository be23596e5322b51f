"""The secure broker's pure core and its folder: grants, topic matching, password
hashes, ACL and config rendering, certificates, file modes. No broker here
(tests/converter/broker/test_secure_mqtt.py runs the same rules against Mosquitto)."""

from __future__ import annotations

import base64
import datetime as dt
import inspect
import json
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.protocol import Topics
from converter.broker.acl import (
    Grant,
    device_grants,
    hash_password,
    host_grants,
    render_acl,
    render_password_file,
    verify_password,
)
from converter.broker.layout import MAX_PACKET_SIZE_BYTES
from converter.broker.registry import (
    AUTH_CERT,
    AUTH_PASSWORD,
    CRED_CA,
    CRED_CERT,
    CRED_KEY,
    CRED_PASSWORD,
    DEVICE_CRED_DIR,
    HOST_USERNAME,
    ListenerPorts,
    Registry,
    agent_toml_snippet,
    check_device_id,
    check_san,
)
from converter.broker.secure import SecureDir, host_client_settings
from converter.errors import BadInputError
from tests.support.harness import litefleet

B = "litefleet/v1"


def allowed(grants: tuple[Grant, ...], access: str, topic: str) -> bool:
    return any(g.allows(access, topic) for g in grants)


# -- topic matching -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flt", "topic", "want"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+", "a", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("a/+/c/#", "a/x/c", True),
        ("a/+/c/#", "a/x/d", False),
        ("#", "a/b", True),
        ("#", "$SYS/broker", False),
        ("+/x", "$SYS/x", False),
        ("a/b", "a/b/", False),
        ("a//b", "a//b", True),
    ],
)
def test_topic_matches(flt: str, topic: str, want: bool) -> None:
    """The grants are matched with paho's matcher; these are the cases the ACL relies on."""
    assert Grant("read", flt).allows("read", topic) is want


# -- grants -----------------------------------------------------------------------------


def test_device_may_write_only_its_own_topics() -> None:
    g = device_grants(Topics("litefleet"), "dev-a")
    for leaf in ("state", "events", "metrics"):
        assert allowed(g, "write", f"{B}/devices/dev-a/{leaf}")
        assert not allowed(g, "write", f"{B}/devices/dev-b/{leaf}")
    for topic in (
        f"{B}/devices/dev-a/infer",
        f"{B}/devices/dev-a/x",
        f"{B}/devices/dev-a",
        f"{B}/repo/metadata/timestamp.json",
        f"{B}/repo/targets/f/0",
        f"{B}/devices/dev-a/state/x",
        "litefleet/v2/devices/dev-a/state",
        "x",
    ):
        assert not allowed(g, "write", topic), topic


def test_device_reads_repository_and_own_topics_only() -> None:
    g = device_grants(Topics("litefleet"), "dev-a")
    for topic in (
        f"{B}/repo/metadata/1.root.json",
        f"{B}/repo/targets/abc.m.tflite/7",
        f"{B}/devices/dev-a/infer",
        f"{B}/devices/dev-a/state",
    ):
        assert allowed(g, "read", topic), topic
    for topic in (
        f"{B}/devices/dev-b/infer",
        f"{B}/devices/dev-b/state",
        f"{B}/replies/h/dev-a",
        "$SYS/broker/uptime",
        "other/topic",
    ):
        assert not allowed(g, "read", topic), topic


def test_no_grant_covers_everything() -> None:
    for g in (*device_grants(Topics("litefleet"), "d"), *host_grants(Topics("litefleet"))):
        assert g.topic.startswith(f"{B}/"), g
        assert "#" not in g.topic[:-1], g  # "#" only as the last level


def test_host_writes_repository_but_not_device_reports() -> None:
    g = host_grants(Topics("litefleet"))
    assert allowed(g, "write", f"{B}/repo/metadata/timestamp.json")
    assert allowed(g, "read", f"{B}/repo/targets/x/0")
    assert allowed(g, "write", f"{B}/devices/dev-a/infer")
    assert allowed(g, "write", f"{B}/devices/dev-a/state")  # to clear a removed device
    for leaf in ("state", "events", "metrics", "infer"):
        assert allowed(g, "read", f"{B}/devices/dev-a/{leaf}")
    for leaf in ("events", "metrics"):
        assert not allowed(g, "write", f"{B}/devices/dev-a/{leaf}")
    # the rollout controller's retained records (docs/protocol.md 6.5)
    assert allowed(g, "write", f"{B}/rollouts/digits") and allowed(g, "read", f"{B}/rollouts/digits")
    assert not allowed(device_grants(Topics("litefleet"), "dev-a"), "write", f"{B}/rollouts/digits")
    assert allowed(g, "read", f"{B}/replies/_lf-host-1/dev-a")
    assert not allowed(g, "write", f"{B}/replies/_lf-host-1/dev-a")


def test_prefix_is_honoured() -> None:
    g = device_grants(Topics("acme/fleet"), "d1")
    assert allowed(g, "read", "acme/fleet/v1/repo/metadata/timestamp.json")
    assert not allowed(g, "read", f"{B}/repo/metadata/timestamp.json")


def test_reply_topics() -> None:
    topics = Topics("litefleet")
    t = topics.reply("_lf-host-ab", "dev-a")
    assert t == f"{B}/replies/_lf-host-ab/dev-a"
    assert topics.reply_allowed("dev-a", t)
    assert topics.reply_allowed("dev-a", t + "/req-7")
    assert allowed(device_grants(Topics("litefleet"), "dev-a"), "write", t)
    for bad in (
        f"{B}/replies/_lf-host-ab/dev-b",
        f"{B}/replies/dev-a",
        f"{B}/replies/+/dev-a",
        f"{B}/devices/dev-b/state",
        f"{B}/replies/x/dev-a/#",
    ):
        assert not topics.reply_allowed("dev-a", bad), bad


def per_device_topics(topics: Topics, device_id: str) -> dict[str, str]:
    """method name -> topic of every ``Topics`` method that names one device's topic
    (one parameter, ``device_id``; a concrete topic, no wildcard)."""
    out = {}
    for name, member in inspect.getmembers(type(topics), inspect.isfunction):
        if name.startswith("_") or list(inspect.signature(member).parameters) != ["self", "device_id"]:
            continue
        topic = getattr(topics, name)(device_id)
        if isinstance(topic, str) and "+" not in topic and "#" not in topic:
            out[name] = topic
    return out


def unclassified(topics: Topics) -> set[str]:
    """Per-device topics that are neither outbound nor inbound: the ACL would not grant
    their writer anything."""
    known = {*topics.device_outbound("dev-a"), *topics.device_inbound("dev-a")}
    return {name for name, t in per_device_topics(topics, "dev-a").items() if t not in known}


def check_acl_follows_topics(topics: Topics) -> None:
    dev_a, dev_b, host = device_grants(topics, "dev-a"), device_grants(topics, "dev-b"), host_grants(topics)
    for t in topics.device_outbound("dev-a"):
        assert allowed(dev_a, "write", t) and allowed(host, "read", t), t
        assert not allowed(dev_b, "write", t) and not allowed(dev_b, "read", t), t
    for t in topics.device_inbound("dev-a"):
        assert allowed(host, "write", t) and allowed(dev_a, "read", t), t
        assert not allowed(dev_a, "write", t) and not allowed(dev_b, "read", t), t
    for t in (topics.metadata("timestamp.json"), topics.chunk("abc.model.tflite", 3)):
        assert allowed(dev_a, "read", t) and allowed(host, "write", t) and not allowed(dev_a, "write", t)
    reply = topics.reply("_lf-host-1", "dev-a")
    assert allowed(dev_a, "write", reply) and allowed(host, "read", reply)
    assert not allowed(dev_b, "write", reply)


def test_every_device_topic_of_topics_is_in_the_acl() -> None:
    """The ACL is built from ``Topics``: each per-device topic it derives is granted to its
    device (and to no other), and a new per-device method must say who writes it."""
    topics = Topics("litefleet")
    assert set(per_device_topics(topics, "dev-a")) >= {"state", "events", "metrics", "infer"}
    assert unclassified(topics) == set()
    check_acl_follows_topics(topics)
    check_acl_follows_topics(Topics("acme/fleet"))


def test_a_renamed_or_added_topic_follows_into_the_acl() -> None:
    class Renamed(Topics):
        def state(self, device_id: str) -> str:
            return self.device(device_id, "status")

    renamed = Renamed("litefleet")
    grants = device_grants(renamed, "dev-a")
    assert allowed(grants, "write", f"{B}/devices/dev-a/status")
    assert not allowed(grants, "write", f"{B}/devices/dev-a/state")
    assert allowed(host_grants(renamed), "write", f"{B}/devices/dev-b/status")  # clearing a row
    check_acl_follows_topics(renamed)

    class Added(Topics):
        def availability(self, device_id: str) -> str:
            return self.device(device_id, "availability")

    # a per-device topic in neither list is caught ...
    assert unclassified(Added("litefleet")) == {"availability"}

    class Listed(Added):
        def device_outbound(self, device_id: str) -> tuple[str, ...]:
            return (*super().device_outbound(device_id), self.availability(device_id))

    # ... and once listed, the device may publish it
    listed = Listed("litefleet")
    assert unclassified(listed) == set()
    assert allowed(device_grants(listed, "dev-a"), "write", f"{B}/devices/dev-a/availability")
    check_acl_follows_topics(listed)


def test_render_acl_has_user_blocks_and_no_patterns() -> None:
    text = render_acl(
        [
            ("dev-a", device_grants(Topics("litefleet"), "dev-a")),
            (HOST_USERNAME, host_grants(Topics("litefleet"))),
        ]
    )
    assert "pattern" not in text
    assert "\nuser dev-a\n" in text and f"\nuser {HOST_USERNAME}\n" in text
    assert f"topic write {B}/devices/dev-a/state\n" in text
    assert f"topic readwrite {B}/repo/#\n" in text


# -- passwords ----------------------------------------------------------------------------


def test_password_hash_format_and_verification() -> None:
    h = hash_password("s3cret", salt=b"\x01" * 12)
    kind, iterations, salt, digest = h.split("$")[1:]
    assert (kind, iterations) == ("7", "101")
    assert base64.b64decode(salt) == b"\x01" * 12
    assert len(base64.b64decode(digest)) == 64
    assert verify_password("s3cret", h)
    assert not verify_password("s3cret ", h)
    assert not verify_password("s3cret", "$6$x$y")
    assert hash_password("s3cret") != hash_password("s3cret")  # random salt


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="no mosquitto_passwd")
def test_password_hash_agrees_with_mosquitto_passwd(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(f), "u1", "pa:ss word"], check=True, capture_output=True
    )
    user, theirs = f.read_text().strip().split(":", 1)
    assert user == "u1"
    assert verify_password("pa:ss word", theirs)
    salt = base64.b64decode(theirs.split("$")[3])
    assert hash_password("pa:ss word", salt=salt) == theirs


def test_password_file_is_sorted_and_may_be_empty() -> None:
    assert render_password_file({}) == ""
    assert render_password_file({"b": "$7$h2", "a": "$7$h1"}) == "a:$7$h1\nb:$7$h2\n"


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["", "-x", "a b", "a/b", "a+b", "a#", "x" * 65, HOST_USERNAME, "_lf-host-1", "dev:1"]
)
def test_bad_device_ids(bad: str) -> None:
    with pytest.raises(BadInputError):
        check_device_id(bad)


@pytest.mark.parametrize("good", ["hub.local", "10.0.0.5", "::1", "fleet-broker.example.com"])
def test_good_sans(good: str) -> None:
    check_san(good)


@pytest.mark.parametrize("bad", ["", "a b", "-x.example", "x" * 64 + ".com", "a..b"])
def test_bad_sans(bad: str) -> None:
    with pytest.raises(BadInputError):
        check_san(bad)


# -- the folder -------------------------------------------------------------------------------


NOW = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def load_cert(p: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(p.read_bytes())


def test_new_folder_is_private_and_complete(tmp_path: Path) -> None:
    sd = SecureDir(tmp_path / "s")
    reg = sd.ensure(now=NOW)
    p = sd.paths
    assert mode(p.root) == 0o700
    for secret in (p.ca_key, p.server_key, p.host_password, p.host_passwd, p.devices_passwd, p.registry):
        assert mode(secret) == 0o600, secret
    assert reg.ports == ListenerPorts(8883, 8884, 8885)
    assert reg.prefix == "litefleet"
    ca = load_cert(p.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    server = load_cert(p.server_cert)
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(a) for a in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.not_valid_before_utc < NOW  # a lagging device clock still accepts it
    crl = x509.load_pem_x509_crl(p.crl.read_bytes())
    assert crl.is_signature_valid(ca.public_key()) and len(crl) == 0
    assert crl.next_update_utc == ca.not_valid_after_utc
    host_pw = p.host_password.read_text().strip()
    user, hashed = p.host_passwd.read_text().strip().split(":", 1)
    assert user == HOST_USERNAME and verify_password(host_pw, hashed)
    assert host_pw not in p.registry.read_text()


def test_ensure_is_idempotent_and_reissues_server_cert_for_new_names(tmp_path: Path) -> None:
    sd = SecureDir(tmp_path / "s")
    sd.ensure(now=NOW)
    ca1, key1, srv1 = (
        sd.paths.ca_cert.read_bytes(),
        sd.paths.ca_key.read_bytes(),
        sd.paths.server_cert.read_bytes(),
    )
    pw1 = sd.paths.host_password.read_bytes()
    sd.ensure(now=NOW + dt.timedelta(days=1))
    assert sd.paths.server_cert.read_bytes() == srv1
    reg = sd.ensure(sans=["hub.local", "10.1.2.3"], now=NOW + dt.timedelta(days=2))
    assert (sd.paths.ca_cert.read_bytes(), sd.paths.ca_key.read_bytes()) == (ca1, key1)
    assert sd.paths.host_password.read_bytes() == pw1
    srv2 = load_cert(sd.paths.server_cert)
    assert srv2.public_bytes is not None and sd.paths.server_cert.read_bytes() != srv1
    names = srv2.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "hub.local" in names.get_values_for_type(x509.DNSName)
    assert reg.public_host == "hub.local"
    # names stay when not given again
    assert SecureDir(tmp_path / "s").ensure(now=NOW).sans == reg.sans


def test_deleting_the_host_password_rotates_it(tmp_path: Path) -> None:
    sd = SecureDir(tmp_path / "s")
    sd.ensure(now=NOW)
    old = sd.paths.host_password.read_text().strip()
    sd.paths.host_password.unlink()
    sd.ensure(now=NOW)
    new = sd.paths.host_password.read_text().strip()
    assert new != old and mode(sd.paths.host_password) == 0o600
    hashed = sd.paths.host_passwd.read_text().strip().split(":", 1)[1]
    assert verify_password(new, hashed) and not verify_password(old, hashed)


def test_server_cert_is_renewed_before_it_expires(tmp_path: Path) -> None:
    sd = SecureDir(tmp_path / "s")
    sd.ensure(now=NOW)
    old = load_cert(sd.paths.server_cert)
    sd.ensure(now=old.not_valid_after_utc - dt.timedelta(days=10))
    assert load_cert(sd.paths.server_cert).serial_number != old.serial_number


def test_prefix_is_fixed_at_creation(tmp_path: Path) -> None:
    sd = SecureDir(tmp_path / "s")
    sd.ensure(prefix="acme", now=NOW)
    with pytest.raises(BadInputError, match="prefix"):
        sd.ensure(prefix="other", now=NOW)
    assert "topic readwrite acme/v1/repo/#" in sd.paths.host_acl.read_text()


def test_half_a_ca_is_refused(tmp_path: Path) -> None:
    sd = SecureDir(tmp_path / "s")
    sd.ensure(now=NOW)
    sd.paths.ca_key.unlink()
    with pytest.raises(BadInputError, match="half a CA"):
        sd.ensure(now=NOW)


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("litefleet: error: "), err
    return lines[0]


@pytest.mark.parametrize(("name", "what"), [("ca.key", "PEM private key"), ("ca.pem", "PEM certificate")])
@pytest.mark.parametrize(
    "damage", [b"", b"garbage\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"]
)
def test_damaged_ca_is_one_line_of_bad_input(tmp_path: Path, name: str, what: str, damage: bytes) -> None:
    """The CA cannot be remade without re-enrolling every device: a damaged ca.key or
    ca.pem stops every command with one line (exit 2), and is left as it was."""
    folder = tmp_path / "s"
    sd = SecureDir(folder)
    sd.add_device("pi-01", now=NOW)
    (folder / name).write_bytes(damage)
    registry = sd.paths.registry.read_bytes()
    for args in (
        ("broker", "--secure", str(folder)),
        ("device", "add", "pi-02", "--secure", str(folder)),
        ("device", "remove", "pi-01", "--secure", str(folder)),
    ):
        code, _, err = litefleet(*args)
        assert code == 2, (args, err)
        line = one_error_line(err)
        assert f"{folder / name} is not a {what}; restore it from a backup" in line, line
        assert (folder / name).read_bytes() == damage
        assert sd.paths.registry.read_bytes() == registry
    assert [d.device_id for d in sd.devices()] == ["pi-01"]


def test_ca_certificate_of_another_key_is_refused(tmp_path: Path) -> None:
    sd = SecureDir(tmp_path / "s")
    sd.ensure(now=NOW)
    other = SecureDir(tmp_path / "other")
    other.ensure(now=NOW)
    shutil.copy(other.paths.ca_cert, sd.paths.ca_cert)
    code, _, err = litefleet("device", "add", "pi-01", "--secure", str(sd.root))
    assert code == 2
    assert "do not belong together" in one_error_line(err)


@pytest.mark.parametrize("name", ["server.pem", "server.key"])
@pytest.mark.parametrize("damage", [b"", b"garbage\n"])
def test_damaged_server_certificate_is_issued_anew(tmp_path: Path, name: str, damage: bytes) -> None:
    """server.pem and server.key derive from the CA: damaged, they are replaced (by
    ``ensure``, which ``litefleet broker --secure`` runs before it starts Mosquitto)."""
    sd = SecureDir(tmp_path / "s")
    sd.ensure(now=NOW)
    old = load_cert(sd.paths.server_cert)
    (sd.root / name).write_bytes(damage)
    code, _, err = litefleet("device", "add", "pi-01", "--secure", str(sd.root))
    assert code == 0 and err == "", err  # does not need the server certificate
    sd.ensure(now=NOW)
    new = load_cert(sd.paths.server_cert)
    assert new.serial_number != old.serial_number
    new.verify_directly_issued_by(load_cert(sd.paths.ca_cert))
    assert mode(sd.paths.server_key) == 0o600
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(sd.paths.server_key.read_bytes(), None)
    assert key.public_key() == new.public_key()


def test_server_key_of_another_certificate_is_replaced(tmp_path: Path) -> None:
    sd = SecureDir(tmp_path / "s")
    sd.ensure(now=NOW)
    old = load_cert(sd.paths.server_cert)
    sd.paths.server_key.write_bytes(sd.paths.ca_key.read_bytes())  # a valid key, wrong one
    sd.ensure(now=NOW)
    assert load_cert(sd.paths.server_cert).serial_number != old.serial_number


def test_missing_folder_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="litefleet broker --secure"):
        SecureDir(tmp_path / "nothing").devices()


def test_add_certificate_device(tmp_path: Path) -> None:
    sd = SecureDir(tmp_path / "s")
    sd.ensure(now=NOW)
    bundle = sd.add_device("pi-01", now=NOW)
    out = sd.paths.device_dir("pi-01")
    assert mode(out) == 0o700 and mode(out / "pi-01.key") == 0o600
    cert = load_cert(out / "pi-01.pem")
    cert.verify_directly_issued_by(load_cert(sd.paths.ca_cert))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-01"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert bundle.serial == cert.serial_number
    assert bundle.broker_url == "mqtts://localhost:8883"
    assert [name for _, name in bundle.files] == ["ca.pem", "client.pem", "client.key"]
    assert f"user pi-01\ntopic write {B}/devices/pi-01/state\n" in sd.paths.devices_acl.read_text()
    assert "pi-01" not in sd.paths.devices_passwd.read_text()  # certificate only
    assert 'key_file = "litefleet_client.key"' in bundle.agent_toml
    # the folder's own agent.toml names the files beside it (an agent without systemd)
    local = tomllib.loads((out / "agent.toml").read_text())
    assert (local["ca_file"], local["cert_file"], local["key_file"]) == ("ca.pem", "pi-01.pem", "pi-01.key")
    assert local["broker"] == bundle.broker_url and local["device_id"] == "pi-01"


def test_add_password_device(tmp_path: Path) -> None:
    sd = SecureDir(tmp_path / "s")
    bundle = sd.add_device("pi-02", auth=AUTH_PASSWORD, now=NOW)  # creates the folder too
    out = sd.paths.device_dir("pi-02")
    password = (out / "password").read_text().strip()
    assert mode(out / "password") == 0o600 and len(password) >= 40
    user, hashed = sd.paths.devices_passwd.read_text().strip().split(":", 1)
    assert user == "pi-02" and verify_password(password, hashed)
    assert bundle.broker_url == "mqtts://localhost:8884"
    assert password not in sd.paths.registry.read_text()
    assert 'username = "pi-02"' in bundle.agent_toml
    assert 'password_file = "litefleet_mqtt-password"' in bundle.agent_toml
    assert [name for _, name in bundle.files] == ["ca.pem", "mqtt-password"]
    local = tomllib.loads((out / "agent.toml").read_text())
    assert (local["username"], local["password_file"]) == ("pi-02", "password")


def test_device_twice_needs_renew_and_renew_revokes(tmp_path: Path) -> None:
    sd = SecureDir(tmp_path / "s")
    first = sd.add_device("pi-01", now=NOW)
    with pytest.raises(BadInputError, match="--renew"):
        sd.add_device("pi-01", now=NOW)
    second = sd.add_device("pi-01", renew=True, now=NOW)
    assert second.serial != first.serial
    crl = x509.load_pem_x509_crl(sd.paths.crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(first.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(second.serial) is None
    assert [d.device_id for d in sd.devices()] == ["pi-01"]


def test_failed_renew_leaves_the_old_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sd = SecureDir(tmp_path / "s")
    first = sd.add_device("pi-01", now=NOW)
    before = {f.name: f.read_bytes() for f in sd.paths.device_dir("pi-01").iterdir()}
    registry = sd.paths.registry.read_bytes()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SecureDir, "_save", disk_full)
    with pytest.raises(OSError):
        sd.add_device("pi-01", renew=True, now=NOW)
    after = {f.name: f.read_bytes() for f in sd.paths.device_dir("pi-01").iterdir()}
    assert after == before and sd.paths.registry.read_bytes() == registry
    assert [p.name for p in sd.paths.device_dir("pi-01").parent.iterdir()] == ["pi-01"]
    assert sd.devices()[0].serial == first.serial


def test_remove_device(tmp_path: Path) -> None:
    sd = SecureDir(tmp_path / "s")
    a = sd.add_device("pi-01", now=NOW)
    sd.add_device("pi-02", auth=AUTH_PASSWORD, now=NOW)
    sd.add_device("pi-03", now=NOW)
    sd.remove_device("pi-01")
    sd.remove_device("pi-02")
    assert [d.device_id for d in sd.devices()] == ["pi-03"]
    acl = sd.paths.devices_acl.read_text()
    assert "pi-01" not in acl and "pi-02" not in acl and "user pi-03" in acl
    assert sd.paths.devices_passwd.read_text() == ""
    assert not sd.paths.device_dir("pi-01").exists()
    crl = x509.load_pem_x509_crl(sd.paths.crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(a.serial) is not None
    with pytest.raises(BadInputError, match="no device"):
        sd.remove_device("pi-01")


def test_registry_round_trip(tmp_path: Path) -> None:
    sd = SecureDir(tmp_path / "s")
    sd.add_device("a", now=NOW)
    sd.add_device("b", auth=AUTH_PASSWORD, now=NOW)
    sd.remove_device("a")
    doc = json.loads(sd.paths.registry.read_text())
    reg = Registry.from_json(doc)
    assert reg.to_json() == doc
    assert [r.device_id for r in reg.revoked] == ["a"]
    assert reg.device("b") is not None and reg.device("b").auth == AUTH_PASSWORD  # type: ignore[union-attr]


def test_host_client_settings(tmp_path: Path) -> None:
    sd = SecureDir(tmp_path / "s")
    sd.ensure(sans=["hub.local"], now=NOW)
    s = host_client_settings(tmp_path / "s")
    assert s["host"] == "hub.local" and s["port"] == 8885 and s["tls"] is True
    assert s["username"] == HOST_USERNAME
    assert s["password"] == sd.paths.host_password.read_text().strip()
    assert Path(s["ca_file"]) == sd.paths.ca_cert
    assert s["url"] == f"mqtts://{HOST_USERNAME}@hub.local:8885"
    assert s["client_id_prefix"].startswith("_")


def test_stale_or_foreign_pid_file_means_no_broker(tmp_path: Path) -> None:
    import os

    sd = SecureDir(tmp_path / "s")
    sd.ensure(now=NOW)
    assert sd.running_broker_pid() is None and sd.reload_broker() is None
    sd.paths.pid_file.write_text(f"{os.getpid()}\n")  # a live process, but not Mosquitto
    assert sd.running_broker_pid() is None and sd.reload_broker() is None
    sd.paths.pid_file.write_text("garbage\n")
    assert sd.running_broker_pid() is None


def test_broker_config_has_no_plain_or_anonymous_listener(tmp_path: Path) -> None:
    sd = SecureDir(tmp_path / "s")
    sd.ensure(now=NOW)
    conf = sd.broker_config(data_dir=tmp_path / "data").render()
    listeners = [ln for ln in conf.splitlines() if ln.startswith("listener ")]
    assert listeners == ["listener 8883 127.0.0.1", "listener 8884 127.0.0.1", "listener 8885 127.0.0.1"]
    assert "allow_anonymous true" not in conf
    assert conf.count("allow_anonymous false") == 3
    assert conf.count("use_username_as_clientid true") == 2  # the device listeners
    assert "per_listener_settings true" in conf
    assert f"max_packet_size {MAX_PACKET_SIZE_BYTES}" in conf
    assert MAX_PACKET_SIZE_BYTES >= 4 * 256 * 1024
    blocks = conf.split("listener ")[1:]
    assert "require_certificate true" in blocks[0] and "use_identity_as_username true" in blocks[0]
    assert "devices.passwd" in blocks[1] and "host.passwd" in blocks[2]
    assert "devices.acl" in blocks[0] and "devices.acl" in blocks[1] and "host.acl" in blocks[2]


def test_agent_toml_snippet_is_accepted_by_the_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``device add`` prints must load in the agent's strict config reader, and its
    file names must resolve the way the packaged unit hands the files over
    (LoadCredential=litefleet:/etc/litefleet/credentials: file F -> litefleet_F)."""
    import tomllib

    from agent.service.config import config_from_mapping

    unit = Path(__file__).resolve().parents[3] / "systemd" / "litefleet-agent.service"
    if unit.exists():
        assert f"LoadCredential=litefleet:{DEVICE_CRED_DIR}" in unit.read_text()
    creds = tmp_path / "creds"
    creds.mkdir()
    for name in (CRED_CA, CRED_CERT, CRED_KEY, CRED_PASSWORD):
        (creds / f"litefleet_{name}").write_text("pw\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    for auth, prefix in ((AUTH_CERT, "litefleet"), (AUTH_PASSWORD, "acme")):
        doc = tomllib.loads(agent_toml_snippet("pi-01", auth, "mqtts://hub.local:8883", prefix))
        cfg = config_from_mapping(
            {**doc, "state_dir": str(tmp_path), "trusted_root": str(tmp_path / "root.json")}
        )
        assert cfg.broker_address.tls
        assert cfg.credential_path(cfg.ca_file) == creds / "litefleet_ca.pem"
        if auth == AUTH_CERT:
            assert cfg.credential_path(cfg.key_file) == creds / "litefleet_client.key"
        else:
            assert cfg.password() == "pw" and cfg.topic_prefix == "acme"
    plain = tomllib.loads(
        agent_toml_snippet(
            "pi-01", AUTH_CERT, "mqtts://h:1", "litefleet", credential_prefix=f"{DEVICE_CRED_DIR}/"
        )
    )
    assert plain["key_file"] == f"{DEVICE_CRED_DIR}/{CRED_KEY}"
