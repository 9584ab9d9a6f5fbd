#!/usr/bin/env bash
# Reproduces the TCP figures of docs/BENCHMARKS.md: settlegate's authorize path against Redis
# SET on this machine, loopback, same connections, pipeline depth and durations.
#   CONNECTIONS=50 PIPELINE=16 WARMUP=2 DURATION=10 USERS=1000 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CONNECTIONS="${CONNECTIONS:-50}" PIPELINE="${PIPELINE:-16}" WARMUP="${WARMUP:-2}"
DURATION="${DURATION:-10}" USERS="${USERS:-1000}"
REDIS_PORT=6399 SG_PORT=7979 SG_HTTP=9979

command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
cargo build --release --quiet --bin settlegate && cargo build --release --quiet -p settlegate-loadgen
work=$(mktemp -d)
cleanup() {
  [ -n "${sg_pid:-}" ] && kill "$sg_pid" 2>/dev/null || true
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# Bench config: zero-latency provider so the engine is what is measured (as Redis is), and
# Argon2 costs lowered because enrolling the dataset is setup, not measurement (bench only).
key_sha=$(printf %s sg-demo-key | sha256sum | cut -d' ' -f1)
cat > "$work/bench.toml" <<TOML
[server]
listen = "127.0.0.1:$SG_PORT"
http_listen = "127.0.0.1:$SG_HTTP"
log_level = "warn"
[[server.identities]]
name = "bench"
api_key_sha256 = "$key_sha"
permissions = ["authorize", "accounts", "providers"]
terminals = ["*"]
providers = [1]
[engine]
password = { memory_kib = 64, iterations = 1, parallelism = 1 }
vault = { key_hex = "$(printf '77%.0s' $(seq 32))" }
[[engine.providers]]
code = 1
name = "zero-latency"
adapter = { kind = "simulated" }
limits = { concurrency_max = 1000000, timeout_ms = 5000 }
TOML

redis-server --port "$REDIS_PORT" --save '' --appendonly no --daemonize yes --logfile "$work/redis.log"
target/release/settlegate serve --config "$work/bench.toml" > "$work/sg.out" 2> "$work/sg.err" &
sg_pid=$!
for _ in $(seq 100); do curl -fs "127.0.0.1:$SG_HTTP/healthz" >/dev/null 2>&1 && break; sleep 0.1; done

common=(--connections "$CONNECTIONS" --pipeline "$PIPELINE" --warmup "$WARMUP" --duration "$DURATION")
echo "== redis SET"
target/release/loadgen redis --target "127.0.0.1:$REDIS_PORT" "${common[@]}" --json "$work/redis.json"
echo "== settlegate authorize"
target/release/loadgen --target "127.0.0.1:$SG_PORT" --users "$USERS" "${common[@]}" --json "$work/sg.json"
python3 - "$work/redis.json" "$work/sg.json" <<'PY'
import json, sys
redis, sg = (json.load(open(p)) for p in sys.argv[1:3])
ratio = sg["throughput_per_s"] / redis["throughput_per_s"]
print(f"ratio settlegate authorize / redis SET throughput: {ratio:.2f}")
for name, r in (("redis", redis), ("settlegate", sg)):
    l = r["latency_us"]
    print(f"{name:10} {r['throughput_per_s']:>10.0f}/s  p50 {l['p50']}us p99 {l['p99']}us p99.9 {l['p999']}us")
PY
