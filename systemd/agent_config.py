"""agent.toml for systemd/install.sh: write it, change keys in it, say what changed.

Run by install.sh with the Python that makes the agent's venv (3.11 or newer, standard
library only: the venv may not exist yet). Guarantees:

- a new agent.toml is the template below with the given keys, and parses with tomllib;
- ``update`` changes only the keys it is given, one line each, leaves every other line (the
  operator's edits, comments) as it was, and prints one line per given key saying whether it
  was kept or changed: install.sh never ignores a flag silently;
- a file is replaced atomically (temp file, fsync, rename), with its mode and owner kept;
- ``missing`` lists every file the configuration names that is not there (a credential name
  ``litefleet_F`` is ``F`` in the credentials folder that ``LoadCredential=`` hands over), so
  install.sh does not start an agent whose configuration cannot connect.

Exit codes: 0 done, 1 a file could not be read or written, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# keys install.sh may set; all plain strings, one line each
SETTABLE = (
    "device_id",
    "broker",
    "trusted_root",
    "ca_file",
    "cert_file",
    "key_file",
    "username",
    "password_file",
    "topic_prefix",
    "site",
)
# keys naming a file: relative names are systemd credentials (LoadCredential=)
FILE_KEYS = ("trusted_root", "ca_file", "cert_file", "key_file", "password_file")
# TLS and identity keys a credentials bundle sets together: one it lacks is removed
BUNDLE_KEYS = ("device_id", "broker", "ca_file", "cert_file", "key_file", "username", "password_file")
# what a bundle may say beside them (a site broker's bundle names its site); a bundle
# without one removes it too (the default prefix; a device of a central broker)
BUNDLE_EXTRA = ("topic_prefix", "site")
CRED_PREFIX = "litefleet_"
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

TEMPLATE = """\
# litefleet agent configuration (/opt/litefleet/docs/systemd.md). Unknown keys are an error.
device_id = {device_id}
broker = {broker}
state_dir = "/var/lib/litefleet"
# the repository's root metadata this device trusts: litefleet repo init writes it
trusted_root = {trusted_root}
groups = []
# local REST API (TensorFlow Serving shape); "" disables it
http = "127.0.0.1:8501"
runtime = "auto"
threads = 1
metrics_interval_s = 10.0
log_level = "info"
# secrets live in /etc/litefleet/credentials/ (root only); systemd hands each file F to
# the agent as litefleet_F (LoadCredential=), e.g. password_file = "litefleet_mqtt-password"
"""


class InputError(Exception):
    """Bad input: exit 2."""


def toml_string(value: str) -> str:
    """A TOML basic string (JSON's escapes are valid TOML for every character)."""
    return json.dumps(value)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"{path} does not exist") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid TOML: {exc}") from exc


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in SETTABLE:
            raise InputError(f"--set wants KEY=VALUE with KEY one of {', '.join(SETTABLE)}: {item!r}")
        out[key] = value
    if "device_id" in out and not DEVICE_ID_RE.match(out["device_id"]):
        raise InputError(f"device id {out['device_id']!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return out


def bundle_keys(bundle: Path) -> dict[str, str]:
    """The identity and TLS keys of a credentials bundle's agent.toml (``device add --bundle``)."""
    doc = read_toml(bundle / "agent.toml")
    keys = {k: v for k, v in doc.items() if k in (*BUNDLE_KEYS, *BUNDLE_EXTRA)}
    bad = [k for k, v in keys.items() if not isinstance(v, str)]
    unknown = sorted(set(doc) - set(keys))
    if bad or unknown or "device_id" not in keys or "broker" not in keys:
        raise InputError(
            f"{bundle}/agent.toml is not a litefleet credentials bundle "
            "(device_id, broker and TLS keys only, as `litefleet device add ID --bundle DIR` writes)"
        )
    for key in ("ca_file", "cert_file", "key_file", "password_file"):
        name = keys.get(key, "")
        if name and not (bundle / "credentials" / name.removeprefix(CRED_PREFIX)).is_file():
            raise InputError(f"{bundle}/agent.toml names {key} {name!r} but credentials/ has no such file")
    return keys


def render(values: Mapping[str, str]) -> str:
    """A new agent.toml: the template with ``values`` (device_id, broker and trusted_root are
    required); other settable keys follow the template's lines."""
    missing = [k for k in ("device_id", "broker", "trusted_root") if not values.get(k)]
    if missing:
        raise InputError(f"a new agent.toml needs {', '.join(missing)}")
    text = TEMPLATE.format(**{k: toml_string(values[k]) for k in ("device_id", "broker", "trusted_root")})
    extra = [
        f"{k} = {toml_string(v)}"
        for k, v in values.items()
        if v and k not in ("device_id", "broker", "trusted_root")
    ]
    return text + ("\n".join(extra) + "\n" if extra else "")


_KEY_LINE = r"^[ \t]*{key}[ \t]*="


def set_key(text: str, key: str, value: str | None) -> str:
    """``text`` with top-level ``key`` set to ``value`` (None removes it). Only single-line
    values are replaced; a table header ends the top level."""
    lines = text.splitlines(keepends=True)
    pattern = re.compile(_KEY_LINE.format(key=re.escape(key)))
    top = next((i for i, line in enumerate(lines) if line.lstrip().startswith("[")), len(lines))
    for i in range(top):
        if pattern.match(lines[i]):
            if value is None:
                del lines[i]
            else:
                lines[i] = f"{key} = {toml_string(value)}\n"
            return "".join(lines)
    if value is None:
        return text
    if top > 0 and not lines[top - 1].endswith("\n"):
        lines[top - 1] += "\n"
    lines.insert(top, f"{key} = {toml_string(value)}\n")
    return "".join(lines)


def update(text: str, wanted: Mapping[str, str | None]) -> tuple[str, list[str]]:
    """Apply ``wanted`` (None: remove the key); return the new text and one report line per key."""
    current = tomllib.loads(text)
    report = []
    for key, value in wanted.items():
        old = current.get(key)
        if value is None:
            if old is not None:
                text = set_key(text, key, None)
                report.append(f"agent.toml: {key} removed (was {old})")
            continue
        if old == value:
            report.append(f"agent.toml: {key} kept ({value})")
            continue
        text = set_key(text, key, value)
        report.append(f"agent.toml: {key} changed: {old if old is not None else '(unset)'} -> {value}")
    after = tomllib.loads(text)
    for key, value in wanted.items():
        if after.get(key) != value:
            raise InputError(f"could not set {key} in agent.toml (is it on more than one line?)")
    return text, report


def missing_files(config: Mapping[str, Any], root: Path, credentials: Path) -> list[str]:
    """``key path`` for every file the configuration names that is absent. Paths are read under
    ``root`` (an install staged with --root); credential names in ``credentials``, itself under
    ``root``."""
    out = []
    for key in FILE_KEYS:
        value = config.get(key)
        if not isinstance(value, str) or not value:
            continue
        if value.startswith("/"):
            path, shown = root / value.lstrip("/"), value
        elif not value.startswith(CRED_PREFIX):
            out.append(f"{key} {value} (a relative name must be a credential, {CRED_PREFIX}FILE)")
            continue
        else:
            path = credentials / value.removeprefix(CRED_PREFIX)
            shown = f"/{path.relative_to(root)} (credential {value})"
        if not path.is_file():
            out.append(f"{key} {shown}")
    return out


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        st = None
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    if st is not None:
        os.chmod(tmp, st.st_mode & 0o7777)
        os.chown(tmp, st.st_uid, st.st_gid)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _wanted(args: argparse.Namespace) -> dict[str, str | None]:
    wanted: dict[str, str | None] = {}
    if args.bundle:
        keys = bundle_keys(Path(args.bundle))
        # the bundle's identity replaces the old one whole: a key it lacks goes
        wanted = {k: keys.get(k) for k in (*BUNDLE_KEYS, *BUNDLE_EXTRA)}
    wanted.update(parse_sets(args.set))
    return wanted


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agent_config.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="write a new agent.toml")
    upd = sub.add_parser("update", help="change keys of an agent.toml, saying what changed")
    for p in (new, upd):
        p.add_argument("config", type=Path)
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--bundle", help="a credentials bundle folder (its agent.toml's keys)")
    get = sub.add_parser("get", help="print a key's value (empty when unset)")
    get.add_argument("config", type=Path)
    get.add_argument("key")
    chk = sub.add_parser("bundle", help="check a credentials bundle; print its device id")
    chk.add_argument("bundle", type=Path)
    miss = sub.add_parser("missing", help="list the files the configuration names that are absent")
    miss.add_argument("config", type=Path)
    miss.add_argument("--root", type=Path, default=Path("/"))
    miss.add_argument("--credentials", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "new":
            wanted = {k: v for k, v in _wanted(args).items() if v is not None}
            text = render(wanted)
            tomllib.loads(text)
            write_atomic(args.config, text)
        elif args.command == "update":
            before = args.config.read_text()
            text, report = update(before, _wanted(args))
            if text != before:
                write_atomic(args.config, text)
            sys.stdout.write("".join(f"{line}\n" for line in report))
        elif args.command == "get":
            value = read_toml(args.config).get(args.key, "")
            sys.stdout.write(f"{value}\n")
        elif args.command == "bundle":
            sys.stdout.write(f"{bundle_keys(args.bundle)['device_id']}\n")
        else:
            absent = missing_files(read_toml(args.config), args.root, args.credentials)
            sys.stdout.write("".join(f"{line}\n" for line in absent))
    except InputError as exc:
        sys.stderr.write(f"litefleet install: error: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"litefleet install: error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
