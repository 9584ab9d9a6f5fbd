#!/usr/bin/env bash
# The test command (README "Test"): formatting, lints, every Rust test, the benches in test
# mode (each benchmark once, so they do not rot), and the Python spec client when present.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

echo "== rustdoc -D warnings"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

echo "== cargo test (unit, integration, doc, examples, benches once)"
cargo test --workspace --all-targets
cargo test --workspace --doc

if [ -d tests/python ]; then
  echo "== python spec client"
  bash tests/python/run.sh
fi
