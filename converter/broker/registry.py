"""The secure broker's registry (``secure.json``) as plain data, and what a device is told.

Pure: frozen dataclasses and functions over plain values; no file, socket or
clock (:class:`converter.broker.secure.SecureDir` reads and writes the file).

Guarantees:

* :meth:`Registry.to_json` and :meth:`Registry.from_json` round-trip, and
  ``from_json`` refuses any other ``format`` than :data:`REGISTRY_FORMAT`;
* the ``check_*`` functions raise :class:`~converter.errors.BadInputError` for a
  device id, topic prefix or ``--san`` name the broker or the agent would not
  take, and the host's username (:data:`HOST_USERNAME`) is never a device id;
* :func:`agent_toml_snippet` and :func:`device_broker_url` give a device the
  listener that matches its kind of identity (certificate or password);
* a site's identities (:func:`site_identity`, :func:`site_sync_identity`) start
  with ``_``, so they are never a device id, a host client id or each other;
  a device id belongs to at most one site, and a site device has no credentials
  at central (:data:`AUTH_SITE`): it connects to its site's broker only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.protocol import DEFAULT_PREFIX, SITE_NAME_RE
from agent.service.config import DEVICE_ID_RE, TOPIC_PREFIX_RE
from converter.errors import BadInputError

REGISTRY_FORMAT = 1
DEFAULT_CERT_PORT = 8883  # + 1: device passwords, + 2: the host
HOST_USERNAME = "litefleet-host"
LOOPBACK_SANS = ("localhost", "127.0.0.1", "::1")

AUTH_CERT = "cert"
AUTH_PASSWORD = "password"
# a device behind a site broker (docs/sites.md): central knows its id, to grant the
# site's bridge its topics, but holds no credentials for it
AUTH_SITE = "site"

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


# -- registry ---------------------------------------------------------


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
    site: str | None = None  # AUTH_SITE: the site whose broker it uses


@dataclass(frozen=True)
class SiteRecord:
    """A site broker's identities at central: the bridge's certificate (CN
    :func:`site_identity`) and the prune's read-only one (CN :func:`site_sync_identity`)."""

    name: str
    created: str  # ISO 8601, UTC
    serial: int
    sync_serial: int
    not_after: str


def site_identity(name: str) -> str:
    """The CN (so the MQTT username and client id) of site ``name``'s bridge at central."""
    return f"_site-{name}"


def site_sync_identity(name: str) -> str:
    """The CN of site ``name``'s read-only metadata reader at central (the prune)."""
    return f"_sync-{name}"


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
    sites: tuple[SiteRecord, ...] = ()
    # this folder's broker is site NAME's (``broker --upstream``): its devices may read the
    # bridge's notification, and their agent.toml says ``site = NAME`` (docs/sites.md)
    uplink_site: str | None = None

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

    def site(self, name: str) -> SiteRecord | None:
        return next((s for s in self.sites if s.name == name), None)

    def site_devices(self, name: str) -> tuple[str, ...]:
        return tuple(d.device_id for d in self.devices if d.site == name)

    def with_site(self, record: SiteRecord) -> Registry:
        rest = [s for s in self.sites if s.name != record.name]
        return replace(self, sites=tuple(sorted([*rest, record], key=lambda s: s.name)))

    def without_site(self, name: str, revoked_at: str) -> Registry:
        """Forget site ``name``: its two certificates are revoked, its devices' grants go."""
        gone = self.site(name)
        if gone is None:
            return self
        revoked = (
            *self.revoked,
            Revocation(gone.serial, site_identity(name), revoked_at),
            Revocation(gone.sync_serial, site_sync_identity(name), revoked_at),
        )
        return replace(
            self,
            sites=tuple(s for s in self.sites if s.name != name),
            devices=tuple(d for d in self.devices if d.site != name),
            revoked=revoked,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REGISTRY_FORMAT,
            "prefix": self.prefix,
            "sans": list(self.sans),
            "ports": {"cert": self.ports.cert, "password": self.ports.password, "host": self.ports.host},
            "host": {"username": HOST_USERNAME, "password_hash": self.host_password_hash},
            "devices": [
                {
                    k: v
                    for k, v in {
                        "device_id": d.device_id,
                        "auth": d.auth,
                        "created": d.created,
                        "serial": None if d.serial is None else format(d.serial, "x"),
                        "not_after": d.not_after,
                        "password_hash": d.password_hash,
                        "site": d.site,
                    }.items()
                    if v is not None
                }
                for d in self.devices
            ],
            "sites": [
                {
                    "name": s.name,
                    "created": s.created,
                    "serial": format(s.serial, "x"),
                    "sync_serial": format(s.sync_serial, "x"),
                    "not_after": s.not_after,
                }
                for s in self.sites
            ],
            "revoked": [
                {"serial": format(r.serial, "x"), "device_id": r.device_id, "revoked": r.revoked}
                for r in self.revoked
            ],
            **({"uplink_site": self.uplink_site} if self.uplink_site else {}),
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
                    device_id=str(d["device_id"]),
                    auth=str(d["auth"]),
                    created=str(d["created"]),
                    serial=int(d["serial"], 16) if "serial" in d else None,
                    not_after=d.get("not_after"),
                    password_hash=d.get("password_hash"),
                    site=d.get("site"),
                )
                for d in doc["devices"]
            ),
            # folders made before sites existed have no "sites" key
            sites=tuple(
                SiteRecord(
                    name=str(s["name"]),
                    created=str(s["created"]),
                    serial=int(s["serial"], 16),
                    sync_serial=int(s["sync_serial"], 16),
                    not_after=str(s["not_after"]),
                )
                for s in doc.get("sites", ())
            ),
            revoked=tuple(
                Revocation(int(r["serial"], 16), str(r["device_id"]), str(r["revoked"]))
                for r in doc["revoked"]
            ),
            uplink_site=_site_name_or_none(doc.get("uplink_site")),
        )


