"""``litefleet``: the host command line. This module owns the console.

Each command lives in its own module and registers itself through
``register(subparsers)``, setting ``func(args) -> int`` on its parser.
Errors the code raises on purpose (:class:`agent.errors.LitefleetError`)
become one line on stderr and an exit code: 2 for bad usage or bad input,
1 for an operation that failed. ``--debug`` shows tracebacks and debug logs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from agent.errors import BadRequestError, ConfigError, LitefleetError
from agent.logs import FORMATS as LOG_FORMATS
from agent.logs import configure
from converter import __version__
from converter.errors import BadInputError

# modules that define commands, in the order `--help` lists them
COMMAND_MODULES = (
    "converter.cli.convert",
    "converter.cli.repo",
    "converter.cli.push",
    "converter.cli.rollout",
    "converter.cli.status",
    "converter.cli.monitor",
    "converter.cli.broker",
    "converter.cli.device",
    "converter.cli.site",
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # one line, as every other error: the usage is one --help away
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="litefleet",
        description="Convert, sign and publish TF Lite models to a fleet of devices over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"litefleet {__version__}")
    parser.add_argument("--debug", action="store_true", help="show debug logs and tracebacks")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="log lines as text with key=value (default) or as JSON objects; under systemd "
        "they are journal entries with LITEFLEET_* fields",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure(
        "litefleet",
        logging.DEBUG
        if args.debug
        else logging.INFO
        if getattr(args, "log_info", False)
        else logging.WARNING,
        fmt=args.log_format,
        text_format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:
        # TensorFlow's C++ and Python chatter is not for the user's console
        import os

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        return int(args.func(args) or 0)
    except (BadInputError, ConfigError, BadRequestError) as exc:
        if args.debug:
            raise
        sys.stderr.write(f"litefleet: error: {exc}\n")
        return EXIT_USAGE
    except LitefleetError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"litefleet: error: {exc}\n")
        return EXIT_FAILED
    except OSError as exc:  # the disk or the system said no (full, read-only, permissions)
        if args.debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        sys.stderr.write(f"litefleet: error: {exc.strerror or exc}{where}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        sys.stderr.write("litefleet: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
