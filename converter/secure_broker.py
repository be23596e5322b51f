"""The secure broker's authority: CA, certificates, credentials and ACLs in one folder.

``litefleet broker --secure DIR`` and ``litefleet device add|list|remove``
keep everything in ``DIR`` (mode 0700):

* ``secure.json``: the registry, the one source of truth (topic prefix, server
  names, listener ports, every identity with its certificate serial or
  password hash, revoked serials). Every other file below except the keys is
  derived from it and rewritten whole (temp file, fsync, rename) on each change.
* ``ca.pem``/``ca.key``: an ECDSA P-256 CA; ``server.pem``/``server.key`` for
  the broker (SANs: localhost, 127.0.0.1, ::1 and ``--san`` names);
  ``crl.pem``: the revoked device certificates.
* ``host.password``: the host identity's MQTT password (``push``, ``status``,
  ``monitor``; see :func:`host_client_settings`).
* ``devices.acl``, ``devices.passwd``, ``host.acl``, ``host.passwd``: Mosquitto's
  ACL and password files.
* ``devices/<id>/``: what to copy onto device ``<id>`` (CA, its certificate and
  key or its password, an ``agent.toml`` snippet).

Three TLS listeners, each with its own identities (``per_listener_settings``):

==========  =====================================  =======================================
port        who, how                               client id
==========  =====================================  =======================================
P (8883)    devices, client certificate (CN = id)  forced to the device id
P+1 (8884)  devices, username/password             forced to the username
P+2 (8885)  the host, username/password            free (the host runs several clients)
==========  =====================================  =======================================

Anonymous clients are refused everywhere and there is no plain listener.
Guarantees: private keys and passwords are written owner-only (0600) and never
logged; a device identity is granted exactly :func:`device_grants` and the
host exactly :func:`host_grants`; a removed device loses its ACL entries, its
password and (via the CRL) its certificate at the next broker reload.

The pure part (grants, topic matching, ACL/password/config rendering,
certificate building) takes plain values and touches no file or clock; the
:class:`SecureDir` methods do the I/O around it.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import DEVICE_ID_RE, TOPIC_PREFIX_RE
from converter.broker import BrokerConfig
from converter.errors import BadInputError

logger = logging.getLogger(__name__)

REGISTRY_FORMAT = 1
DEFAULT_PREFIX = "litefleet"
DEFAULT_CERT_PORT = 8883  # + 1: device passwords, + 2: the host
HOST_USERNAME = "litefleet-host"
# Host processes choose client ids starting with this: a leading "_" is never
# a valid device id, so a host client can never take over a device's session.
HOST_CLIENT_ID_PREFIX = "_lf-host-"
LOOPBACK_SANS = ("localhost", "127.0.0.1", "::1")
# Delivery chunks are <= 256 KiB (agent.protocol.MAX_CHUNK_SIZE: 1 MiB); 4 MiB
# leaves room for metadata (targets.json of a large repository) and properties.
MAX_PACKET_SIZE_BYTES = 4 * 1024 * 1024
# Mosquitto's own default iteration count. The passwords are 256-bit random
# strings, so key stretching adds nothing against guessing; it only costs CPU
# on every (re)connect of a fleet.
PBKDF2_ITERATIONS = 101
PASSWORD_SALT_BYTES = 12
CA_DAYS = 20 * 365
SERVER_DAYS = 825
DEVICE_DAYS = 10 * 365
SERVER_RENEW_DAYS = 30
# certificates start a day early: a device whose clock lags a little still connects
BACKDATE = dt.timedelta(days=1)

AUTH_CERT = "cert"
AUTH_PASSWORD = "password"

# Files go into DEVICE_CRED_DIR on the device. The packaged unit
# (systemd/litefleet-agent.service: LoadCredential=litefleet:/etc/litefleet/credentials)
# hands each file F to the agent as $CREDENTIALS_DIRECTORY/litefleet_F, and the agent
# resolves relative names there; so agent.toml names them CRED_PREFIX + F.
CRED_CA = "ca.pem"
CRED_CERT = "client.pem"
CRED_KEY = "client.key"
CRED_PASSWORD = "mqtt-password"
CRED_PREFIX = "litefleet_"
DEVICE_CRED_DIR = "/etc/litefleet/credentials"


# -- permissions (pure) ---------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """One ACL line: ``access`` is ``read``, ``write`` or ``readwrite`` on a topic filter."""

    access: str
    topic: str

    def allows(self, access: str, topic: str) -> bool:
        return (self.access == "readwrite" or self.access == access) and topic_matches(
            self.topic, topic
        )


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching of a concrete ``topic`` against a filter with ``+`` and ``#``.

    ``a/#`` matches ``a`` itself; wildcards never match a topic starting with ``$``.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    fparts, tparts = topic_filter.split("/"), topic.split("/")
    for i, f in enumerate(fparts):
        if f == "#":
            return True
        if i >= len(tparts):
            return False
        if f != "+" and f != tparts[i]:
            return False
    return len(fparts) == len(tparts)


def base_topic(prefix: str) -> str:
    return f"{prefix}/v1"


def device_grants(prefix: str, device_id: str) -> tuple[Grant, ...]:
    """What device ``device_id`` may do: publish its own state, events, metrics and
    inference replies; read the repository and its own topics (inference requests)."""
    b = base_topic(prefix)
    return (
        Grant("write", f"{b}/devices/{device_id}/state"),
        Grant("write", f"{b}/devices/{device_id}/events"),
        Grant("write", f"{b}/devices/{device_id}/metrics"),
        Grant("write", f"{b}/replies/+/{device_id}/#"),
        Grant("read", f"{b}/devices/{device_id}/#"),
        Grant("read", f"{b}/repo/#"),
    )


def host_grants(prefix: str) -> tuple[Grant, ...]:
    """What the host identity may do: write (and read back) the repository, read all
    device topics and replies, send inference requests, clear a device's retained state."""
    b = base_topic(prefix)
    return (
        Grant("readwrite", f"{b}/repo/#"),
        Grant("read", f"{b}/devices/#"),
        Grant("write", f"{b}/devices/+/infer"),
        # an empty retained message clears the row of a removed device
        Grant("write", f"{b}/devices/+/state"),
        Grant("read", f"{b}/replies/#"),
    )


