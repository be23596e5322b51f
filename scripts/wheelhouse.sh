#!/usr/bin/env bash
# Make an offline installer for devices without a route to the package index: the litefleet
# wheel, every wheel the agent needs on the target (Python 3.11, Raspberry Pi OS / Debian
# bookworm), the build requirements (for an install from a checkout), install.sh and the docs.
#
#   scripts/wheelhouse.sh --arch arm64 -o litefleet-arm64/    # 64-bit Raspberry Pi OS
#   scripts/wheelhouse.sh --arch amd64 -o litefleet-amd64/    # a Debian PC
#   # copy the folder to the device, then there (no network needed):
#   sudo litefleet-arm64/systemd/install.sh --credentials pi-kitchen/
#
# Options:
#   --arch amd64|arm64     the device's architecture (default: this machine's)
#   -o, --out DIR          the folder to create (must not exist or be empty)
#   --python-version X.Y   the device's Python (default 3.11: bookworm)
#   --source DIR           the litefleet source tree (default: this checkout)
#   --pip-args "ARGS"      more arguments for pip (e.g. "--no-index --find-links CACHE")
# 32-bit Raspberry Pi OS (armhf) takes numpy from Debian (apt), so it has no offline wheelhouse.
# Needs a Python with pip on this machine (.venv's when it exists) and, without --pip-args
# pointing at a local cache, the package index. See docs/systemd.md ("Offline install").
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
ARCH=""
OUT=""
PYVER=3.11
SOURCE=$HERE
PIP_ARGS=""

die() { printf 'wheelhouse: error: %s\n' "$*" >&2; exit "${2:-1}"; }
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH=${2:?--arch needs amd64 or arm64}; shift 2 ;;
    -o|--out) OUT=${2:?--out needs a folder}; shift 2 ;;
    --python-version) PYVER=${2:?}; shift 2 ;;
    --source) SOURCE=${2:?}; shift 2 ;;
    --pip-args) PIP_ARGS=${2?}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) printf 'wheelhouse: unknown option %s\n' "$1" >&2; usage >&2; exit 2 ;;
  esac
done
[ -n "$OUT" ] || die "give -o DIR (the folder to create)" 2
if [ -z "$ARCH" ]; then
  case "$(uname -m)" in x86_64) ARCH=amd64 ;; aarch64) ARCH=arm64 ;; *) ARCH=$(uname -m) ;; esac
fi
case "$ARCH" in
  amd64) PLATFORMS="manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux2014_x86_64" ;;
  arm64) PLATFORMS="manylinux_2_27_aarch64 manylinux_2_28_aarch64 manylinux2014_aarch64" ;;
  *) die "--arch must be amd64 or arm64 (32-bit Raspberry Pi OS installs numpy from apt: no offline wheelhouse)" 2 ;;
esac
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || die "--python-version must look like 3.11" 2
[ -f "$SOURCE/pyproject.toml" ] || die "--source $SOURCE has no pyproject.toml" 2
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then die "$OUT exists and is not empty" 2; fi
PY=${PYTHON:-$HERE/.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -m pip --version >/dev/null 2>&1 || die "$PY has no pip (give PYTHON=/path/to/python)"

OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# a clean copy: building in place would leave build/ and *.egg-info in the checkout
mkdir "$WORK/src"
cp -r "$SOURCE/pyproject.toml" "$SOURCE/README.md" "$SOURCE/agent" "$SOURCE/converter" "$WORK/src/"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p "$WORK/out/wheels" "$WORK/out/systemd" "$WORK/out/docs"

echo "==> building the litefleet wheel from $SOURCE"
# shellcheck disable=SC2086 # PIP_ARGS is a word list on purpose
if ! "$PY" -m pip wheel --disable-pip-version-check --no-deps $PIP_ARGS -w "$WORK/out/wheels" \
    "$WORK/src" > "$WORK/build.log" 2>&1; then
  tail -n 20 "$WORK/build.log" >&2
  die "building the litefleet wheel failed"
fi
WHEEL=$(ls "$WORK"/out/wheels/litefleet-*.whl)

PLATFORM_ARGS=()
for p in $PLATFORMS; do PLATFORM_ARGS+=(--platform "$p"); done
echo "==> fetching what the agent needs on $ARCH (Python $PYVER)"
# the agent extra picks the runtime by machine: ai-edge-litert on amd64 and arm64.
# setuptools and wheel: the build requirements, for an offline install from a checkout
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --disable-pip-version-check --no-input --only-binary=:all: \
  "${PLATFORM_ARGS[@]}" --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" \
  $PIP_ARGS -d "$WORK/out/wheels" "$WHEEL[agent]" "setuptools>=68" wheel

cp "$HERE/systemd/install.sh" "$HERE/systemd/agent_config.py" "$HERE/systemd/litefleet-agent.service" \
  "$WORK/out/systemd/"
cp "$HERE/docs/systemd.md" "$HERE/docs/raspberry-pi.md" "$WORK/out/docs/"
cp -r "$WORK/out/." "$OUT/"
COUNT=$(ls "$OUT"/wheels/*.whl | wc -l)
echo "==> $OUT: $COUNT wheels for $ARCH, Python $PYVER ($(du -sh "$OUT" | cut -f1))"
echo "    on the device: sudo $(basename "$OUT")/systemd/install.sh --credentials BUNDLE/"
echo "    (or --device-id ID --broker URL --trusted-root root.json); nothing is downloaded there"
