#!/usr/bin/env bash
# The test command: installs what is missing, then runs the whole suite. Without a GPU the
# suite turns the Triton interpreter on, so every Triton kernel runs on the CPU.
#
# With no arguments it runs in two passes: everything but the timing-sensitive tests on two
# pytest-xdist workers (a file's tests stay in one worker, so module-scoped fixtures such as the
# build check's compile run once), then the tests marked `serial` (host-overhead budgets, the
# simulated GPU plan's step budgets) alone, so that no other worker's load is in their timings.
# With arguments it is one plain pytest run with them.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
set +e
if [ "$#" -gt 0 ]; then
  "$PY" -m pytest -q --durations=15 "$@"
  rc=$?
else
  "$PY" -m pytest -q --durations=15 -n "${FASTNOTE_TEST_WORKERS:-2}" --dist loadfile -m "not serial"
  rc=$?
  "$PY" -m pytest -q --durations=5 -m serial
  rc_serial=$?
  [ "$rc" -ne 0 ] || rc=$rc_serial
fi
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
