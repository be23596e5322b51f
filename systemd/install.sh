#!/bin/sh
# Install (or remove) the litefleet agent as a systemd service on Raspberry Pi OS or Debian.
# `install.sh --help` prints the usage; docs/systemd.md says what each step does and why.
set -eu

PREFIX=/opt/litefleet
ROOT=/
SOURCE=""
WHEELHOUSE=""
BUNDLE=""
RUNTIME=auto
DEVICE_ID=""
BROKER=""
TRUSTED_ROOT=""
PYTHON=python3
PIP_ARGS=""
DO_PIP=1
DO_SYSTEMCTL=1
DO_USER=1
DO_APT=1
DO_START=1
DRY_RUN=0
UNINSTALL=0
PURGE=0
# which options were given (a second run reports on each of them)
GIVEN_PREFIX=0
GIVEN_RUNTIME=0
GIVEN_PYTHON=0
GIVEN_TRUSTED_ROOT=0
USER_NAME=litefleet
UNIT=litefleet-agent.service
DEFAULT_BROKER="mqtt://localhost:1883"
HERE=$(cd "$(dirname "$0")" && pwd)

say() { printf 'litefleet install: %s\n' "$*"; }
die() { printf 'litefleet install: error: %s\n' "$*" >&2; exit 1; }
bad() { printf 'litefleet install: error: %s\n' "$*" >&2; exit 2; }
run() {
    if [ "$DRY_RUN" = 1 ]; then printf '+ %s\n' "$*"; else "$@"; fi
}
usage() {
    cat <<'EOF'
Usage: sudo install.sh [OPTIONS]
       sudo install.sh --uninstall [--purge]

Installs the litefleet agent as the systemd service litefleet-agent: its own virtual
environment in PREFIX/venv (litefleet and the LiteRT runtime for this machine),
/etc/litefleet/agent.toml, secrets in /etc/litefleet/credentials (handed to the agent by
LoadCredential=), state in /var/lib/litefleet, the system user "litefleet", and the unit,
enabled. The service is started only once its configuration can connect: the trusted
root and every file agent.toml names are in place and `litefleet-agent check-config` passes.
Run it again to upgrade or to change a setting: it says what it keeps and what it changes.

The device:
  --credentials DIR    a bundle from `litefleet device add ID --secure BROKERDIR --bundle DIR`:
                       device id, broker URL, TLS files or password, and root.json if it has one
  --device-id ID       the device's id (required for a new install unless --credentials gives
                       it: there is no default, every stock Raspberry Pi is called raspberrypi)
  --broker URL         mqtt://[user@]host[:port] or mqtts://...; a new install without
                       --credentials uses mqtt://localhost:1883
  --trusted-root FILE  the repository's root.json (`litefleet repo init` writes it); kept once
                       installed (the device follows root rotations itself)
  --no-start           install and enable the service, do not (re)start it

What to install (default: the wheels beside this script when it came in a wheelhouse,
else the checkout it is in):
  --wheelhouse DIR     install offline, from DIR only (made by scripts/wheelhouse.sh)
  --source SPEC        what pip installs: a checkout, a wheel or a requirement
  --runtime R          auto (default), ai-edge-litert or tflite-runtime
  --pip-args "ARGS"    more pip arguments (an index URL, a proxy)
  --python PY          the Python that makes the venv (default python3; 3.11 or newer)
  --prefix DIR         where the venv and these docs go (default /opt/litefleet)

Removing:
  --uninstall          stop and remove the service and PREFIX; keep /etc/litefleet and
                       /var/lib/litefleet
  --purge              with --uninstall: remove those and the user too

Staging an image, and tests:
  --root DIR           install under DIR (no user, no apt)
  --no-systemctl       leave systemd alone
  --no-pip             an empty venv, nothing installed into it
  --no-user            do not create the user
  --no-apt             never apt-get (python3-venv, python3-numpy)
  --dry-run            print the commands instead of running them
  -h, --help           this text
LITEFLEET_UNAME_M and LITEFLEET_USERLAND_BITS stand in for `uname -m` and `getconf LONG_BIT`.

