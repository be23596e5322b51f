# Shared, idempotent set-up for scripts/test.sh and scripts/demo.sh (source it, don't run it).
# - finds a Python >= 3.11 and creates .venv with it if .venv is missing;
# - installs litefleet with every extra (pip install -e ".[agent,convert,dev]"), again only
#   when pyproject.toml changed since the last install (a stamp file in .venv remembers);
# - installs Mosquitto with apt-get (sudo when not root) when it is missing;
# - for the tests, also the Debian packages they use: qemu-user-static (the emulated
#   Raspberry Pi userland), debian-archive-keyring (to fetch its packages), faketime
#   (an agent with a wrong clock), systemd-container, mmdebstrap and arch-test (booted
#   Debian machines with systemd as PID 1, tests/systemd).
# Every step says what it does; a step that has nothing to do says so in one line.

say() { printf '==> %s\n' "$*"; }

find_python() {
  local py
  for py in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$py" ] || continue
    command -v "$py" >/dev/null 2>&1 || continue
    if "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      command -v "$py"
      return 0
    fi
  done
  return 1
}

# true when .venv has litefleet (editable, with its console scripts) and every extra's packages
installed() {
  [ -x .venv/bin/litefleet ] && [ -x .venv/bin/litefleet-agent ] || return 1
  .venv/bin/python - <<'PY' 2>/dev/null
import importlib.util, sys
mods = ["agent", "converter", "numpy", "paho", "tuf", "ai_edge_litert", "tensorflow", "keras",
        "cryptography", "pytest", "hypothesis", "sklearn", "jax", "ruff", "mypy"]
sys.exit(0 if all(importlib.util.find_spec(m) for m in mods) else 1)
PY
}

setup_venv() {
  if [ -x .venv/bin/python ]; then
    say "using .venv ($(.venv/bin/python -c 'import platform; print("Python", platform.python_version())'))"
  else
    local py
    py=$(find_python) || { echo "error: litefleet needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; return 1; }
    say "creating .venv with $py"
    "$py" -m venv .venv
  fi
  local stamp=.venv/.litefleet-install-stamp want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && installed; then
    say "litefleet and its extras are installed (pyproject.toml unchanged since)"
  elif [ ! -f "$stamp" ] && installed; then
    say "litefleet and its extras are already installed in .venv"
    echo "$want" > "$stamp"
  else
    say "installing litefleet with extras agent, convert, dev (TensorFlow is large: a few minutes on a cold cache)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[agent,convert,dev]"
    echo "$want" > "$stamp"
  fi
}

# "sudo" when not root (empty when root)
sudo_if_needed() { [ "$(id -u)" -ne 0 ] && echo sudo; return 0; }

# apt-get install PKG... (with sudo when not root; an error when sudo is missing)
apt_install() {
  local sudo
  sudo=$(sudo_if_needed)
  if [ -n "$sudo" ] && ! command -v sudo >/dev/null 2>&1; then
    echo "error: $* missing and sudo is not available; install them with apt-get" >&2
    return 1
  fi
  say "installing $* with apt-get${sudo:+ (sudo)}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

setup_mosquitto() {
  if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
    say "mosquitto is installed"
    return 0
  fi
  apt_install mosquitto mosquitto-clients || return 1
  # the private brokers litefleet starts are its own; the system service is not needed
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
    $(sudo_if_needed) systemctl disable --now mosquitto >/dev/null 2>&1 || true
  fi
}

# apt-get install the packages whose commands are missing: setup_packages CMD=PKG ...
setup_packages() {
  local want=() pair cmd pkg
  for pair in "$@"; do
    cmd=${pair%%=*}; pkg=${pair#*=}
    if [ "${cmd#/}" != "$cmd" ]; then [ -e "$cmd" ] && continue; else command -v "$cmd" >/dev/null 2>&1 && continue; fi
    want+=("$pkg")
  done
  if [ ${#want[@]} -eq 0 ]; then
    say "already installed: ${*#*=}"
    return 0
  fi
  apt_install "${want[@]}"
}

setup_test_tools() {
  setup_packages qemu-aarch64-static=qemu-user-static \
    /usr/share/keyrings/debian-archive-keyring.gpg=debian-archive-keyring \
    faketime=faketime \
    runsv=runit \
    promtool=prometheus \
    chromium=chromium \
    systemd-nspawn=systemd-container mmdebstrap=mmdebstrap arch-test=arch-test
  # only promtool and runsv are wanted: where a package (prometheus, its recommended node
  # exporter, runit's runsvdir) started a service, stop it and keep it off
  local unit
  for unit in prometheus prometheus-node-exporter runit; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$unit" 2>/dev/null; then
      $(sudo_if_needed) systemctl disable --now "$unit" >/dev/null 2>&1 || true
    fi
  done
}
