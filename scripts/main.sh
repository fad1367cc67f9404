#!/usr/bin/env bash
# The main job: installs what is missing, runs every benchmark (real runs on a GPU, writing
# benchmarks/results/<gpu>/; a smoke run into out/bench-smoke without one), then prints the
# parity report of every op against fastnote.reference.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  "$PY" benchmarks/run_all.py "$@"
  "$PY" benchmarks/make_table.py
else
  echo "[main] no GPU: benchmarks in smoke mode (tiny shapes, one repeat), CPU-measured ones for real"
  "$PY" benchmarks/run_all.py --smoke --out out/bench-smoke "$@"
fi
"$PY" benchmarks/parity_report.py