Not supported: ARMv6 (Raspberry Pi 1, Zero, Zero W: no LiteRT build exists for it).
Exit codes: 0 done, 1 a step failed, 2 bad usage or input.
EOF
}

need() { [ $# -ge 2 ] && [ -n "$2" ] || bad "$1 needs a value (install.sh --help)"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --root) need "$@"; ROOT=$2; shift 2 ;;
        --prefix) need "$@"; PREFIX=$2; GIVEN_PREFIX=1; shift 2 ;;
        --source) need "$@"; SOURCE=$2; shift 2 ;;
        --wheelhouse) need "$@"; WHEELHOUSE=$2; shift 2 ;;
        --credentials) need "$@"; BUNDLE=$2; shift 2 ;;
        --runtime) need "$@"; RUNTIME=$2; GIVEN_RUNTIME=1; shift 2 ;;
        --device-id) need "$@"; DEVICE_ID=$2; shift 2 ;;
        --broker) need "$@"; BROKER=$2; shift 2 ;;
        --trusted-root) need "$@"; TRUSTED_ROOT=$2; GIVEN_TRUSTED_ROOT=1; shift 2 ;;
        --python) need "$@"; PYTHON=$2; GIVEN_PYTHON=1; shift 2 ;;
        --pip-args) [ $# -ge 2 ] || bad "--pip-args needs a value"; PIP_ARGS=$2; shift 2 ;;
        --no-pip) DO_PIP=0; shift ;;
        --no-systemctl) DO_SYSTEMCTL=0; shift ;;
        --no-user) DO_USER=0; shift ;;
        --no-apt) DO_APT=0; shift ;;
        --no-start) DO_START=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) printf 'litefleet install: unknown option %s (install.sh --help)\n' "$1" >&2; exit 2 ;;
    esac
done

