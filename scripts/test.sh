#!/usr/bin/env bash
# The test command: installs what is missing, then runs the whole suite. Without a GPU the
# suite turns the Triton interpreter on, so every kernel runs on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
set +e
"$PY" -m pytest -q --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
