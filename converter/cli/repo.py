"""``litefleet repo``: create, inspect, re-sign and republish a model repository."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from converter.cli.host_mqtt import add_broker_args, connect
from converter.cli.progress import ProgressBar
from converter.cli.table import format_table
from converter.errors import BadInputError
from converter.repo.expiry import expiry_warnings, needs_root_signature
from converter.repo.publish import RepoPublisher
from converter.repo.repository import DEFAULT_EXPIRY_DAYS, Repository
from converter.repo.signing import RootKeysNeededError, now_utc
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
    init.add_argument(
        "--root-keys",
        type=Path,
        metavar="DIR",
        help="write the root keys into DIR (an empty folder on removable media) instead of beside "
        "the online keys; rotate and root re-signing then ask for it",
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
    _root_keys_arg(rotate)
    add_broker_args(rotate, required=False)
    rotate.set_defaults(func=run_rotate)

    resign = rsub.add_parser(
        "resign",
        help="sign new metadata versions with fresh expiry dates (root too when its expiry is near)",
    )
    resign.add_argument("dir", type=Path)
    _root_keys_arg(resign)
    add_broker_args(resign, required=False)
    resign.set_defaults(func=run_resign)


def _root_keys_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root-keys",
        type=Path,
        metavar="DIR",
        help="the folder with the root keys, for a repository made with repo init --root-keys "
        "(needed only when root is signed: a rotation, or root's expiry near)",
    )


def _open(args: argparse.Namespace) -> Repository:
    repo = Repository.open(args.dir)
    if getattr(args, "root_keys", None) is not None:
        repo.use_root_keys(args.root_keys)
    return repo


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
        args.dir,
        keys=args.keys,
        threshold=args.threshold,
        expiry_days=_parse_expiry(args.expiry_days),
        root_keys=args.root_keys,
    )
    if args.root_keys is not None:
        keys = (
            f"  signing keys: {args.dir / 'keys'} (owner-only: targets, snapshot, timestamp)\n"
            f"  root keys:    {args.root_keys / 'root'} (offline: keep this folder on removable "
            "media, away from this machine; repo rotate and root re-signing ask for it)\n"
        )
    else:
        keys = (
            f"  signing keys: {args.dir / 'keys'} (owner-only; the root keys too: "
            "repo init --root-keys DIR keeps them elsewhere)\n"
        )
    sys.stdout.write(
        f"created repository {args.dir}\n"
        + keys
        + f"  give devices: {args.dir / 'root.json'} as trusted_root\n"
        f"  expiry (days): {json.dumps(repo.state.expiry_days.to_json())}; re-sign well inside "
        f"them: litefleet repo resign {args.dir} (a timer)\n"
    )
    return 0


def expiry_notes(repo: Repository, now: datetime | None = None) -> list[str]:
    """One warning line per role whose signed expiry is near or past, with what to run."""
    expires = {
        "root": repo.root.signed.expires,
        "targets": repo.targets.signed.expires,
        "snapshot": repo.snapshot.signed.expires,
        "timestamp": repo.timestamp.signed.expires,
    }
    lines = []
    for w in expiry_warnings(expires, now or now_utc(), repo.state.expiry_days):
        fix = f"litefleet repo resign {repo.dir}" + (
            " --root-keys DIR" if w.role == "root" and repo.state.root_keys_offline else ""
        )
        lines.append(f"{w.describe()}: run `{fix}`")
    return lines


def run_show(args: argparse.Namespace) -> int:
    repo = Repository.open(args.dir)
    releases = [
        (name, version, rollout)
        for name in repo.model_names()
        for version, rollout in sorted(repo.model_releases(name).items())
    ]
    notes = expiry_notes(repo)
    if args.json:
        doc = {
            "targets_version": repo.targets.signed.version,
            "timestamp_expires": repo.timestamp.signed.expires.isoformat(),
            "expires": {
                "root": repo.root.signed.expires.isoformat(),
                "targets": repo.targets.signed.expires.isoformat(),
                "snapshot": repo.snapshot.signed.expires.isoformat(),
                "timestamp": repo.timestamp.signed.expires.isoformat(),
            },
            "warnings": notes,
            "root_keys": "offline" if repo.state.root_keys_offline else "online",
            "releases": [
                {"name": name, "version": version, "target": r.target, "canary_pct": r.canary_pct}
                for name, version, r in releases
            ],
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        _warn(notes)
        return 0
    sys.stdout.write(
        f"repository {args.dir}: targets v{repo.targets.signed.version}, "
        f"timestamp expires {repo.timestamp.signed.expires:%Y-%m-%d %H:%M} UTC, "
        f"root v{repo.root.signed.version} expires {repo.root.signed.expires:%Y-%m-%d}, root keys "
        + ("offline\n" if repo.state.root_keys_offline else f"in {repo.keys_dir / 'root'}\n")
    )
    if releases:
        cells = [
            (name, f"v{version}", r.target + (f" (canary {r.canary_pct}%)" if r.canary_pct < 100 else ""))
            for name, version, r in releases
        ]
        sys.stdout.write(format_table(("MODEL", "VERSION", "ROLLOUT"), cells, indent="  "))
    if repo.state.pending_uploads:
        sys.stdout.write("  not yet published: " + ", ".join(repo.state.pending_uploads) + "\n")
    _warn(notes)
    return 0


def _warn(lines: list[str]) -> None:
    for line in lines:
        sys.stderr.write(f"litefleet: warning: {line}\n")


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
    repo = _open(args)
    publish = bool(args.broker or args.secure_dir)
    root_note, root_missing = "", False
    if needs_root_signature(repo.root.signed.expires, now_utc(), repo.state.expiry_days):
        try:
            repo.resign_root()
            root_note = f"; root v{repo.root.signed.version} expires {repo.root.signed.expires:%Y-%m-%d}"
        except RootKeysNeededError:
            root_missing = True  # the rest is re-signed all the same: the timestamp cannot wait
    plan = repo.resign()
    if publish:
        _publish(repo, args, repo.pending_uploads(), plan)
    sys.stdout.write(
        f"signed targets v{repo.targets.signed.version}; timestamp expires "
        f"{repo.timestamp.signed.expires:%Y-%m-%d %H:%M} UTC{root_note}"
        + ("; published\n" if publish else "; publish with `litefleet repo publish`\n")
    )
    if not root_missing:
        return 0
    root = [w for w in expiry_warnings({"root": repo.root.signed.expires}, now_utc(), repo.state.expiry_days)]
    line = (
        f"{root[0].describe()}; signing it needs the root keys, kept offline: run "
        f"`litefleet repo resign {args.dir} --root-keys DIR` with their folder"
    )
    if root[0].expired:
        sys.stderr.write(f"litefleet: error: {line}\n")
        return 1
    _warn([line])
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    repo = _open(args)
    plan = repo.rotate(args.role, keys=args.keys, threshold=args.threshold)
    published = bool(args.broker or args.secure_dir)
    if published:
        _publish(repo, args, repo.pending_uploads(), plan)
    retired = (
        repo.root_keys_dir if args.role == "root" and repo.root_keys_dir else repo.keys_dir
    ) / "retired"
    sys.stdout.write(
        f"rotated the {args.role} keys: root v{repo.root.signed.version}, "
        f"targets v{repo.targets.signed.version}; old keys moved to {retired} "
        "(destroy them)" + ("; published\n" if published else "; publish with `litefleet repo publish`\n")
    )
    return 0
