#!/usr/bin/env bash
# Compares two builds' recovery of a data directory each: alternating, a fresh process each
# (the durability bench binary run with SETTLEGATE_BENCH_RECOVER_ONCE, as benches/durability.rs
# does), it prints each run's `elapsed_ms` from the engine's `recovered` line and the process's
# user and system CPU seconds.
#
#   scripts/recovery-ab.sh OLD_BENCH OLD_DIR NEW_BENCH NEW_DIR [ROUNDS]      (ROUNDS: 3)
#
# A BENCH is a durability bench binary (`cargo bench --bench durability --no-run` prints its
# path; build the old one in a worktree of the old commit). A DIR is a data set that build wrote
# (for example <SETTLEGATE_RECOVERY_DIR>/users-1000000, see benches/durability.rs): a build may
# convert an older build's data set on first open, so give each its own.
set -euo pipefail
[ $# -ge 4 ] || { sed -n '2,12p' "$0"; exit 2; }
old_bin=$1 old_dir=$2 new_bin=$3 new_dir=$4 rounds=${5:-3}
run() {
  local label=$1 bin=$2 dir=$3 out
  out=$( { /usr/bin/time -f "cpu %U %S" env SETTLEGATE_BENCH_RECOVER_ONCE="$dir" "$bin"; } 2>&1 \
    | sed 's/\x1b\[[0-9;]*m//g')
  echo "$label $(grep -o 'elapsed_ms=[0-9]*' <<<"$out") user+sys $(grep '^cpu ' <<<"$out" | cut -d' ' -f2-)"
}
for round in $(seq "$rounds"); do
  echo "round $round (load $(cut -d' ' -f1 /proc/loadavg))"
  run old "$old_bin" "$old_dir"
  run new "$new_bin" "$new_dir"
done
