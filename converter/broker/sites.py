"""Central's side of sites: site identities, their uplink bundles, which devices each owns.

``litefleet site add|list|remove --secure CENTRAL_DIR`` and ``litefleet device add ID
--site NAME --secure CENTRAL_DIR`` work on the same folder as ``litefleet broker
--secure`` (:class:`converter.broker.secure.SecureDir`); :class:`CentralDir` adds the
site operations under the same lock, registry and derived files.

Guarantees:

* a site gets two client certificates from central's CA (the bridge's, CN
  ``_site-<name>``; the prune's, CN ``_sync-<name>``) in its bundle folder
  ``CENTRAL_DIR/sites/<name>/`` (:mod:`converter.broker.uplink`), keys
  owner-only; renewing or removing a site revokes both old certificates (CRL);
* central's device ACL grants a site's bridge exactly its own devices' topics
  (:func:`converter.broker.acl.site_grants`); a device id belongs to one site or
  to central, never to two, and a site device has no credentials at central;
* a failure leaves the registry, the derived files and an existing bundle as
  they were (the bundle is built aside and swapped in after the registry is saved).

Call :meth:`~converter.broker.secure.SecureDir.reload_broker` after a change, as
for devices: the bridge of a running site stays connected through the reload.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.files import atomic_write, replace_dir
from converter.broker.certs import make_client_cert, new_key, pem_cert, pem_key
from converter.broker.registry import (
    AUTH_SITE,
    DeviceRecord,
    Registry,
    Revocation,
    SiteRecord,
    check_device_id,
    check_site_name,
    site_identity,
    site_sync_identity,
)
from converter.broker.secure import SecureDir, _private_dir, _utcnow
from converter.broker.uplink import UplinkInfo, UplinkPaths
from converter.errors import BadInputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteBundle:
    """What ``site add`` made: the folder to copy to the site host as ``SITE_DIR/uplink``."""

    record: SiteRecord
    folder: Path
    info: UplinkInfo


def central_upstream_url(registry: Registry) -> str:
    """The URL a site's ``--upstream`` names: central's device-certificate listener (the
    one that forces client id = certificate CN)."""
    host = registry.public_host
    return f"mqtts://{f'[{host}]' if ':' in host else host}:{registry.ports.cert}"


class CentralDir(SecureDir):
    """A secure broker folder that also issues site identities."""

    def site_dir(self, name: str) -> Path:
        return self.root / "sites" / name

    def sites(self) -> tuple[SiteRecord, ...]:
        return self.load().sites

    def add_site(self, name: str, *, renew: bool = False, now: dt.datetime | None = None) -> SiteBundle:
        """Issue site ``name``'s two certificates and write its bundle (``renew``: new
        certificates for an existing site, the old ones revoked; its devices stay)."""
        check_site_name(name)
        now = now or _utcnow()
        if not self.exists():
            self.ensure(now=now)
        with self._locked():
            registry = self.load()
            old = registry.site(name)
            if old is not None and not renew:
                raise BadInputError(f"site {name!r} exists already; --renew replaces its certificates")
            if old is not None:
                registry = replace(
                    registry,
                    revoked=(
                        *registry.revoked,
                        Revocation(old.serial, site_identity(name), now.isoformat()),
                        Revocation(old.sync_serial, site_sync_identity(name), now.isoformat()),
                    ),
                )
            ca_key, ca = self._ensure_ca(now)
            out = self.site_dir(name)
            _private_dir(out.parent)
            tmp = out.parent / f".{name}.{secrets.token_hex(4)}.tmp"
            _private_dir(tmp)
            try:
                record = self._write_bundle(UplinkPaths(tmp), name, ca_key, ca, now)
                registry = registry.with_site(record)
                info = UplinkInfo(site=name, prefix=registry.prefix, upstream=central_upstream_url(registry))
                atomic_write(
                    UplinkPaths(tmp).site_json, (json.dumps(info.to_json(), indent=2) + "\n").encode()
                )
                self._save(registry, ca_key, ca, now)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            replace_dir(tmp, out)
            logger.info("site %s added", name)
            return SiteBundle(record, out, info)

    @staticmethod
    def _write_bundle(
        paths: UplinkPaths,
        name: str,
        ca_key: ec.EllipticCurvePrivateKey,
        ca: x509.Certificate,
        now: dt.datetime,
    ) -> SiteRecord:
        atomic_write(paths.ca_cert, pem_cert(ca), 0o644)
        serials = []
        for cn, cert_path, key_path in (
            (site_identity(name), paths.uplink_cert, paths.uplink_key),
            (site_sync_identity(name), paths.sync_cert, paths.sync_key),
        ):
            key = new_key()
            cert = make_client_cert(ca_key, ca, key, cn, now)
            atomic_write(key_path, pem_key(key))
            atomic_write(cert_path, pem_cert(cert), 0o644)
            serials.append(cert)
        uplink, sync = serials
        return SiteRecord(
            name=name,
            created=now.isoformat(),
            serial=uplink.serial_number,
            sync_serial=sync.serial_number,
            not_after=uplink.not_valid_after_utc.isoformat(),
        )

    def remove_site(self, name: str, *, now: dt.datetime | None = None) -> tuple[SiteRecord, tuple[str, ...]]:
        """Forget site ``name``: both certificates revoked, its bundle deleted, its devices'
        grants gone. Returns the record and the device ids it owned."""
        now = now or _utcnow()
        with self._locked():
            registry = self.load()
            record = registry.site(name)
            if record is None:
                raise BadInputError(f"no site {name!r} in {self.root}")
            devices = registry.site_devices(name)
            registry = registry.without_site(name, now.isoformat())
            ca_key, ca = self._ensure_ca(now)
            self._save(registry, ca_key, ca, now)
            shutil.rmtree(self.site_dir(name), ignore_errors=True)
            logger.info("site %s removed with %d devices", name, len(devices))
            return record, devices

    def add_site_device(self, device_id: str, site: str, *, now: dt.datetime | None = None) -> DeviceRecord:
        """Grant site ``site``'s bridge device ``device_id``'s topics at central. The
        device's credentials are made at the site (``litefleet device add ID --secure
        SITE_DIR``), after this: until central grants them, its reports are dropped here."""
        check_device_id(device_id)
        now = now or _utcnow()
        with self._locked():
            registry = self.load()
            if registry.site(site) is None:
                raise BadInputError(
                    f"no site {site!r} in {self.root}; add it with: litefleet site add {site}"
                )
            old = registry.device(device_id)
            if old is not None:
                where = f"site {old.site!r}" if old.site else "central (it has credentials here)"
                raise BadInputError(f"device {device_id!r} exists already, at {where}")
            record = DeviceRecord(device_id, AUTH_SITE, now.isoformat(), site=site)
            ca_key, ca = self._ensure_ca(now)
            self._save(registry.with_device(record), ca_key, ca, now)
            logger.info("device %s added to site %s", device_id, site)
            return record