case "$ROOT" in /*) ;; *) ROOT=$(pwd)/$ROOT ;; esac
ROOT=${ROOT%/}
R=$ROOT  # prefix for every path we touch ("" for the real system)
case "$PREFIX" in
    /*litefleet*) ;;  # the uninstall removes it whole: it must be ours
    *) bad "--prefix must be an absolute folder named for litefleet (like /opt/litefleet)" ;;
esac
[ "$PURGE" = 0 ] || [ "$UNINSTALL" = 1 ] || bad "--purge goes with --uninstall"
if [ -n "$R" ]; then
    DO_USER=0   # a user belongs to the real system's /etc/passwd
    DO_APT=0
fi
if [ -z "$R" ] && [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo), or give --root DIR to stage an install in a folder"
fi

systemctl_() { if [ "$DO_SYSTEMCTL" = 1 ]; then run systemctl "$@"; fi; }

# -- uninstall ------------------------------------------------------------------------
if [ "$UNINSTALL" = 1 ]; then
    systemctl_ disable --now "$UNIT" 2>/dev/null || true
    run rm -f "$R/etc/systemd/system/$UNIT"
    systemctl_ daemon-reload || true
    systemctl_ reset-failed "$UNIT" 2>/dev/null || true
    run rm -rf "$R$PREFIX"
    if [ "$PURGE" = 1 ]; then
        run rm -rf "$R/etc/litefleet" "$R/var/lib/litefleet"
        if [ "$DO_USER" = 1 ] && getent passwd "$USER_NAME" >/dev/null 2>&1; then
            run userdel "$USER_NAME"
        fi
        say "removed the agent, its configuration, state and user"
    else
        say "removed the agent; kept /etc/litefleet and /var/lib/litefleet (--purge removes them)"
    fi
    exit 0
fi

# -- which runtime ------------------------------------------------------------------------
MACHINE=${LITEFLEET_UNAME_M:-$(uname -m)}
case "$MACHINE" in
    armv6l|armv6*) die "ARMv6 ($MACHINE: Raspberry Pi 1, Zero, Zero W) is not supported: no LiteRT build exists for it" ;;
esac
if [ "$RUNTIME" = auto ]; then
    case "$MACHINE" in
        x86_64|amd64|aarch64|arm64) RUNTIME=ai-edge-litert ;;
        armv7l|armhf|arm) RUNTIME=tflite-runtime ;;
        *) die "no LiteRT runtime is known for $MACHINE (give --runtime)" ;;
    esac
    # a 64-bit kernel under 32-bit Raspberry Pi OS says aarch64: trust the userland
    if [ "$RUNTIME" = ai-edge-litert ] && [ "$MACHINE" != x86_64 ] && [ "$MACHINE" != amd64 ]; then
        BITS=${LITEFLEET_USERLAND_BITS:-$(getconf LONG_BIT 2>/dev/null || echo 64)}
        if [ "$BITS" = 32 ]; then RUNTIME=tflite-runtime; fi
    fi
fi
case "$RUNTIME" in
    ai-edge-litert) RUNTIME_REQS="ai-edge-litert"; OTHER_RUNTIME=tflite-runtime ;;
    # tflite-runtime is built against numpy 1.x, and PyPI has no armv7 numpy wheels:
    # numpy comes from Debian (python3-numpy 1.24 on bookworm), seen by the venv
    tflite-runtime) RUNTIME_REQS="tflite-runtime"; OTHER_RUNTIME=ai-edge-litert ;;
    *) bad "--runtime must be auto, ai-edge-litert or tflite-runtime" ;;
esac
say "machine $MACHINE: runtime $RUNTIME"

if [ "$DO_PIP" = 1 ] || [ ! -x "$R$PREFIX/venv/bin/python" ] || [ "$DRY_RUN" = 0 ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (sudo apt-get install -y python3)"
    PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "Python $PYVER is too old: the agent needs 3.11 or newer"
fi
if [ "$DO_PIP" = 1 ] || [ ! -x "$R$PREFIX/venv/bin/python" ]; then
    if [ "$RUNTIME" = tflite-runtime ]; then
        "$PYTHON" -c 'import sys; sys.exit(sys.version_info >= (3, 12))' \
            || die "tflite-runtime has no wheels for Python $PYVER (32-bit ARM needs Python 3.11: Raspberry Pi OS bookworm)"
    fi
    if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        [ "$DO_APT" = 1 ] || die "$PYTHON cannot make virtual environments (apt-get install -y python3-venv)"
        run apt-get install -y python3-venv
    fi
    if [ "$RUNTIME" = tflite-runtime ] && ! "$PYTHON" -c 'import numpy' >/dev/null 2>&1; then
        [ "$DO_APT" = 1 ] || die "32-bit ARM takes numpy from Debian: apt-get install -y python3-numpy"
        run apt-get install -y python3-numpy
    fi
fi
# on 32-bit ARM the venv sees the system's numpy (there is no armv7 wheel on PyPI)
VENV_FLAGS=""
if [ "$RUNTIME" = tflite-runtime ]; then VENV_FLAGS="--system-site-packages"; fi

# -- check every input before anything changes -----------------------------------------------
config_tool() { "$PYTHON" "$HERE/agent_config.py" "$@"; }
CONF=$R/etc/litefleet/agent.toml
CREDS=$R/etc/litefleet/credentials
if [ -n "$DEVICE_ID" ] && ! printf '%s\n' "$DEVICE_ID" | grep -Eq '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'; then
    bad "device id '$DEVICE_ID' must be 1-64 letters, digits, '.', '_' or '-'"
fi
if [ -n "$BUNDLE" ]; then
    [ -d "$BUNDLE" ] || bad "--credentials $BUNDLE is not a folder"
    BUNDLE=$(cd "$BUNDLE" && pwd)
    BUNDLE_ID=$(config_tool bundle "$BUNDLE") || exit 2
    if [ -n "$DEVICE_ID" ] && [ "$DEVICE_ID" != "$BUNDLE_ID" ]; then
        bad "--device-id $DEVICE_ID differs from the bundle's device id $BUNDLE_ID (its certificate is for $BUNDLE_ID)"
    fi
    if [ -z "$TRUSTED_ROOT" ] && [ -f "$BUNDLE/root.json" ]; then TRUSTED_ROOT=$BUNDLE/root.json; fi
fi
if [ -n "$TRUSTED_ROOT" ] && [ ! -f "$TRUSTED_ROOT" ]; then bad "--trusted-root $TRUSTED_ROOT does not exist"; fi
if [ ! -f "$CONF" ] && [ -z "$DEVICE_ID" ] && [ -z "$BUNDLE" ]; then
    bad "give --device-id ID or --credentials DIR: the device id has no default (every stock Raspberry Pi is called raspberrypi)"
fi
if [ -z "$WHEELHOUSE" ] && [ -z "$SOURCE" ] && ls "$HERE"/../wheels/litefleet-*.whl >/dev/null 2>&1; then
    WHEELHOUSE=$(cd "$HERE/../wheels" && pwd)   # this script came in a wheelhouse
fi
if [ -n "$WHEELHOUSE" ]; then
    [ -d "$WHEELHOUSE" ] || bad "--wheelhouse $WHEELHOUSE is not a folder"
    WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
    if [ -z "$SOURCE" ]; then
        SOURCE=$(ls "$WHEELHOUSE"/litefleet-*.whl 2>/dev/null | sort -V | tail -n 1)
        [ -n "$SOURCE" ] || bad "--wheelhouse $WHEELHOUSE holds no litefleet wheel (scripts/wheelhouse.sh makes one)"
    fi
    PIP_ARGS="--no-index --find-links $WHEELHOUSE $PIP_ARGS"
fi
if [ "$DO_PIP" = 1 ] && [ -z "$SOURCE" ]; then
    [ -f "$HERE/../pyproject.toml" ] || bad "give --wheelhouse DIR or --source (a litefleet checkout, wheel or requirement)"
    SOURCE=$(cd "$HERE/.." && pwd)
fi

# -- user and folders -----------------------------------------------------------------------
if [ "$DO_USER" = 1 ]; then
    if getent passwd "$USER_NAME" >/dev/null 2>&1; then
        say "user $USER_NAME exists"
    else
        run useradd --system --user-group --home-dir /var/lib/litefleet --no-create-home \
            --shell /usr/sbin/nologin --comment "litefleet agent" "$USER_NAME"
    fi
    OWNER="$USER_NAME:$USER_NAME"
    GROUP_OWNER="root:$USER_NAME"
else
    OWNER=""
    GROUP_OWNER=""
fi
chown_() { if [ -n "$1" ]; then run chown "$1" "$2"; fi; }

run mkdir -p "$R$PREFIX" "$R/etc/litefleet" "$CREDS" "$R/var/lib/litefleet" "$R/etc/systemd/system"
run chmod 0755 "$R/etc/litefleet"
run chmod 0700 "$CREDS" "$R/var/lib/litefleet"
chown_ "$OWNER" "$R/var/lib/litefleet"

# -- the venv ---------------------------------------------------------------------------------
VENV=$R$PREFIX/venv
venv_dists() {  # "name version" of litefleet and the runtimes in the venv
    [ -x "$VENV/bin/python" ] || return 0
    "$VENV/bin/python" - <<'EOF' 2>/dev/null || true
import importlib.metadata as md
for name in ("litefleet", "ai-edge-litert", "tflite-runtime"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        pass
EOF
}
OLD_PREFIX=$(sed -n 's#^ExecStart=\(/.*\)/venv/bin/litefleet-agent .*#\1#p' "$R/etc/systemd/system/$UNIT" 2>/dev/null || true)
if [ -n "$OLD_PREFIX" ] && [ "$OLD_PREFIX" != "$PREFIX" ]; then
    say "prefix changed: $OLD_PREFIX -> $PREFIX (the unit moves; $OLD_PREFIX stays: remove it with rm -rf $OLD_PREFIX)"
elif [ "$GIVEN_PREFIX" = 1 ] && [ -n "$OLD_PREFIX" ]; then
    say "prefix kept ($PREFIX)"
fi
BEFORE=$(venv_dists)
if [ -x "$VENV/bin/python" ]; then
    MADE_WITH=$(sed -n 's/^version *= *//p' "$VENV/pyvenv.cfg" 2>/dev/null || true)
    say "venv $PREFIX/venv exists (Python $MADE_WITH)"
    if [ "$GIVEN_PYTHON" = 1 ]; then
        say "kept the venv: --python $PYTHON applies to a new venv only (install.sh --uninstall first to rebuild it)"
    fi
