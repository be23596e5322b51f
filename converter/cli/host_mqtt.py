"""How host commands reach the broker: shared flags and a connected client.

Every host command that talks to the broker takes the same flags
(:func:`add_broker_args`); :func:`connect` turns them into a connected
:class:`agent.mqtt.client.MqttClient` or raises one clear error.
"""

from __future__ import annotations

import argparse
import os
import uuid
from pathlib import Path

from agent.errors import ConfigError
from agent.mqtt.client import ConnectionSettings, MqttClient
from agent.protocol import DEFAULT_PREFIX, Topics
from agent.service.config import parse_broker_url
from converter.errors import BadInputError


def add_broker_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    # required in effect: settings_from_args insists on --broker or --secure
    parser.add_argument(
        "--broker",
        help="mqtt://[user[:password]@]host[:port] or mqtts://..." + ("" if required else " (optional)"),
    )
    parser.add_argument(
        "--prefix", help=f"topic prefix (default: the --secure folder's, else {DEFAULT_PREFIX})"
    )
    parser.add_argument("--ca-file", help="CA certificate for mqtts:// (PEM)")
    parser.add_argument("--cert-file", help="client certificate (PEM)")
    parser.add_argument("--key-file", help="client private key (PEM)")
    parser.add_argument("--password-file", help="file holding the MQTT password")
    # one spelling everywhere: --secure DIR, as `litefleet broker --secure DIR` and `device add
    # --secure DIR` name the same folder; --secure-dir (the older spelling) stays as an alias
    parser.add_argument(
        "--secure",
        dest="secure_dir",
        type=Path,
        metavar="DIR",
        help="the folder of a 'litefleet broker --secure DIR': connect with its host identity over TLS "
        "(also $LITEFLEET_SECURE_DIR)",
    )
    parser.add_argument("--secure-dir", dest="secure_dir", type=Path, help=argparse.SUPPRESS)


def _secure_dir(args: argparse.Namespace) -> Path | None:
    return getattr(args, "secure_dir", None) or (
        Path(os.environ["LITEFLEET_SECURE_DIR"]) if os.environ.get("LITEFLEET_SECURE_DIR") else None
    )


def topic_prefix(args: argparse.Namespace) -> str:
    """``--prefix``, else the prefix the ``--secure`` broker was made with (its ACLs
    grant nothing under another one), else the default."""
    if getattr(args, "prefix", None):
        return str(args.prefix)
    secure_dir = _secure_dir(args)
    if secure_dir is not None:
        from converter.broker.secure import host_client_settings

        return str(host_client_settings(secure_dir)["topic_prefix"])
    return DEFAULT_PREFIX


def settings_from_args(
    args: argparse.Namespace, role: str, *, session: str | None = None, session_expiry_s: int = 0
) -> ConnectionSettings:
    """The host's connection settings from the common broker flags. With ``session``, a
    persistent session under a stable client id (``<prefix><role>-<session>``) instead of a
    fresh one per process."""
    secure_dir = _secure_dir(args)
    host: dict[str, object] = {}
    if secure_dir is not None:
        from converter.broker.secure import host_client_settings

        host = host_client_settings(secure_dir)
    url = args.broker or host.get("url")
    if not url:
        raise BadInputError("give --broker URL (or --secure DIR of a secure broker)")
    try:
        addr = parse_broker_url(str(url))
    except ConfigError as exc:
        raise BadInputError(str(exc)) from exc
    ca, cert, key = args.ca_file, args.cert_file, args.key_file
    username, password = addr.username, addr.password
    if host:
        ca = ca or host.get("ca_file")
        cert = cert or host.get("cert_file")
        key = key or host.get("key_file")
        username = username or host.get("username")  # type: ignore[assignment]
        password = password or host.get("password")  # type: ignore[assignment]
    if args.password_file:
        try:
            password = Path(args.password_file).read_text().strip()
        except OSError as exc:
            raise BadInputError(f"cannot read --password-file: {exc.strerror}") from exc
    if (ca or cert) and not addr.tls:
        raise BadInputError("--ca-file/--cert-file need an mqtts:// broker URL")
    for label, path in (("--ca-file", ca), ("--cert-file", cert), ("--key-file", key)):
        if path and not Path(path).is_file():
            raise BadInputError(f"{label} {path} does not exist")
    return ConnectionSettings(
        host=addr.host,
        port=addr.port,
        # "_" never starts a device id: a host client can never take a device's session
        client_id=f"{host.get('client_id_prefix', '_lf-host-')}{role}-{session or uuid.uuid4().hex[:8]}",
        tls=addr.tls,
        ca_file=ca,
        cert_file=cert,
        key_file=key,
        username=username,
        password=password,
        session_expiry_s=session_expiry_s if session else 0,
    )


def connect(args: argparse.Namespace, role: str, timeout_s: float = 10.0) -> tuple[MqttClient, Topics]:
    client = MqttClient(settings_from_args(args, role))
    client.connect(timeout_s)
    return client, Topics(topic_prefix(args))


def finite_float(text: str, *, allow_zero: bool = False, maximum: float = 1e9) -> float:
    """An argparse ``type=`` for a number flag: finite, > 0 (>= 0 with ``allow_zero``) and at
    most ``maximum`` (larger timeouts overflow the clock). Anything else (``nan``, ``inf``,
    ``-1``, ``ten``) is one usage error; bind the options with :func:`functools.partial`."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= maximum):  # False for nan
        raise argparse.ArgumentTypeError(
            f"expected a number {'>= 0' if allow_zero else '> 0'} and at most {maximum:.10g}, got {text!r}"
        )
    return value
