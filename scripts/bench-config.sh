# shellcheck shell=bash
# Sourced by bench.sh, ab.sh and syscalls.sh: the settlegate config they benchmark with, and (at
# the end) the set-up of a script that runs one server at a time.
#
#   bench_config PORT HTTP_PORT [ENGINE_LINES] [ADAPTER_FIELDS] > bench.toml
#
# A zero-latency simulated provider, so the engine is what is measured (as Redis is), that
# settles no sales for refunds (refunds_sales = false: the engine keeps no payment for a later
# REFUND; what keeping them costs is measured on its own, docs/BENCHMARKS.md), and Argon2
# costs lowered, because enrolling the dataset is setup, not measurement (bench only).
# ENGINE_LINES (e.g. "shards = 2", or 'durability = { data_dir = "/tmp/x", fsync = "always" }')
# go into [engine]; ADAPTER_FIELDS (e.g. "latency_us_min = 500, latency_us_max = 1000") into the
# simulated provider's adapter table; the rest is the embedded default.
bench_config() {
  local port=$1 http=$2 engine_lines=${3:-} adapter_fields=${4:+, $4} key_sha refunds
  # No sales kept for refunds, unless ADAPTER_FIELDS says otherwise; ADAPTER_FIELDS "default"
  # leaves the field out (the build's own default: a build older than the field refuses it).
  case "${4:-}" in
    *refunds_sales*) refunds="" ;;
    default) refunds="" adapter_fields="" ;;
    *) refunds=", refunds_sales = false" ;;
  esac
  key_sha=$(printf %s sg-demo-key | sha256sum | cut -d' ' -f1)
  cat <<TOML
[server]
listen = "127.0.0.1:$port"
http_listen = "127.0.0.1:$http"
log_level = "warn"
[[server.identities]]
name = "bench"
api_key_sha256 = "$key_sha"
permissions = ["authorize", "accounts", "providers"]
terminals = ["*"]
providers = [1]
[engine]
$engine_lines
password = { memory_kib = 64, iterations = 1, parallelism = 1 }
vault = { key_hex = "$(printf '77%.0s' $(seq 32))" }
[[engine.providers]]
code = 1
name = "zero-latency"
adapter = { kind = "simulated"$refunds$adapter_fields }
limits = { concurrency_max = 1000000, timeout_ms = 5000 }
TOML
}

# For a script that runs one settlegate server at a time under the loadgen (ab.sh,
# syscalls.sh): builds the loadgen ($loadgen), makes a work directory ($work), and at exit
# stops the server whose PID is in $sg_pid (if any) and removes the directory.
bench_workspace() {
  cargo build --release --quiet -p settlegate-loadgen
  loadgen="${CARGO_TARGET_DIR:-target}/release/loadgen"
  work=$(mktemp -d)
  sg_pid=""
  trap bench_cleanup EXIT
}

bench_cleanup() {
  if [ -n "$sg_pid" ]; then kill "$sg_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}

# Waits (up to 30 s) until the server whose HTTP port is $1 answers /readyz.
bench_ready() {
  for _ in $(seq 300); do
    curl -fs "127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
}
