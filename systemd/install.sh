#!/bin/sh
# Install (or remove) the litefleet agent as a systemd service on Raspberry Pi OS or Debian.
#
#   sudo ./systemd/install.sh [--device-id ID] [--broker URL] [--trusted-root root.json]
#   sudo ./systemd/install.sh --uninstall [--purge]
#
# What it does, each step skipped when already done (running it again is safe):
#   - a system user "litefleet" (no login, no home of its own);
#   - its own virtual environment in /opt/litefleet/venv with litefleet and the
#     LiteRT runtime this machine can run: ai-edge-litert on 64-bit (x86_64,
#     aarch64), tflite-runtime (with numpy<2, which it was built against) on
#     32-bit ARM (armv7l, armv6l, or a 64-bit kernel under a 32-bit userland);
#   - /etc/litefleet/agent.toml from a template (never overwritten once there),
#     /etc/litefleet/credentials/ (root only) for secrets handed over by
#     systemd's LoadCredential=, the trusted root as /etc/litefleet/root.json;
#   - /var/lib/litefleet (the state folder, owned by the user);
#   - the unit /etc/systemd/system/litefleet-agent.service, enabled; started
#     once the trusted root is in place.
# --uninstall stops and removes the unit and the venv, keeping configuration and
# state; --purge removes those and the user too.
#
# For tests and image staging: --root DIR installs under DIR (no user is created
# there), --no-systemctl leaves systemd alone, --no-pip makes an empty venv,
# --dry-run prints the commands instead of running them; LITEFLEET_UNAME_M and
# LITEFLEET_USERLAND_BITS stand in for `uname -m` and `getconf LONG_BIT`.
set -eu

PREFIX=/opt/litefleet
ROOT=/
SOURCE=""
RUNTIME=auto
DEVICE_ID=""
BROKER="mqtt://localhost:1883"
TRUSTED_ROOT=""
PYTHON=python3
PIP_ARGS=""
DO_PIP=1
DO_SYSTEMCTL=1
DO_USER=1
DO_APT=1
DRY_RUN=0
UNINSTALL=0
PURGE=0
USER_NAME=litefleet
UNIT=litefleet-agent.service
HERE=$(cd "$(dirname "$0")" && pwd)

say() { printf 'litefleet install: %s\n' "$*"; }
die() { printf 'litefleet install: error: %s\n' "$*" >&2; exit 1; }
run() {
    if [ "$DRY_RUN" = 1 ]; then printf '+ %s\n' "$*"; else "$@"; fi
}
usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=${2:?--root needs a folder}; shift 2 ;;
        --prefix) PREFIX=${2:?--prefix needs a folder}; shift 2 ;;
        --source) SOURCE=${2:?--source needs a path or requirement}; shift 2 ;;
        --runtime) RUNTIME=${2:?--runtime needs auto, ai-edge-litert or tflite-runtime}; shift 2 ;;
        --device-id) DEVICE_ID=${2:?}; shift 2 ;;
        --broker) BROKER=${2:?}; shift 2 ;;
        --trusted-root) TRUSTED_ROOT=${2:?}; shift 2 ;;
        --python) PYTHON=${2:?}; shift 2 ;;
        --pip-args) PIP_ARGS=${2?}; shift 2 ;;
        --no-pip) DO_PIP=0; shift ;;
        --no-systemctl) DO_SYSTEMCTL=0; shift ;;
        --no-user) DO_USER=0; shift ;;
        --no-apt) DO_APT=0; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage 0 ;;
        *) printf 'litefleet install: unknown option %s\n' "$1" >&2; usage 2 ;;
    esac
done

