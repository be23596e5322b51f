"""``litefleet broker``: a private Mosquitto in the foreground until Ctrl-C or SIGTERM.

Plain (default): one anonymous MQTT listener on loopback (port 1883), data in
``./.litefleet-broker`` (``--data``). It only ever listens on loopback: an
anonymous broker must not be reachable from the network.

``--secure DIR``: three TLS listeners (devices with client certificates on
``--port``, devices with passwords on ``--port``+1, the host on ``--port``+2,
default 8883), anonymous clients refused, per-device ACLs; the CA, keys and
credentials live in DIR (created on first use, see
:mod:`converter.broker.secure`), the broker's data in ``DIR/broker``. With
``--bind 0.0.0.0`` and ``--san NAME`` devices on the network can reach it.

``--secure DIR --upstream mqtts://central:8883``: a site broker (docs/sites.md),
bridged to a central secure broker through a TLS relay in this process, with the
identity ``litefleet site add NAME`` made at central (copied to ``DIR/uplink``, or
``--uplink BUNDLE``). The repository comes down, the devices' reports go up; this
process prunes what central cleared during an outage, reports the link on
``<prefix>/v1/sites/NAME/status`` and in ``DATA/site-status.json``, and restarts
Mosquitto when it exits or stops answering.

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
from typing import TYPE_CHECKING, Any

from agent.errors import ConfigError, TransportError
from agent.service.config import parse_broker_url
from converter.broker.layout import MAX_PACKET_SIZE_BYTES
from converter.broker.mosquitto import BrokerConfig, BrokerProcess, free_port
from converter.broker.registry import DEFAULT_CERT_PORT, HOST_USERNAME, ListenerPorts, Registry
from converter.broker.secure import SecureDir
from converter.broker.uplink import load_uplink
from converter.errors import BadInputError

if TYPE_CHECKING:
    from converter.site.supervisor import SiteSettings, SiteSupervisor

DESCRIPTION = """\
Runs Mosquitto in the foreground until Ctrl-C or SIGTERM: give it its own terminal,
or run it as a service.

Plain (default): one anonymous MQTT listener on loopback (port 1883), data in
./.litefleet-broker (--data). It only ever listens on loopback: an anonymous broker
must not be reachable from the network.

--secure DIR: three TLS listeners (devices with client certificates on --port,
devices with passwords on --port + 1, the host on --port + 2; default 8883),
anonymous clients refused, per-device ACLs. The CA, keys and credentials live in
DIR (created on first use), the broker's data in DIR/broker. With --bind 0.0.0.0
and --san NAME, devices on the network can reach it as NAME.

--upstream mqtts://central:PORT (with --secure SITE_DIR): a site broker bridged
to a central one through a local TLS relay, pruned after each reconnect and
watched by a supervisor (docs/sites.md).

