"""Before the agent starts: every file its configuration names is there and usable.

A missing ``ca_file`` used to surface as a ``FileNotFoundError`` traceback from
``ssl.create_default_context`` once the agent had started (under systemd: a
crash loop until the start limit). :func:`check_files` reads each file the way
the agent will, so ``litefleet-agent check-config`` and ``run`` refuse such a
configuration with one line and exit code 2.

Guarantees:

* every key that names a file (``trusted_root``, ``ca_file``, ``cert_file``,
  ``key_file``, ``password_file``) is checked, and ``state_dir`` is a folder
  if it exists; the first problem raises :class:`agent.errors.ConfigError`
  naming the key and the path;
* a relative credential name is looked up as the agent will look it up
  (:func:`agent.service.config.resolve_credential`): the message names every
  folder looked in, so an operator sees whether ``$CREDENTIALS_DIRECTORY`` was
  set;
* the TLS files are loaded into an :class:`ssl.SSLContext` exactly as the MQTT
  client will load them, and any :class:`ssl.SSLError` or :class:`OSError`
  becomes that one line: no traceback from :mod:`ssl`, ever;
* nothing is written and nothing connects.

:func:`supervision_warning` is advice, not a refusal: ``check_isolation = "restart"``
leans on whatever restarts the agent when it ends (docs/protocol.md 7.2), and an agent
started from a terminal has nothing; ``run`` logs it at start-up.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path

from agent.errors import ConfigError
from agent.service.config import CREDENTIAL_KEYS, AgentConfig, resolve_credential


def credential_files(cfg: AgentConfig, env: Mapping[str, str] | None = None) -> dict[str, Path]:
    """key -> the file it names, for every credential key that is set; raises
    :class:`ConfigError` for one that is not a readable file."""
    env = os.environ if env is None else env
    found: dict[str, Path] = {}
    for key in CREDENTIAL_KEYS:
        value = getattr(cfg, key)
        if not value:
            continue
        lookup = resolve_credential(value, env, cfg.base_dir)
        if lookup.looked_in and not lookup.path.exists():  # a relative name found nowhere
            raise ConfigError(f"{key} {value}: no such file (looked in {' and '.join(lookup.looked_in)})")
        _readable(key, lookup.path)
        found[key] = lookup.path
    return found


def _readable(key: str, path: Path) -> None:
    if not path.exists():
        raise ConfigError(f"{key} {path}: no such file")
    if not path.is_file():
        raise ConfigError(f"{key} {path}: not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(f"{key} {path}: cannot read it ({exc.strerror})") from exc


def check_tls(files: Mapping[str, Path]) -> None:
    """Load the CA and the client certificate and key as the MQTT client does."""
    ca = files.get("ca_file")
    try:
        ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"ca_file {ca}: not a usable CA certificate ({_ssl_reason(exc)})") from exc
    cert = files.get("cert_file")
    if cert is None:
        return
    key = files.get("key_file")
    try:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"cert_file {cert} with key_file {key}: not a matching PEM certificate and key "
            f"({_ssl_reason(exc)})"
        ) from exc


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return str(reason).replace("\n", " ")[:120]


def check_files(cfg: AgentConfig, env: Mapping[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` for the first file of ``cfg`` that the agent could not use."""
    from agent.delivery.updater import read_trusted_root

    if cfg.state_dir.exists() and not cfg.state_dir.is_dir():
        raise ConfigError(f"state_dir {cfg.state_dir}: exists and is not a folder")
    _readable("trusted_root", cfg.trusted_root)
    read_trusted_root(cfg.trusted_root)  # TUF root metadata, or a ConfigError naming it
    files = credential_files(cfg, env)
    if cfg.broker_address.tls:
        check_tls(files)
    if "password_file" in files and not files["password_file"].read_text(errors="replace").strip():
        raise ConfigError(f"password_file {files['password_file']}: is empty")


def restarted_by(env: Mapping[str, str] | None = None, parent_comm: str | None = None) -> str | None:
    """What starts this process again when it ends: ``"systemd"`` (a unit: systemd sets
    ``INVOCATION_ID``), ``"runit"`` (the parent is ``runsv``: termux-services), or None.
    ``parent_comm``: the parent's command name (read from /proc when not given)."""
    env = os.environ if env is None else env
    if env.get("INVOCATION_ID"):
        return "systemd"
    if parent_comm is None:
        try:
            parent_comm = Path(f"/proc/{os.getppid()}/comm").read_text().strip()
        except OSError:
            return None
    return "runit" if parent_comm == "runsv" else None


def supervision_warning(
    cfg: AgentConfig, env: Mapping[str, str] | None = None, parent_comm: str | None = None
) -> str | None:
    """A line for the log when ``cfg`` asks for restart isolation and nothing seems to
    restart the agent (a unit without ``Restart=`` is not noticed)."""
    if cfg.check_isolation != "restart" or restarted_by(env, parent_comm) is not None:
        return None
    return (
        'check_isolation = "restart", but this agent is neither a systemd service nor under '
        "runit, so nothing seems to start it again when it ends: a model that crashes or hangs "
        'its check would leave the device serving nothing. Use "fork" (the default) here.'
    )
