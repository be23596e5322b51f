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

The rules live in pure modules: :mod:`converter.broker.acl` (grants, ACL and
password files), :mod:`converter.broker.certs` (CA, certificates, CRL) and
:mod:`converter.broker.registry` (the ``secure.json`` data, what a device is
told); :class:`SecureDir` here does the file and process I/O around them.
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
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from agent.files import atomic_write, fsync_dir
from agent.protocol import DEFAULT_PREFIX
from converter.broker.acl import (
    device_grants,
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
from converter.errors import BadInputError

__all__ = [
    "HOST_CLIENT_ID_PREFIX",
    "MAX_PACKET_SIZE_BYTES",
    "RELOADED_LOG_LINE",
    "SecureDir",
    "SecurePaths",
    "host_client_settings",
    "listener_lines",
]

logger = logging.getLogger(__name__)

# Host processes choose client ids starting with this: a leading "_" is never
# a valid device id, so a host client can never take over a device's session.
HOST_CLIENT_ID_PREFIX = "_lf-host-"
# Delivery chunks are <= 256 KiB (agent.protocol.MAX_CHUNK_SIZE: 1 MiB); 4 MiB
# leaves room for metadata (targets.json of a large repository) and properties.
MAX_PACKET_SIZE_BYTES = 4 * 1024 * 1024


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
    def ensure(
        self,
        *,
        prefix: str | None = None,
        sans: Sequence[str] = (),
        ports: ListenerPorts | None = None,
        now: dt.datetime | None = None,
    ) -> Registry:
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
                        f"{self.root} was set up for topic prefix {registry.prefix!r}, not {prefix!r}"
                    )
                if sans:
                    registry = replace(registry, sans=tuple(dict.fromkeys((*LOOPBACK_SANS, *sans))))
                if ports is not None:
                    registry = replace(registry, ports=ports)
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
        atomic_write(p.crl, pem_crl(make_crl(ca_key, ca, registry.revoked, now)), 0o644)
        atomic_write(
            p.devices_acl,
            render_acl(
                (d.device_id, device_grants(registry.prefix, d.device_id)) for d in registry.devices
            ).encode(),
        )
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
        atomic_write(p.host_acl, render_acl([(HOST_USERNAME, host_grants(registry.prefix))]).encode())
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
                toml = agent_toml_snippet(device_id, auth, url, registry.prefix)
                atomic_write(tmp / "agent.toml", toml.encode(), 0o644)
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
            fsync_dir(out.parent)
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
        if log is not None and not _wait_for_log_line(log, offset, RELOADED_LOG_LINE, timeout_s):
            logger.warning("mosquitto pid %s did not log a reload within %.0f s", pid, timeout_s)
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
                return Path(line[len("log_dest file ") :].strip())
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


def host_client_settings(directory: str | Path) -> dict[str, Any]:
    """The host identity's connection settings for a ``--secure DIR`` broker."""
    return SecureDir(directory).host_client_settings()