Retained messages persist across restarts. SIGHUP is passed on to Mosquitto (it
rereads the ACL, password and CRL files)."""
DEFAULT_PLAIN_PORT = 1883
DEFAULT_DATA_DIR = Path(".litefleet-broker")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "broker",
        help="run a private Mosquitto in the foreground (TLS and per-device ACLs with --secure)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help="listener port (plain: 1883; --secure: first of three, 8883); 0 picks free ports",
    )
    p.add_argument(
        "--secure",
        metavar="DIR",
        type=Path,
        default=None,
        help="TLS, per-device credentials and ACLs; CA and keys in DIR",
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        type=Path,
        default=None,
        help="persistence and log folder (plain: ./.litefleet-broker, --secure: DIR/broker)",
    )
    p.add_argument(
        "--bind",
        default="127.0.0.1",
        help="listen address; anything but loopback needs --secure (default 127.0.0.1)",
    )
    p.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help="--secure: extra DNS name or IP address in the server certificate "
        "(repeatable; the first is the host name devices are told to use)",
    )
    p.add_argument(
        "--prefix",
        default=None,
        help="--secure: topic prefix the ACLs are written for (default litefleet; fixed when DIR is created)",
    )
    site = p.add_argument_group("site broker (docs/sites.md)")
    site.add_argument(
        "--upstream",
        metavar="URL",
        default=None,
        help="with --secure: bridge to this central broker (mqtts://HOST:PORT: its device-certificate port)",
    )
    site.add_argument(
        "--uplink",
        metavar="BUNDLE",
        type=Path,
        default=None,
        help="the site's identity from `litefleet site add` at central (default: DIR/uplink)",
    )
    site.add_argument(
        "--uplink-retry-max-s",
        type=int,
        default=10,
        metavar="S",
        help="longest wait between the bridge's reconnect attempts (default 10)",
    )
    site.add_argument(
        "--uplink-keepalive-s",
        type=int,
        default=15,
        metavar="S",
        help="the bridge's MQTT keep-alive: a silent uplink is noticed after 1.5x this "
        "(5-30; devices send again what they sent in the 60 s before; default 15)",
    )
    site.add_argument(
        "--watchdog-s",
        type=float,
        default=5.0,
        metavar="S",
        help="probe the site's Mosquitto every S seconds; 3 missed probes restart it (0: off; default 5)",
    )
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
    if args.upstream is None and args.uplink is not None:
        raise BadInputError("--uplink only applies with --upstream URL")
    if args.secure is None:
        if args.san or args.prefix or args.upstream:
            raise BadInputError("--san, --prefix and --upstream only apply with --secure DIR")
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
        config = BrokerConfig(
            data_dir=data_dir, port=port, host=args.bind, max_packet_size=MAX_PACKET_SIZE_BYTES
        )
        with _Signals() as signals:
            proc = BrokerProcess(config)
            return _serve(
                proc,
                signals,
                [
                    "litefleet broker running, anonymous, loopback only",
                    f"  url:   {proc.url}",
                    f"  data:  {data_dir}",
                    f"  log:   {data_dir / 'mosquitto.log'}",
                    "Ctrl-C stops it.",
                ],
            )

    secure = SecureDir(args.secure)
    pid = secure.running_broker_pid()
    if pid is not None:
        raise TransportError(f"a broker for {secure.root} runs already (mosquitto pid {pid})")
    # a site's flags are checked before DIR is created or changed
    site = site_settings(args, secure) if args.upstream is not None else None
    stored = secure.load().ports if secure.exists() else None
    ports = choose_ports(args, stored) or ListenerPorts.from_base(DEFAULT_CERT_PORT)
    registry = secure.ensure(
        prefix=args.prefix, sans=args.san, ports=ports, uplink_site=site.site if site is not None else None
    )
    for p in (registry.ports.cert, registry.ports.password, registry.ports.host):
        check_port_free(args.bind, p)
    data_dir = args.data.resolve() if args.data else secure.paths.default_data_dir
    if site is not None:
        from converter.site.supervisor import SiteSupervisor

        return _serve_site(
            SiteSupervisor(secure, site, data_dir=data_dir, bind=args.bind),
            _secure_banner(secure, registry, data_dir, args.bind),
        )
    with _Signals() as signals:
        proc = BrokerProcess(secure.broker_config(data_dir=data_dir, bind=args.bind, registry=registry))
        return _serve(proc, signals, _secure_banner(secure, registry, data_dir, args.bind))


def site_settings(args: argparse.Namespace, secure: SecureDir) -> SiteSettings:
    """``--upstream``/``--uplink`` and the site's tuning flags as settings, or one clear
    BadInputError."""
    try:
        addr = parse_broker_url(args.upstream)
    except ConfigError as exc:
        raise BadInputError(f"--upstream: {exc}") from exc
    if not addr.tls or addr.username or addr.password:
        raise BadInputError(
            "--upstream must be mqtts://HOST:PORT (central's device-certificate listener; "
            "the site's identity is its certificate)"
        )
    info, paths = load_uplink((args.uplink or secure.root / "uplink").expanduser().resolve())
    stored = secure.load().prefix if secure.exists() else None
    for prefix in (stored, args.prefix):
        if prefix is not None and prefix != info.prefix:
            raise BadInputError(
                f"the uplink bundle is for topic prefix {info.prefix!r}, this broker's is {prefix!r}"
            )
    if args.prefix is None:
        args.prefix = info.prefix
    from converter.site.supervisor import SiteSettings

    if not 1 <= args.uplink_retry_max_s <= 3600:
        raise BadInputError("--uplink-retry-max-s must be between 1 and 3600")
    if not 5 <= args.uplink_keepalive_s <= 30:
        raise BadInputError(
            "--uplink-keepalive-s must be between 5 and 30 (a device sends again what it sent "
            "in the 60 s before it learns of an outage: 1.5x the keep-alive must fit)"
        )
    if not (args.watchdog_s == 0 or 0.5 <= args.watchdog_s <= 3600):
        raise BadInputError("--watchdog-s must be 0 (off) or between 0.5 and 3600")
    return SiteSettings(
        site=info.site,
        upstream_host=addr.host,
        upstream_port=addr.port,
        uplink=paths,
        retry_max_s=args.uplink_retry_max_s,
        keepalive_s=args.uplink_keepalive_s,
        watchdog_s=args.watchdog_s,
    )


def _serve_site(sup: SiteSupervisor, banner: list[str]) -> int:
    """Run the site supervisor until Ctrl-C/SIGTERM; it restarts Mosquitto itself and
    raises TransportError (exit 1) only when that does not help."""
    s = sup.settings
    with _Signals() as signals:
        try:
            sup.start()
            signals.proc = sup.broker
            if not signals.stop.is_set():
                title = banner[0].replace("secure broker", f"site broker {s.site!r}")
                _say(
                    f"{title} (mosquitto pid {sup.facts().mosquitto_pid})",
                    *banner[1:-1],
                    f"  upstream:                      mqtts://{s.upstream_host}:{s.upstream_port} "
                    f"(through a relay on 127.0.0.1:{sup.relay.port})",
                    f"  link status:                   {sup.status_file}",
                    banner[-1],
                )
            while not signals.stop.wait(0.5):
                sup.poll()
        finally:
            sup.stop()
    _say(f"broker stopped ({signal.Signals(signals.received[0]).name}); data kept")
    return 0


def _secure_banner(secure: SecureDir, registry: Registry, data_dir: Path, bind: str) -> list[str]:
    host = registry.public_host
    shown = f"[{host}]" if ":" in host else host
    ports = registry.ports
    where = "loopback only" if is_loopback(bind) else f"on {bind}"
    return [
        f"litefleet secure broker running, TLS only, {where}",
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


def _say(*lines: str) -> None:
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


class _Signals:
    """Ctrl-C/SIGTERM set a flag, SIGHUP is passed on to Mosquitto. Installed before
    Mosquitto starts, so a signal that comes early still stops it cleanly (a default
    SIGTERM would end this process and leave Mosquitto running in its own session).
    Handlers run on the main thread between bytecodes and only set flags or signal."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.received: list[int] = []
        self.proc: BrokerProcess | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig, handler in (
            (signal.SIGINT, self._on_stop),
            (signal.SIGTERM, self._on_stop),
            (signal.SIGHUP, self._on_hup),
        ):
            self._old[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        self.stop.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        if self.proc is not None and self.proc.proc is not None and self.proc.proc.poll() is None:
            self.proc.proc.send_signal(signal.SIGHUP)


def _serve(proc: BrokerProcess, signals: _Signals, banner: list[str]) -> int:
    """Start Mosquitto, print ``banner``, wait for Ctrl-C/SIGTERM (then stop Mosquitto
    cleanly: it saves its data) or for Mosquitto to die (exit 1)."""
    signals.proc = proc
    try:
        proc.start()
        if not signals.stop.is_set():
            pid = proc.proc.pid if proc.proc is not None else "?"
            _say(f"{banner[0]} (mosquitto pid {pid})", *banner[1:])
        while not signals.stop.wait(0.5):
            if not proc.running():
                code = proc.proc.returncode if proc.proc is not None else None
                log = proc.config.data_dir / "mosquitto.log"
                raise TransportError(f"mosquitto exited unexpectedly (code {code}); see {log}")
    finally:
        proc.stop()
    _say(f"broker stopped ({signal.Signals(signals.received[0]).name}); data kept")
    return 0
