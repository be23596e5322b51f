"""Where the secure broker's files live and how its three TLS listeners are configured (pure).

Guarantees:

* every file of a ``--secure DIR`` folder is named here, once
  (:class:`SecurePaths`), and nothing here touches the file system;
* :func:`listener_lines` refuses anonymous clients on every listener and has
  no plain listener; devices get ``use_username_as_clientid`` (a device can
  only ever be itself), the host free client ids (see :data:`HOST_CLIENT_ID_PREFIX`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from converter.broker.registry import ListenerPorts

# Host processes choose client ids starting with this: a leading "_" is never
# a valid device id, so a host client can never take over a device's session.
HOST_CLIENT_ID_PREFIX = "_lf-host-"
# Delivery chunks are <= 256 KiB (agent.protocol.MAX_CHUNK_SIZE: 1 MiB); 4 MiB
# leaves room for metadata (targets.json of a large repository) and properties.
MAX_PACKET_SIZE_BYTES = 4 * 1024 * 1024


# -- Mosquitto configuration (pure) ---------------------------------------------


@dataclass(frozen=True)
class SecurePaths:
    root: Path

    @property
    def registry(self) -> Path:
        return self.root / "secure.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def host_password(self) -> Path:
        return self.root / "host.password"

    @property
    def devices_acl(self) -> Path:
        return self.root / "devices.acl"

    @property
    def devices_passwd(self) -> Path:
        return self.root / "devices.passwd"

    @property
    def host_acl(self) -> Path:
        return self.root / "host.acl"

    @property
    def host_passwd(self) -> Path:
        return self.root / "host.passwd"

    @property
    def pid_file(self) -> Path:
        return self.root / "mosquitto.pid"

    @property
    def default_data_dir(self) -> Path:
        return self.root / "broker"

    def device_dir(self, device_id: str) -> Path:
        return self.root / "devices" / device_id


def listener_lines(paths: SecurePaths, ports: ListenerPorts, bind: str) -> list[str]:
    """The three TLS listener blocks (see the module docstring)."""
    tls = [
        f"cafile {paths.ca_cert}",
        f"certfile {paths.server_cert}",
        f"keyfile {paths.server_key}",
        "tls_version tlsv1.2",
        "allow_anonymous false",
    ]
    return [
        "# devices, client certificates: username = certificate CN, client id = username",
        f"listener {ports.cert} {bind}",
        *tls,
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        f"crlfile {paths.crl}",
        f"acl_file {paths.devices_acl}",
        "# devices, username/password: client id = username",
        f"listener {ports.password} {bind}",
        *tls,
        "require_certificate false",
        "use_username_as_clientid true",
        f"password_file {paths.devices_passwd}",
        f"acl_file {paths.devices_acl}",
        "# the host (push, status, monitor): username/password, free client ids",
        f"listener {ports.host} {bind}",
        *tls,
        "require_certificate false",
        f"password_file {paths.host_passwd}",
        f"acl_file {paths.host_acl}",
    ]
