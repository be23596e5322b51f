"""``litefleet broker``: a private Mosquitto in the foreground until Ctrl-C or SIGTERM.

Plain (default): one anonymous MQTT listener on loopback (port 1883), data in
``./.litefleet-broker`` (``--data``). It only ever listens on loopback: an
anonymous broker must not be reachable from the network.

``--secure DIR``: three TLS listeners (devices with client certificates on
``--port``, devices with passwords on ``--port``+1, the host on ``--port``+2,
default 8883), anonymous clients refused, per-device ACLs; the CA, keys and
credentials live in DIR (created on first use, see
:mod:`converter.secure_broker`), the broker's data in ``DIR/broker``. With
``--bind 0.0.0.0`` and ``--san NAME`` devices on the network can reach it.

Retained messages persist (``persistence true``) across restarts. SIGHUP is
passed on to Mosquitto (it rereads ACL, password and CRL files).
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from agent.errors import TransportError
from converter.broker import BrokerConfig, BrokerProcess, free_port
from converter.errors import BadInputError
from converter.secure_broker import (
    DEFAULT_CERT_PORT,
    HOST_USERNAME,
    MAX_PACKET_SIZE_BYTES,
    ListenerPorts,
    Registry,
    SecureDir,
)

DEFAULT_PLAIN_PORT = 1883
DEFAULT_DATA_DIR = Path(".litefleet-broker")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "broker",
        help="run a private Mosquitto (TLS and per-device ACLs with --secure)",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--port", type=int, default=None,
                   help="listener port (plain: 1883; --secure: first of three, 8883); "
                        "0 picks free ports")
    p.add_argument("--secure", metavar="DIR", type=Path, default=None,
                   help="TLS, per-device credentials and ACLs; CA and keys in DIR")
    p.add_argument("--data", metavar="DIR", type=Path, default=None,
                   help="persistence and log folder (plain: ./.litefleet-broker, "
                        "--secure: DIR/broker)")
    p.add_argument("--bind", default="127.0.0.1",
                   help="listen address; anything but loopback needs --secure (default 127.0.0.1)")
    p.add_argument("--san", action="append", default=[], metavar="NAME",
                   help="--secure: extra DNS name or IP address in the server certificate "
                        "(repeatable; the first is the host name devices are told to use)")
    p.add_argument("--prefix", default=None,
                   help="--secure: topic prefix the ACLs are written for (default litefleet; "
                        "fixed when DIR is created)")
    p.set_defaults(func=run)


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    """Refuse early when a port is taken: otherwise the readiness probe would find
    the other program listening and report our broker as started."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise TransportError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def choose_ports(args: argparse.Namespace, stored: ListenerPorts | None) -> ListenerPorts | None:
    """--port N: N, N+1, N+2; --port 0: three free ports; no --port: what DIR has."""
    if args.port is None:
        return stored
    if args.port == 0:
        return ListenerPorts(free_port(args.bind), free_port(args.bind), free_port(args.bind))
    if not 1 <= args.port <= 65533:
        raise BadInputError(f"--port must be between 1 and 65533, got {args.port}")
    return ListenerPorts.from_base(args.port)


def run(args: argparse.Namespace) -> int:
    if args.secure is None:
        if args.san or args.prefix:
            raise BadInputError("--san and --prefix only apply with --secure DIR")
        if not is_loopback(args.bind):
            raise BadInputError(
                "a plain broker is anonymous and listens on loopback only; "
                "use --secure DIR to accept devices from the network"
            )
        port = DEFAULT_PLAIN_PORT if args.port is None else args.port
        if port == 0:
            port = free_port(args.bind)
        check_port_free(args.bind, port)
        data_dir = (args.data or DEFAULT_DATA_DIR).resolve()
        config = BrokerConfig(data_dir=data_dir, port=port, host=args.bind,
                              max_packet_size=MAX_PACKET_SIZE_BYTES)
        proc = BrokerProcess(config)
        proc.start()
        _say(
            f"litefleet broker running (mosquitto pid {_pid(proc)}), anonymous, loopback only",
            f"  url:   {proc.url}",
            f"  data:  {data_dir}",
            f"  log:   {data_dir / 'mosquitto.log'}",
            "Ctrl-C stops it.",
        )
        return _serve(proc)

    secure = SecureDir(args.secure)
    pid = secure.running_broker_pid()
    if pid is not None:
        raise TransportError(f"a broker for {secure.root} runs already (mosquitto pid {pid})")
    stored = secure.load().ports if secure.exists() else None
    ports = choose_ports(args, stored) or ListenerPorts.from_base(DEFAULT_CERT_PORT)
    registry = secure.ensure(prefix=args.prefix, sans=args.san, ports=ports)
    for p in (registry.ports.cert, registry.ports.password, registry.ports.host):
        check_port_free(args.bind, p)
    data_dir = (args.data.resolve() if args.data else secure.paths.default_data_dir)
    proc = BrokerProcess(secure.broker_config(data_dir=data_dir, bind=args.bind,
                                              registry=registry))
    proc.start()
    _say(*_secure_banner(secure, registry, proc, data_dir, args.bind))
    return _serve(proc)


def _secure_banner(secure: SecureDir, registry: Registry, proc: BrokerProcess,
                   data_dir: Path, bind: str) -> list[str]:
    host = registry.public_host
    shown = f"[{host}]" if ":" in host else host
    ports = registry.ports
    where = "loopback only" if is_loopback(bind) else f"on {bind}"
    return [
        f"litefleet secure broker running (mosquitto pid {_pid(proc)}), TLS only, {where}",
        f"  devices, client certificates:  mqtts://{shown}:{ports.cert}",
        f"  devices, username/password:    mqtts://{shown}:{ports.password}",
        f"  host (push, status, monitor):  mqtts://{HOST_USERNAME}@{shown}:{ports.host}"
        f"  (password: {secure.paths.host_password})",
        f"  CA certificate:                {secure.paths.ca_cert}",
        f"  topic prefix:                  {registry.prefix}",
        f"  devices:                       {len(registry.devices)} "
        f"(add: litefleet device add ID --secure {secure.root})",
        f"  data:                          {data_dir}",
        f"  log:                           {data_dir / 'mosquitto.log'}",
        "Ctrl-C stops it.",
    ]


def _pid(proc: BrokerProcess) -> int | None:
    return proc.proc.pid if proc.proc is not None else None


def _say(*lines: str) -> None:
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def _serve(proc: BrokerProcess) -> int:
    """Wait for Ctrl-C/SIGTERM (stop Mosquitto cleanly: it saves its data) or for
    Mosquitto to die (exit 1). Signal handlers run on the main thread and only set
    flags or forward SIGHUP."""
    stop = threading.Event()
    received: list[int] = []

    def on_stop(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.send_signal(signal.SIGHUP)

    old = {s: signal.signal(s, h) for s, h in
           ((signal.SIGINT, on_stop), (signal.SIGTERM, on_stop), (signal.SIGHUP, on_hup))}
    try:
        while not stop.wait(0.5):
            if not proc.running():
                code = proc.proc.returncode if proc.proc is not None else None
                log = proc.config.data_dir / "mosquitto.log"
                raise TransportError(f"mosquitto exited unexpectedly (code {code}); see {log}")
    finally:
        proc.stop()
        for s, h in old.items():
            signal.signal(s, h)
    _say(f"broker stopped ({signal.Signals(received[0]).name}); data kept")
    return 0
