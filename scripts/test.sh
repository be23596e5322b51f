#!/usr/bin/env bash
# Set up (idempotent: .venv, litefleet with all extras, Mosquitto), check lint, format and types,
# and run the whole test suite.
#   scripts/test.sh                 # everything CI runs
#   scripts/test.sh -k convert -x   # extra arguments go to pytest
#   LITEFLEET_SKIP_LINT=1 scripts/test.sh ...   # only the tests (while iterating)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
setup_venv
setup_mosquitto
setup_test_tools
if [ "${LITEFLEET_SKIP_LINT:-0}" != 1 ]; then
  say "lint: ruff check (with a complexity cap of 15), ruff format --check, mypy --strict"
  .venv/bin/ruff check .
  .venv/bin/ruff format --check .
  .venv/bin/mypy
fi
say "running the tests: .venv/bin/python -m pytest $*"
exec .venv/bin/python -m pytest "$@"
