#!/usr/bin/env bash
# The long soak: what CI's fast suite proves once, many times over. Sets up like
# scripts/test.sh (idempotent: .venv, Mosquitto), plus faketime and atheris, then runs
#   1. the soak-marked tests: 500 SIGKILLs of the agent during download and activation
#      with broker restarts, 50 broker restarts and 200 cut connections mid-transfer
#      (tests/e2e/test_soak.py), atheris on the agent's parsers (tests/fuzz/test_atheris.py);
#   2. the hypothesis fuzzers with the soak profile (thousands of examples each);
#   3. the fault and watchdog tests once more;
# and prints a summary (also written to build/soak/summary.txt).
#
#   scripts/soak.sh                          # the whole soak (about 40 min on 2 cores)
#   LITEFLEET_SOAK_KILLS=50 LITEFLEET_SOAK_FAULTS=5 LITEFLEET_FUZZ_EXAMPLES=500 \
#     LITEFLEET_ATHERIS_RUNS=20000 scripts/soak.sh     # a short rehearsal
#   LITEFLEET_SOAK_STEPS="fuzz" scripts/soak.sh          # only some steps (soak fuzz faults)
#   scripts/soak.sh -x                       # extra arguments go to every pytest run
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
setup_venv
setup_mosquitto

setup_test_tools  # faketime among them: the clock tests
if ! .venv/bin/python -c 'import atheris' 2>/dev/null; then
  say "installing atheris (coverage-guided fuzzing; soak only)"
  .venv/bin/python -m pip install --quiet atheris || say "atheris did not install: its tests will be skipped"
fi

export LITEFLEET_SOAK_KILLS="${LITEFLEET_SOAK_KILLS:-500}"
export LITEFLEET_SOAK_FAULTS="${LITEFLEET_SOAK_FAULTS:-50}"
export LITEFLEET_FUZZ_EXAMPLES="${LITEFLEET_FUZZ_EXAMPLES:-5000}"
export LITEFLEET_ATHERIS_RUNS="${LITEFLEET_ATHERIS_RUNS:-500000}"
out=build/soak
mkdir -p "$out"
export LITEFLEET_SOAK_REPORT="$PWD/$out/figures.jsonl"
: > "$LITEFLEET_SOAK_REPORT"
: > "$out/steps.txt"
rm -f "$out"/*.log
started=$(date +%s)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
dirty=$(git status --porcelain -- agent converter tests 2>/dev/null | wc -l)
steps="${LITEFLEET_SOAK_STEPS:-soak fuzz faults}"

step() {  # step NAME -- pytest arguments...
  local name=$1; shift
  case " $steps " in *" $name "*) ;; *) return 0 ;; esac
  local t0 rc log="$out/$name.log"
  t0=$(date +%s)
  say "soak step $name: pytest $*"
  .venv/bin/python -m pytest -p no:cacheprovider -q -rA "$@" >"$log" 2>&1
  rc=$?
  local last
  last=$(grep -aE '^[=]* ?[0-9]+ (passed|failed)|[0-9]+ (passed|failed|error)' "$log" | tail -1 | tr -d '=')
  printf '%-10s %-4s %5ds  %s\n' "$name" "$([ $rc -eq 0 ] && echo PASS || echo FAIL)" \
    $(( $(date +%s) - t0 )) "${last:-see $log}" | tee -a "$out/steps.txt"
  return $rc
}

status=0
step soak -m soak tests/e2e/test_soak.py tests/fuzz/test_atheris.py "$@" || status=1
HYPOTHESIS_PROFILE=soak step fuzz tests/fuzz/test_delivery.py tests/fuzz/test_serving.py \
  tests/fuzz/test_config.py tests/fuzz/test_regressions.py --hypothesis-show-statistics "$@" || status=1
step faults tests/e2e/test_faults.py tests/agent/service/test_watchdog.py tests/e2e/test_secure.py \
  tests/e2e/test_attacks.py tests/e2e/test_resilience.py tests/e2e/test_delivery.py \
  tests/converter/broker/test_secure_mqtt.py tests/agent/service/test_systemd_unit.py "$@" || status=1

{
  echo "litefleet soak $(date -u -d "@$started" '+%Y-%m-%d %H:%M UTC'), commit $commit" \
    "($dirty files under agent/ converter/ tests/ not committed), $(nproc) cores," \
    "$(( ($(date +%s) - started) / 60 )) min"
  echo
  cat "$out/steps.txt"
  echo
  echo "figures:"
  sed 's/^/  /' "$LITEFLEET_SOAK_REPORT"
  echo
  [ -f "$out/fuzz.log" ] && echo "hypothesis examples per fuzz test:" && .venv/bin/python - "$out/fuzz.log" <<'PY'
import re, sys
counts, cur = {}, None
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"^(tests/fuzz/\S+::\S+):$", line.strip())
    if m:
        cur = m.group(1)
        counts.setdefault(cur, [0, 0])
        continue
    m = re.search(r"- (\d+) passing, (\d+) failing", line)
    if m and cur:
        counts[cur][0] += int(m.group(1))
        counts[cur][1] += int(m.group(2))
for name, (ok, bad) in counts.items():
    print(f"  {name}: {ok} passing, {bad} failing")
PY
  echo
  echo "result: $([ $status -eq 0 ] && echo PASS || echo FAIL)  (logs in $out/)"
} | tee "$out/summary.txt"
exit $status
