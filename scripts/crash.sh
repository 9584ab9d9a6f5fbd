#!/usr/bin/env bash
# The long crash test: SIGKILL the server under load many times (default 50), restarting it on
# the same data directory, checking every acknowledged operation after each restart.
#   ROUNDS=200 SEED=1234 scripts/crash.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export SETTLEGATE_CRASH_ROUNDS="${ROUNDS:-50}"
if [ -n "${SEED:-}" ]; then export SETTLEGATE_CRASH_SEED="$SEED"; fi
cargo test --release --test tests server_crash -- --nocapture
