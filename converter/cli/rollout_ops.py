"""``litefleet rollout status|pause|resume|abort``: act on recorded rollouts.

A rollout driven by a live process (its foreground ``start``/``resume``, or the service)
is asked through a request file, which that process applies; one nobody drives is changed
here, under its driver lock (``converter.rollout.store``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from converter.cli.host_mqtt import add_broker_args
from converter.cli.rollout_run import close_controller, follow, open_controller, report, view_for
from converter.cli.rollout_view import final_line, status_table
from converter.errors import BadInputError
from converter.rollout.decide import Request, with_request
from converter.rollout.record import RolloutRecord, RolloutState
from converter.rollout.spec import parse_duration
from converter.rollout.store import RolloutStore


def register_ops(rsub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = rsub.add_parser("status", help="the recorded rollouts and their gates")
    status.add_argument("name", nargs="?", help="only this model")
    status.add_argument("--repo", type=Path, required=True)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=run_status)

    pause = rsub.add_parser("pause", help="stop promoting (the rollout is still watched)")
    pause.add_argument("name")
    pause.add_argument("--repo", type=Path, required=True)
    pause.set_defaults(func=run_pause)

    resume = rsub.add_parser(
        "resume", help="continue a paused or held rollout (a fresh bake), or drive one nobody drives"
    )
    resume.add_argument("name")
    resume.add_argument("--repo", type=Path, required=True)
    resume.add_argument("--json", action="store_true", help="print the final record as JSON")
    add_broker_args(resume, required=False)
    resume.set_defaults(func=run_resume)

    abort = rsub.add_parser("abort", help="send every device that took the new version back")
    abort.add_argument("name")
    abort.add_argument("--repo", type=Path, required=True)
    abort.add_argument(
        "--wait", default="60s", help="how long to wait for a driving process to abort (default 60s)"
    )
    add_broker_args(abort, required=False)
    abort.set_defaults(func=run_abort)


def _existing(store: RolloutStore, name: str) -> RolloutRecord:
    record = store.load(name)
    if record is None:
        raise BadInputError(f"no rollout of {name} is recorded in {store.dir}")
    return record


def _has_broker(args: argparse.Namespace) -> bool:
    import os

    return bool(args.broker or args.secure_dir or os.environ.get("LITEFLEET_SECURE_DIR"))


def run_status(args: argparse.Namespace) -> int:
    store = RolloutStore(args.repo)
    names = [args.name] if args.name else store.names()
    entries = []
    for name in names:
        record = store.load(name)
        if record is None:
            raise BadInputError(f"no rollout of {name} is recorded in {store.dir}")
        entries.append((record, None if record.state.terminal else store.driver_pid(name)))
    if args.json:
        doc = [
            {
                **record.to_wire(),
                "detached": record.detached,
                "driver_pid": pid,
                "waves_done": [w.to_json() for w in record.waves],
                "steps": [s.to_json() for s in record.steps],
            }
            for record, pid in entries
        ]
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return 0
    if not entries:
        sys.stdout.write(f"no rollouts recorded in {store.dir}\n")
        return 0
    sys.stdout.write(status_table(entries, time.time()))
    return 0


def _ask(store: RolloutStore, name: str, request: Request, pid: int | None) -> None:
    store.put_request(name, request)
    sys.stdout.write(f"asked the process driving rollout {name} (pid {pid}) to {request.value} it\n")


def run_pause(args: argparse.Namespace) -> int:
    store = RolloutStore(args.repo)
    record = _existing(store, args.name)
    if record.state.terminal:
        raise BadInputError(
            f"rollout {args.name} v{record.version} is {record.state.value}; nothing to pause"
        )
    with store.locked(args.name) as lock:
        if lock is None:
            _ask(store, args.name, Request.PAUSE, store.driver_pid(args.name))
            return 0
        paused = with_request(record, Request.PAUSE, time.time())
        if paused is record:
            raise BadInputError(
                f"rollout {args.name} is {record.state.value}; only a baking or held rollout pauses"
            )
        store.save(paused)
    sys.stdout.write(
        f"paused rollout {args.name} v{record.version} (nobody drives it now; `resume` continues it)\n"
    )
    return 0


def run_resume(args: argparse.Namespace) -> int:
    store = RolloutStore(args.repo)
    record = _existing(store, args.name)
    if record.state.terminal:
        return report(record, args)
    lock = store.try_lock(args.name)
    if lock is None:
        _ask(store, args.name, Request.RESUME, store.driver_pid(args.name))
        return 0
    try:
        resumed = with_request(record, Request.RESUME, time.time())
        if not _has_broker(args):
            raise BadInputError(
                f"nobody drives rollout {args.name}: "
                "give --broker URL or --secure-dir DIR to drive it from here"
                + (
                    " (or start litefleet-rollout.service, which drives detached rollouts)"
                    if record.detached
                    else ""
                )
            )
        if resumed is not record:
            store.save(resumed)
        view = view_for(args)
        controller = open_controller(args, f"rollout-{args.name}", view)
        try:
            controller.adopt(resumed, lock)
            return follow(controller, args.name, args, view)
        finally:
            close_controller(controller)
    finally:
        lock.release()


def run_abort(args: argparse.Namespace) -> int:
    store = RolloutStore(args.repo)
    record = _existing(store, args.name)
    if record.state.terminal:
        sys.stdout.write(final_line(record) + "\n")
        return 0 if record.state is RolloutState.ABORTED else 1
    wait_s = parse_duration(args.wait, "--wait")
    lock = store.try_lock(args.name)
    if lock is None:
        _ask(store, args.name, Request.ABORT, store.driver_pid(args.name))
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            current = store.load(args.name)
            if current is not None and current.state.terminal:
                sys.stdout.write(final_line(current) + "\n")
                return 0 if current.state is RolloutState.ABORTED else 1
            time.sleep(0.2)
        sys.stderr.write(f"litefleet: rollout {args.name} is not aborted yet after {args.wait}\n")
        return 1
    try:
        if not _has_broker(args):
            raise BadInputError(
                f"nobody drives rollout {args.name}: give --broker URL or --secure-dir DIR so that this "
                "command signs and publishes the abort itself"
            )
        return _abort_here(args, store, record, lock)
    finally:
        lock.release()


def _abort_here(args: argparse.Namespace, store: RolloutStore, record: RolloutRecord, lock: object) -> int:
    controller = open_controller(args, f"rollout-{args.name}", persistent=False)
    try:
        signer = controller.signer
        if record.intent is not None:  # a step a killed controller left: it goes first
            record = signer.carry_out(record)
            store.save(record)
        if not record.state.terminal:
            record = with_request(record, Request.ABORT, time.time())
            store.save(record)
            record = signer.carry_out(record)
            store.save(record)
        store.archive(record)
        store.drop_files(args.name)
        controller.client.publish(
            controller.topics.rollout(args.name),
            json.dumps(record.to_wire(), sort_keys=True).encode(),
            qos=1,
            retain=True,
        ).wait(10.0)
    finally:
        close_controller(controller)
    sys.stdout.write(final_line(record) + "\n")
    return 0 if record.state is RolloutState.ABORTED else 1
