"""Central's side of sites: the registry, the grants, the bundle, the commands, and central's
ACL refusing a site's identity everything but its own devices (a real Mosquitto, MQTT 5
PUBACK reason codes)."""

from __future__ import annotations

import json
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from agent.protocol import Topics
from converter.broker.acl import Grant, device_grants, site_grants, site_sync_grants
from converter.broker.registry import AUTH_SITE, Registry
from converter.broker.secure import SecureDir
from converter.broker.sites import CentralDir
from converter.broker.uplink import load_uplink
from converter.errors import BadInputError
from tests.support.harness import litefleet
from tests.support.secure import Client, connect, refused
from tests.support.sites import Central, start_central

B = "litefleet/v1"
NOT_AUTHORIZED = 0x87
OK = (0x00, 0x10)  # success, no matching subscribers


def allowed(grants: tuple[Grant, ...], access: str, topic: str) -> bool:
    return any(g.allows(access, topic) for g in grants)


# -- pure -------------------------------------------------------------------------------


def test_site_grants_are_exactly_its_devices_topics() -> None:
    topics = Topics()
    g = site_grants(topics, "a", ["dev-a1", "dev-a2"])
    for d in ("dev-a1", "dev-a2"):
        for t in topics.device_outbound(d):
            assert allowed(g, "write", t)
        assert allowed(g, "write", topics.reply("_lf-host-x", d) + "/7")
        assert allowed(g, "read", topics.infer(d))
        assert not allowed(g, "write", topics.infer(d))
    for t in (
        topics.state("dev-b1"),
        topics.events("central-1"),
        topics.reply("_lf-host-x", "dev-b1"),
        topics.metadata("timestamp.json"),
        topics.chunk("models/m/1/abc.model.tflite", 0),
        topics.site("b", "status"),
    ):
        assert not allowed(g, "write", t), t
    assert allowed(g, "read", topics.chunk("models/m/1/abc.model.tflite", 0))
    assert allowed(g, "write", topics.site("a", "bridge"))
    assert not allowed(g, "read", topics.state("dev-b1"))
    sync = site_sync_grants(topics)
    assert allowed(sync, "read", topics.metadata("timestamp.json"))
    assert not allowed(sync, "read", topics.chunk("x", 0))
    assert not [x for x in sync if x.access != "read"]


def test_registry_with_sites_round_trips_and_reads_an_old_file() -> None:
    cd_doc = {
        "format": 1,
        "prefix": "litefleet",
        "sans": ["localhost"],
        "ports": {"cert": 1, "password": 2, "host": 3},
        "host": {"username": "litefleet-host", "password_hash": "$7$x"},
        "devices": [
            {"device_id": "d", "auth": "cert", "created": "2026-01-01T00:00:00+00:00", "serial": "ff"}
        ],
        "revoked": [],
    }
    old = Registry.from_json(cd_doc)  # written before sites existed
    assert old.sites == () and old.devices[0].site is None
    doc = json.loads(json.dumps(old.to_json()))
    assert Registry.from_json(doc) == old


# -- the folder -------------------------------------------------------------------------


@pytest.fixture
def central_dir(tmp_path: Path) -> CentralDir:
    cd = CentralDir(tmp_path / "central")
    cd.ensure()
    return cd


