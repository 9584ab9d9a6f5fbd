#!/usr/bin/env bash
# Compares two settlegate builds, or two settings of one, on this shared machine: alternating,
# each run on a fresh server under bench.sh's closed loop (CONNECTIONS, 50 unless set, x 16 in
# batches, 1,000 users, 2 s warm-up + DURATION, 10 s unless set), it prints each run's
# throughput, the server's and loadgen's CPU per request over the whole run (from /proc), and
# their ratio. A slow spell of the host moves throughput by tens of percent and both CPU figures
# with it; the ratio of the two (same cores, same seconds) moves far less, and is the figure to
# compare. With a data directory it also prints the log writers' mean fsync and fsyncs per
# second (from the server's metrics).
#
#   scripts/ab.sh BIN_A BIN_B [PAIRS]                  (PAIRS: 3)
#   A_ENGINE="shards = 2" B_ENGINE="shards = 1" scripts/ab.sh BIN BIN
#   A_ENV="RUST_LOG=debug" scripts/ab.sh BIN BIN              (environment of A's server)
#   B_ADAPTER="refunds_sales = true" scripts/ab.sh BIN BIN   (fields of B's simulated provider;
#                                      "default": none, for a build older than refunds_sales)
#   A_ENGINE='durability = { data_dir = "@DATA@", fsync = "always" }' B_ENGINE="$A_ENGINE" \
#     scripts/ab.sh BIN_A BIN_B             (@DATA@: a fresh data directory for each run)
#   CLOSED_LOOP=window scripts/ab.sh BIN BIN  (loadgen's --closed-loop mode: batch unless set)
#
# BIN is a `settlegate` binary (for example a copy of target/release/settlegate built at another
# commit); loadgen is this tree's, built here.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n '2,21p' "$0" >&2; exit 2; }
bins=("$1" "$2") pairs=${3:-3}
envs=("${A_ENV:-}" "${B_ENV:-}") engines=("${A_ENGINE:-}" "${B_ENGINE:-}")
adapters=("${A_ADAPTER:-}" "${B_ADAPTER:-}")
PORT=7989 HTTP=9989
# shellcheck source=scripts/bench-config.sh
. scripts/bench-config.sh
bench_workspace
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for pair in $(seq "$pairs"); do
  for side in 0 1; do
    name=$([ $side = 0 ] && echo A || echo B)
    data="$work/data-$pair-$name"
    mkdir -m 700 "$data"
    bench_config "$PORT" "$HTTP" "${engines[$side]//@DATA@/$data}" "${adapters[$side]}" > "$work/bench.toml"
    # shellcheck disable=SC2086
    env ${envs[$side]} "${bins[$side]}" serve --config "$work/bench.toml" > "$work/sg.out" 2>&1 &
    sg_pid=$!
    bench_ready "$HTTP"
    t0=$(ticks "$sg_pid")
    # loadgen's CPU time from its rusage, as its parent sees it.
    python3 -c 'import resource, subprocess, sys
subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(f"{r.ru_utime} {r.ru_stime}")' "$work/time" \
      "$loadgen" --target "127.0.0.1:$PORT" --users 1000 --connections "${CONNECTIONS:-50}" --pipeline 16 \
      --warmup 2 --duration "${DURATION:-10}" --closed-loop "${CLOSED_LOOP:-batch}" --no-progress --json "$work/run.json"
    t1=$(ticks "$sg_pid")
    # The log writers' fsyncs over the run, where the server has a data directory.
    curl -fs "127.0.0.1:$HTTP/metrics" | awk '/^settlegate_wal_fsync_duration_seconds_sum/ {s += $2}
      /^settlegate_wal_fsync_duration_seconds_count/ {n += $2} END {print s + 0, n + 0}' > "$work/fsync"
    kill "$sg_pid"; wait "$sg_pid" 2>/dev/null || true; sg_pid=""
    rm -rf "$data"
    python3 - "$name" "$pair" "$t0" "$t1" "$(getconf CLK_TCK)" "$work" "${DURATION:-10}" <<'PY'
import json, sys
name, pair, t0, t1, tck, work = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), sys.argv[6]
seconds = 2 + float(sys.argv[7])
tp = json.load(open(f"{work}/run.json"))["throughput_per_s"]
user, system = map(float, open(f"{work}/time").read().split())
n = tp * seconds  # the run's requests: warm-up and measured seconds at the measured rate
server, client = (t1 - t0) / tck / n * 1e6, (user + system) / n * 1e6
fsync_s, fsyncs = map(float, open(f"{work}/fsync").read().split())
fsync = f"  fsync {fsync_s / fsyncs * 1e3:.3f} ms x {fsyncs / seconds:.0f}/s" if fsyncs else ""
print(f"pair {pair} {name}: {tp:>9.0f}/s  server {server:.2f} us/req  loadgen {client:.2f} us/req"
      f"  server/loadgen {server / client:.2f}{fsync}")
PY
  done
done
