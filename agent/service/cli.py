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
from agent.logs import FORMATS as LOG_FORMATS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="litefleet-agent",
        description="Pull signed models over MQTT, activate them safely, serve LiteRT inference.",
    )
    parser.add_argument("--version", action="version", version=f"litefleet-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    run = sub.add_parser("run", help="run the agent in the foreground")
    _add_config_args(run)
    check = sub.add_parser(
        "check-config",
        help="check the configuration and every file it names (root, TLS, password), then exit",
        description="Check what `run` with the same arguments would start with: the keys, and "
        "that every file named is there and usable (TLS files are loaded as the agent loads them).",
    )
    _add_config_args(check)
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
    return parser


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="agent.toml (flags below override its keys)")
    p.add_argument("--device-id")
    p.add_argument("--broker", help="mqtt://[user[:password]@]host[:port] or mqtts://...")
    p.add_argument("--state-dir")
    p.add_argument("--trusted-root", help="the repository's root.json this device trusts")
    p.add_argument("--groups", help="comma-separated group names")
    p.add_argument("--http", help="host:port of the local REST API ('' disables it)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="text: one line per event with key=value (default); json: one JSON object per line "
        "(under systemd the agent writes journal entries with LITEFLEET_* fields either way)",
    )


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    return {
        "device_id": args.device_id,
        "broker": args.broker,
        "state_dir": args.state_dir,
        "trusted_root": args.trusted_root,
        "groups": args.groups,
        "http": getattr(args, "http", None),
        "log_level": args.log_level,
        "log_format": getattr(args, "log_format", None),
    }


def _keep_pyca_out() -> None:
    """The daemon checks signatures through the libcrypto Python has loaded
    (agent.delivery.ed25519): where pyca/cryptography is installed too (a host or
    development venv) it stays out of the process, 7.8 MB of resident memory, so an
    agent is the same process on a device install and on a host."""
    from agent.delivery import ed25519

    if "cryptography" not in sys.modules and ed25519.available():
        sys.modules["cryptography"] = None  # type: ignore[assignment]  # import fails: ImportError


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("run", "simulate"):
        _keep_pyca_out()  # first: reading trusted_root below imports securesystemslib
    from agent.service.config import load_config
    from agent.service.preflight import check_files

    try:
        if args.config is None and not all((args.device_id, args.broker, args.state_dir, args.trusted_root)):
            raise ConfigError(
                "give --config agent.toml, or all of --device-id --broker --state-dir --trusted-root"
            )
        cfg = load_config(args.config, _overrides(args))
        check_files(cfg)  # before anything starts: a missing ca_file is one line, not a traceback
    except ConfigError as exc:
        sys.stderr.write(f"litefleet-agent: error: {exc}\n")
        return 2
    if args.command == "check-config":
        sys.stdout.write(
            f"{args.config or 'flags'}: ok (device {cfg.device_id}, broker {cfg.broker_address})\n"
        )
        return 0
    if args.command == "simulate":
        logging.basicConfig(
            level=getattr(logging, cfg.log_level.upper()),
            format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        from agent.service.simulate import simulate

        return simulate(cfg, args.devices, args.first)
    from agent.logs import configure

    configure(
        "litefleet-agent",
        getattr(logging, cfg.log_level.upper()),
        fmt=cfg.log_format,
        static={"device_id": cfg.device_id},
    )
    from agent.service.daemon import Agent, install_signal_handlers
    from agent.service.preflight import supervision_warning
    from agent.service.sdnotify import Notifier

    if advice := supervision_warning(cfg):
        logging.getLogger("agent.service").warning("%s", advice)

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