def reply_topic(prefix: str, requester_client_id: str, device_id: str) -> str:
    """The MQTT 5 response topic a requester gives with an inference request to
    ``device_id``; it subscribes to ``<prefix>/v1/replies/<its client id>/#``."""
    return f"{base_topic(prefix)}/replies/{requester_client_id}/{device_id}"


def reply_topic_allowed(prefix: str, device_id: str, topic: str) -> bool:
    """Whether the broker lets ``device_id`` publish a reply on ``topic`` (the agent
    should check a request's response topic with the same rule before answering)."""
    if "+" in topic or "#" in topic:
        return False
    return topic_matches(f"{base_topic(prefix)}/replies/+/{device_id}/#", topic)


def render_acl(entries: Iterable[tuple[str, Sequence[Grant]]]) -> str:
    """Mosquitto ``acl_file`` text: one ``user`` block per identity, no patterns
    (a pattern would keep granting rights to a removed device's valid certificate)."""
    out = ["# generated by litefleet from secure.json; edits are overwritten"]
    for username, grants in entries:
        out.append(f"\nuser {username}")
        out += [f"topic {g.access} {g.topic}" for g in grants]
    return "\n".join(out) + "\n"


# -- passwords (pure) -----------------------------------------------------------


def hash_password(password: str, *, salt: bytes | None = None,
                  iterations: int = PBKDF2_ITERATIONS) -> str:
    """Mosquitto's ``$7$`` format: PBKDF2-HMAC-SHA512, ``$7$<iter>$<b64 salt>$<b64 hash>``."""
    salt = secrets.token_bytes(PASSWORD_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt, want = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]))
    return hmac.compare_digest(got, want)


def new_password() -> str:
    """A 256-bit random password, URL-safe (it may appear in an mqtts:// URL)."""
    return secrets.token_urlsafe(32)


