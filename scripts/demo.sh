#!/usr/bin/env bash
# Set up (idempotent, as scripts/test.sh does) and run the end-to-end demo, scripts/demo.py:
# train a digits model, convert it to int8 with `litefleet convert`, run it with LiteRT.
# Outputs go to demo-out/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
setup_venv
setup_mosquitto
say "running the demo: .venv/bin/python scripts/demo.py $*"
exec .venv/bin/python scripts/demo.py "$@"
