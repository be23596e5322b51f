#!/usr/bin/env bash
# Build (or check) the emulated Raspberry Pi userlands the `pi` tests run in, or run their
# python3.11 under qemu. Needs qemu-user-static, apt-get/dpkg-deb and network on a cold build.
#   scripts/pi-userland.sh build --arch all        # warm: < 1 s; cold: ~1 min per arch
#   scripts/pi-userland.sh run --arch arm64 -- -c 'import platform; print(platform.machine())'
# See docs/raspberry-pi.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" -m tests.pi.userland "$@"
