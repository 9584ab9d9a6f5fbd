#!/usr/bin/env bash
# Reproduces the figures of docs/BENCHMARKS.md.
#
#   scripts/bench.sh [tcp] [open] [criterion] [providers] [durable] [sweep] [all]
#                                                        (default: tcp open; all: every part)
#
#   tcp        settlegate's authorize path against Redis SET (REDIS_OP) over loopback, closed loop in
#              batches for both (each connection writes PIPELINE requests, reads their answers,
#              writes the next batch: redis-benchmark -P's way), same
#              connections, pipeline depth and durations (the "Over TCP against Redis" table;
#              RUNS=3 gives the three runs and their median), and each server's CPU per
#              request over the middle of its run (from /proc).
#   open       then open loop at half the measured maximum authorize rate (OPEN_RATE=N to set
#              it), latency corrected for coordinated omission, against the issue #5 target
#              authorize p99 <= 1 ms (measured and printed; the script does not fail on it),
#              and Redis SET (REDIS_OP) open loop at the same rate with the same settings: the baseline
#              (and loadgen's own floor) for those percentiles; for each, the cores the server
#              and loadgen used over the middle of the run (how near the machine was to full)
#              and the share the hypervisor took (steal: above a few per cent, the tails
#              measure the host more than the servers).
#   criterion  the criterion sections: tag verification (and the openssl baseline), the
#              in-process authorize path, durability, and the protocol codec.
#   providers  two settlegate servers side by side (ports 7980, 7981), one with the zero-latency
#              provider and one with PROVIDER_LATENCY_US (500-1000 unless set); per run, the
#              closed loop against each, and the ratio of their throughputs (latency / zero),
#              and of each server's CPU per request over the run (steadier than throughput
#              when the host is noisy), then the medians over RUNS.
#   durable    settlegate in memory and with a data directory (fsync = "always"), and Redis
#              (REDIS_OP) in memory and with appendfsync always, four servers side by side
#              (ports 7982, 7983, 6401, 6402); per run, the closed loop against each, and the
#              ratios settlegate-always / redis-always, settlegate-always / settlegate in
#              memory, settlegate in memory / redis in memory, then the medians over RUNS.
#   sweep      latency against throughput: settlegate's closed-loop maximum (authorize), then
#              the open loop at SWEEP_STEPS per cent of it, settlegate and Redis (REDIS_OP) at
#              each same rate, SWEEP_DURATION seconds a step; one HTML report
#              ($OUT/sweep.html: p50, p99, p99.9, corrected, against the rate, both servers),
#              $OUT/sweep.json and sweep.txt, and the verdict on the goal: settlegate's p99 <=
#              Redis's at every step, and <= 1 ms up to the highest rate at which Redis holds
#              p99 <= 1 ms.
#
# The comparisons' medians and ratios are also written as $OUT/providers.json and durable.json.
#
#   CONNECTIONS=50 PIPELINE=16 WARMUP=2 DURATION=10 USERS=1000 RUNS=1 OUT=target/bench \
#     PIN=0 PACING=timer REDIS_OP=set DURABLE=0 PROVIDER_LATENCY_US= scripts/bench.sh
#   RUNS=3 scripts/bench.sh durable                  REDIS_OP=auth RUNS=3 scripts/bench.sh durable
#   RUNS=3 PROVIDER_LATENCY_US=500-1000 scripts/bench.sh providers
#   PIN=1 PACING=spin SWEEP_DURATION=10 scripts/bench.sh sweep
#
#   PIN=1      the servers (settlegate, Redis) on core 1 and loadgen on core 0 (taskset), so
#              client and server do not take each other's CPU; the same for both servers.
#   PACING     the open loop's --pacing: timer (millisecond bursts) or spin (evenly spaced
#              sends; it keeps loadgen's core busy, so use it with PIN=1).
#   REDIS_OP   the Redis baseline's operation: set (SET of a new 100-byte value; the default)
#              or auth (the same work as an authorization, without the cryptography: loadgen's
#              Lua script by EVALSHA keeping an idempotency record, a per-user nonce, a balance
#              and the last payment over USERS users; reported as redis_auth_lua).
#   DURABLE=1  the tcp, open and sweep parts' servers keep their data: settlegate with a data
#              directory and fsync = "always", Redis with --appendonly yes --appendfsync always
#              (both in the temporary work directory).
#   PROVIDER_LATENCY_US  e.g. 500-1000 (or 700): the simulated provider answers after a
#              uniform latency in that range (latency_us_min, latency_us_max) in every
#              settlegate server (the providers part's zero-latency one excepted); zero unless
#              set.
#   SWEEP_DURATION  seconds measured at each sweep step, and for its closed-loop maximum
#              (default DURATION); SWEEP_STEPS the per cents of the maximum (default
#              "10 20 30 40 50 60 70 80 90"); SWEEP_MAX=N skips measuring the maximum;
#              SWEEP_FRESH=1 starts both servers afresh before each step (by default each step
#              finds what the runs before it left: settlegate's idempotency records, Redis's keys).
#   STEAL_MAX  a run (a Redis run and its settlegate run, or an open-loop pair) in which the
#              hypervisor took more than this percentage of the machine (steal, as loadgen
#              reports it) measured the host, not the servers: it is taken again, up to
#              ATTEMPTS times in all, and a run still over it is shown but not counted in the
#              medians (default 5 and 3).
#
# Reports (JSON, and HTML with the latency-percentile plot) are kept in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNECTIONS="${CONNECTIONS:-50}" PIPELINE="${PIPELINE:-16}" WARMUP="${WARMUP:-2}"
DURATION="${DURATION:-10}" USERS="${USERS:-1000}" RUNS="${RUNS:-1}" OPEN_RATE="${OPEN_RATE:-}"
PIN="${PIN:-0}" PACING="${PACING:-timer}" STEAL_MAX="${STEAL_MAX:-5}" ATTEMPTS="${ATTEMPTS:-3}"
server_pin=() client_pin=()
if [ "$PIN" = 1 ]; then server_pin=(taskset -c 1) client_pin=(taskset -c 0); fi
REDIS_OP="${REDIS_OP:-set}" DURABLE="${DURABLE:-0}" PROVIDER_LATENCY_US="${PROVIDER_LATENCY_US:-}"
SWEEP_DURATION="${SWEEP_DURATION:-$DURATION}" SWEEP_STEPS="${SWEEP_STEPS:-10 20 30 40 50 60 70 80 90}"
SWEEP_MAX="${SWEEP_MAX:-}" SWEEP_FRESH="${SWEEP_FRESH:-0}"
OUT="${OUT:-target/bench}"
# Ports below 32768, out of the ephemeral range: the main pair, then the comparisons' servers.
REDIS_PORT=6399 SG_PORT=7979 SG_HTTP=9979
BIN="${CARGO_TARGET_DIR:-target}/release"
case "$REDIS_OP" in
  set) redis_label="redis SET" ;;
  auth) redis_label="redis auth (Lua)" ;;
  *) echo "REDIS_OP must be set or auth" >&2; exit 2 ;;