def render_password_file(entries: Mapping[str, str]) -> str:
    """``username:hash`` lines; an empty file is valid (nobody may log in)."""
    return "".join(f"{user}:{hashed}\n" for user, hashed in sorted(entries.items()))


# -- registry (pure data) ---------------------------------------------------------


@dataclass(frozen=True)
class ListenerPorts:
    cert: int = DEFAULT_CERT_PORT
    password: int = DEFAULT_CERT_PORT + 1
    host: int = DEFAULT_CERT_PORT + 2

    @classmethod
    def from_base(cls, port: int) -> ListenerPorts:
        return cls(port, port + 1, port + 2)


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    auth: str  # AUTH_CERT or AUTH_PASSWORD
    created: str  # ISO 8601, UTC
    serial: int | None = None  # of its client certificate
    not_after: str | None = None
    password_hash: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Revocation:
    serial: int
    device_id: str
    revoked: str  # ISO 8601, UTC


@dataclass(frozen=True)
class Registry:
    prefix: str
    sans: tuple[str, ...]
    ports: ListenerPorts
    host_password_hash: str = field(repr=False)
    devices: tuple[DeviceRecord, ...] = ()
    revoked: tuple[Revocation, ...] = ()

    @property
    def public_host(self) -> str:
        """The name devices put in their broker URL: the first ``--san`` name, else localhost."""
        extra = [s for s in self.sans if s not in LOOPBACK_SANS]
        return extra[0] if extra else "localhost"

    def device(self, device_id: str) -> DeviceRecord | None:
        return next((d for d in self.devices if d.device_id == device_id), None)

    def with_device(self, record: DeviceRecord) -> Registry:
        rest = [d for d in self.devices if d.device_id != record.device_id]
        return replace(self, devices=tuple(sorted([*rest, record], key=lambda d: d.device_id)))

    def without_device(self, device_id: str, revoked_at: str) -> Registry:
        gone = self.device(device_id)
        revoked = self.revoked
        if gone is not None and gone.serial is not None:
            revoked = (*revoked, Revocation(gone.serial, device_id, revoked_at))
        return replace(
            self,
            devices=tuple(d for d in self.devices if d.device_id != device_id),
            revoked=revoked,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REGISTRY_FORMAT,
            "prefix": self.prefix,
            "sans": list(self.sans),
            "ports": {"cert": self.ports.cert, "password": self.ports.password,
                      "host": self.ports.host},
            "host": {"username": HOST_USERNAME, "password_hash": self.host_password_hash},
            "devices": [
                {k: v for k, v in {
                    "device_id": d.device_id, "auth": d.auth, "created": d.created,
                    "serial": None if d.serial is None else format(d.serial, "x"),
                    "not_after": d.not_after, "password_hash": d.password_hash,
                }.items() if v is not None}
                for d in self.devices
            ],
            "revoked": [{"serial": format(r.serial, "x"), "device_id": r.device_id,
                         "revoked": r.revoked} for r in self.revoked],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Registry:
        if doc.get("format") != REGISTRY_FORMAT:
            raise ValueError(f"unsupported format {doc.get('format')!r}")
        ports = doc["ports"]
        return cls(
            prefix=str(doc["prefix"]),
            sans=tuple(str(s) for s in doc["sans"]),
            ports=ListenerPorts(int(ports["cert"]), int(ports["password"]), int(ports["host"])),
            host_password_hash=str(doc["host"]["password_hash"]),
            devices=tuple(
                DeviceRecord(
                    device_id=str(d["device_id"]), auth=str(d["auth"]),
                    created=str(d["created"]),
                    serial=int(d["serial"], 16) if "serial" in d else None,
                    not_after=d.get("not_after"), password_hash=d.get("password_hash"),
                )
                for d in doc["devices"]
            ),
            revoked=tuple(Revocation(int(r["serial"], 16), str(r["device_id"]), str(r["revoked"]))
                          for r in doc["revoked"]),
        )


def check_device_id(device_id: str) -> None:
    if not DEVICE_ID_RE.match(device_id):
        raise BadInputError(
            f"device id {device_id!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "and start with a letter or digit"
        )
    if device_id == HOST_USERNAME:
        raise BadInputError(f"{HOST_USERNAME!r} is the host's identity, not a device id")


def check_prefix(prefix: str) -> None:
    if not TOPIC_PREFIX_RE.match(prefix):
        raise BadInputError(f"topic prefix {prefix!r} may not contain wildcards or empty levels")


def check_san(name: str) -> None:
    try:
        ipaddress.ip_address(name)
        return
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if not name or len(name) > 253 or not all(
        label and len(label) <= 63 and label.replace("-", "").isalnum() and label[0] != "-"
        for label in labels
    ):
        raise BadInputError(f"--san {name!r} is neither a DNS name nor an IP address")


# -- certificates (pure apart from key generation) ---------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "litefleet"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def new_key() -> ec.EllipticCurvePrivateKey:
    """ECDSA P-256: Ed25519 works with Mosquitto's OpenSSL 3 too, but P-256 is what
    every TLS stack on small devices (mbedTLS, older Android, OpenSSL 1.1) accepts."""
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name("litefleet broker CA"))
        .issuer_name(_name("litefleet broker CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False,
                          key_encipherment=False, data_encipherment=False,
                          key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
          key: ec.EllipticCurvePrivateKey, common_name: str, *, server: bool,
          sans: Sequence[str], now: dt.datetime, days: int) -> x509.Certificate:
    not_after = min(now + dt.timedelta(days=days), ca.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False,
                          key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]),
                                        critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
                     key: ec.EllipticCurvePrivateKey, sans: Sequence[str],
                     now: dt.datetime) -> x509.Certificate:
    return _leaf(ca_key, ca, key, "litefleet broker", server=True, sans=sans, now=now,
                 days=SERVER_DAYS)


