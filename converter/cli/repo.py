"""``litefleet repo``: create, inspect, re-sign and republish a model repository."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from converter.cli.host_mqtt import add_broker_args, connect
from converter.cli.progress import ProgressBar
from converter.cli.table import format_table
from converter.errors import BadInputError
from converter.repo.publish import RepoPublisher
from converter.repo.repository import DEFAULT_EXPIRY_DAYS, Repository
from converter.repo.targets import PublishPlan, TargetUpload


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("repo", help="manage the signed model repository")
    rsub = p.add_subparsers(dest="repo_command", metavar="ACTION")
    rsub.required = True

    init = rsub.add_parser("init", help="create keys and the first signed metadata")
    init.add_argument("dir", type=Path)
    init.add_argument("--keys", type=int, default=1, help="keys per role (default 1)")
    init.add_argument("--threshold", type=int, default=1, help="signatures needed per role (default 1)")
    init.add_argument(
        "--expiry-days",
        action="append",
        default=[],
        metavar="ROLE=DAYS",
        help="expiry of a role's metadata, e.g. timestamp=7 (defaults: "
        + ", ".join(f"{k}={v}" for k, v in DEFAULT_EXPIRY_DAYS.items())
        + ")",
    )
    init.set_defaults(func=run_init)

    show = rsub.add_parser("show", help="list the models, versions and rollouts in the repository")
    show.add_argument("dir", type=Path)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=run_show)

    pub = rsub.add_parser("publish", help="(re)publish the whole repository to a broker")
    pub.add_argument("dir", type=Path)
    add_broker_args(pub)
    pub.set_defaults(func=run_publish)

    rotate = rsub.add_parser("rotate", help="replace the keys of a role (root, targets, snapshot, timestamp)")
    rotate.add_argument("dir", type=Path)
    rotate.add_argument("role", choices=("root", "targets", "snapshot", "timestamp"))
    rotate.add_argument("--keys", type=int, help="number of new keys (default: as many as now)")
    rotate.add_argument("--threshold", type=int, help="signatures needed (default: as now)")
    add_broker_args(rotate, required=False)
    rotate.set_defaults(func=run_rotate)

    resign = rsub.add_parser("resign", help="sign new metadata versions with fresh expiry dates")
    resign.add_argument("dir", type=Path)
    add_broker_args(resign, required=False)
    resign.set_defaults(func=run_resign)


def _parse_expiry(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        role, _, days = item.partition("=")
        if role not in DEFAULT_EXPIRY_DAYS or not days.isdigit() or int(days) < 1:
            raise BadInputError(
                f"--expiry-days {item!r}: expected ROLE=DAYS with ROLE one of "
                f"{', '.join(DEFAULT_EXPIRY_DAYS)}"
            )
        out[role] = int(days)
    return out


def run_init(args: argparse.Namespace) -> int:
    repo = Repository.init(
        args.dir, keys=args.keys, threshold=args.threshold, expiry_days=_parse_expiry(args.expiry_days)
    )
    sys.stdout.write(
        f"created repository {args.dir}\n"
        f"  signing keys: {args.dir / 'keys'} (owner-only; keep the root keys offline)\n"
        f"  give devices: {args.dir / 'root.json'} as trusted_root\n"
        f"  expiry (days): {json.dumps(repo.state.expiry_days.to_json())}\n"
    )
    return 0


def run_show(args: argparse.Namespace) -> int:
    repo = Repository.open(args.dir)
    releases = [
        (name, version, rollout)
        for name in repo.model_names()
        for version, rollout in sorted(repo.model_releases(name).items())
    ]
    if args.json:
        doc = {
            "targets_version": repo.targets.signed.version,
            "timestamp_expires": repo.timestamp.signed.expires.isoformat(),
            "releases": [
                {"name": name, "version": version, "target": r.target, "canary_pct": r.canary_pct}
                for name, version, r in releases
            ],
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return 0
    sys.stdout.write(
        f"repository {args.dir}: targets v{repo.targets.signed.version}, "
        f"timestamp expires {repo.timestamp.signed.expires:%Y-%m-%d %H:%M} UTC\n"
    )
    if releases:
        cells = [
            (name, f"v{version}", r.target + (f" (canary {r.canary_pct}%)" if r.canary_pct < 100 else ""))
            for name, version, r in releases
        ]
        sys.stdout.write(format_table(("MODEL", "VERSION", "ROLLOUT"), cells, indent="  "))
    if repo.state.pending_uploads:
        sys.stdout.write("  not yet published: " + ", ".join(repo.state.pending_uploads) + "\n")
    return 0


def _publish(
    repo: Repository, args: argparse.Namespace, uploads: list[TargetUpload], plan: PublishPlan | None = None
) -> None:
    client, topics = connect(args, "publish")
    try:
        bar = ProgressBar("publishing")
        publisher = RepoPublisher(client, topics)
        try:
            publisher.upload(uploads, bar)
        finally:
            bar.close()
        publisher.publish_metadata(repo.current_metadata())
        if plan is not None:
            publisher.clear(plan)
        publisher.sweep_metadata(repo.retained_metadata_names())
        repo.mark_published()
    finally:
        client.stop()


def run_publish(args: argparse.Namespace) -> int:
    repo = Repository.open(args.dir)
    uploads = repo.all_uploads()
    _publish(repo, args, uploads)
    sys.stdout.write(
        f"published {len(uploads)} target files and metadata (targets v{repo.targets.signed.version})\n"
    )
    return 0


def run_resign(args: argparse.Namespace) -> int:
    repo = Repository.open(args.dir)
    plan = repo.resign()
    if args.broker or args.secure_dir:
        _publish(repo, args, repo.pending_uploads(), plan)
    sys.stdout.write(
        f"signed targets v{repo.targets.signed.version}; timestamp expires "
        f"{repo.timestamp.signed.expires:%Y-%m-%d %H:%M} UTC"
        + ("; published\n" if args.broker or args.secure_dir else "; publish with `litefleet repo publish`\n")
    )
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    repo = Repository.open(args.dir)
    plan = repo.rotate(args.role, keys=args.keys, threshold=args.threshold)
    published = bool(args.broker or args.secure_dir)
    if published:
        _publish(repo, args, repo.pending_uploads(), plan)
    sys.stdout.write(
        f"rotated the {args.role} keys: root v{repo.root.signed.version}, "
        f"targets v{repo.targets.signed.version}; old keys moved to {args.dir / 'keys' / 'retired'} "
        "(destroy them)" + ("; published\n" if published else "; publish with `litefleet repo publish`\n")
    )
    return 0