esac
redis_args=(--redis-op "$REDIS_OP")
if [ "$REDIS_OP" = auth ]; then redis_args+=(--users "$USERS"); fi
if [ -n "$PROVIDER_LATENCY_US" ] && ! [[ $PROVIDER_LATENCY_US =~ ^[0-9]+(-[0-9]+)?$ ]]; then
  echo "PROVIDER_LATENCY_US must be N or N-M (microseconds)" >&2; exit 2
fi

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tcp open)
want() { local p; for p in "${parts[@]}"; do [ "$p" = "$1" ] || [ "$p" = all ] && return 0; done; return 1; }
for p in "${parts[@]}"; do
  case "$p" in
    tcp | open | criterion | providers | durable | sweep | all) ;;
    *) echo "unknown part '$p' (tcp, open, criterion, providers, durable, sweep, all)" >&2; exit 2 ;;
  esac
done

if want criterion; then
  echo "== criterion: tag verification, in-process authorize, durability, codec"
  cargo bench --bench verify -- --warm-up-time 1 --measurement-time 4
  if command -v openssl >/dev/null; then openssl speed -seconds 3 -bytes 81 sha256; fi
  cargo bench --bench authorize -- --warm-up-time 1 --measurement-time 5
  SETTLEGATE_RECOVERY_USERS="${SETTLEGATE_RECOVERY_USERS:-1000000}" \
    cargo bench --bench durability -- --warm-up-time 1 --measurement-time 6
  cargo bench -p settlegate-protocol --bench codec -- --warm-up-time 1 --measurement-time 3
