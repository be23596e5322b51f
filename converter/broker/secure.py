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
  key or its password) and an ``agent.toml`` naming those files beside it, which
  ``litefleet-agent run --config`` takes as it is (without systemd).

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

The rules live in pure modules: :mod:`converter.broker.acl` (grants, ACL and
password files), :mod:`converter.broker.certs` (CA, certificates, CRL) and
:mod:`converter.broker.registry` (the ``secure.json`` data, what a device is
told), :mod:`converter.broker.layout` (file names, listener configuration);
:class:`SecureDir` here does the file I/O around them, and
:mod:`converter.broker.reload` finds and reloads the running broker.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from agent.files import atomic_write, replace_dir
from agent.protocol import DEFAULT_PREFIX, Topics
from converter.broker.acl import (
    device_acl_entries,
    hash_password,
    host_grants,
    new_password,
    render_acl,
    render_password_file,
)
from converter.broker.certs import (
    make_ca,
    make_client_cert,
    make_crl,
    make_server_cert,
    new_key,
    pem_cert,
    pem_crl,
    pem_key,
    server_cert_fits,
)
from converter.broker.layout import HOST_CLIENT_ID_PREFIX, MAX_PACKET_SIZE_BYTES, SecurePaths, listener_lines
from converter.broker.mosquitto import BrokerConfig
from converter.broker.registry import (
    AUTH_CERT,
    AUTH_PASSWORD,
    CRED_CA,
    CRED_CERT,
    CRED_KEY,
    CRED_PASSWORD,
    HOST_USERNAME,
    LOOPBACK_SANS,
    DeviceBundle,
    DeviceRecord,
    ListenerPorts,
    Registry,
    agent_toml_snippet,
    check_device_id,
    check_prefix,
    check_san,
    device_broker_url,
)
from converter.broker.reload import reload, running_pid
from converter.broker.uplink import UplinkInfo, UplinkPaths
from converter.errors import BadInputError

logger = logging.getLogger(__name__)