def test_site_add_writes_a_bundle_of_two_identities_from_centrals_ca(central_dir: CentralDir) -> None:
    bundle = central_dir.add_site("a")
    info, paths = load_uplink(bundle.folder)
    assert (info.site, info.prefix) == ("a", "litefleet")
    assert info.upstream == f"mqtts://localhost:{central_dir.load().ports.cert}"
    ca = x509.load_pem_x509_certificate(central_dir.paths.ca_cert.read_bytes())
    assert paths.ca_cert.read_bytes() == central_dir.paths.ca_cert.read_bytes()
    for cert_path, cn in ((paths.uplink_cert, "_site-a"), (paths.sync_cert, "_sync-a")):
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == cn
    for key in (paths.uplink_key, paths.sync_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    acl = central_dir.paths.devices_acl.read_text()
    assert "user _site-a\n" in acl and "user _sync-a\n" in acl


def test_site_devices_are_granted_to_their_site_only(central_dir: CentralDir) -> None:
    central_dir.add_site("a")
    central_dir.add_site("b")
    central_dir.add_device("central-1")
    rec = central_dir.add_site_device("dev-a1", "a")
    assert (rec.auth, rec.site) == (AUTH_SITE, "a")
    acl = central_dir.paths.devices_acl.read_text()
    block_a = acl.split("user _site-a\n")[1].split("\nuser ")[0]
    assert f"topic write {B}/devices/dev-a1/state" in block_a
    assert "user dev-a1" not in acl  # no credentials at central: no block of its own
    assert not (central_dir.paths.device_dir("dev-a1")).exists()
    for taken, where in (("dev-a1", "site 'a'"), ("central-1", "central")):
        with pytest.raises(BadInputError, match=where):
            central_dir.add_site_device(taken, "b")
    with pytest.raises(BadInputError, match="belongs to site"):
        central_dir.add_device("dev-a1", renew=True)
    with pytest.raises(BadInputError, match="no site 'c'"):
        central_dir.add_site_device("dev-c1", "c")
    # a device leaves its site with `device remove`
    central_dir.remove_device("dev-a1")
    assert f"{B}/devices/dev-a1/" not in central_dir.paths.devices_acl.read_text()


def test_a_site_brokers_devices_read_their_sites_uplink_state_and_are_told_their_site(
    central_dir: CentralDir, tmp_path: Path
) -> None:
    """At site a's broker a device may read ``sites/a/bridge`` (nothing else of a site) and its
    agent.toml says ``site = "a"``; at central neither."""
    topics = Topics()
    g = device_grants(topics, "dev-a1", "a")
    assert allowed(g, "read", topics.site("a", "bridge"))
    for t in (topics.site("a", "status"), topics.site("b", "bridge")):
        assert not allowed(g, "read", t), t
    assert not allowed(g, "write", topics.site("a", "bridge"))
    assert not allowed(device_grants(topics, "dev-a1"), "read", topics.site("a", "bridge"))

    central_dir.add_site("a")
    central_dir.add_device("central-1")
    block = central_dir.paths.devices_acl.read_text().split("user central-1\n")[1].split("\nuser ")[0]
    assert "/sites/" not in block
    assert "site =" not in (central_dir.paths.device_dir("central-1") / "agent.toml").read_text()

    # the site's folder, set up as docs/sites.md says: the bundle copied in, devices added,
    # then `broker --upstream` records the site (ensure(uplink_site=...))
    site = SecureDir(tmp_path / "north")
    site.ensure()
    shutil.copytree(central_dir.site_dir("a"), site.root / "uplink")
    bundle = site.add_device("dev-a1")
    assert 'site = "a"' in bundle.agent_toml
    assert 'site = "a"' in (site.paths.device_dir("dev-a1") / "agent.toml").read_text()
    block = site.paths.devices_acl.read_text().split("user dev-a1\n")[1].split("\nuser ")[0]
    assert f"topic read {B}/sites/a/bridge" in block
    shutil.rmtree(site.root / "uplink")  # --uplink elsewhere: the recorded name counts
    site.ensure(uplink_site="a")
    assert site.load().uplink_site == "a"
    assert f"topic read {B}/sites/a/bridge" in site.paths.devices_acl.read_text()
    with pytest.raises(BadInputError, match="site 'a'"):
        site.ensure(uplink_site="b")
    doc = json.loads(json.dumps(site.load().to_json()))
    assert Registry.from_json(doc).uplink_site == "a"
    with pytest.raises(BadInputError, match="site name"):  # a level of an ACL topic
        Registry.from_json({**doc, "uplink_site": "a/#"})


def test_renewing_or_removing_a_site_revokes_both_certificates(central_dir: CentralDir) -> None:
    first = central_dir.add_site("a")
    central_dir.add_site_device("dev-a1", "a")
    with pytest.raises(BadInputError, match="exists already"):
        central_dir.add_site("a")
    second = central_dir.add_site("a", renew=True)
    assert central_dir.load().site_devices("a") == ("dev-a1",)  # its devices stay
    crl = x509.load_pem_x509_crl(central_dir.paths.crl.read_bytes())
    revoked = {r.serial_number for r in crl}
    assert {first.record.serial, first.record.sync_serial} <= revoked
    assert not {second.record.serial, second.record.sync_serial} & revoked
    record, devices = central_dir.remove_site("a")
    assert devices == ("dev-a1",) and not central_dir.site_dir("a").exists()
    registry = central_dir.load()
    assert registry.sites == () and registry.device("dev-a1") is None
    revoked = {r.serial_number for r in x509.load_pem_x509_crl(central_dir.paths.crl.read_bytes())}
    assert {record.serial, record.sync_serial} <= revoked
    assert "_site-a" not in central_dir.paths.devices_acl.read_text()


@pytest.mark.parametrize("name", ["A", "-a", "a/b", "a+", "", "x" * 33, "_site"])
def test_bad_site_names_are_refused(central_dir: CentralDir, name: str) -> None:
    with pytest.raises(BadInputError, match="site name"):
        central_dir.add_site(name)


# -- the commands -------------------------------------------------------------------------


def test_site_and_device_commands(tmp_path: Path) -> None:
    d = str(tmp_path / "central")
    code, out, err = litefleet("site", "add", "north", "--secure", d)
    assert code == 0, err
    assert "litefleet broker --secure SITE_DIR --upstream mqtts://localhost:" in out
    assert f"litefleet device add ID --site north --secure {tmp_path / 'central'}" in out
    code, out, err = litefleet("device", "add", "pi-n1", "--site", "north", "--secure", d)
    assert code == 0 and "reached through site north" in out, err
    code, out, _ = litefleet("site", "list", "--secure", d, "--json")
    assert [(s["site"], s["devices"]) for s in json.loads(out)] == [("north", ["pi-n1"])]
    code, out, _ = litefleet("device", "list", "--secure", d, "--json")
    assert [(x["device_id"], x["auth"], x["site"]) for x in json.loads(out)] == [("pi-n1", "site", "north")]
    for args, message in (
        (("device", "add", "pi-n1", "--site", "north", "--secure", d), "exists already"),
        (
            ("device", "add", "pi-n2", "--site", "north", "--password", "--secure", d),
            "do not apply with --site",
        ),
        (("device", "add", "pi-n2", "--site", "south", "--secure", d), "no site 'south'"),
        (("site", "add", "North", "--secure", d), "site name"),
        (("site", "remove", "south", "--secure", d), "no site 'south'"),
    ):
        code, out, err = litefleet(*args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    code, out, err = litefleet("site", "remove", "north", "--secure", d)
    assert code == 0 and "1 devices' grants gone" in out, err


# -- central's ACL against a real Mosquitto (test (d) of the issue) ---------------------


pytestmark_mqtt = pytest.mark.skipif(
    shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists(),
    reason="mosquitto is not installed",
)


@pytest.fixture
def central(tmp_path: Path) -> Iterator[Central]:
    c = start_central(tmp_path, {"a": ["dev-a1"], "b": ["dev-b1"]})
    c.dir.add_device("central-1")
    c.dir.reload_broker()
    try:
        yield c
    finally:
        c.stop()


def as_site(central: Central, name: str, *, sync: bool = False) -> Client:
    """A site's certificate used directly at central, as a compromised site host could."""
    _, p = load_uplink(central.dir.site_dir(name))
    cert, key = (p.sync_cert, p.sync_key) if sync else (p.uplink_cert, p.uplink_key)
    c = connect(central.cert_port, ca=p.ca_cert, cert=cert, key=key)
    assert c.connected.is_set(), c.connack
    return c


@pytestmark_mqtt
def test_central_refuses_a_site_everything_but_its_own_devices(central: Central) -> None:
    site = as_site(central, "a")
    try:
        codes = {
            topic: site.publish(f"{B}/{topic}", b"{}").value
            for topic in (
                "devices/dev-a1/state",
                "devices/dev-a1/events",
                "devices/dev-a1/metrics",
                "replies/_lf-host-x/dev-a1/1",
                "sites/a/status",
                "sites/a/bridge",
                "devices/dev-b1/state",  # another site's device
                "devices/central-1/state",  # a device of central's own
                "replies/_lf-host-x/dev-b1/1",
                "devices/dev-a1/infer",  # requests come from the host, not from a site
                "repo/metadata/timestamp.json",
                "repo/targets/models/m/1/abc.model.tflite/0",
                "sites/b/status",
            )
        }
    finally:
        site.close()
    mine = {
        "devices/dev-a1/state",
        "devices/dev-a1/events",
        "devices/dev-a1/metrics",
        "replies/_lf-host-x/dev-a1/1",
        "sites/a/status",
        "sites/a/bridge",
    }
    got = {t: "ok" if c in OK else c for t, c in codes.items()}
    assert got == {t: "ok" if t in mine else NOT_AUTHORIZED for t in codes}


@pytestmark_mqtt
def test_a_sites_prune_identity_only_reads_metadata(central: Central) -> None:
    host = central.host()
    sync = as_site(central, "a", sync=True)
    try:
        assert host.publish(f"{B}/repo/metadata/timestamp.json", b"ts", retain=True).value in OK
        assert host.publish(f"{B}/repo/targets/f/0", b"chunk", retain=True).value in OK
        sync.subscribe(f"{B}/#")
        assert sync.wait_for(f"{B}/repo/metadata/timestamp.json") is not None
        for topic in (f"{B}/repo/metadata/x.json", f"{B}/devices/dev-a1/state", f"{B}/sites/a/status"):
            assert sync.publish(topic, b"{}").value == NOT_AUTHORIZED, topic
        assert f"{B}/repo/targets/f/0" not in sync.topics()
    finally:
        host.close()
        sync.close()


@pytestmark_mqtt
def test_a_removed_site_cannot_connect(central: Central) -> None:
    _, p = load_uplink(central.dir.site_dir("a"))
    kept = central.dir.root.parent / "kept-bundle"
    shutil.copytree(p.root, kept)
    central.dir.remove_site("a")
    central.dir.reload_broker()
    c = connect(central.cert_port, ca=kept / "ca.pem", cert=kept / "uplink.pem", key=kept / "uplink.key")
    assert refused(c)