fi
want tcp || want open || want providers || want durable || want sweep || exit 0

command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
cargo build --release --quiet --bin settlegate && cargo build --release --quiet -p settlegate-loadgen
mkdir -p "$OUT"
work=$(mktemp -d)
sg_pids=() redis_ports=()
cleanup() {
  local pid port
  for pid in "${sg_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for port in "${redis_ports[@]}"; do redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# shellcheck source=scripts/bench-config.sh
. scripts/bench-config.sh
# A settlegate server NAME on PORT (and HTTP_PORT), in memory or, with DURABLE 1, with a data
# directory and fsync = "always", its provider answering after LATENCY us (N or N-M; none:
# zero); its pid in $started.
start_settlegate() {
  local name=$1 port=$2 http=$3 durable=$4 latency=$5 engine="" adapter=""
  if [ "$durable" = 1 ]; then
    engine="durability = { data_dir = \"$work/$name-data\", fsync = \"always\" }"
  fi
  if [ -n "$latency" ]; then
    adapter="latency_us_min = ${latency%-*}, latency_us_max = ${latency#*-}"
  fi
  bench_config "$port" "$http" "$engine" "$adapter" > "$work/$name.toml"
  "${server_pin[@]}" "$BIN/settlegate" serve --config "$work/$name.toml" > "$work/$name.out" \
    2> "$work/$name.err" &
  started=$!
  sg_pids+=("$started")
  # /readyz: the HTTP port answers /healthz while the engine still recovers, before the protocol
  # port listens.
  for _ in $(seq 300); do curl -fs "127.0.0.1:$http/readyz" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "settlegate $name did not come up:" >&2
  cat "$work/$name.err" >&2
  exit 1
}
# A Redis server NAME on PORT, its files in the work directory: in memory or, with DURABLE 1,
# with --appendonly yes --appendfsync always; its pid in $started.
start_redis() {
  local name=$1 port=$2 durable=$3 persistence=(--appendonly no)
  if [ "$durable" = 1 ]; then persistence=(--appendonly yes --appendfsync always); fi
  mkdir -p "$work/$name"
  "${server_pin[@]}" redis-server --port "$port" --bind 127.0.0.1 --save '' "${persistence[@]}" \
    --dir "$work/$name" --daemonize yes --logfile "$work/$name.log"
  redis_ports+=("$port")
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  started=$(redis-cli -p "$port" info server | tr -d '\r' | sed -n 's/^process_id://p')
  [ -n "$started" ] || { echo "redis $name did not come up:" >&2; cat "$work/$name.log" >&2; exit 1; }
}
# Stops the settlegate servers of these pids; the Redis servers on these ports.
stop_settlegate() {
  local pid
  for pid in "$@"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
}
stop_redis() {
  local port
  for port in "$@"; do redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; done
}

common=(--connections "$CONNECTIONS" --pipeline "$PIPELINE" --warmup "$WARMUP" --duration "$DURATION")
closed=(--closed-loop batch)
# loadgen against the settlegate server, or the Redis, on PORT for SECONDS measured, with
# loadgen's further flags (in the foreground).
lg_settlegate() {
  local port=$1 seconds=$2
  shift 2
  "${client_pin[@]}" "$BIN/loadgen" --target "127.0.0.1:$port" --users "$USERS" \
    --connections "$CONNECTIONS" --pipeline "$PIPELINE" --warmup "$WARMUP" --duration "$seconds" "$@"
}
lg_redis() {
  local port=$1 seconds=$2
  shift 2
  "${client_pin[@]}" "$BIN/loadgen" redis --target "127.0.0.1:$port" "${redis_args[@]}" \
    --connections "$CONNECTIONS" --pipeline "$PIPELINE" --warmup "$WARMUP" --duration "$seconds" "$@"
}
# Server CPU over the middle of a measured run (from 1 s after the warm-up until 1 s before the
# end), read from /proc: "ticks_before ticks_after seconds ticks_per_second" into $2. CPU per
# request is a steadier measure of a server's own cost than throughput on a shared machine.
clk_tck=$(getconf CLK_TCK)
# CPU ticks (user + system) process $1 has used.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
sample_cpu() {
  local pid=$1 out=$2 window=$((DURATION - 2)) t0
  [ "$window" -ge 1 ] || return 0
  sleep $((WARMUP + 1))
  t0=$(ticks "$pid")
  sleep "$window"
  echo "$t0 $(ticks "$pid") $window $clk_tck" > "$out"
}
# Whether the runs whose JSON reports are given all had steal at most STEAL_MAX; else says so.
quiet_host() {
  python3 - "$STEAL_MAX" "$@" <<'PY'
import json, sys
limit, paths = float(sys.argv[1]), sys.argv[2:]
steal = [(json.load(open(p)).get("host") or {}).get("steal_percent", 0.0) for p in paths]
if max(steal) > limit:
    print(f"   steal {' / '.join(f'{s:.0f}%' for s in steal)}: over {limit:.0f}%, the host's "
          "minute, not the servers'", file=sys.stderr)
    sys.exit(1)
PY
}
# The tcp part: closed loop, Redis then settlegate, per run; sets max_rate (the median of
# settlegate's throughputs), which the open part takes half of.
tcp_part() {
  for run in $(seq "$RUNS"); do
    for attempt in $(seq "$ATTEMPTS"); do
      echo "== run $run (attempt $attempt): $redis_label"
      sample_cpu "$redis_pid" "$OUT/redis-$run.cpu" & sampler=$!
      lg_redis "$REDIS_PORT" "$DURATION" "${closed[@]}" --json "$OUT/redis-$run.json" \
        --html "$OUT/redis-$run.html"
      wait "$sampler"
      echo "== run $run (attempt $attempt): settlegate authorize (closed loop)"
      sample_cpu "$sg_pid" "$OUT/authorize-$run.cpu" & sampler=$!
      lg_settlegate "$SG_PORT" "$DURATION" "${closed[@]}" --json "$OUT/authorize-$run.json" \
        --html "$OUT/authorize-$run.html"
      wait "$sampler"
      quiet_host "$OUT/redis-$run.json" "$OUT/authorize-$run.json" && break
    done
  done
  # The table: each run, then the median (of throughputs and of the ratio).
  max_rate=$(python3 - "$OUT" "$RUNS" "$STEAL_MAX" "$redis_label" <<'PY'
import json, statistics, sys
out, runs, steal_max, redis_name = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
rows, counted = [], []
for run in range(1, runs + 1):
    redis, sg = (json.load(open(f"{out}/{name}-{run}.json")) for name in ("redis", "authorize"))
    l = sg["latency_us"]
    quiet = all((r.get("host") or {}).get("steal_percent", 0.0) <= steal_max for r in (redis, sg))
    rows.append((redis["throughput_per_s"], sg["throughput_per_s"]))
    counted.append(quiet)
    print(f"run {run}: {redis_name} {redis['throughput_per_s']:>10.0f}/s  settlegate authorize "
          f"{sg['throughput_per_s']:>10.0f}/s  ratio {sg['throughput_per_s'] / redis['throughput_per_s']:.2f}  "
          f"p50 / p99 / p99.9 {l['p50'] / 1e3:.1f} / {l['p99'] / 1e3:.1f} / {l['p999'] / 1e3:.1f} ms"
          + ("" if quiet else f"  (steal over {steal_max:.0f}%: not counted)"),
          file=sys.stderr)
def cpu_us(name, run, throughput):
    # Server CPU per request over the sampled window (see sample_cpu), or None.
    try:
        t0, t1, window, tck = (float(x) for x in open(f"{out}/{name}-{run}.cpu").read().split())
    except (OSError, ValueError):
        return None
    return (t1 - t0) / tck / window / throughput * 1e6 if throughput else None
def steal(name, run):
    # The share of the machine the hypervisor took over the run, as loadgen's report has it.
    host = json.load(open(f"{out}/{name}-{run}.json")).get("host") or {}
    return f"{host['steal_percent']:.0f}%" if "steal_percent" in host else "?"
cpu_rows = []
for run, (redis_tp, sg_tp) in enumerate(rows, start=1):
    r, s = cpu_us("redis", run, redis_tp), cpu_us("authorize", run, sg_tp)
    if r and s and counted[run - 1]:
        cpu_rows.append((r, s))
        print(f"run {run}: server CPU per request: {redis_name} {r:.2f} us  settlegate authorize "
              f"{s:.2f} us  ratio {s / r:.2f}  (steal {steal('redis', run)} / "
              f"{steal('authorize', run)})", file=sys.stderr)
if cpu_rows:
    print(f"median server CPU per request: {redis_name} {statistics.median(r for r, _ in cpu_rows):.2f} us  "
          f"settlegate authorize {statistics.median(s for _, s in cpu_rows):.2f} us  "
          f"ratio {statistics.median(s / r for r, s in cpu_rows):.2f}", file=sys.stderr)
if any(counted):
    rows = [row for row, quiet in zip(rows, counted) if quiet]
else:
    print(f"warning: every run had steal over {steal_max:.0f}%: the medians below are of runs "
          "that measured the host", file=sys.stderr)
redis_med = statistics.median(r for r, _ in rows)
sg_med = statistics.median(s for _, s in rows)
ratio_med = statistics.median(s / r for r, s in rows)
print(f"median: {redis_name} {redis_med:.0f}/s  settlegate authorize {sg_med:.0f}/s  "
      f"ratio settlegate authorize / {redis_name} throughput: {ratio_med:.2f}", file=sys.stderr)
print(f"{sg_med:.0f}")
PY
  )
}

# The open part: settlegate and Redis in the open loop at OPEN_RATE, or half of max_rate.
open_part() {
  rate="${OPEN_RATE:-$((max_rate / 2))}"
  # The cores a server and its load generator use over the middle of an open-loop run, as
  # sample_cpu measures them: "server_cores loadgen_cores cores" into $3. At a fixed rate, how
  # near the machine is to full says much of what the tail latency will be.
  sample_cores() {
    local server=$1 client=$2 out=$3 window=$((DURATION - 2)) s0 c0
    [ "$window" -ge 1 ] || return 0
    sleep $((WARMUP + 1))
    s0=$(ticks "$server") c0=$(ticks "$client")
    sleep "$window"
    awk -v s="$(( $(ticks "$server") - s0 ))" -v c="$(( $(ticks "$client") - c0 ))" \
      -v w="$window" -v t="$clk_tck" -v n="$(nproc)" \
      'BEGIN { printf "%.2f %.2f %d\n", s / t / w, c / t / w, n }' > "$out"
  }
  for attempt in $(seq "$ATTEMPTS"); do
    echo "== settlegate authorize, open loop at $rate/s (half of the measured maximum" \
      "$max_rate/s), $PACING pacing (attempt $attempt)"
    status=0
    "${client_pin[@]}" "$BIN/loadgen" --target "127.0.0.1:$SG_PORT" --users "$USERS" \
      "${common[@]}" --rate "$rate" --pacing "$PACING" --slo authorize:p99=1ms \
      --json "$OUT/authorize-open.json" --html "$OUT/authorize-open.html" &
    client=$!
    sample_cores "$sg_pid" "$client" "$OUT/authorize-open.cores" & sampler=$!
    wait "$client" || status=$?
    wait "$sampler" || true
    [ "$status" -gt 1 ] && exit "$status"
    echo "== $redis_label, open loop at $rate/s, $PACING pacing (the baseline for these percentiles)"
    "${client_pin[@]}" "$BIN/loadgen" redis --target "127.0.0.1:$REDIS_PORT" "${redis_args[@]}" \
      "${common[@]}" \
      --rate "$rate" --pacing "$PACING" --json "$OUT/redis-open.json" \
      --html "$OUT/redis-open.html" &
    client=$!
    sample_cores "$redis_pid" "$client" "$OUT/redis-open.cores" & sampler=$!
    wait "$client"
    wait "$sampler" || true
    quiet_host "$OUT/authorize-open.json" "$OUT/redis-open.json" && break
  done
  python3 - "$OUT/authorize-open" "$OUT/redis-open" "$redis_label" <<'PY'
import json, sys
sg, redis = (json.load(open(f"{path}.json")) for path in sys.argv[1:3])
for path, name, r in ((sys.argv[1], "settlegate authorize", sg), (sys.argv[2], sys.argv[3], redis)):
    l, u = r["latency_us"], r["latency_us_uncorrected"]
    print(f"{name}: open loop at {r['rate_per_s']:.0f}/s: served {r['throughput_per_s']:.0f}/s, "
          f"errors {r['errors']}, unsent {r['unsent']}")
    print(f"  corrected   p50 {l['p50']}us p90 {l['p90']}us p99 {l['p99']}us p99.9 {l['p999']}us max {l['max']}us")
    print(f"  uncorrected p50 {u['p50']}us p90 {u['p90']}us p99 {u['p99']}us p99.9 {u['p999']}us max {u['max']}us")
    try:
        server, client, cores = open(f"{path}.cores").read().split()
        print(f"  cores used over the middle of the run: server {server}, loadgen {client} (of {cores})")
    except (OSError, ValueError):
        pass
    if r.get("host"):
        print(f"  taken by the hypervisor over the run (steal): {r['host']['steal_percent']:.0f}%")
print(f"corrected p99, settlegate / redis at the same rate: "
      f"{sg['latency_us']['p99'] / max(redis['latency_us']['p99'], 1):.2f}")
verdict = "met" if all(s["met"] for s in sg["slo"]) else "NOT met"
print(f"target authorize p99 <= 1 ms at half the maximum rate: {verdict}")
PY
}

# The providers part: settlegate with the zero-latency provider and with PROVIDER_LATENCY_US,
# side by side, per run; the ratio of their throughputs.
providers_part() {
  local latency=${PROVIDER_LATENCY_US:-500-1000} zero latent run attempt
  start_settlegate sg-zero 7980 9980 "$DURABLE" ""
  zero=$started
  start_settlegate sg-latency 7981 9981 "$DURABLE" "$latency"
  latent=$started
  for run in $(seq "$RUNS"); do
    for attempt in $(seq "$ATTEMPTS"); do
      echo "== providers, run $run (attempt $attempt): settlegate, zero-latency provider"
      sample_cpu "$zero" "$OUT/providers-zero-$run.cpu" & sampler=$!
      lg_settlegate 7980 "$DURATION" "${closed[@]}" --json "$OUT/providers-zero-$run.json"
      wait "$sampler"
      echo "== providers, run $run (attempt $attempt): settlegate, provider latency $latency us"
      sample_cpu "$latent" "$OUT/providers-latency-$run.cpu" & sampler=$!
      lg_settlegate 7981 "$DURATION" "${closed[@]}" --json "$OUT/providers-latency-$run.json"
      wait "$sampler"
      quiet_host "$OUT/providers-zero-$run.json" "$OUT/providers-latency-$run.json" && break
    done
  done
  # What the simulated provider took, as the guard measured each call: that the provider
  # was simulated at the latency asked for, not at a timer's coarser tick.
  curl -fs 127.0.0.1:9981/metrics | awk -v asked="$latency" '
    /^settlegate_provider_call_duration_seconds_sum/ { sum = $2 }
    /^settlegate_provider_call_duration_seconds_count/ { count = $2 }
    END { if (count) printf "== providers: the simulated provider (%s us asked) answered %d calls in %.0f us on average\n", asked, count, sum / count * 1e6 }'
  stop_settlegate "$zero" "$latent"
  echo "== providers: settlegate authorize, closed loop, zero-latency provider against $latency us"
  python3 scripts/bench-report.py compare --out "$OUT" --runs "$RUNS" --steal-max "$STEAL_MAX" \
    --name providers --series "providers-zero=settlegate, zero-latency provider" \
    --series "providers-latency=settlegate, provider $latency us" \
    --ratio providers-latency/providers-zero
}

# The durable part: settlegate and Redis, each in memory and durable (fsync = "always",
# appendfsync always), side by side, per run; the ratios of their throughputs.
durable_part() {
  local settlegates=() run attempt set name redis_port sg_port
  start_settlegate sg-memory 7982 9982 0 "$PROVIDER_LATENCY_US"
  settlegates+=("$started")
  start_settlegate sg-always 7983 9983 1 "$PROVIDER_LATENCY_US"
  settlegates+=("$started")
  start_redis redis-memory 6401 0
  start_redis redis-always 6402 1
  for run in $(seq "$RUNS"); do
    for attempt in $(seq "$ATTEMPTS"); do
      for set in "memory 6401 7982" "always 6402 7983"; do
        read -r name redis_port sg_port <<< "$set"
        echo "== durable, run $run (attempt $attempt): $redis_label, $name"
        lg_redis "$redis_port" "$DURATION" "${closed[@]}" --json "$OUT/durable-redis-$name-$run.json"
        echo "== durable, run $run (attempt $attempt): settlegate authorize, $name"
        lg_settlegate "$sg_port" "$DURATION" "${closed[@]}" --json "$OUT/durable-sg-$name-$run.json"
      done
      quiet_host "$OUT"/durable-{redis,sg}-{memory,always}-"$run".json && break
    done
  done
  stop_settlegate "${settlegates[@]}"
  stop_redis 6401 6402
  echo "== durable: closed loop, in memory and with every write fsynced before its answer"
  python3 scripts/bench-report.py compare --out "$OUT" --runs "$RUNS" --steal-max "$STEAL_MAX" \
    --name durable --series "durable-sg-memory=settlegate in memory" \
    --series "durable-sg-always=settlegate fsync always" \
    --series "durable-redis-memory=$redis_label in memory" \
    --series "durable-redis-always=$redis_label appendfsync always" \
    --ratio durable-sg-always/durable-redis-always --ratio durable-sg-always/durable-sg-memory \
    --ratio durable-sg-memory/durable-redis-memory --ratio durable-redis-always/durable-redis-memory
}

# The sweep part: settlegate's closed-loop maximum, then settlegate and Redis in the open loop at
# each SWEEP_STEPS per cent of it; one report of latency against rate.
sweep_part() {
  local max=$SWEEP_MAX pct rate
  if [ -z "$max" ]; then
    echo "== sweep: settlegate authorize, closed-loop maximum (${SWEEP_DURATION} s)"
    lg_settlegate "$SG_PORT" "$SWEEP_DURATION" "${closed[@]}" --json "$OUT/sweep-max.json" \
      > "$OUT/sweep-max.txt"
    max=$(python3 -c 'import json, sys; print(round(json.load(open(sys.argv[1]))["throughput_per_s"]))' \
      "$OUT/sweep-max.json")
  fi
  echo "== sweep: maximum $max/s; steps of ${SWEEP_DURATION} s at $SWEEP_STEPS per cent"
  for pct in $SWEEP_STEPS; do
    rate=$((max * pct / 100))
    if [ "$SWEEP_FRESH" = 1 ]; then
      stop_settlegate "$sg_pid"
      stop_redis "$REDIS_PORT"
      start_redis redis "$REDIS_PORT" "$DURABLE"
      start_settlegate sg "$SG_PORT" "$SG_HTTP" "$DURABLE" "$PROVIDER_LATENCY_US"
      sg_pid=$started
    fi
    echo "== sweep $pct% ($rate/s): settlegate authorize, then $redis_label, open loop," \
      "$PACING pacing"
    lg_settlegate "$SG_PORT" "$SWEEP_DURATION" --rate "$rate" --pacing "$PACING" \
      --json "$OUT/sweep-sg-$pct.json" > "$OUT/sweep-sg-$pct.txt"
    lg_redis "$REDIS_PORT" "$SWEEP_DURATION" --rate "$rate" --pacing "$PACING" \
      --json "$OUT/sweep-redis-$pct.json" > "$OUT/sweep-redis-$pct.txt"
  done
  python3 scripts/bench-report.py sweep --out "$OUT" --max "$max" --steps "$SWEEP_STEPS" \
    --steal-max "$STEAL_MAX" --redis-label "$redis_label"
  echo "sweep report: $OUT/sweep.html ($OUT/sweep.json, $OUT/sweep.txt)"
}

# The servers of the tcp, open and sweep parts: settlegate and Redis, per DURABLE and
# PROVIDER_LATENCY_US.
if want tcp || want open || want sweep; then
  start_redis redis "$REDIS_PORT" "$DURABLE"
  redis_pid=$started
  start_settlegate sg "$SG_PORT" "$SG_HTTP" "$DURABLE" "$PROVIDER_LATENCY_US"
  sg_pid=$started
fi
if want tcp || want open; then tcp_part; fi
if want open; then open_part; fi
if want providers; then providers_part; fi
if want durable; then durable_part; fi
if want sweep; then sweep_part; fi
echo "reports in $OUT"
