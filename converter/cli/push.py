"""``litefleet push``: sign a model into the repository and publish it to the fleet."""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from agent.errors import ModelRejectedError, TransportError
from agent.model_card import parse_card
from agent.protocol import ProtocolError, Rollout
from converter.cli.host_mqtt import add_broker_args, connect
from converter.cli.progress import ProgressBar
from converter.errors import BadInputError
from converter.fleet.view import collect_states
from converter.repo.lock import signing_lock
from converter.repo.publish import RepoPublisher
from converter.repo.repository import Repository
from converter.rollout.selection import KnownDevice, describe


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "push",
        help="sign a model and publish it to the fleet",
        description="Sign MODEL.tflite (with MODEL.card.json and MODEL.golden.npz when "
        "they lie beside it) into the repository and publish it over MQTT.",
    )
    p.add_argument("model", type=Path, metavar="MODEL.tflite")
    p.add_argument("--repo", type=Path, required=True, help="repository folder (litefleet repo init)")
    p.add_argument("--name", required=True, help="model name, e.g. digits")
    p.add_argument("--version", type=int, help="version number (default: the next one)")
    p.add_argument("--target", default="all", help="all | group:G | device:ID (default: all)")
    p.add_argument(
        "--canary",
        type=int,
        default=100,
        metavar="PCT",
        help="only this percentage of the targeted devices, chosen by a stable hash (default 100)",
    )
    add_check_data_arg(p)
    add_broker_args(p)
    p.set_defaults(func=run)


# what a device cannot check without each sidecar (docs/protocol.md 7.2)
LOST_WITHOUT = {
    "card": "its inputs and outputs against the model card",
    "golden vectors": "its outputs against the golden vectors (only that it runs once on zeros)",
}


def add_check_data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-check-data",
        action="store_true",
        help="publish a model without its card or golden vectors (devices then only check that it "
        "loads and runs once on zeros, not that its inputs, outputs and results are right)",
    )


def require_check_data(args: argparse.Namespace, card: bytes | None, golden: bytes | None) -> None:
    """Refuse a model without its card or golden vectors unless --no-check-data says so (then warn)."""
    lost = missing_check_data(args.model, card, golden)
    if lost and not args.no_check_data:
        raise BadInputError(
            f"{lost}. `litefleet convert` writes both; --no-check-data publishes it without them"
        )
    if lost:
        sys.stderr.write(f"litefleet: warning: {lost}\n")


def missing_check_data(model: Path, card: bytes | None, golden: bytes | None) -> str | None:
    """What the pre-activation check would lose, in words, or None when nothing is missing."""
    card_path, golden_path = sidecars(model)
    missing = [
        (n, p)
        for n, p, d in (("card", card_path, card), ("golden vectors", golden_path, golden))
        if d is None
    ]
    if not missing:
        return None
    names = " and ".join(f"no {n} ({p.name})" for n, p in missing)
    lost = "; ".join(LOST_WITHOUT[n] for n, _ in missing)
    return f"{model} has {names} beside it: devices could not check {lost}"


def sidecars(model: Path) -> tuple[Path, Path]:
    stem = model.name[: -len(".tflite")] if model.name.endswith(".tflite") else model.stem
    return model.with_name(f"{stem}.card.json"), model.with_name(f"{stem}.golden.npz")


def read_model_files(model: Path) -> tuple[bytes, bytes | None, bytes | None]:
    try:
        data = model.read_bytes()
    except FileNotFoundError as exc:
        raise BadInputError(f"{model} does not exist") from exc
    except OSError as exc:
        raise BadInputError(f"cannot read {model}: {exc.strerror}") from exc
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise BadInputError(f"{model} is not a TF Lite model (no TFL3 identifier)")
    card_path, golden_path = sidecars(model)
    card = card_path.read_bytes() if card_path.exists() else None
    golden = golden_path.read_bytes() if golden_path.exists() else None
    if card is not None:
        try:
            parsed = parse_card(card)
        except ModelRejectedError as exc:
            raise BadInputError(f"{card_path}: {exc}") from exc
        if parsed.tflite_sha256 and parsed.tflite_sha256 != hashlib.sha256(data).hexdigest():
            raise BadInputError(f"{card_path} describes a different model file than {model}")
    if golden is not None and not golden.startswith(b"PK"):
        raise BadInputError(f"{golden_path} is not an .npz file")
    return data, card, golden


def run(args: argparse.Namespace) -> int:
    try:
        rollout = Rollout(args.target, args.canary)
    except ProtocolError as exc:
        raise BadInputError(str(exc)) from exc
    model, card, golden = read_model_files(args.model)
    require_check_data(args, card, golden)
    repo = Repository.open(args.repo)
    client, topics = connect(args, "push")
    started = time.monotonic()
    try:
        # before anything is signed: which known devices this rule selects (issue 10: a
        # `--canary 50` on a fleet of two selected neither, and nothing said so)
        devices = [KnownDevice(r["device_id"], tuple(r["groups"])) for r in collect_states(client, topics)]
        version = args.version or repo.next_version(args.name)
        sys.stdout.write(f"{args.name} v{version} for {rollout.target}")
        sys.stdout.write(f" (canary {rollout.canary_pct} %): " if rollout.canary_pct < 100 else ": ")
        sys.stdout.write(describe(rollout, args.name, devices) + "\n")
        with signing_lock(args.repo):
            repo = Repository.open(args.repo)  # as it is now that we hold the lock
            # (held until published: mark_published writes repo.json too)
            result = repo.add_release(
                args.name, model, card=card, golden=golden, version=args.version, rollout=rollout
            )
            if result.unchanged:
                sys.stdout.write(f"{args.name} v{result.version} already published with this rollout\n")
            bar = ProgressBar(f"pushing {args.name} v{result.version}")
            publisher = RepoPublisher(client, topics)
            try:
                publisher.apply(
                    result.plan,
                    repo.pending_uploads(result.plan.uploads),
                    repo.current_metadata(),
                    repo.retained_metadata_names(),
                    bar,
                )
            except TransportError as exc:
                raise TransportError(
                    f"{exc}; the repository is signed but not fully published: run "
                    f"`litefleet repo publish {args.repo} --broker ...` or push again"
                ) from exc
            finally:
                bar.close()
            repo.mark_published()
    finally:
        client.stop()
    parts = [f"{args.name} v{result.version} -> {rollout.target}"]
    if rollout.canary_pct < 100:
        parts.append(f"canary {rollout.canary_pct}%")
    parts.append(f"{len(model)} bytes")
    extras = [n for n, d in (("card", card), ("golden vectors", golden)) if d is not None]
    if extras:
        parts.append("with " + " and ".join(extras))
    if result.removed_versions:
        parts.append("retired v" + ", v".join(map(str, result.removed_versions)))
    parts.append(f"targets metadata v{result.targets_version}")
    parts.append(f"{time.monotonic() - started:.2f} s")
    sys.stdout.write("pushed " + "; ".join(parts) + "\n")
    return 0
