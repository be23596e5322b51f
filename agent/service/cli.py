"""``litefleet-agent``: the device command line. This module owns the console.

``litefleet-agent run --config agent.toml [overrides]`` runs the daemon in the
foreground (systemd, termux-services or a terminal). Configuration errors
are one line on stderr and exit code 2; a failure to start is exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.errors import ConfigError, LitefleetError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="litefleet-agent",
        description="Pull signed models over MQTT, activate them safely, serve LiteRT inference.",
    )
    parser.add_argument("--version", action="version", version=f"litefleet-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    run = sub.add_parser("run", help="run the agent in the foreground")
    run.add_argument("--config", type=Path, help="agent.toml (flags below override its keys)")
    run.add_argument("--device-id")
    run.add_argument("--broker", help="mqtt://[user[:password]@]host[:port] or mqtts://...")
    run.add_argument("--state-dir")
    run.add_argument("--trusted-root", help="the repository's root.json this device trusts")
    run.add_argument("--groups", help="comma-separated group names")
    run.add_argument("--http", help="host:port of the local REST API ('' disables it)")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    sim = sub.add_parser(
        "simulate",
        help="run N simulated devices in one process on the agent's code (benches, tests)",
        description="N devices, each an agent with its own id (<device-id>-<n>), connection, "
        "state folder (<state-dir>/<id>), TUF metadata, downloads, checks and activation; they "
        "share one network thread and one loaded interpreter set per model file (docs/scale.md).",
    )
    sim.add_argument("--config", type=Path, help="the template agent.toml (device_id is the id prefix)")
    sim.add_argument("--devices", type=int, required=True, help="how many devices")
    sim.add_argument("--first", type=int, default=0, help="number of the first device (default 0)")
    for flag in ("--device-id", "--broker", "--state-dir", "--trusted-root", "--groups"):
        sim.add_argument(flag)
    sim.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    check = sub.add_parser("check-config", help="validate the configuration and exit")
    check.add_argument("--config", type=Path, required=True)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    return {
        "device_id": args.device_id,
        "broker": args.broker,
        "state_dir": args.state_dir,
        "trusted_root": args.trusted_root,
        "groups": args.groups,
        "http": getattr(args, "http", None),
        "log_level": args.log_level,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from agent.service.config import load_config

    try:
        if args.command == "check-config":
            cfg = load_config(args.config)
            sys.stdout.write(f"{args.config}: ok (device {cfg.device_id}, broker {cfg.broker_address})\n")
            return 0
        if args.config is None and not all((args.device_id, args.broker, args.state_dir, args.trusted_root)):
            raise ConfigError(
                "give --config agent.toml, or all of --device-id --broker --state-dir --trusted-root"
            )
        cfg = load_config(args.config, _overrides(args))
    except ConfigError as exc:
        sys.stderr.write(f"litefleet-agent: error: {exc}\n")
        return 2
    if args.command == "simulate":
        logging.basicConfig(
            level=getattr(logging, cfg.log_level.upper()),
            format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        from agent.service.simulate import simulate

        return simulate(cfg, args.devices, args.first)
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from agent.service.daemon import Agent, install_signal_handlers
    from agent.service.sdnotify import Notifier

    try:
        agent = Agent(cfg, notifier=Notifier(unset_environment=True))
        install_signal_handlers(agent)
        agent.start()
    except ConfigError as exc:
        sys.stderr.write(f"litefleet-agent: error: {exc}\n")
        return 2
    except LitefleetError as exc:
        sys.stderr.write(f"litefleet-agent: error: {exc}\n")
        return 1
    try:
        agent.run()
    finally:
        agent.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
