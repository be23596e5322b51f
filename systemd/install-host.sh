#!/bin/sh
# Install (or remove) litefleet's host side as systemd services: the broker, the monitor,
# the rollout service and a timer that re-signs the repository's metadata before it expires;
# or, with --upstream, a site host: the site broker alone, bridged to central (docs/sites.md).
# `install-host.sh --help` prints the usage; docs/systemd.md ("The host side") says more.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=/
LITEFLEET=""
RUN_USER=${SUDO_USER:-}
SECURE_DIR=""
REPO_DIR=""
UPSTREAM=""
BIND=127.0.0.1
BROKER_ARGS=""
MONITOR_DB=""
PROMETHEUS=127.0.0.1:9464
HTTP=127.0.0.1:8080
RESIGN_CALENDAR=daily
DOCS=/usr/local/share/doc/litefleet
DO_SYSTEMCTL=1
DO_START=1
UNINSTALL=0
INSTALLED_LIST=/etc/litefleet-host/units

say() { printf 'litefleet install-host: %s\n' "$*"; }
die() { printf 'litefleet install-host: error: %s\n' "$*" >&2; exit 1; }
bad() { printf 'litefleet install-host: error: %s\n' "$*" >&2; exit 2; }
usage() {
    cat <<'EOF'
Usage: sudo install-host.sh --secure-dir DIR --repo DIR [OPTIONS]
       sudo install-host.sh --secure-dir DIR --upstream mqtts://CENTRAL:PORT [OPTIONS]
       sudo install-host.sh --uninstall

Installs litefleet's host side as systemd services, run as the operator's user:
  litefleet-broker.service   litefleet broker --secure DIR (TLS, per-device identities)
  litefleet-monitor.service  litefleet monitor (history in SQLite, Prometheus /metrics, page and API)
  litefleet-rollout.service  litefleet rollout service (drives `rollout start ... --detach`)
  litefleet-resign.timer     litefleet repo resign REPO, daily (timestamp.json expires in 14 days)
Every systemd/litefleet-*.service and *.timer template beside this script is installed
(litefleet-agent.service aside, it is the device's): a new template is picked up as it is.
With --upstream the host is a site's: only litefleet-broker.service, as a site broker
(`litefleet broker --secure DIR --upstream URL`); no repository, monitor, rollout or timer.
Running it again rewrites the units with the new options and restarts what runs.

  --secure-dir DIR     the broker's folder (`litefleet broker --secure DIR` makes it on first start)
  --repo DIR           the model repository (`litefleet repo init DIR`)
  --upstream URL       a site host: central's mqtts://HOST:PORT; DIR/uplink must hold the bundle
                       `litefleet site add NAME` wrote at central (docs/sites.md)
  --user USER          who the services run as: the owner of DIR and REPO (default: $SUDO_USER)
  --litefleet PATH     the litefleet command (default: the one on PATH)
  --bind ADDR          the broker's listen address (default 127.0.0.1; 0.0.0.0 for devices on the LAN)
  --broker-args "ARGS" more `litefleet broker` options, e.g. "--san broker.lan --port 8883"
  --monitor-db FILE    the monitor's SQLite file (default: DIR/../monitor/litefleet-monitor.db)
  --prometheus H:P     the monitor's /metrics for Prometheus (default 127.0.0.1:9464)
  --http H:P           the monitor's page and /api (default 127.0.0.1:8080; the same H:P as
                       --prometheus serves both there)
  --resign-calendar C  when the timer re-signs (systemd OnCalendar=, default daily)
  --no-start           install and enable, do not (re)start
  --uninstall          stop and remove the units (data folders stay)
  --root DIR           install under DIR (image staging, tests); --no-systemctl leaves systemd alone
  -h, --help           this text
Exit codes: 0 done, 1 a step failed, 2 bad usage or input.
EOF
}

need() { [ $# -ge 2 ] && [ -n "$2" ] || bad "$1 needs a value (install-host.sh --help)"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --secure-dir) need "$@"; SECURE_DIR=$2; shift 2 ;;
        --repo) need "$@"; REPO_DIR=$2; shift 2 ;;
        --upstream) need "$@"; UPSTREAM=$2; shift 2 ;;
        --user) need "$@"; RUN_USER=$2; shift 2 ;;
        --litefleet) need "$@"; LITEFLEET=$2; shift 2 ;;
        --bind) need "$@"; BIND=$2; shift 2 ;;
        --broker-args) [ $# -ge 2 ] || bad "--broker-args needs a value"; BROKER_ARGS=$2; shift 2 ;;
        --monitor-db) need "$@"; MONITOR_DB=$2; shift 2 ;;
        --prometheus) need "$@"; PROMETHEUS=$2; shift 2 ;;
        --http) need "$@"; HTTP=$2; shift 2 ;;
        --resign-calendar) need "$@"; RESIGN_CALENDAR=$2; shift 2 ;;
        --no-start) DO_START=0; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --root) need "$@"; ROOT=$2; shift 2 ;;
        --no-systemctl) DO_SYSTEMCTL=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) printf 'litefleet install-host: unknown option %s (install-host.sh --help)\n' "$1" >&2; exit 2 ;;
    esac
