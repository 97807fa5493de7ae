#!/usr/bin/env bash
# The test command: install what the tests need, build, run every test, and
# end with the plain line "N passed, N failed" counted from tap's own output.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh --all || { echo "install-deps failed"; echo "0 passed, 1 failed"; exit 1; }
mkdir -p .tap
out=.tap/last-run.tap
npx tap --reporter=tap "$@" 2>&1 | tee "$out"
status=${PIPESTATUS[0]}
node scripts/tap-summary.js "$out"
exit "$status"
