"""A site's uplink bundle: what ``litefleet site add`` writes at central and what the
site's ``litefleet broker --upstream`` reads (docs/sites.md).

Guarantees:

* every file of the bundle is named here, once (:class:`UplinkPaths`), and
  :class:`UplinkInfo` round-trips ``site.json`` (refusing any other ``format``);
* :func:`load_uplink` either returns a bundle whose files all exist and whose
  ``site.json`` is valid, or raises :class:`~converter.errors.BadInputError`
  with one line naming what is missing.

A bundle holds central's CA certificate (the relay checks central's server
certificate against it), the bridge's client certificate and key (CN
``_site-<name>``) and the prune's (CN ``_sync-<name>``), all issued by
central's CA. Keys are written owner-only; copy the folder as it is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.broker.registry import check_prefix, check_site_name
from converter.errors import BadInputError

BUNDLE_FORMAT = 1


@dataclass(frozen=True)
class UplinkPaths:
    root: Path

    @property
    def site_json(self) -> Path:
        return self.root / "site.json"

    @property
    def ca_cert(self) -> Path:
        """Central's CA certificate."""
        return self.root / "ca.pem"

    @property
    def uplink_cert(self) -> Path:
        return self.root / "uplink.pem"

    @property
    def uplink_key(self) -> Path:
        return self.root / "uplink.key"

    @property
    def sync_cert(self) -> Path:
        return self.root / "sync.pem"

    @property
    def sync_key(self) -> Path:
        return self.root / "sync.key"

    def files(self) -> tuple[Path, ...]:
        return (
            self.site_json,
            self.ca_cert,
            self.uplink_cert,
            self.uplink_key,
            self.sync_cert,
            self.sync_key,
        )


@dataclass(frozen=True)
class UplinkInfo:
    """``site.json``: the site's name and topic prefix, and central's device-certificate
    listener as central's operator knows it (``--upstream`` may say otherwise)."""

    site: str
    prefix: str
    upstream: str

    def to_json(self) -> dict[str, Any]:
        return {"format": BUNDLE_FORMAT, "site": self.site, "prefix": self.prefix, "upstream": self.upstream}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> UplinkInfo:
        if doc.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"unsupported format {doc.get('format')!r}")
        info = cls(site=str(doc["site"]), prefix=str(doc["prefix"]), upstream=str(doc["upstream"]))
        check_site_name(info.site)
        check_prefix(info.prefix)
        return info


def load_uplink(root: Path) -> tuple[UplinkInfo, UplinkPaths]:
    """Read and check the bundle in ``root``."""
    paths = UplinkPaths(root)
    missing = [p.name for p in paths.files() if not p.is_file()]
    if missing:
        raise BadInputError(
            f"{root} is not a site uplink bundle (missing {', '.join(missing)}); "
            "make one at central with: litefleet site add NAME --secure CENTRAL_DIR"
        )
    try:
        info = UplinkInfo.from_json(json.loads(paths.site_json.read_text()))
    except (OSError, ValueError, KeyError, TypeError, BadInputError) as exc:
        raise BadInputError(f"{paths.site_json} is unreadable: {exc}") from exc
    return info, paths