done
case "$ROOT" in /*) ;; *) ROOT=$(pwd)/$ROOT ;; esac
R=${ROOT%/}
if [ -z "$R" ] && [ "$(id -u)" != 0 ]; then die "run as root (sudo), or give --root DIR"; fi
systemctl_() { if [ "$DO_SYSTEMCTL" = 1 ]; then systemctl "$@"; fi; }

# -- uninstall ------------------------------------------------------------------------------
if [ "$UNINSTALL" = 1 ]; then
    [ -f "$R$INSTALLED_LIST" ] || { say "no host units are installed"; exit 0; }
    while read -r unit; do
        [ -n "$unit" ] || continue
        systemctl_ disable --now "$unit" 2>/dev/null || true
        rm -f "$R/etc/systemd/system/$unit"
        say "removed $unit"
    done < "$R$INSTALLED_LIST"
    rm -rf "$R$(dirname "$INSTALLED_LIST")" "$R$DOCS"
    systemctl_ daemon-reload
    say "kept the data: the broker folder, the repository and the monitor's history"
    exit 0
fi

# -- check every input before anything changes -----------------------------------------------
[ -n "$SECURE_DIR" ] || bad "give --secure-dir DIR (the broker's folder)"
case "$SECURE_DIR" in /*) ;; *) bad "$SECURE_DIR: give absolute paths (the services do not run in this folder)" ;; esac
if [ -n "$UPSTREAM" ]; then
    # a site host: its broker alone, bridged up; the repository and its services stay at central
    case "$UPSTREAM" in mqtts://?*:[0-9]*) ;; *) bad "--upstream $UPSTREAM: give mqtts://HOST:PORT (central's device-certificate listener)" ;; esac
    [ -z "$REPO_DIR" ] || bad "--repo: a site host has no repository (--upstream installs the site broker alone)"
    [ -f "$R$SECURE_DIR/uplink/site.json" ] || bad "$SECURE_DIR/uplink/site.json is missing: copy the folder 'litefleet site add NAME' wrote at central (CENTRAL/sites/NAME) to $SECURE_DIR/uplink first"
    if [ -z "$R" ] && [ -n "$RUN_USER" ] && [ -n "$(find "$SECURE_DIR/uplink" ! -user "$RUN_USER" -print -quit)" ]; then
        bad "$SECURE_DIR/uplink holds files $RUN_USER does not own (the broker runs as $RUN_USER): chown -R $RUN_USER $SECURE_DIR/uplink"
    fi
    OWNED=$SECURE_DIR
else
    [ -n "$REPO_DIR" ] || bad "give --repo DIR (the model repository)"
    case "$REPO_DIR" in /*) ;; *) bad "$REPO_DIR: give absolute paths (the services do not run in this folder)" ;; esac
    [ -f "$R$REPO_DIR/repo.json" ] || bad "$REPO_DIR is not a litefleet repository (litefleet repo init $REPO_DIR)"
    OWNED=$REPO_DIR
fi
[ -n "$MONITOR_DB" ] || MONITOR_DB=$(dirname "$SECURE_DIR")/monitor/litefleet-monitor.db
case "$MONITOR_DB" in /*) ;; *) bad "--monitor-db: give an absolute path" ;; esac
if [ -z "$LITEFLEET" ]; then
    LITEFLEET=$(command -v litefleet 2>/dev/null) || bad "litefleet is not on PATH: give --litefleet PATH"
fi
case "$LITEFLEET" in /*) ;; *) bad "--litefleet: give an absolute path" ;; esac
[ -x "$R$LITEFLEET" ] || bad "$LITEFLEET is not an executable"
[ -n "$RUN_USER" ] || bad "give --user USER (the services run as the owner of the repository's keys, not root)"
if [ -z "$R" ]; then
    getent passwd "$RUN_USER" >/dev/null 2>&1 || bad "no user $RUN_USER"
    [ "$(stat -c %U "$OWNED")" = "$RUN_USER" ] || bad "$OWNED belongs to $(stat -c %U "$OWNED"), not $RUN_USER"
fi
if [ -n "$UPSTREAM" ]; then
    [ -f "$HERE/litefleet-broker.service" ] || die "no litefleet-broker.service template beside $0"
    TEMPLATES=$HERE/litefleet-broker.service
    BROKER_ARGS="--upstream $UPSTREAM${BROKER_ARGS:+ $BROKER_ARGS}"
else
    TEMPLATES=$(ls "$HERE"/litefleet-*.service "$HERE"/litefleet-*.timer 2>/dev/null | grep -v '/litefleet-agent\.service$' || true)
    [ -n "$TEMPLATES" ] || die "no litefleet-*.service templates beside $0"
fi
KNOWN='@LITEFLEET@ @USER@ @SECURE_DIR@ @REPO_DIR@ @BIND@ @BROKER_ARGS@ @MONITOR_DB@ @MONITOR_DIR@ @PROMETHEUS@ @HTTP@ @RESIGN_CALENDAR@ @DOCS@'
for t in $TEMPLATES; do
    for field in $(grep -o '@[A-Z_]*@' "$t" | sort -u); do
        case " $KNOWN " in *" $field "*) ;; *) die "$(basename "$t") uses $field, which this installer does not know" ;; esac
    done
done

# -- folders, docs, units ------------------------------------------------------------------------
MONITOR_DIR=$(dirname "$MONITOR_DB")
# the units may write only there (ReadWritePaths=), so both must exist, the user's
for d in "$SECURE_DIR" "$MONITOR_DIR"; do
    if [ -n "$UPSTREAM" ] && [ "$d" = "$MONITOR_DIR" ]; then continue; fi  # no monitor at a site
    if [ ! -d "$R$d" ]; then
        mkdir -p "$R$d"
        chmod 0700 "$R$d"
        [ -n "$R" ] || chown "$RUN_USER" "$R$d"
    fi
done
mkdir -p "$R/etc/systemd/system" "$R$(dirname "$INSTALLED_LIST")" "$R$DOCS"
for doc in systemd.md monitor.md rollouts.md security.md sites.md; do
    if [ -f "$HERE/../docs/$doc" ]; then install -m 0644 "$HERE/../docs/$doc" "$R$DOCS/$doc"; fi
done
esc() { printf '%s' "$1" | sed 's/[#&\\]/\\&/g'; }
: > "$R$INSTALLED_LIST.tmp"
for t in $TEMPLATES; do
    unit=$(basename "$t")
    dest=$R/etc/systemd/system/$unit
    sed -e "s#@LITEFLEET@#$(esc "$LITEFLEET")#g" -e "s#@USER@#$(esc "$RUN_USER")#g" \
        -e "s#@SECURE_DIR@#$(esc "$SECURE_DIR")#g" -e "s#@REPO_DIR@#$(esc "$REPO_DIR")#g" \
        -e "s#@BIND@#$(esc "$BIND")#g" -e "s#@BROKER_ARGS@#$(esc "$BROKER_ARGS")#g" \
        -e "s#@MONITOR_DB@#$(esc "$MONITOR_DB")#g" -e "s#@MONITOR_DIR@#$(esc "$MONITOR_DIR")#g" \
        -e "s#@PROMETHEUS@#$(esc "$PROMETHEUS")#g" -e "s#@HTTP@#$(esc "$HTTP")#g" \
        -e "s#@RESIGN_CALENDAR@#$(esc "$RESIGN_CALENDAR")#g" \
        -e "s#@DOCS@#$(esc "$DOCS")#g" "$t" > "$dest.tmp"
    chmod 0644 "$dest.tmp"
    if [ -f "$dest" ] && cmp -s "$dest.tmp" "$dest"; then
        rm -f "$dest.tmp"
        say "$unit unchanged"
    else
        if [ -f "$dest" ]; then what=updated; else what=installed; fi
        mv "$dest.tmp" "$dest"
        say "$unit $what"
    fi
    echo "$unit" >> "$R$INSTALLED_LIST.tmp"
done
# units an earlier run installed that this one does not (a central host made a site's): gone
if [ -f "$R$INSTALLED_LIST" ]; then
    while read -r unit; do
        [ -n "$unit" ] || continue
        grep -qFx "$unit" "$R$INSTALLED_LIST.tmp" && continue
        systemctl_ disable --now "$unit" 2>/dev/null || true
        rm -f "$R/etc/systemd/system/$unit"
        say "removed $unit (not part of this host any more)"
    done < "$R$INSTALLED_LIST"
fi
mv "$R$INSTALLED_LIST.tmp" "$R$INSTALLED_LIST"
systemctl_ daemon-reload

# -- enable and (re)start: services with an [Install] section, and every timer ---------------------
STARTED=""
for unit in $(cat "$R$INSTALLED_LIST"); do
    grep -q '^\[Install\]' "$R/etc/systemd/system/$unit" || continue
    systemctl_ enable "$unit"
    if [ "$DO_START" = 1 ]; then
        systemctl_ restart "$unit" || die "$unit did not start: journalctl -u $unit -n 50"
        STARTED="$STARTED $unit"
    fi
done
if [ "$DO_SYSTEMCTL" = 0 ]; then
    say "installed (systemd left alone: --no-systemctl)"
elif [ -n "$STARTED" ]; then
    case "$STARTED" in
        *.timer*) say "running:$STARTED (systemctl list-timers 'litefleet-*' shows the next re-sign)" ;;
        *) say "running:$STARTED" ;;
    esac
else
    say "installed and enabled, not started (--no-start)"
fi