def _site_name_or_none(value: Any) -> str | None:
    """A recorded site name, checked: it becomes a level of an ACL topic."""
    if value is None:
        return None
    check_site_name(str(value))
    return str(value)


def check_device_id(device_id: str) -> None:
    if not DEVICE_ID_RE.match(device_id):
        raise BadInputError(
            f"device id {device_id!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "and start with a letter or digit"
        )
    if device_id == HOST_USERNAME:
        raise BadInputError(f"{HOST_USERNAME!r} is the host's identity, not a device id")


def check_site_name(name: str) -> None:
    if not SITE_NAME_RE.match(name):
        raise BadInputError(
            f"site name {name!r} must be 1-32 lowercase letters, digits, '.', '_' or '-' "
            "and start with a letter or digit"
        )


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
    if (
        not name
        or len(name) > 253
        or not all(
            label and len(label) <= 63 and label.replace("-", "").isalnum() and label[0] != "-"
            for label in labels
        )
    ):
        raise BadInputError(f"--san {name!r} is neither a DNS name nor an IP address")


# -- the device's side -------------------------------------------------------


@dataclass(frozen=True)
class DeviceBundle:
    """What to copy onto a device: ``files`` maps a file in DIR to its name on the device."""

    device_id: str
    auth: str
    broker_url: str
    files: tuple[tuple[Path, str], ...]
    agent_toml: str
    serial: int | None = None


def agent_toml_snippet(
    device_id: str,
    auth: str,
    broker_url: str,
    prefix: str,
    *,
    credential_prefix: str = CRED_PREFIX,
    names: Mapping[str, str] | None = None,
    site: str | None = None,
) -> str:
    """The device's agent.toml lines for the broker. File names are systemd credential
    names (``litefleet_<file>``); ``credential_prefix=DEVICE_CRED_DIR + "/"`` gives
    absolute paths for an agent run without systemd; ``credential_prefix=""`` with
    ``names`` (name on the device -> file name) names files beside the agent.toml."""

    def f(name: str) -> str:
        return credential_prefix + (names or {}).get(name, name)

    lines = [f'device_id = "{device_id}"', f'broker = "{broker_url}"', f'ca_file = "{f(CRED_CA)}"']
    if auth == AUTH_CERT:
        lines += [f'cert_file = "{f(CRED_CERT)}"', f'key_file = "{f(CRED_KEY)}"']
    else:
        lines += [f'username = "{device_id}"', f'password_file = "{f(CRED_PASSWORD)}"']
    if prefix != DEFAULT_PREFIX:
        lines.append(f'topic_prefix = "{prefix}"')
    if site:
        lines.append(f'site = "{site}"')
    return "\n".join(lines) + "\n"


def device_broker_url(registry: Registry, auth: str) -> str:
    port = registry.ports.cert if auth == AUTH_CERT else registry.ports.password
    host = registry.public_host
    if ":" in host:
        host = f"[{host}]"
    return f"mqtts://{host}:{port}"
