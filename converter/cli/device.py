"""``litefleet device add|list|remove --secure DIR``: device identities of the secure broker.

``add ID`` creates a client certificate (CN = ID) or, with ``--password``, a
random password, updates the broker's ACL and password files, reloads a
running broker (SIGHUP) and prints exactly what to copy onto the device.
``remove ID`` revokes it and, with the broker running, deletes its retained state
(:func:`converter.fleet.view.clear_state`). See :mod:`converter.broker.secure`
and docs/security.md.

``add ID --site NAME`` at central makes no credentials: it lets site NAME's
bridge carry device ID's topics (docs/sites.md); the device's identity is made
at its site with ``litefleet device add ID --secure SITE_DIR``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from converter.broker.bundle import check_bundle_target, write_bundle
from converter.broker.registry import (
    AUTH_CERT,
    AUTH_PASSWORD,
    AUTH_SITE,
    CRED_PREFIX,
    DEVICE_CRED_DIR,
    DeviceBundle,
    agent_toml_snippet,
)
from converter.broker.secure import SecureDir
from converter.broker.sites import CentralDir
from converter.cli.reloaded import reload_line
from converter.cli.table import format_table
from converter.errors import BadInputError

DESCRIPTION = (
    "add ID creates a client certificate (CN = ID) or, with --password, a random password, "
    "updates the broker's ACL and password files, reloads a running broker (SIGHUP) and prints "
    "exactly what to copy onto the device. remove ID revokes it and clears its retained state "
    "from a running broker, so status no longer lists it. add ID --site NAME (at central) lets "
    "site NAME's bridge carry the device's topics instead (docs/sites.md). See docs/security.md."
)


def _secure_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--secure", metavar="DIR", type=Path, required=True, help="the secure broker's folder")
    # the spelling push, status and monitor used to have: accepted here too
    p.add_argument("--secure-dir", dest="secure", type=Path, help=argparse.SUPPRESS)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "device", help="add, list or remove device identities (--secure broker)", description=DESCRIPTION
    )
    dsub = p.add_subparsers(dest="device_command", metavar="ACTION", parser_class=type(p))
    dsub.required = True

    add = dsub.add_parser("add", help="create a device's credentials and print what to copy")
    add.add_argument("device_id", metavar="ID")
    _secure_arg(add)
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
    add.add_argument(
        "--site",
        metavar="NAME",
        default=None,
        help="at central: the device uses site NAME's broker (no credentials here; see docs/sites.md)",
    )
    add.set_defaults(func=run_add)

    lst = dsub.add_parser("list", help="list device identities")
    _secure_arg(lst)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=run_list)

    rm = dsub.add_parser("remove", help="revoke a device's credentials")
    rm.add_argument("device_id", metavar="ID")
    _secure_arg(rm)
    rm.set_defaults(func=run_remove)


def run_add(args: argparse.Namespace) -> int:
    if args.site is not None:
        return run_add_site_device(args)
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


def run_add_site_device(args: argparse.Namespace) -> int:
    if args.password or args.renew:
        raise BadInputError(
            "--password and --renew do not apply with --site (credentials are made at the site)"
        )
    central = CentralDir(args.secure)
    record = central.add_site_device(args.device_id, args.site)
    pid = central.reload_broker()
    sys.stdout.write(
        f"device {record.device_id}: reached through site {record.site}; no credentials here.\n"
        f"Now make its identity at the site: litefleet device add {record.device_id} --secure SITE_DIR\n"
        + reload_line(pid)
        + "\n"
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
        f"The same files are in {folder}/, with an agent.toml that names them beside it: without",
        f"systemd, `litefleet-agent run --config {folder}/agent.toml --trusted-root ROOT --state-dir DIR`",
        "runs the agent from that folder (or a copy of it) as it is.",
        f"The agent connects with client id = {bundle.device_id} (the broker enforces it): "
        "run one agent per identity.",
        reload_line(broker_pid),
    ]
    return "\n".join(lines) + "\n"


def run_list(args: argparse.Namespace) -> int:
    devices = SecureDir(args.secure).devices()
    if args.json:
        doc = [
            {
                "device_id": d.device_id,
                "auth": d.auth,
                "created": d.created,
                "serial": None if d.serial is None else format(d.serial, "x"),
                "not_after": d.not_after,
                "site": d.site,
            }
            for d in devices
        ]
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return 0
    if not devices:
        sys.stdout.write("no devices\n")
        return 0
    rows = [(d.device_id, d.auth, d.site or "-", d.created, d.not_after or "-") for d in devices]
    sys.stdout.write(format_table(("DEVICE", "AUTH", "SITE", "CREATED", "CERT EXPIRES"), rows))
    return 0


def run_remove(args: argparse.Namespace) -> int:
    secure = SecureDir(args.secure)
    try:
        record = secure.remove_device(args.device_id)
    except BadInputError:
        # removed before while no broker ran: its retained state may still be there to clear
        if secure.running_broker_pid() is None or not _clear_state(args):
            raise
        sys.stdout.write(f"device {args.device_id} had no identity left; its retained state is cleared.\n")
        return 0
    pid = secure.reload_broker()
    what = {
        AUTH_CERT: "its certificate is revoked (CRL)",
        AUTH_SITE: f"site {record.site}'s bridge no longer carries its topics",
    }.get(record.auth, "its password is deleted")
    lines = [f"device {record.device_id} removed: ACL entries gone, {what}."]
    if pid:
        lines.append(
            reload_line(
                pid,
                "new connections with the old credentials are refused; "
                "a session still open has no rights left",
            )
        )
        cleared = _clear_state(args)
        lines.append(
            "Its retained state is cleared: status and the monitor no longer list it."
            if cleared
            else "It had no retained state on the broker."
        )
    else:
        lines.append(
            reload_line(None) + " The device's last retained "
            "state stays with the broker's data, so status lists it (offline) until you run "
            f"`litefleet device remove {record.device_id} --secure {args.secure}` again with the "
            "broker running."
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _clear_state(args: argparse.Namespace) -> bool:
    """Delete the device's retained state through the host identity; True if there was one."""
    from converter.cli.host_mqtt import connect
    from converter.fleet.view import clear_state

    conn = argparse.Namespace(
        broker=None, prefix=None, ca_file=None, cert_file=None, key_file=None, password_file=None
    )
    conn.secure_dir = args.secure
    client, topics = connect(conn, "device")
    try:
        return clear_state(client, topics, args.device_id)
    finally:
        client.stop()