elif [ "$DO_PIP" = 1 ]; then
    # shellcheck disable=SC2086 # VENV_FLAGS is empty or one flag
    run "$PYTHON" -m venv $VENV_FLAGS "$VENV"
else
    # shellcheck disable=SC2086
    run "$PYTHON" -m venv --without-pip $VENV_FLAGS "$VENV"
fi
if [ "$DO_PIP" = 1 ]; then
    # shellcheck disable=SC2086 # PIP_ARGS and RUNTIME_REQS are word lists on purpose
    run "$VENV/bin/python" -m pip install --upgrade --disable-pip-version-check $PIP_ARGS \
        "$SOURCE" $RUNTIME_REQS
    if printf '%s\n' "$BEFORE" | grep -q "^$OTHER_RUNTIME "; then
        run "$VENV/bin/python" -m pip uninstall -y --disable-pip-version-check "$OTHER_RUNTIME"
        say "runtime changed: $OTHER_RUNTIME -> $RUNTIME (removed $OTHER_RUNTIME from the venv)"
    elif [ "$GIVEN_RUNTIME" = 1 ] && [ -n "$BEFORE" ]; then
        say "runtime kept ($RUNTIME)"
    fi
    AFTER=$(venv_dists)
    OLD_V=$(printf '%s\n' "$BEFORE" | sed -n 's/^litefleet //p')
    NEW_V=$(printf '%s\n' "$AFTER" | sed -n 's/^litefleet //p')
    if [ -z "$OLD_V" ]; then
        say "installed litefleet $NEW_V"
    elif [ "$OLD_V" = "$NEW_V" ]; then
        say "litefleet $NEW_V kept (same version; a new version upgrades it)"
    else
        say "litefleet upgraded: $OLD_V -> $NEW_V"
    fi