def make_client_cert(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
                     key: ec.EllipticCurvePrivateKey, common_name: str,
                     now: dt.datetime) -> x509.Certificate:
    """A client certificate; Mosquitto takes the CN as the MQTT username."""
    return _leaf(ca_key, ca, key, common_name, server=False, sans=(), now=now, days=DEVICE_DAYS)


def make_crl(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
             revoked: Iterable[Revocation], now: dt.datetime) -> x509.CertificateRevocationList:
    """The CRL stays valid as long as the CA: an expired CRL would make OpenSSL
    refuse every client certificate while the broker runs."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - BACKDATE)
        .next_update(ca.not_valid_after_utc)
    )
    for r in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(r.serial)
            .revocation_date(dt.datetime.fromisoformat(r.revoked))
            .build()
        )
    return builder.sign(ca_key, hashes.SHA256())


def server_cert_fits(cert: x509.Certificate, ca: x509.Certificate, sans: Sequence[str],
                     now: dt.datetime) -> bool:
    """Keep the server certificate unless its CA, names or remaining life changed."""
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    want = {_san(s) for s in sans}
    return set(have) == want and cert.not_valid_after_utc - now > dt.timedelta(
        days=SERVER_RENEW_DAYS)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# -- the device's side (pure) -------------------------------------------------------


@dataclass(frozen=True)
class DeviceBundle:
    """What to copy onto a device: ``files`` maps a file in DIR to its name on the device."""

    device_id: str
    auth: str
    broker_url: str
    files: tuple[tuple[Path, str], ...]
    agent_toml: str
    serial: int | None = None


def agent_toml_snippet(device_id: str, auth: str, broker_url: str, prefix: str,
                       *, credential_prefix: str = CRED_PREFIX) -> str:
    """The device's agent.toml lines for the broker. File names are systemd credential
    names (``litefleet_<file>``); ``credential_prefix=DEVICE_CRED_DIR + "/"`` gives
    absolute paths for an agent run without systemd."""
    c = credential_prefix
    lines = [f'device_id = "{device_id}"', f'broker = "{broker_url}"', f'ca_file = "{c}{CRED_CA}"']
    if auth == AUTH_CERT:
        lines += [f'cert_file = "{c}{CRED_CERT}"', f'key_file = "{c}{CRED_KEY}"']
    else:
        lines += [f'username = "{device_id}"', f'password_file = "{c}{CRED_PASSWORD}"']
    if prefix != DEFAULT_PREFIX:
        lines.append(f'topic_prefix = "{prefix}"')
    return "\n".join(lines) + "\n"


def device_broker_url(registry: Registry, auth: str) -> str:
    port = registry.ports.cert if auth == AUTH_CERT else registry.ports.password
    host = registry.public_host
    if ":" in host:
        host = f"[{host}]"
    return f"mqtts://{host}:{port}"


# -- Mosquitto configuration (pure) ---------------------------------------------


@dataclass(frozen=True)
class SecurePaths:
    root: Path

    @property
    def registry(self) -> Path:
        return self.root / "secure.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def host_password(self) -> Path:
        return self.root / "host.password"

    @property
    def devices_acl(self) -> Path:
        return self.root / "devices.acl"

    @property
    def devices_passwd(self) -> Path:
        return self.root / "devices.passwd"

    @property
    def host_acl(self) -> Path:
        return self.root / "host.acl"

    @property
    def host_passwd(self) -> Path:
        return self.root / "host.passwd"

    @property
    def pid_file(self) -> Path:
        return self.root / "mosquitto.pid"

    @property
    def default_data_dir(self) -> Path:
        return self.root / "broker"

    def device_dir(self, device_id: str) -> Path:
        return self.root / "devices" / device_id


def listener_lines(paths: SecurePaths, ports: ListenerPorts, bind: str) -> list[str]:
    """The three TLS listener blocks (see the module docstring)."""
    tls = [
        f"cafile {paths.ca_cert}",
        f"certfile {paths.server_cert}",
        f"keyfile {paths.server_key}",
        "tls_version tlsv1.2",
        "allow_anonymous false",
    ]
    return [
        "# devices, client certificates: username = certificate CN, client id = username",
        f"listener {ports.cert} {bind}",
        *tls,
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        f"crlfile {paths.crl}",
        f"acl_file {paths.devices_acl}",
        "# devices, username/password: client id = username",
        f"listener {ports.password} {bind}",
        *tls,
        "require_certificate false",
        "use_username_as_clientid true",
        f"password_file {paths.devices_passwd}",
        f"acl_file {paths.devices_acl}",
        "# the host (push, status, monitor): username/password, free client ids",
        f"listener {ports.host} {bind}",
        *tls,
        "require_certificate false",
        f"password_file {paths.host_passwd}",
        f"acl_file {paths.host_acl}",
    ]


# -- files -------------------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` atomically (temp file, fsync, rename, fsync folder) with ``mode``
    from the first byte on: a secret is never readable by others, not even briefly."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _proc_is_mosquitto(pid: int) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return argv0.endswith(b"mosquitto")


class SecureDir:
    """The folder behind ``--secure DIR``. Mutations hold an exclusive lock on
    ``DIR/.lock`` so two ``litefleet device`` commands cannot interleave."""

    def __init__(self, root: str | Path) -> None:
        self.paths = SecurePaths(Path(root).expanduser().resolve())

    @property
    def root(self) -> Path:
        return self.paths.root

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        _private_dir(self.root)
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def exists(self) -> bool:
        return self.paths.registry.exists()

    def load(self) -> Registry:
        try:
            doc = json.loads(self.paths.registry.read_text())
            return Registry.from_json(doc)
        except FileNotFoundError as exc:
            raise BadInputError(
                f"{self.root} is not a litefleet secure broker folder (no secure.json); "
                f"create it with: litefleet broker --secure {self.root}"
            ) from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BadInputError(f"{self.paths.registry} is unreadable: {exc}") from exc

    # -- set-up ---------------------------------------------------------------------
    def ensure(self, *, prefix: str | None = None, sans: Sequence[str] = (),
               ports: ListenerPorts | None = None,
               now: dt.datetime | None = None) -> Registry:
        """Create or reuse the authority. Idempotent: keys are never replaced; the
        server certificate is reissued (same CA, so devices need nothing new) when
        ``sans`` or the CA changed or it expires within 30 days; a missing
        ``host.password`` is made anew (that is how it is rotated). ``sans`` are
        extra names (the loopback ones are always in); empty keeps the stored ones.
        Every derived file is rewritten."""
        for s in sans:
            check_san(s)
        if prefix is not None:
            check_prefix(prefix)
        now = now or _utcnow()
        with self._locked():
            if self.exists():
                registry = self.load()
                if prefix is not None and prefix != registry.prefix:
                    raise BadInputError(
                        f"{self.root} was set up for topic prefix {registry.prefix!r}, "
                        f"not {prefix!r}"
                    )
                if sans:
                    registry = replace(registry, sans=tuple(dict.fromkeys(
                        (*LOOPBACK_SANS, *sans))))
                if ports is not None:
                    registry = replace(registry, ports=ports)
                if not self.paths.host_password.exists():
                    # deleting host.password is how the host password is rotated
                    host_password = new_password()
                    write_private(self.paths.host_password, (host_password + "\n").encode())
                    registry = replace(registry, host_password_hash=hash_password(host_password))
                    logger.info("new host password in %s", self.paths.host_password)
            else:
                host_password = new_password()
                write_private(self.paths.host_password, (host_password + "\n").encode())
                registry = Registry(
                    prefix=prefix or DEFAULT_PREFIX,
                    sans=tuple(dict.fromkeys((*LOOPBACK_SANS, *sans))),
                    ports=ports or ListenerPorts(),
                    host_password_hash=hash_password(host_password),
                )
                logger.info("new secure broker folder %s", self.root)
            ca_key, ca = self._ensure_ca(now)
            self._ensure_server_cert(ca_key, ca, registry.sans, now)
            self._save(registry, ca_key, ca, now)
            return registry

    def _ensure_ca(self, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if self.paths.ca_key.exists() and self.paths.ca_cert.exists():
            key = serialization.load_pem_private_key(self.paths.ca_key.read_bytes(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise BadInputError(f"{self.paths.ca_key} is not an EC key")
            return key, x509.load_pem_x509_certificate(self.paths.ca_cert.read_bytes())
        if self.paths.ca_key.exists() or self.paths.ca_cert.exists():
            raise BadInputError(f"{self.root} has only half a CA (ca.pem / ca.key); restore both")
        key = new_key()
        ca = make_ca(key, now)
        write_private(self.paths.ca_key, _pem_key(key))
        write_private(self.paths.ca_cert, _pem_cert(ca), 0o644)
        logger.info("new CA in %s", self.paths.ca_cert)
        return key, ca

    def _ensure_server_cert(self, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
                            sans: Sequence[str], now: dt.datetime) -> None:
        if self.paths.server_cert.exists() and self.paths.server_key.exists():
            cert = x509.load_pem_x509_certificate(self.paths.server_cert.read_bytes())
            if server_cert_fits(cert, ca, sans, now):
                return
            logger.info("reissuing the server certificate for %s", ", ".join(sans))
        key = new_key()
        write_private(self.paths.server_key, _pem_key(key))
        cert = make_server_cert(ca_key, ca, key, sans, now)
        write_private(self.paths.server_cert, _pem_cert(cert), 0o644)

    def _save(self, registry: Registry, ca_key: ec.EllipticCurvePrivateKey,
              ca: x509.Certificate, now: dt.datetime) -> None:
        """Write the registry and every file derived from it."""
        p = self.paths
        write_private(p.crl, _pem_cert_crl(make_crl(ca_key, ca, registry.revoked, now)), 0o644)
        write_private(p.devices_acl, render_acl(
            (d.device_id, device_grants(registry.prefix, d.device_id))
            for d in registry.devices).encode())
        write_private(p.devices_passwd, render_password_file(
            {d.device_id: d.password_hash for d in registry.devices
             if d.auth == AUTH_PASSWORD and d.password_hash}).encode())
        write_private(p.host_acl, render_acl([(HOST_USERNAME, host_grants(registry.prefix))])
                      .encode())
        write_private(p.host_passwd,
                      render_password_file({HOST_USERNAME: registry.host_password_hash}).encode())
        write_private(p.registry, (json.dumps(registry.to_json(), indent=2) + "\n").encode())

    # -- devices --------------------------------------------------------------------
    def add_device(self, device_id: str, *, auth: str = AUTH_CERT, renew: bool = False,
                   now: dt.datetime | None = None) -> DeviceBundle:
        """Create device ``device_id``'s identity (``renew``: replace it, revoking the old
        certificate) and its bundle folder. Call :meth:`reload_broker` afterwards."""
        check_device_id(device_id)
        if auth not in (AUTH_CERT, AUTH_PASSWORD):
            raise BadInputError(f"auth must be {AUTH_CERT} or {AUTH_PASSWORD}, not {auth!r}")
        now = now or _utcnow()
        if not self.exists():
            self.ensure(now=now)
        with self._locked():
            registry = self.load()
            old = registry.device(device_id)
            if old is not None and not renew:
                raise BadInputError(
                    f"device {device_id!r} exists already; --renew replaces its credentials"
                )
            if old is not None:
                registry = registry.without_device(device_id, now.isoformat())
            ca_key, ca = self._ensure_ca(now)
            out = self.paths.device_dir(device_id)
            _private_dir(out.parent)
            # the bundle is built aside and swapped in after the registry is saved: a
            # failure leaves the old identity and its files as they were
            tmp = out.parent / f".{device_id}.{secrets.token_hex(4)}.tmp"
            _private_dir(tmp)
            try:
                record, names = self._write_credentials(tmp, device_id, auth, ca_key, ca, now)
                registry = registry.with_device(record)
                url = device_broker_url(registry, auth)
                toml = agent_toml_snippet(device_id, auth, url, registry.prefix)
                write_private(tmp / "agent.toml", toml.encode(), 0o644)
                self._save(registry, ca_key, ca, now)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if out.exists():
                trash = out.parent / f".{device_id}.{secrets.token_hex(4)}.old"
                os.replace(out, trash)
                os.replace(tmp, out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, out)
            _fsync_dir(out.parent)
            logger.info("device %s added (%s)", device_id, auth)
            return DeviceBundle(device_id, auth, url,
                                tuple((out / f, name) for f, name in names), toml,
                                serial=record.serial)

    @staticmethod
    def _write_credentials(folder: Path, device_id: str, auth: str,
                           ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
                           now: dt.datetime) -> tuple[DeviceRecord, list[tuple[str, str]]]:
        """Write a new identity's files into ``folder``; return its registry record and
        ``(file name, name on the device)`` pairs."""
        write_private(folder / "ca.pem", _pem_cert(ca), 0o644)
        names = [("ca.pem", CRED_CA)]
        if auth == AUTH_CERT:
            key = new_key()
            cert = make_client_cert(ca_key, ca, key, device_id, now)
            write_private(folder / f"{device_id}.key", _pem_key(key))
            write_private(folder / f"{device_id}.pem", _pem_cert(cert), 0o644)
            names += [(f"{device_id}.pem", CRED_CERT), (f"{device_id}.key", CRED_KEY)]
            return DeviceRecord(device_id, AUTH_CERT, now.isoformat(),
                                serial=cert.serial_number,
                                not_after=cert.not_valid_after_utc.isoformat()), names
        password = new_password()
        write_private(folder / "password", (password + "\n").encode())
        names.append(("password", CRED_PASSWORD))
        return DeviceRecord(device_id, AUTH_PASSWORD, now.isoformat(),
                            password_hash=hash_password(password)), names

    def remove_device(self, device_id: str, *, now: dt.datetime | None = None) -> DeviceRecord:
        """Forget ``device_id``: ACL entries and password go, its certificate is revoked,
        its bundle folder is deleted. Call :meth:`reload_broker` afterwards."""
        now = now or _utcnow()
        with self._locked():
            registry = self.load()
            record = registry.device(device_id)
            if record is None:
                raise BadInputError(f"no device {device_id!r} in {self.root}")
            registry = registry.without_device(device_id, now.isoformat())
            ca_key, ca = self._ensure_ca(now)
            self._save(registry, ca_key, ca, now)
            shutil.rmtree(self.paths.device_dir(device_id), ignore_errors=True)
            logger.info("device %s removed", device_id)
            return record

    def devices(self) -> tuple[DeviceRecord, ...]:
        return self.load().devices

    # -- host and broker ------------------------------------------------------------
    def host_client_settings(self) -> dict[str, Any]:
        """How the host CLI connects: keys match ``agent.mqtt_client.ConnectionSettings``
        (plus ``url`` and ``client_id_prefix``; give each process its own client id
        starting with that prefix)."""
        registry = self.load()
        try:
            password = self.paths.host_password.read_text().strip()
        except OSError as exc:
            raise BadInputError(f"cannot read {self.paths.host_password}: {exc.strerror}") from exc
        host = registry.public_host
        return {
            "host": host,
            "port": registry.ports.host,
            "tls": True,
            "ca_file": str(self.paths.ca_cert),
            "cert_file": None,
            "key_file": None,
            "username": HOST_USERNAME,
            "password": password,
            "client_id_prefix": HOST_CLIENT_ID_PREFIX,
            "topic_prefix": registry.prefix,
            "url": f"mqtts://{HOST_USERNAME}@{f'[{host}]' if ':' in host else host}"
                   f":{registry.ports.host}",
        }

    def broker_config(self, *, data_dir: Path | None = None, bind: str = "127.0.0.1",
                      registry: Registry | None = None) -> BrokerConfig:
        registry = registry or self.load()
        return BrokerConfig(
            data_dir=data_dir or self.paths.default_data_dir,
            port=registry.ports.cert,
            host=bind,
            allow_anonymous=False,
            plain_listener=False,
            per_listener_settings=True,
            max_packet_size=MAX_PACKET_SIZE_BYTES,
            pid_file=self.paths.pid_file,
            extra_lines=listener_lines(self.paths, registry.ports, bind),
        )

    def running_broker_pid(self) -> int | None:
        """The pid of the Mosquitto serving this folder, or None (a stale pid file,
        or a pid now used by another program, counts as none)."""
        try:
            pid = int(self.paths.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _proc_is_mosquitto(pid) else None

    def reload_broker(self, *, timeout_s: float = 5.0) -> int | None:
        """SIGHUP the running broker so it rereads ACL, password and CRL files, and wait
        (up to ``timeout_s``) until its log says it did; returns its pid, or None when
        no broker runs for this folder."""
        pid = self.running_broker_pid()
        if pid is None:
            return None
        log = _broker_log_file(pid)
        offset = log.stat().st_size if log is not None and log.exists() else 0
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            return None
        if log is not None and not _wait_for_log_line(log, offset, RELOADED_LOG_LINE,
                                                      timeout_s):
            logger.warning("mosquitto pid %s did not log a reload within %.0f s", pid,
                           timeout_s)
        logger.info("reloaded mosquitto pid %s", pid)
        return pid


RELOADED_LOG_LINE = b"Reloading config."


def _broker_log_file(pid: int) -> Path | None:
    """Mosquitto's log file, from the ``-c CONFIG`` it was started with (``log_dest file``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        conf = Path(os.fsdecode(argv[argv.index(b"-c") + 1]))
        for line in conf.read_text().splitlines():
            if line.startswith("log_dest file "):
                return Path(line[len("log_dest file "):].strip())
    except (OSError, ValueError, IndexError):
        return None
    return None


def _wait_for_log_line(log: Path, offset: int, needle: bytes, timeout_s: float) -> bool:
    """Mosquitto logs the reload before it rereads the files and serves no client in
    between (one thread), so once the line is there new connections see the new files."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with open(log, "rb") as f:
                f.seek(offset)
                if needle in f.read():
                    return True
        except OSError:
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _pem_cert_crl(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def host_client_settings(directory: str | Path) -> dict[str, Any]:
    """The host identity's connection settings for a ``--secure DIR`` broker."""
    return SecureDir(directory).host_client_settings()
