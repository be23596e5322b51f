"""``litefleet site add|list|remove --secure CENTRAL_DIR``: site identities at central.

``add NAME`` issues the site's two certificates from central's CA (its bridge's
and its prune's), writes the uplink bundle ``CENTRAL_DIR/sites/NAME/``, grants
the site its own status topics, reloads a running central broker and prints how
to start the site broker. Devices join a site at central with ``litefleet device
add ID --site NAME --secure CENTRAL_DIR`` (first), then at the site with
``litefleet device add ID --secure SITE_DIR``. ``remove NAME`` revokes both
certificates and the grants of its devices. See docs/sites.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from converter.broker.registry import site_identity, site_sync_identity
from converter.broker.sites import CentralDir, SiteBundle
from converter.cli.reloaded import reload_line
from converter.cli.table import format_table

DESCRIPTION = (
    "add NAME issues the site's two certificates from central's CA (its bridge's and its "
    "prune's), writes the uplink bundle CENTRAL_DIR/sites/NAME/, grants the site its own status "
    "topics, reloads a running central broker and prints how to start the site broker. Devices "
    "join a site at central with 'litefleet device add ID --site NAME --secure CENTRAL_DIR' "
    "(first), then at the site with 'litefleet device add ID --secure SITE_DIR'. remove NAME "
    "revokes both certificates and the grants of its devices. See docs/sites.md."
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "site",
        help="add, list or remove site brokers bridged to this (--secure) broker",
        description=DESCRIPTION,
    )
    ssub = p.add_subparsers(dest="site_command", metavar="ACTION", parser_class=type(p))
    ssub.required = True

    add = ssub.add_parser("add", help="issue a site's identity and print how to start its broker")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--secure", metavar="CENTRAL_DIR", type=Path, required=True)
    add.add_argument(
        "--renew",
        action="store_true",
        help="new certificates for an existing site (the old ones are revoked)",
    )
    add.set_defaults(func=run_add)

    lst = ssub.add_parser("list", help="list sites and how many devices each has")
    lst.add_argument("--secure", metavar="CENTRAL_DIR", type=Path, required=True)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=run_list)

    rm = ssub.add_parser("remove", help="revoke a site's identity and its devices' grants")
    rm.add_argument("name", metavar="NAME")
    rm.add_argument("--secure", metavar="CENTRAL_DIR", type=Path, required=True)
    rm.set_defaults(func=run_remove)


def run_add(args: argparse.Namespace) -> int:
    central = CentralDir(args.secure)
    bundle = central.add_site(args.name, renew=args.renew)
    pid = central.reload_broker()
    sys.stdout.write(format_site_bundle(bundle, pid))
    return 0


def format_site_bundle(bundle: SiteBundle, broker_pid: int | None) -> str:
    name = bundle.record.name
    lines = [
        f"site {name}: bridge identity {site_identity(name)}, prune identity {site_sync_identity(name)} "
        f"(serials {bundle.record.serial:x}, {bundle.record.sync_serial:x})",
        "",
        f"1. Copy {bundle.folder}/ onto the site host as SITE_DIR/uplink/ (owner only, mode 0700):",
        "   it holds central's CA certificate and the site's two keys.",
        "2. Start the site broker there (devices at the site connect to it, not to central):",
        f"   litefleet broker --secure SITE_DIR --upstream {bundle.info.upstream} \\",
        "       --bind 0.0.0.0 --san SITE_HOST",
        "   (central's server certificate must name the host in --upstream: `litefleet broker --san`).",
        "3. For each device of the site, first here, then at the site:",
        f"   litefleet device add ID --site {name} --secure {Path(bundle.folder).parents[1]}",
        "   litefleet device add ID --secure SITE_DIR",
        reload_line(broker_pid),
    ]
    return "\n".join(lines) + "\n"


def run_list(args: argparse.Namespace) -> int:
    registry = CentralDir(args.secure).load()
    if args.json:
        doc = [
            {
                "site": s.name,
                "created": s.created,
                "serial": format(s.serial, "x"),
                "sync_serial": format(s.sync_serial, "x"),
                "not_after": s.not_after,
                "devices": list(registry.site_devices(s.name)),
            }
            for s in registry.sites
        ]
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return 0
    if not registry.sites:
        sys.stdout.write("no sites\n")
        return 0
    rows = [(s.name, str(len(registry.site_devices(s.name))), s.created, s.not_after) for s in registry.sites]
    sys.stdout.write(format_table(("SITE", "DEVICES", "CREATED", "CERT EXPIRES"), rows))
    return 0


def run_remove(args: argparse.Namespace) -> int:
    central = CentralDir(args.secure)
    record, devices = central.remove_site(args.name)
    pid = central.reload_broker()
    sys.stdout.write(
        f"site {record.name} removed: both certificates revoked (CRL), "
        f"{len(devices)} devices' grants gone.\n"
        + reload_line(pid, "an open bridge session has no rights left")
        + "\n"
    )
    return 0
