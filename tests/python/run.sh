#!/usr/bin/env bash
# Spec check: the Python client written from docs/PROTOCOL.md alone.
#
# 1. offline tests (example frames of section 7, codecs);
# 2. build and start `settlegate serve` (no flags), wait for /healthz;
# 3. live tests against 127.0.0.1:7878 (or $SETTLEGATE_ADDR);
# 4. SIGTERM the server; it must exit 0 within 15 s.
#
# The last line printed is `N passed, M failed`. Steps that are not tests
# (build, server start, clean shutdown) count as one failure each when they
# fail. Exit status is non-zero when anything failed.

set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT" || exit 2

HEALTH_URL="http://127.0.0.1:9898/healthz"
HEALTH_WAIT_S=60
SHUTDOWN_WAIT_S=15

WORK="$(mktemp -d)"
SERVER_LOG="$WORK/server.log"
SERVER_PID=""
PASSED=0
FAILED=0

# Kill the server if it is still running, and remove temporary files.
cleanup() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -KILL "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Record a failed step that is not a unit test.
fail_step() {
    echo "FAILED: $*" >&2
    FAILED=$((FAILED + 1))
}

# A unittest runner that writes "<passed> <failed>" to a file.
cat >"$WORK/runner.py" <<'PY'
"""Run one test module; write '<passed> <failed>' to the given file."""
import sys
import unittest


class CountingResult(unittest.TextTestResult):
    """Counts tests that passed outright and distinct tests that failed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passed = 0
        self.failed_ids = set()

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed += 1

    def _failed(self, test):
        self.failed_ids.add(getattr(test, "test_case", test).id())

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._failed(test)

    def addError(self, test, err):
        super().addError(test, err)
        self._failed(test)

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self._failed(test)

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._failed(test)


module, counts_file = sys.argv[1], sys.argv[2]
suite = unittest.defaultTestLoader.loadTestsFromName(module)
runner = unittest.TextTestRunner(verbosity=2, stream=sys.stdout, resultclass=CountingResult)
result = runner.run(suite)
with open(counts_file, "w") as out:
    out.write(f"{result.passed} {len(result.failed_ids)}\n")
PY

# Run a test module from tests/python and add its counts to the totals.
run_suite() {
    local module="$1" counts="$WORK/counts.$1"
    echo "== $module"
    (cd "$HERE" && PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" \
        python3 "$WORK/runner.py" "$module" "$counts")
    if [[ -s "$counts" ]]; then
        local passed failed
        read -r passed failed <"$counts"
        PASSED=$((PASSED + passed))
        FAILED=$((FAILED + failed))
    else
        fail_step "test runner for $module crashed"
    fi
}

# Whether /healthz answers 200.
healthy() {
    python3 - "$HEALTH_URL" <<'PY' 2>/dev/null
import sys
import urllib.request

try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

# Start the server in the background (working directory: a scratch
# directory, so any files it writes stay out of the repository).
start_server() {
    mkdir -p "$WORK/cwd"
    (cd "$WORK/cwd" && exec "$ROOT/target/debug/settlegate" serve) >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    local deadline=$((SECONDS + HEALTH_WAIT_S))
    while (( SECONDS < deadline )); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            wait "$SERVER_PID"
            fail_step "server exited during startup (status $?)"
            SERVER_PID=""
            return 1
        fi
        if healthy; then
            return 0
        fi
        sleep 0.25
    done
    fail_step "server not healthy at $HEALTH_URL within ${HEALTH_WAIT_S} s"
    return 1
}

# SIGTERM the server; it must exit with status 0 within the shutdown wait.
stop_server() {
    kill -TERM "$SERVER_PID" 2>/dev/null
    local deadline=$((SECONDS + SHUTDOWN_WAIT_S))
    while kill -0 "$SERVER_PID" 2>/dev/null && (( SECONDS < deadline )); do
        sleep 0.1
    done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        fail_step "server still running ${SHUTDOWN_WAIT_S} s after SIGTERM"
        return 1
    fi
    wait "$SERVER_PID"
    local status=$?
    SERVER_PID=""
    if (( status != 0 )); then
        fail_step "server exited with status $status after SIGTERM"
        return 1
    fi
    echo "server exited 0 after SIGTERM"
}

main() {
    local server_trouble=0
    run_suite test_spec_offline

    echo "== build"
    if ! cargo build -q --bin settlegate; then
        fail_step "cargo build failed"
        server_trouble=1
    elif ! start_server; then
        server_trouble=1
    else
        SETTLEGATE_LIVE=1 run_suite test_spec_live
        stop_server || server_trouble=1
    fi

    if (( FAILED > 0 || server_trouble )) && [[ -s "$SERVER_LOG" ]]; then
        echo "== server log"
        cat "$SERVER_LOG"
    fi
    echo "$PASSED passed, $FAILED failed"
    (( FAILED == 0 && server_trouble == 0 ))
}

main
