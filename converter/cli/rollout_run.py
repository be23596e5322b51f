"""Driving a rollout from the command line: the controller's connection, following it, the end.

Shared by ``rollout start`` (:mod:`converter.cli.rollout`) and ``rollout resume|abort``
(:mod:`converter.cli.rollout_ops`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from agent.mqtt.client import MqttClient
from agent.protocol import Topics
from converter.cli.host_mqtt import settings_from_args, topic_prefix
from converter.cli.rollout_view import LiveView, final_line
from converter.rollout.record import RolloutRecord, RolloutState
from converter.rollout.service import Controller

# how long the broker keeps a killed controller's session (its events) for the next one
SESSION_EXPIRY_S = 3600
CONNECT_TIMEOUT_S = 10.0


def open_controller(
    args: argparse.Namespace, session: str, view: LiveView | None = None, persistent: bool = True
) -> Controller:
    settings = settings_from_args(
        args, "rollout", session=session if persistent else None, session_expiry_s=SESSION_EXPIRY_S
    )
    client = MqttClient(settings)
    controller = Controller(
        Path(args.repo),
        client,
        Topics(topic_prefix(args)),
        on_update=(lambda record, results: view.update(record, results)) if view else None,
    )
    client.connect(CONNECT_TIMEOUT_S)
    return controller


def close_controller(controller: Controller) -> None:
    controller.release_all()
    controller.client.stop()


def follow(controller: Controller, name: str, args: argparse.Namespace, view: LiveView) -> int:
    """Drive ``name`` in this process until it is promoted or aborted."""
    driver = controller.drivers[name]
    view.update(driver.record)
    controller.run(until=lambda: driver.record.state.terminal)
    record = driver.record
    # Mosquitto handles one connection's packets in order: once this barrier's SUBACK is
    # back, the last retained rollout record published before it has been taken
    controller.client.sync()
    controller.client.wait_synced(5.0)
    return report(record, args)


def report(record: RolloutRecord, args: argparse.Namespace) -> int:
    line = final_line(record)
    if args.json:
        sys.stdout.write(json.dumps(record.summary(), indent=2) + "\n")
    if record.state is RolloutState.PROMOTED:
        if not args.json:
            sys.stdout.write(line + "\n")
        return 0
    sys.stderr.write(f"litefleet: {line}\n")
    return 1


def view_for(args: argparse.Namespace) -> LiveView:
    stream: TextIO = sys.stderr if getattr(args, "json", False) else sys.stdout
    return LiveView(stream)