# -- files -------------------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _load_key(path: Path) -> PrivateKeyTypes | None:
    """The unencrypted PEM private key in ``path``, or None when it holds none."""
    try:
        return serialization.load_pem_private_key(path.read_bytes(), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None


def _load_cert(path: Path) -> x509.Certificate | None:
    """The PEM certificate in ``path``, or None when it holds none."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        return None


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


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
    def ensure(
        self,
        *,
        prefix: str | None = None,
        sans: Sequence[str] = (),
        ports: ListenerPorts | None = None,
        uplink_site: str | None = None,
        now: dt.datetime | None = None,
    ) -> Registry:
        """Create or reuse the authority. Idempotent: keys are never replaced; the
        server certificate is reissued (same CA, so devices need nothing new) when
        ``sans`` or the CA changed or it expires within 30 days; a missing
        ``host.password`` is made anew (that is how it is rotated). ``sans`` are
        extra names (the loopback ones are always in); empty keeps the stored ones.
        ``uplink_site``: this folder's broker is that site's (``broker --upstream``),
        recorded. Every derived file is rewritten."""
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
                        f"{self.root} was set up for topic prefix {registry.prefix!r}, not {prefix!r}"
                    )
                if sans:
                    registry = replace(registry, sans=tuple(dict.fromkeys((*LOOPBACK_SANS, *sans))))
                if ports is not None:
                    registry = replace(registry, ports=ports)
                if uplink_site is not None and registry.uplink_site not in (None, uplink_site):
                    raise BadInputError(
                        f"{self.root} is site {registry.uplink_site!r}'s broker folder, "
                        f"not site {uplink_site!r}'s"
                    )
                if not self.paths.host_password.exists():
                    # deleting host.password is how the host password is rotated
                    host_password = new_password()
                    atomic_write(self.paths.host_password, (host_password + "\n").encode())
                    registry = replace(registry, host_password_hash=hash_password(host_password))
                    logger.info("new host password in %s", self.paths.host_password)
            else:
                host_password = new_password()
                atomic_write(self.paths.host_password, (host_password + "\n").encode())
                registry = Registry(
                    prefix=prefix or DEFAULT_PREFIX,
                    sans=tuple(dict.fromkeys((*LOOPBACK_SANS, *sans))),
                    ports=ports or ListenerPorts(),
                    host_password_hash=hash_password(host_password),
                )
                logger.info("new secure broker folder %s", self.root)
            if uplink_site is not None:
                registry = replace(registry, uplink_site=uplink_site)
            ca_key, ca = self._ensure_ca(now)
            self._ensure_server_cert(ca_key, ca, registry.sans, now)
            self._save(registry, ca_key, ca, now)
            return registry

    def _ensure_ca(self, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if self.paths.ca_key.exists() and self.paths.ca_cert.exists():
            # the CA cannot be remade without re-enrolling every device: never replace it
            key = _load_key(self.paths.ca_key)
            if key is None:
                raise BadInputError(f"{self.paths.ca_key} is not a PEM private key; restore it from a backup")
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise BadInputError(f"{self.paths.ca_key} is not an EC key")
            ca = _load_cert(self.paths.ca_cert)
            if ca is None:
                raise BadInputError(
                    f"{self.paths.ca_cert} is not a PEM certificate; restore it from a backup"
                )
            if ca.public_key() != key.public_key():
                raise BadInputError(
                    f"{self.paths.ca_cert} and {self.paths.ca_key} do not "
                    "belong together; restore both from a backup"
                )
            return key, ca
        if self.paths.ca_key.exists() or self.paths.ca_cert.exists():
            raise BadInputError(f"{self.root} has only half a CA (ca.pem / ca.key); restore both")
        key = new_key()
        ca = make_ca(key, now)
        atomic_write(self.paths.ca_key, pem_key(key))
        atomic_write(self.paths.ca_cert, pem_cert(ca), 0o644)
        logger.info("new CA in %s", self.paths.ca_cert)
        return key, ca

    def _ensure_server_cert(
        self, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, sans: Sequence[str], now: dt.datetime
    ) -> None:
        if self.paths.server_cert.exists() and self.paths.server_key.exists():
            # both are derived from the CA: damaged ones are simply issued anew
            cert = _load_cert(self.paths.server_cert)
            key = _load_key(self.paths.server_key)
            if (
                cert is not None
                and key is not None
                and key.public_key() == cert.public_key()
                and server_cert_fits(cert, ca, sans, now)
            ):
                return
            logger.info("reissuing the server certificate for %s", ", ".join(sans))
        key = new_key()
        atomic_write(self.paths.server_key, pem_key(key))
        cert = make_server_cert(ca_key, ca, key, sans, now)
        atomic_write(self.paths.server_cert, pem_cert(cert), 0o644)

    def _save(
        self, registry: Registry, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, now: dt.datetime
    ) -> None:
        """Write the registry and every file derived from it."""
        p = self.paths
        topics = Topics(registry.prefix)
        atomic_write(p.crl, pem_crl(make_crl(ca_key, ca, registry.revoked, now)), 0o644)
        acl = device_acl_entries(topics, registry, self.uplink_site(registry))
        atomic_write(p.devices_acl, render_acl(acl).encode())
        atomic_write(
            p.devices_passwd,
            render_password_file(
                {
                    d.device_id: d.password_hash
                    for d in registry.devices
                    if d.auth == AUTH_PASSWORD and d.password_hash
                }
            ).encode(),
        )
        atomic_write(p.host_acl, render_acl([(HOST_USERNAME, host_grants(topics))]).encode())
        atomic_write(
            p.host_passwd, render_password_file({HOST_USERNAME: registry.host_password_hash}).encode()
        )
        atomic_write(p.registry, (json.dumps(registry.to_json(), indent=2) + "\n").encode())

    # -- devices --------------------------------------------------------------------
    def add_device(
        self, device_id: str, *, auth: str = AUTH_CERT, renew: bool = False, now: dt.datetime | None = None
    ) -> DeviceBundle:
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
            if old is not None and old.site is not None:
                raise BadInputError(
                    f"device {device_id!r} belongs to site {old.site!r}: it has credentials at its "
                    "site's broker only (litefleet device remove it here first to move it)"
                )
            if old is not None and not renew:
                raise BadInputError(f"device {device_id!r} exists already; --renew replaces its credentials")
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
                site = self.uplink_site(registry)
                toml = agent_toml_snippet(device_id, auth, url, registry.prefix, site=site)
                # the folder's own agent.toml names the files beside it: an agent runs from
                # it as it is, without systemd (relative names resolve against its folder)
                local = agent_toml_snippet(
                    device_id,
                    auth,
                    url,
                    registry.prefix,
                    credential_prefix="",
                    names={device: mine for mine, device in names},
                    site=site,
                )
                atomic_write(tmp / "agent.toml", local.encode(), 0o644)
                self._save(registry, ca_key, ca, now)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            replace_dir(tmp, out)
            logger.info("device %s added (%s)", device_id, auth)
            return DeviceBundle(
                device_id, auth, url, tuple((out / f, name) for f, name in names), toml, serial=record.serial
            )

    @staticmethod
    def _write_credentials(
        folder: Path,
        device_id: str,
        auth: str,
        ca_key: ec.EllipticCurvePrivateKey,
        ca: x509.Certificate,
        now: dt.datetime,
    ) -> tuple[DeviceRecord, list[tuple[str, str]]]:
        """Write a new identity's files into ``folder``; return its registry record and
        ``(file name, name on the device)`` pairs."""
        atomic_write(folder / "ca.pem", pem_cert(ca), 0o644)
        names = [("ca.pem", CRED_CA)]
        if auth == AUTH_CERT:
            key = new_key()
            cert = make_client_cert(ca_key, ca, key, device_id, now)
            atomic_write(folder / f"{device_id}.key", pem_key(key))
            atomic_write(folder / f"{device_id}.pem", pem_cert(cert), 0o644)
            names += [(f"{device_id}.pem", CRED_CERT), (f"{device_id}.key", CRED_KEY)]
            return DeviceRecord(
                device_id,
                AUTH_CERT,
                now.isoformat(),
                serial=cert.serial_number,
                not_after=cert.not_valid_after_utc.isoformat(),
            ), names
        password = new_password()
        atomic_write(folder / "password", (password + "\n").encode())
        names.append(("password", CRED_PASSWORD))
        return DeviceRecord(
            device_id, AUTH_PASSWORD, now.isoformat(), password_hash=hash_password(password)
        ), names

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
        """How the host CLI connects: keys match ``agent.mqtt.client.ConnectionSettings``
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
            "url": f"mqtts://{HOST_USERNAME}@{f'[{host}]' if ':' in host else host}:{registry.ports.host}",
        }

    def broker_config(
        self, *, data_dir: Path | None = None, bind: str = "127.0.0.1", registry: Registry | None = None
    ) -> BrokerConfig:
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

    def uplink_site(self, registry: Registry) -> str | None:
        """The site whose broker this folder's is: as ``broker --upstream`` recorded it,
        else as the bundle ``site add`` wrote says, where docs/sites.md has it copied
        (``DIR/uplink``, before the first ``device add``); None for a central broker."""
        if registry.uplink_site:
            return registry.uplink_site
        try:
            doc = json.loads(UplinkPaths(self.root / "uplink").site_json.read_text())
            return UplinkInfo.from_json(doc).site
        except (OSError, ValueError, KeyError, TypeError, BadInputError):
            return None

    def running_broker_pid(self) -> int | None:
        """The pid of the Mosquitto serving this folder, or None
        (see :func:`converter.broker.reload.running_pid`)."""
        return running_pid(self.paths.pid_file)

    def reload_broker(self, *, timeout_s: float = 5.0) -> int | None:
        """Make the running broker reread ACL, password and CRL files; its pid, or None
        when no broker runs for this folder (see :func:`converter.broker.reload.reload`)."""
        return reload(self.paths.pid_file, timeout_s=timeout_s)


def host_client_settings(directory: str | Path) -> dict[str, Any]:
    """The host identity's connection settings for a ``--secure DIR`` broker."""
    return SecureDir(directory).host_client_settings()
