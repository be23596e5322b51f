"""``litefleet rollout``: staged rollouts gated on what the new version does on the devices.

``start`` signs the first wave and (in the foreground, by default) drives the rollout to
its end: exit 0 promoted to 100 %, 1 aborted (one line: the gate and its values), 2 bad
usage, nothing signed. ``plan`` says what ``start`` would do. ``status``, ``pause``,
``resume``, ``abort`` act on recorded rollouts; ``service`` drives every rollout started
with ``--detach`` (``systemd/litefleet-rollout.service``). ``docs/rollouts.md`` has the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from agent.protocol import NAME_RE
from converter.cli.host_mqtt import add_broker_args
from converter.cli.push import add_check_data_arg, read_model_files, require_check_data, sidecars
from converter.cli.rollout_ops import register_ops
from converter.cli.rollout_run import close_controller, follow, open_controller, view_for
from converter.cli.rollout_view import LiveView
from converter.errors import BadInputError
from converter.repo.repository import Repository
from converter.repo.targets import ReleaseFiles
from converter.rollout.decide import new_record
from converter.rollout.gates import DEFAULT_GATES
from converter.rollout.plan import card_baseline, choose_versions
from converter.rollout.selection import KnownDevice, describe, plan_waves, selected
from converter.rollout.service import Controller, RolloutService
from converter.rollout.spec import (
    DEFAULT_BAKE_S,
    DEFAULT_MAX_WAIT_BAKES,
    DEFAULT_MIN_SAMPLES,
    DEFAULT_SHADOW_K,
    RolloutSpec,
    gate_settings,
    parse_duration,
    parse_waves,
)
from converter.rollout.store import DriverLock, RolloutStore


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, metavar="MODEL.tflite")
    p.add_argument("--repo", type=Path, required=True, help="repository folder (litefleet repo init)")
    p.add_argument("--name", required=True, help="model name, e.g. digits")
    p.add_argument("--target", default="all", help="all | group:G (default: all)")
    p.add_argument(
        "--waves", default="5,25,100", help="canary percentages, increasing, ending at 100 (default 5,25,100)"
    )
    p.add_argument(
        "--bake", default=f"{DEFAULT_BAKE_S / 60:g}m", help="how long each wave is watched (default 10m)"
    )
    p.add_argument(
        "--max-wait",
        help="how long a wave may wait for enough samples before it holds "
        f"(default {DEFAULT_MAX_WAIT_BAKES:g}x bake)",
    )
    p.add_argument(
        "--min-samples",
        type=int,
        default=DEFAULT_MIN_SAMPLES,
        help=f"samples a gate needs before it passes or fails (default {DEFAULT_MIN_SAMPLES})",
    )
    p.add_argument(
        "--shadow-k",
        type=int,
        default=DEFAULT_SHADOW_K,
        help="canaries also run the previous version on 1 in K requests "
        f"(default {DEFAULT_SHADOW_K}; 0: none)",
    )
    p.add_argument(
        "--gate",
        action="append",
        default=[],
        metavar="EXPR",
        help="'NAME OP NUMBER' (OP <=, >=, <, >) replaces a default, 'NAME=off' disables a gate; gates: "
        + ", ".join(f"{s.describe()}" for s in DEFAULT_GATES.values()),
    )
    p.add_argument("--json", action="store_true", help="print the final record (plan: the plan) as JSON")
    add_check_data_arg(p)
    add_broker_args(p)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "rollout",
        help="staged rollouts: promote or abort on live health, latency and agreement",
        description="Roll a new model version out in waves, watching what it does on the devices.",
    )
    rsub = p.add_subparsers(dest="rollout_command", metavar="ACTION")
    rsub.required = True

    start = rsub.add_parser("start", help="sign the first wave and drive the rollout to its end")
    _spec_args(start)
    start.add_argument(
        "--detach", action="store_true", help="record it for `litefleet rollout service` and return"
    )
    start.add_argument(
        "--allow-empty", action="store_true", help="start even if the first wave selects no known device"
    )
    start.set_defaults(func=run_start)

    plan = rsub.add_parser("plan", help="say which known devices each wave would select; sign nothing")
    _spec_args(plan)
    plan.set_defaults(func=run_plan)

    service = rsub.add_parser("service", help="drive every rollout started with --detach (systemd service)")
    service.add_argument("--repo", type=Path, required=True)
    add_broker_args(service)
    service.set_defaults(func=run_service, log_info=True)  # a service's journal says what it does
    register_ops(rsub)


# -- shared -------------------------------------------------------------------------------------


def spec_from_args(args: argparse.Namespace) -> RolloutSpec:
    if not NAME_RE.match(args.name):
        raise BadInputError(
            f"model name {args.name!r} must be 1-63 lowercase letters, digits, '.', '_' or '-'"
        )
    if args.target.startswith("device:"):
        raise BadInputError("--target device:ID has no waves; push to one device with `litefleet push`")
    waves = parse_waves(args.waves)
    bake = parse_duration(args.bake, "--bake")
    max_wait = parse_duration(args.max_wait, "--max-wait") if args.max_wait else bake * DEFAULT_MAX_WAIT_BAKES
    return RolloutSpec(
        name=args.name,
        target=args.target,
        waves=waves,
        bake_s=bake,
        max_wait_s=max_wait,
        min_samples=args.min_samples,
        shadow_k=args.shadow_k,
        gates=gate_settings(args.gate),
    )


# -- start and plan --------------------------------------------------------------------------------


def _prepare(args: argparse.Namespace) -> tuple[RolloutSpec, ReleaseFiles, dict[str, Any] | None, int, int]:
    """Everything ``start`` and ``plan`` check before touching the broker."""
    spec = spec_from_args(args)
    model, card, golden = read_model_files(args.model)
    require_check_data(args, card, golden)
    baseline = card_baseline(card, str(sidecars(args.model)[0]))
    repo = Repository.open(args.repo)
    version, previous = choose_versions(
        spec.name, repo.model_releases(spec.name), repo.state.latest_version(spec.name), spec.target
    )
    return spec, ReleaseFiles(model, card, golden), baseline, version, previous


def _wave_lines(spec: RolloutSpec, devices: list[KnownDevice]) -> list[str]:
    lines = []
    for i, w in enumerate(plan_waves(spec.target, spec.waves, spec.name, devices)):
        lines.append(
            f"  wave {i + 1} ({w.canary_pct} % of {spec.target}): "
            + describe(spec.rule(i), spec.name, devices)
        )
    return lines


def run_plan(args: argparse.Namespace) -> int:
    spec, _files, baseline, version, previous = _prepare(args)
    controller = open_controller(args, "plan", persistent=False)
    try:
        devices = controller.known_devices()
    finally:
        close_controller(controller)
    plans = plan_waves(spec.target, spec.waves, spec.name, devices)
    if args.json:
        doc = {
            "name": spec.name,
            "version": version,
            "previous": previous,
            "known_devices": len(devices),
            "spec": spec.to_json(),
            "waves": [
                {
                    "canary_pct": w.canary_pct,
                    "selected": list(w.selected),
                    "count": len(w.selected),
                    "in_target": w.in_target,
                }
                for w in plans
            ],
            "card_baseline": baseline is not None,
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return 0
    out = [f"rollout of {spec.name} v{version} (from v{previous}), {len(devices)} known devices:"]
    out += _wave_lines(spec, devices)
    out.append(
        f"  each wave bakes {args.bake}; gates: " + ", ".join(s.describe() for s in spec.gates.values())
    )
    if not baseline:
        out.append("  the card has no output_baseline: drift_baseline_js is skipped")
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def _running(store: RolloutStore, name: str) -> str | None:
    existing = store.load(name)
    if existing is None or existing.state.terminal:
        return None
    return (
        f"a rollout of {name} (v{existing.version}, {existing.state.value}, wave {existing.wave + 1} of "
        f"{len(existing.spec.waves)}) is not finished; see `litefleet rollout status`, "
        "then resume or abort it"
    )


def run_start(args: argparse.Namespace) -> int:
    spec, files, baseline, version, previous = _prepare(args)
    store = RolloutStore(args.repo)
    lock = store.try_lock(spec.name)
    if lock is None:
        raise BadInputError(
            f"a rollout of {spec.name} is being driven by process {store.driver_pid(spec.name)}"
        )
    try:
        problem = _running(store, spec.name)
        if problem:
            raise BadInputError(problem)
        view = view_for(args)
        controller = open_controller(args, f"rollout-{spec.name}", view)
        try:
            return _start(args, spec, files, baseline, version, previous, store, controller, lock, view)
        finally:
            close_controller(controller)
    finally:
        lock.release()  # no-op once the controller owns it


def _start(
    args: argparse.Namespace,
    spec: RolloutSpec,
    files: ReleaseFiles,
    baseline: dict[str, Any] | None,
    version: int,
    previous: int,
    store: RolloutStore,
    controller: Controller,
    lock: DriverLock,
    view: LiveView,
) -> int:
    devices = controller.known_devices()
    first = spec.rule(0)
    if not selected(first, spec.name, devices) and not args.allow_empty:
        raise BadInputError(
            f"the first wave ({first.canary_pct} % of {first.target}) {describe(first, spec.name, devices)}; "
            "choose a larger first wave, or pass --allow-empty; nothing was signed"
        )
    (sys.stderr if args.json else sys.stdout).write(
        f"rolling out {spec.name} v{version} (from v{previous}), {len(devices)} known devices:\n"
        + "\n".join(_wave_lines(spec, devices))
        + "\n"
    )
    store.stage_files(spec.name, files)
    record = new_record(
        spec,
        version=version,
        previous=previous,
        model_sha256=hashlib.sha256(files.model).hexdigest(),
        now=time.time(),
        detached=args.detach,
        baseline=baseline,
    )
    store.save(record)
    if args.detach:
        sys.stdout.write(
            f"recorded rollout {spec.name} v{version}; `litefleet rollout service` "
            "(litefleet-rollout.service) "
            "drives it; follow it with `litefleet rollout status`\n"
        )
        return 0
    controller.adopt(record, lock)
    return follow(controller, spec.name, args, view)


# -- the service -------------------------------------------------------------------------------------


def run_service(args: argparse.Namespace) -> int:
    from agent.service.sdnotify import Notifier

    stopping: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    notifier = Notifier()
    controller = open_controller(args, "service")
    try:
        service = RolloutService(controller)
        notifier.ready(f"watching {args.repo} for detached rollouts")

        def tick() -> None:
            notifier.watchdog()
            driven = ", ".join(f"{n} {d.record.state.value}" for n, d in controller.drivers.items())
            notifier.status(f"driving: {driven}" if driven else "idle: no detached rollout")

        service.run(until=lambda: bool(stopping), tick=tick)
        notifier.stopping("stopping")
    finally:
        close_controller(controller)
    return 0
