"""``litefleet device add|list|remove --secure DIR``: device identities of the secure broker.

``add ID`` creates a client certificate (CN = ID) or, with ``--password``, a
random password, updates the broker's ACL and password files, reloads a
running broker (SIGHUP) and prints exactly what to copy onto the device.
``remove ID`` revokes it. See :mod:`converter.broker.secure` and docs/security.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from converter.broker.bundle import check_bundle_target, write_bundle
from converter.broker.registry import (
    AUTH_CERT,
    AUTH_PASSWORD,
    CRED_PREFIX,
    DEVICE_CRED_DIR,
    DeviceBundle,
    agent_toml_snippet,
)
from converter.broker.secure import SecureDir
from converter.errors import BadInputError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "device",
        help="add, list or remove device identities (--secure broker)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    dsub = p.add_subparsers(dest="device_command", metavar="ACTION", parser_class=type(p))
    dsub.required = True

    add = dsub.add_parser("add", help="create a device's credentials and print what to copy")
    add.add_argument("device_id", metavar="ID")
    add.add_argument("--secure", metavar="DIR", type=Path, required=True)
    add.add_argument(
        "--password", action="store_true", help="username/password instead of a client certificate"
    )
    add.add_argument(
        "--bundle",
        metavar="OUT",
        type=Path,
        help="also write a credentials bundle folder for `systemd/install.sh --credentials OUT`",
    )
    add.add_argument(
        "--trusted-root",
        metavar="ROOT_JSON",
        type=Path,
        help="with --bundle: put the repository's root.json in the bundle too",
    )
    add.add_argument(
        "--renew",
        action="store_true",
        help="replace the credentials of an existing device (the old ones stop working at once)",
    )
    add.set_defaults(func=run_add)

    lst = dsub.add_parser("list", help="list device identities")
    lst.add_argument("--secure", metavar="DIR", type=Path, required=True)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=run_list)

    rm = dsub.add_parser("remove", help="revoke a device's credentials")
    rm.add_argument("device_id", metavar="ID")
    rm.add_argument("--secure", metavar="DIR", type=Path, required=True)
    rm.set_defaults(func=run_remove)


def run_add(args: argparse.Namespace) -> int:
    if args.trusted_root is not None and args.bundle is None:
        raise BadInputError("--trusted-root goes with --bundle OUT")
    if args.bundle is not None:
        check_bundle_target(args.bundle, args.trusted_root)
    secure = SecureDir(args.secure)
    bundle = secure.add_device(
        args.device_id, auth=AUTH_PASSWORD if args.password else AUTH_CERT, renew=args.renew
    )
    pid = secure.reload_broker()
    prefix = secure.load().prefix
    sys.stdout.write(format_bundle(bundle, secure.paths.device_dir(bundle.device_id), pid, prefix))
    if args.bundle is not None:
        out = write_bundle(bundle, args.bundle, args.trusted_root)
        root = " and root.json" if args.trusted_root is not None else ""
        sys.stdout.write(
            f"\nBundle: {out}/ (agent.toml, credentials/{root}). On the device, one command:\n"
            f"   sudo systemd/install.sh --credentials {out.name}/\n"
        )
    return 0


def format_bundle(bundle: DeviceBundle, folder: Path, broker_pid: int | None, prefix: str) -> str:
    how = "client certificate (CN = device id)" if bundle.auth == AUTH_CERT else "username/password"
    serial = f", serial {bundle.serial:x}" if bundle.serial is not None else ""
    width = max(len(str(src)) for src, _ in bundle.files)
    plain = agent_toml_snippet(
        bundle.device_id, bundle.auth, bundle.broker_url, prefix, credential_prefix=f"{DEVICE_CRED_DIR}/"
    )
    lines = [
        f"device {bundle.device_id}: {how}{serial}",
        "",
        f"1. Copy these files onto the device into {DEVICE_CRED_DIR}/ (owner root, mode 0600):",
        *(f"   {src!s:<{width}}  ->  {DEVICE_CRED_DIR}/{name}" for src, name in bundle.files),
        "",
        "2. Put this into the device's /etc/litefleet/agent.toml (beside state_dir, trusted_root, ...):",
        *(f"   {line}" for line in bundle.agent_toml.splitlines()),
        "   The names are systemd credentials: the packaged litefleet-agent.service hands",
        f"   each file F of {DEVICE_CRED_DIR} to the agent as {CRED_PREFIX}F (LoadCredential=litefleet:...).",
        "   Without systemd, use the files' paths instead:",
        *(f"   {line}" for line in plain.splitlines() if "_file" in line),
        "",
        f"The same files and agent.toml are in {folder}/.",
        f"The agent connects with client id = {bundle.device_id} (the broker enforces it): "
        "run one agent per identity.",
        f"Running broker reloaded (mosquitto pid {broker_pid})."
        if broker_pid
        else "No broker is running; it picks this up when it starts.",
    ]
    return "\n".join(lines) + "\n"


def run_list(args: argparse.Namespace) -> int:
    devices = SecureDir(args.secure).devices()
    if args.json:
        rows = [
            {
                "device_id": d.device_id,
                "auth": d.auth,
                "created": d.created,
                "serial": None if d.serial is None else format(d.serial, "x"),
                "not_after": d.not_after,
            }
            for d in devices
        ]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return 0
    if not devices:
        sys.stdout.write("no devices\n")
        return 0
    header = ("DEVICE", "AUTH", "CREATED", "CERT EXPIRES")
    rows_t = [(d.device_id, d.auth, d.created, d.not_after or "-") for d in devices]
    widths = [max(len(r[i]) for r in [header, *rows_t]) for i in range(len(header))]
    for r in [header, *rows_t]:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    secure = SecureDir(args.secure)
    record = secure.remove_device(args.device_id)
    pid = secure.reload_broker()
    what = "its certificate is revoked (CRL)" if record.auth == AUTH_CERT else "its password is deleted"
    sys.stdout.write(
        f"device {record.device_id} removed: ACL entries gone, {what}.\n"
        + (
            f"Running broker reloaded (mosquitto pid {pid}): new connections with the old "
            "credentials are refused; a session still open has no rights left.\n"
            if pid
            else "No broker is running; it picks this up when it starts.\n"
        )
    )
    return 0
