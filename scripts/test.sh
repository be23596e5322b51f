#!/usr/bin/env bash
# Set up (idempotent: .venv, litefleet with all extras, Mosquitto) and run the whole test suite.
#   scripts/test.sh                 # everything CI runs
#   scripts/test.sh -k convert -x   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
setup_venv
setup_mosquitto
setup_test_tools
say "running the tests: .venv/bin/python -m pytest $*"
exec .venv/bin/python -m pytest "$@"