fi
# Documentation= in the unit points here
if [ -d "$HERE/../docs" ]; then
    run mkdir -p "$R$PREFIX/docs"
    for doc in systemd.md raspberry-pi.md; do
        if [ -f "$HERE/../docs/$doc" ]; then run install -m 0644 "$HERE/../docs/$doc" "$R$PREFIX/docs/$doc"; fi
    done
else
    say "no docs/ beside this script: the unit's Documentation= ($PREFIX/docs/systemd.md) will be missing"
fi

# -- trusted root and credentials -----------------------------------------------------------------
if [ -n "$TRUSTED_ROOT" ]; then
    if [ -f "$R/etc/litefleet/root.json" ]; then
        if cmp -s "$TRUSTED_ROOT" "$R/etc/litefleet/root.json"; then
            say "root.json kept (the same file)"
        else
            say "kept the existing /etc/litefleet/root.json; $TRUSTED_ROOT differs (a device follows root rotations itself; remove the file to replace it)"
        fi
    else
        run install -m 0644 "$TRUSTED_ROOT" "$R/etc/litefleet/root.json"
        say "root.json installed"
    fi
fi
if [ -n "$BUNDLE" ]; then
    for src in "$BUNDLE"/credentials/*; do
        [ -f "$src" ] || continue
        name=$(basename "$src")
        dest=$CREDS/$name
        if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
            say "credential $name kept"
            continue
        fi
        if [ -f "$dest" ]; then what=replaced; else what=added; fi
        run install -m 0600 "$src" "$dest.tmp"
        run mv "$dest.tmp" "$dest"
        say "credential $name $what"
    done
    # the bundle is the device's whole identity: a standard credential it lacks is stale
    for name in ca.pem client.pem client.key mqtt-password; do
        if [ -f "$CREDS/$name" ] && [ ! -f "$BUNDLE/credentials/$name" ]; then
            run rm -f "$CREDS/$name"
            say "credential $name removed (not in the new bundle)"
        fi
    done
fi

# -- configuration ------------------------------------------------------------------------------
set --
if [ -n "$BUNDLE" ]; then set -- "$@" --bundle "$BUNDLE"; fi
if [ -n "$DEVICE_ID" ]; then set -- "$@" --set "device_id=$DEVICE_ID"; fi
if [ -n "$BROKER" ]; then set -- "$@" --set "broker=$BROKER"; fi
if [ -f "$CONF" ] && [ $# -eq 0 ]; then
    say "kept the existing /etc/litefleet/agent.toml"
elif [ -f "$CONF" ]; then
    say "kept the existing /etc/litefleet/agent.toml, changing only what the options say:"
    if [ "$DRY_RUN" = 1 ]; then
        printf '+ update %s %s\n' "$CONF" "$*"
    else
        REPORT=$(config_tool update "$CONF" "$@") || exit $?
        printf '%s\n' "$REPORT" | sed 's/^/  /'
    fi
elif [ "$DRY_RUN" = 1 ]; then
    printf '+ write %s\n' "$CONF"
else
    if [ -z "$BROKER" ] && [ -z "$BUNDLE" ]; then set -- "$@" --set "broker=$DEFAULT_BROKER"; fi
    umask 027
    : > "$CONF.tmp"
    config_tool new "$CONF.tmp" --set "trusted_root=/etc/litefleet/root.json" "$@" || { rm -f "$CONF.tmp"; exit 2; }
    mv "$CONF.tmp" "$CONF"
    umask 022
    run chmod 0640 "$CONF"
    chown_ "$GROUP_OWNER" "$CONF"
    say "wrote /etc/litefleet/agent.toml (device $(config_tool get "$CONF" device_id), broker $(config_tool get "$CONF" broker))"
fi

# -- the unit ------------------------------------------------------------------------------------
UNIT_SRC=$HERE/$UNIT
[ -f "$UNIT_SRC" ] || die "$UNIT_SRC is missing (run this script from the litefleet source tree or wheelhouse)"
if [ "$DRY_RUN" = 1 ]; then
    printf '+ install %s\n' "$R/etc/systemd/system/$UNIT"
else
    sed "s#/opt/litefleet#$PREFIX#g" "$UNIT_SRC" > "$R/etc/systemd/system/$UNIT.tmp"
    chmod 0644 "$R/etc/systemd/system/$UNIT.tmp"
    mv "$R/etc/systemd/system/$UNIT.tmp" "$R/etc/systemd/system/$UNIT"
fi
systemctl_ daemon-reload
systemctl_ enable "$UNIT"

# -- start only a configuration that can connect --------------------------------------------------
WHY_NOT=""
if [ "$DRY_RUN" = 0 ]; then
    WHY_NOT=$(config_tool missing "$CONF" --root "${R:-/}" --credentials "$CREDS" | sed 's/^/missing /' | paste -sd ';' -)
    if [ -z "$WHY_NOT" ] && [ -x "$VENV/bin/litefleet-agent" ] && [ "$DO_PIP" = 1 ] && [ -z "$R" ]; then
        # check-config looks a credential name litefleet_F up in $CREDENTIALS_DIRECTORY, as
        # the agent does under the unit: hand it the credentials as LoadCredential= will
        CHECK_CREDS=$(mktemp -d)
        for f in "$CREDS"/*; do
            if [ -f "$f" ]; then ln -s "$f" "$CHECK_CREDS/litefleet_$(basename "$f")"; fi
        done
        if ! CHECK=$(CREDENTIALS_DIRECTORY=$CHECK_CREDS "$VENV/bin/litefleet-agent" check-config --config "$CONF" 2>&1); then
            WHY_NOT="check-config: $CHECK"
        fi
        rm -rf "$CHECK_CREDS"
    fi
fi
if [ -n "$WHY_NOT" ]; then
    say "installed, not started: $WHY_NOT"
    say "put that in place, then: sudo systemctl restart litefleet-agent"
elif [ "$DO_START" = 0 ]; then
    say "installed and enabled, not started (--no-start): sudo systemctl start litefleet-agent"
elif [ "$DO_SYSTEMCTL" = 0 ]; then
    say "installed (systemd left alone: --no-systemctl)"
else
    systemctl_ restart "$UNIT" || die "the agent did not start: journalctl -u litefleet-agent -n 50"
    say "installed; the agent is running (systemctl status litefleet-agent, journalctl -u litefleet-agent -f)"
fi