case "$ROOT" in /*) ;; *) ROOT=$(pwd)/$ROOT ;; esac
ROOT=${ROOT%/}
R=$ROOT  # prefix for every path we touch ("" for the real system)
case "$PREFIX" in
    /*litefleet*) ;;  # the uninstall removes it whole: it must be ours
    *) die "--prefix must be an absolute folder named for litefleet (like /opt/litefleet)" ;;
esac
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
if [ "$RUNTIME" = auto ]; then
    case "$MACHINE" in
        x86_64|amd64|aarch64|arm64) RUNTIME=ai-edge-litert ;;
        armv7l|armv6l|armhf|arm) RUNTIME=tflite-runtime ;;
        *) die "no LiteRT runtime is known for $MACHINE (give --runtime)" ;;
    esac
    # a 64-bit kernel under 32-bit Raspberry Pi OS says aarch64: trust the userland
    if [ "$RUNTIME" = ai-edge-litert ] && [ "$MACHINE" != x86_64 ] && [ "$MACHINE" != amd64 ]; then
        BITS=${LITEFLEET_USERLAND_BITS:-$(getconf LONG_BIT 2>/dev/null || echo 64)}
        if [ "$BITS" = 32 ]; then RUNTIME=tflite-runtime; fi
    fi
fi
case "$RUNTIME" in
    ai-edge-litert) RUNTIME_REQS="ai-edge-litert" ;;
    # tflite-runtime is built against numpy 1.x, and PyPI has no armv7 numpy wheels:
    # numpy comes from Debian (python3-numpy 1.24 on bookworm), seen by the venv
    tflite-runtime) RUNTIME_REQS="tflite-runtime" ;;
    *) die "--runtime must be auto, ai-edge-litert or tflite-runtime" ;;
esac
say "machine $MACHINE: runtime $RUNTIME"

if [ "$DO_PIP" = 1 ] || [ ! -x "$R$PREFIX/venv/bin/python" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (sudo apt-get install -y python3)"
    PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "Python $PYVER is too old: the agent needs 3.11 or newer"
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

run mkdir -p "$R$PREFIX" "$R/etc/litefleet" "$R/etc/litefleet/credentials" "$R/var/lib/litefleet" \
    "$R/etc/systemd/system"
run chmod 0755 "$R/etc/litefleet"
run chmod 0700 "$R/etc/litefleet/credentials" "$R/var/lib/litefleet"
chown_ "$OWNER" "$R/var/lib/litefleet"

# -- the venv ---------------------------------------------------------------------------------
VENV=$R$PREFIX/venv
if [ -x "$VENV/bin/python" ]; then
    say "venv $PREFIX/venv exists"
elif [ "$DO_PIP" = 1 ]; then
    # shellcheck disable=SC2086 # VENV_FLAGS is empty or one flag
    run "$PYTHON" -m venv $VENV_FLAGS "$VENV"
else
    # shellcheck disable=SC2086
    run "$PYTHON" -m venv --without-pip $VENV_FLAGS "$VENV"
fi
if [ "$DO_PIP" = 1 ]; then
    if [ -z "$SOURCE" ]; then
        [ -f "$HERE/../pyproject.toml" ] || die "give --source (a litefleet source tree, wheel or requirement)"
        SOURCE=$(cd "$HERE/.." && pwd)
    fi
    # shellcheck disable=SC2086 # PIP_ARGS and RUNTIME_REQS are word lists on purpose
    run "$VENV/bin/python" -m pip install --upgrade --disable-pip-version-check $PIP_ARGS \
        "$SOURCE" $RUNTIME_REQS
fi

# -- configuration ------------------------------------------------------------------------------
CONF=$R/etc/litefleet/agent.toml
if [ -n "$TRUSTED_ROOT" ]; then
    if [ -f "$R/etc/litefleet/root.json" ]; then
        if ! cmp -s "$TRUSTED_ROOT" "$R/etc/litefleet/root.json"; then
            say "kept the existing /etc/litefleet/root.json (a device updates its root itself; remove it to replace)"
        fi
    else
        run install -m 0644 "$TRUSTED_ROOT" "$R/etc/litefleet/root.json"
    fi
fi
if [ -f "$CONF" ]; then
    say "kept the existing /etc/litefleet/agent.toml"
else
    ID=${DEVICE_ID:-$(hostname 2>/dev/null | tr -c 'A-Za-z0-9_.\n-' '-' | cut -c1-64)}
    if [ "$DRY_RUN" = 1 ]; then
        printf '+ write %s\n' "$CONF"
    else
        umask 027
        cat > "$CONF.tmp" <<EOF
# litefleet agent configuration (see docs/systemd.md). Unknown keys are an error.
device_id = "$ID"
broker = "$BROKER"
state_dir = "/var/lib/litefleet"
# the repository's root metadata this device trusts: litefleet repo init writes it
trusted_root = "/etc/litefleet/root.json"
groups = []
# local REST API (TensorFlow Serving shape); "" disables it
http = "127.0.0.1:8501"
runtime = "auto"
threads = 1
metrics_interval_s = 10.0
# secrets live in /etc/litefleet/credentials/ (root only); systemd hands each file
# to the agent as litefleet_<file>, e.g.:
# password_file = "litefleet_mqtt-password"
EOF
        mv "$CONF.tmp" "$CONF"
        umask 022
    fi
    run chmod 0640 "$CONF"
    chown_ "$GROUP_OWNER" "$CONF"
fi

# -- the unit ------------------------------------------------------------------------------------
UNIT_SRC=$HERE/$UNIT
[ -f "$UNIT_SRC" ] || die "$UNIT_SRC is missing (run this script from the litefleet source tree)"
if [ "$DRY_RUN" = 1 ]; then
    printf '+ install %s\n' "$R/etc/systemd/system/$UNIT"
else
    sed "s#/opt/litefleet#$PREFIX#g" "$UNIT_SRC" > "$R/etc/systemd/system/$UNIT.tmp"
    chmod 0644 "$R/etc/systemd/system/$UNIT.tmp"
    mv "$R/etc/systemd/system/$UNIT.tmp" "$R/etc/systemd/system/$UNIT"
fi
systemctl_ daemon-reload
systemctl_ enable "$UNIT"
if [ -f "$R/etc/litefleet/root.json" ]; then
    systemctl_ restart "$UNIT"
    if [ "$DO_SYSTEMCTL" = 1 ]; then
        say "installed; the agent is running (journalctl -u litefleet-agent -f)"
    else
        say "installed (systemd left alone: --no-systemctl)"
    fi
else
    say "installed; put the repository's root.json at /etc/litefleet/root.json, check"
    say "/etc/litefleet/agent.toml, then: sudo systemctl start litefleet-agent"
fi
