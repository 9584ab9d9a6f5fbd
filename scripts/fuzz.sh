#!/usr/bin/env bash
# Runs every fuzz target in turn, one process each, for SECONDS_EACH (default 60) or, with RUNS
# set, for that many executions; then prints each target's executions and coverage. Needs
# nightly and cargo-fuzz (`cargo install cargo-fuzz`). Crashes are left in
# fuzz/artifacts/<target>/; the corpus grows in fuzz/corpus/<target>/ (not committed), from the
# seeds in fuzz/seeds/<target>/ (written by fuzz/seeds/make.py from docs/PROTOCOL.md's examples).
#   scripts/fuzz.sh                  # every target, 60 s each
#   SECONDS_EACH=600 scripts/fuzz.sh request_body response_body
#   RUNS=10000000 scripts/fuzz.sh     # the recorded runs of docs/TESTING.md
# Logs go to a temporary directory, or to LOGS when set.
set -uo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${SECONDS_EACH:-60}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
if [ -n "${RUNS:-}" ]; then
  limit=(-runs="$RUNS")
else
  limit=(-max_total_time="$seconds")
fi

logs=${LOGS:-$(mktemp -d)}
mkdir -p "$logs"
status=0
for target in "${targets[@]}"; do
  echo "== $target (${limit[*]})"
  mkdir -p "corpus/$target"
  seeds=()
  [ -d "seeds/$target" ] && seeds=("seeds/$target")
  if ! cargo +nightly fuzz run "$target" "corpus/$target" "${seeds[@]}" -- "${limit[@]}" \
      -print_final_stats=1 >"$logs/$target.log" 2>&1; then
    status=1
    echo "   FAILED: see $logs/$target.log and fuzz/artifacts/$target/"
  fi
  execs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$logs/$target.log" | grep -Eo '[0-9]+$')
  last=$(grep -E '^#[0-9]+.*cov:' "$logs/$target.log" | tail -1)
  cov=$(grep -Eo 'cov: [0-9]+' <<<"$last" | grep -Eo '[0-9]+')
  corp=$(grep -Eo 'corp: [^ ]+' <<<"$last" | cut -d' ' -f2)
  echo "   executions ${execs:-?}, cov ${cov:-?}, corpus ${corp:-?} (units/bytes)"
done
exit $status
