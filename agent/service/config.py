"""The agent's configuration: ``agent.toml`` plus command-line overrides.

:func:`load_config` reads the TOML file with :mod:`tomllib`, applies flag
overrides, rejects unknown keys and checks every field and the fields against
each other; it returns a frozen :class:`AgentConfig` or raises
:class:`agent.errors.ConfigError` with one clear sentence.

Relative paths in the file are relative to the file's own folder (a flag's
relative path to the working directory, as usual in a shell). A relative TLS or
password file name is first looked up in ``$CREDENTIALS_DIRECTORY``, which
systemd's ``LoadCredential=`` sets, then in the config file's folder
(:func:`resolve_credential`; :mod:`agent.service.preflight` checks that each one
is there before the agent starts).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from agent.errors import ConfigError
from agent.logs import FORMATS as LOG_FORMATS
from agent.protocol import SITE_NAME_RE
from agent.serving.runtime import RUNTIME_CHOICES

# agent.activation.check.Isolation's values a device may choose (its "none" is the simulator's)
ISOLATION_CHOICES = ("fork", "restart")

DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
GROUP_RE = DEVICE_ID_RE
TOPIC_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
# keys naming a file the agent reads; relative names are credentials (see resolve_credential)
CREDENTIAL_KEYS = ("ca_file", "cert_file", "key_file", "password_file")
# keys holding a path that, given relative in the file, is relative to the file's folder
PATH_KEYS = ("state_dir", "trusted_root")


@dataclass(frozen=True)
class BrokerAddress:
    """A parsed ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://`` URL."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:  # never shows the password
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse a broker URL or raise :class:`ConfigError`."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r} is malformed: {exc}") from exc
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise ConfigError(f"broker URL {url!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"broker URL {url!r} must be mqtt[s]://[user[:password]@]host[:port]")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs to run. Units are in the names."""

    device_id: str
    broker: str
    state_dir: Path
    trusted_root: Path
    groups: tuple[str, ...] = ()
    # host:port of the local REST API; "" disables it
    http: str = "127.0.0.1:8501"
    runtime: str = "auto"
    threads: int = 1
    metrics_interval_s: float = 10.0
    # -- beyond the contract's keys (documented in docs/agent.md) --
    topic_prefix: str = "litefleet"
    # a refresh also happens at once whenever a new timestamp.json arrives
    refresh_interval_s: float = 300.0
    # chunk subscriptions in flight at once while downloading
    download_window: int = 8
    # a model bigger than this is refused before any byte is fetched
    max_model_bytes: int = 512 * 1024 * 1024
    # a new model is "good" after this many successful inferences or this long
    # without an inference error, whichever comes first
    probation_inferences: int = 20
    probation_s: float = 60.0
    # CPU seconds a candidate's checks may take (load and golden vectors, in a
    # child process); a model that never returns is killed after this
    check_timeout_s: float = 120.0
    # where those checks run: "fork" (a child process: a model that crashes the runtime
    # kills the child) or "restart" (the agent itself: half the CPU of a small model's
    # activation, but such a model kills the agent, and its restart rejects it)
    check_isolation: str = "fork"
    # start-ups in a row that may end before a new model is marked good
    max_crash_restarts: int = 2
    # the on-disk metrics queue used while the broker is unreachable
    # ~1.5 kB a row: 20,000 rows are ~30 MB, 2.3 days of metrics every 10 s
    metrics_queue_max_rows: int = 20_000
    http_max_body_bytes: int = 32 * 1024 * 1024
    # the previous version runs as a shadow (a rollout rule's shadow_k) only when its model
    # file is at most this big; 0 never shadows (docs/agent-api.md, "Shadow evaluation")
    shadow_max_bytes: int = 64 * 1024 * 1024
    # the site whose broker this device uses (docs/sites.md): while its uplink to central
    # is down, metrics stay queued on disk and events are held; "" for a central broker
    site: str = ""
    # TLS and credentials; relative paths are looked up in $CREDENTIALS_DIRECTORY
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password_file: str = ""
    log_level: str = "info"
    # "text": one line per event with key=value; "json": one JSON object per line
    log_format: str = "text"
    # not a key: the folder of the config file, where relative credential names are
    # looked up when $CREDENTIALS_DIRECTORY does not have them (None: the working directory)
    base_dir: Path | None = field(default=None, metadata={"key": False})

    @property
    def broker_address(self) -> BrokerAddress:
        return parse_broker_url(self.broker)

    @property
    def http_address(self) -> tuple[str, int] | None:
        return parse_host_port(self.http) if self.http else None

    def credential_path(self, value: str) -> Path | None:
        """Resolve a secret file name (see :func:`resolve_credential`); None for ""."""
        if not value:
            return None
        return resolve_credential(value, os.environ, self.base_dir).path

    def password(self) -> str | None:
        addr = self.broker_address
        if addr.password:
            return addr.password
        path = self.credential_path(self.password_file)
        if path is None:
            return None
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read password_file {path}: {exc.strerror}") from exc


@dataclass(frozen=True)
class CredentialLookup:
    """Where a credential file name led: ``path`` (the first place that has it, else the
    last place looked) and every folder looked in, in order, for an error message."""

    path: Path
    looked_in: tuple[str, ...]


UNIT_CREDENTIAL_PREFIX = "litefleet_"  # LoadCredential=litefleet:DIR names DIR's file F litefleet_F


def resolve_credential(value: str, env: Mapping[str, str], base_dir: Path | None) -> CredentialLookup:
    """An absolute name is itself. A relative one is looked up in ``$CREDENTIALS_DIRECTORY``
    (systemd's ``LoadCredential=``) when that is set, then in ``base_dir`` (the config
    file's folder; the working directory when None), then, for a name ``litefleet_F``, as
    ``base_dir/credentials/F``: the folder the unit hands over as ``litefleet_*``
    (``LoadCredential=litefleet:/etc/litefleet/credentials``), so that the config
    install.sh writes can be checked by hand (``sudo litefleet-agent check-config``) as it
    is read under the unit. Pure but for ``exists()``."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return CredentialLookup(p, ())
    places: list[tuple[str, Path]] = []
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds:
        places.append((f"$CREDENTIALS_DIRECTORY ({creds})", Path(creds) / p))
    folder = base_dir if base_dir is not None else Path.cwd()
    what = "the config file's folder" if base_dir is not None else "the working directory"
    beside = folder / p  # where a missing file is reported
    places.append((f"{what} ({folder})", beside))
    if base_dir is not None and value.startswith(UNIT_CREDENTIAL_PREFIX) and len(p.parts) == 1:
        unit_dir = base_dir / "credentials"
        name = value.removeprefix(UNIT_CREDENTIAL_PREFIX)
        places.append((f"the unit's credentials folder ({unit_dir})", unit_dir / name))
    labels = tuple(label for label, _ in places)
    for _, candidate in places:
        if candidate.exists():
            return CredentialLookup(candidate, labels)
    return CredentialLookup(beside, labels)


_FIELDS = {f.name: f for f in fields(AgentConfig) if f.metadata.get("key", True)}
REQUIRED = ("device_id", "broker", "state_dir", "trusted_root")


def parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port_s = value.rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ConfigError(f"http must be host:port (or empty to disable), got {value!r}")
    return host.strip("[]"), int(port_s)


_EXPECTED = {
    "Path": "a non-empty path string",
    "tuple[str, ...]": "a list of strings",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
}


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML or flag value into the field's type, or raise ConfigError."""
    kind = _FIELDS[name].type
    if isinstance(value, str) and "\0" in value:  # TOML allows "\u0000"; no file name does
        raise ConfigError(f"config key {name!r}: contains a NUL character")
    try:
        if kind == "Path" and isinstance(value, str) and value:
            return Path(value).expanduser()  # RuntimeError for ~nosuchuser
        if kind == "tuple[str, ...]":
            if isinstance(value, str):
                value = [g for g in value.split(",") if g.strip()]
            if isinstance(value, list) and all(isinstance(g, str) for g in value):
                return tuple(g.strip() for g in value)
        if kind == "int" and not isinstance(value, bool) and isinstance(value, int | str):
            return int(value)
        if kind == "float" and not isinstance(value, bool) and isinstance(value, int | float | str):
            return float(value)
        if kind == "str" and isinstance(value, str):
            return value
    except (ValueError, RuntimeError):
        pass
    raise ConfigError(f"config key {name!r}: expected {_EXPECTED[str(kind)]}, got {value!r}")


def _check(cfg: AgentConfig) -> None:
    """Raise :class:`ConfigError` for the first key that is wrong, or wrong with another."""
    _check_names(cfg)
    _check_numbers(cfg)
    _check_connection(cfg)
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level must be debug, info, warning or error, got {cfg.log_level!r}")
    if cfg.log_format not in LOG_FORMATS:
        raise ConfigError(f"log_format must be {' or '.join(LOG_FORMATS)}, got {cfg.log_format!r}")


def _check_names(cfg: AgentConfig) -> None:
    if not DEVICE_ID_RE.match(cfg.device_id):
        raise ConfigError(f"device_id {cfg.device_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
    for g in cfg.groups:
        if not GROUP_RE.match(g):
            raise ConfigError(f"group {g!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if cfg.site and not SITE_NAME_RE.match(cfg.site):
        raise ConfigError(f"site {cfg.site!r} must be a site broker's name: 1-32 of a-z, 0-9, '.', '_', '-'")
    parse_broker_url(cfg.broker)
    if cfg.http:
        parse_host_port(cfg.http)
    if cfg.runtime not in RUNTIME_CHOICES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIME_CHOICES)}, got {cfg.runtime!r}")
    if cfg.check_isolation not in ISOLATION_CHOICES:
        raise ConfigError(
            f"check_isolation must be {' or '.join(ISOLATION_CHOICES)}, got {cfg.check_isolation!r}"
        )


def _check_numbers(cfg: AgentConfig) -> None:
    if not 1 <= cfg.threads <= 64:
        raise ConfigError(f"threads must be between 1 and 64, got {cfg.threads}")
    positive = ("metrics_interval_s", "refresh_interval_s", "probation_s", "check_timeout_s")
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in (
        "download_window",
        "max_model_bytes",
        "metrics_queue_max_rows",
        "http_max_body_bytes",
        "probation_inferences",
    ):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_crash_restarts < 0:
        raise ConfigError("max_crash_restarts must not be negative")
    if cfg.shadow_max_bytes < 0:
        raise ConfigError(f"shadow_max_bytes must not be negative (0: never), got {cfg.shadow_max_bytes}")


def _check_connection(cfg: AgentConfig) -> None:
    addr = parse_broker_url(cfg.broker)
    if not TOPIC_PREFIX_RE.match(cfg.topic_prefix):
        raise ConfigError(f"topic_prefix {cfg.topic_prefix!r} may not contain wildcards or empty levels")
    if bool(cfg.cert_file) != bool(cfg.key_file):
        raise ConfigError("cert_file and key_file go together: give both or neither")
    if (cfg.ca_file or cfg.cert_file) and not addr.tls:
        raise ConfigError("ca_file/cert_file are set but the broker URL is not mqtts://")
    if cfg.password_file and addr.password:
        raise ConfigError("give the password in the broker URL or in password_file, not both")


def config_from_mapping(
    doc: dict[str, Any], *, source: str = "config", base_dir: Path | None = None
) -> AgentConfig:
    unknown = sorted(set(doc) - set(_FIELDS))
    if unknown:
        # repr() for a name that would not print as one plain word (an error is one line)
        shown = (k if k.isprintable() and k.strip() == k else repr(k) for k in unknown)
        raise ConfigError(f"{source}: unknown key(s) {', '.join(shown)}")
    missing = [k for k in REQUIRED if doc.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
    values = {k: _coerce(k, v) for k, v in doc.items()}
    cfg = AgentConfig(**values, base_dir=base_dir)
    _check(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    """Read ``path`` (may be None when every required key is overridden) and apply
    ``overrides`` (flag values; None means "not given")."""
    doc: dict[str, Any] = {}
    source = "command line"
    base_dir: Path | None = None
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
            # tomllib raises UnicodeDecodeError for a file that is not UTF-8 and
            # RecursionError for absurdly nested arrays
            raise ConfigError(f"{path} is not valid TOML: {str(exc)[:200]}") from exc
        base_dir = Path(path).absolute().parent
        for key in PATH_KEYS:  # relative to the file, as its credential names are
            value = doc.get(key)
            # an absolute value stays itself; "~" is expanded later, by _coerce
            if isinstance(value, str) and value and not value.startswith("~") and "\0" not in value:
                doc[key] = str(base_dir / value)
    for key, value in (overrides or {}).items():
        if value is not None:
            doc[key] = value
    return config_from_mapping(doc, source=source, base_dir=base_dir)


def with_overrides(cfg: AgentConfig, **changes: Any) -> AgentConfig:
    new = replace(cfg, **changes)
    _check(new)
    return new
