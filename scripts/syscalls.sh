#!/usr/bin/env bash
# Where a settlegate server's time goes outside its own code, under bench.sh's closed loop: over
# 4 s of the run (after 4 s of warm-up), per request, its system calls by kind (perf's syscall
# tracepoints), its threads' voluntary and involuntary context switches (from /proc), and the
# machine's local timer and rescheduling interrupts (from /proc/interrupts, both cores: the
# loadgen's share included). Compare two settings of one build side by side, for example the
# zero-latency provider against one answering in 0.5-1 ms:
#
#   scripts/syscalls.sh BIN [ENGINE_LINES] [ADAPTER_FIELDS]
#   scripts/syscalls.sh target/release/settlegate "" "latency_us_min = 500, latency_us_max = 1000"
#   scripts/syscalls.sh target/release/settlegate 'durability = { data_dir = "@DATA@", fsync = "always" }'
#
# CONNECTIONS (50) and CLOSED_LOOP (batch: loadgen's --closed-loop mode) as in ab.sh.
# Needs `perf` with access to the tracepoints (root, or kernel.perf_event_paranoid <= 1).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '2,14p' "$0" >&2; exit 2; }
bin=$1 engine=${2:-} adapter=${3:-}
PORT=7987 HTTP=9987
# shellcheck source=scripts/bench-config.sh
. scripts/bench-config.sh
bench_workspace
mkdir -m 700 "$work/data"
bench_config "$PORT" "$HTTP" "${engine//@DATA@/$work/data}" "$adapter" > "$work/bench.toml"
"$bin" serve --config "$work/bench.toml" > "$work/sg.out" 2>&1 &
sg_pid=$!
bench_ready "$HTTP"
# Per thread name: voluntary and involuntary context switches so far.
switches() {
  for t in /proc/"$sg_pid"/task/*; do
    awk -v name="$(tr ' ' _ < "$t/comm")" '/^voluntary/ {v = $2} /^nonvoluntary/ {n = $2}
      END {print name, v, n}' "$t/status"
  done | awk '{v[$1] += $2; n[$1] += $3} END {for (k in v) print k, v[k], n[k]}' | sort
}
interrupts() { awk '/^ *(LOC|RES):/ {print $1, $2 + $3}' /proc/interrupts; }
"$loadgen" --target "127.0.0.1:$PORT" --users 1000 --connections "${CONNECTIONS:-50}" --pipeline 16 \
  --warmup 2 --duration 10 --closed-loop "${CLOSED_LOOP:-batch}" --no-progress --json "$work/run.json" > /dev/null 2>&1 &
lg_pid=$!
sleep 4
switches > "$work/s0"; interrupts > "$work/i0"
kinds=(recvfrom sendto read write writev epoll_wait futex sched_yield timerfd_settime fdatasync pwrite64)
events=$(printf 'syscalls:sys_enter_%s,' "${kinds[@]}")
perf stat -x, -e "${events%,}" -p "$sg_pid" -- sleep 4 2> "$work/perf" > /dev/null
switches > "$work/s1"; interrupts > "$work/i1"
wait "$lg_pid"
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
rate = json.load(open(f"{work}/run.json"))["throughput_per_s"]
requests = rate * 4
print(f"closed loop: {rate:,.0f}/s; per request over 4 s ({requests:,.0f} requests):")
for line in open(f"{work}/perf"):
    fields = line.strip().split(",")
    if len(fields) > 2 and fields[2].startswith("syscalls:sys_enter_"):
        count = float(fields[0]) if fields[0].replace(".", "").isdigit() else 0.0
        print(f"  {fields[2][len('syscalls:sys_enter_'):]:<16} {count / requests:8.4f}  ({count:,.0f})")
def table(path):
    return {f[0]: list(map(float, f[1:])) for f in (l.split() for l in open(path)) if f}
s0, s1 = table(f"{work}/s0"), table(f"{work}/s1")
for name in sorted(s1):
    v0, n0 = s0.get(name, [0, 0])
    v, n = s1[name][0] - v0, s1[name][1] - n0
    if v or n:
        print(f"  switches {name:<18} voluntary {v / requests:.4f}  involuntary {n / requests:.4f}")
i0, i1 = table(f"{work}/i0"), table(f"{work}/i1")
for name in i1:
    count = i1[name][0] - i0.get(name, [0])[0]
    print(f"  interrupts {name:<5} {count / requests:.4f}  ({count:,.0f}, both cores)")
PY
