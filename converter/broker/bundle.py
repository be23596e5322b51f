"""A device's credentials bundle: one folder that ``systemd/install.sh --credentials DIR`` turns
into a TLS-complete install.

Layout (what ``litefleet device add ID --secure BROKERDIR --bundle DIR`` writes)::

    DIR/agent.toml           device_id, broker and the TLS keys, naming systemd credentials
    DIR/credentials/ca.pem   the broker's CA
    DIR/credentials/client.pem, client.key   (certificate identity), or
    DIR/credentials/mqtt-password            (password identity)
    DIR/root.json            the repository's trusted root, when given

Guarantees: the file names under ``credentials/`` are the names on the device
(:data:`converter.broker.registry.DEVICE_CRED_DIR`), so ``agent.toml``'s ``litefleet_<file>``
credential names resolve once installed; the folder appears whole (built aside, one rename)
or not at all; secrets are owner-only (folder 0700, key and password 0600).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from agent.files import atomic_write, fsync_dir
from converter.broker.registry import DeviceBundle
from converter.errors import BadInputError

PUBLIC_FILES = ("ca.pem", "client.pem")


def check_bundle_target(out: Path, trusted_root: Path | None) -> None:
    """Refuse, before anything is created, a target that exists with content, or a trusted
    root that is not a readable JSON file."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"--bundle {out} exists and is not an empty folder")
    if trusted_root is not None:
        try:
            json.loads(trusted_root.read_bytes())
        except OSError as exc:
            raise BadInputError(f"--trusted-root {trusted_root}: {exc.strerror}") from exc
        except ValueError as exc:
            raise BadInputError(f"--trusted-root {trusted_root} is not JSON (the repo's root.json)") from exc


def write_bundle(bundle: DeviceBundle, out: Path, trusted_root: Path | None = None) -> Path:
    """Write ``bundle`` (from :meth:`converter.broker.secure.SecureDir.add_device`) into ``out``."""
    check_bundle_target(out, trusted_root)
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir(mode=0o700)
    try:
        creds = tmp / "credentials"
        creds.mkdir(mode=0o700)
        for src, name in bundle.files:
            mode = 0o644 if name in PUBLIC_FILES else 0o600
            atomic_write(creds / name, src.read_bytes(), mode)
        atomic_write(tmp / "agent.toml", bundle.agent_toml.encode(), 0o644)
        if trusted_root is not None:
            atomic_write(tmp / "root.json", trusted_root.read_bytes(), 0o644)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
