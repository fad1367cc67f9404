#!/usr/bin/env bash
# Everything a GPU machine should run, in one go, on an image that already has torch + triton
# (no registry needed): install, the whole test suite with the interpreter off, every benchmark,
# the parity report and the README table. Logs and a copy of the results go to $OUT (default
# out/gpu-run); the results themselves land in benchmarks/results/<gpu>/, to be committed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-run}
mkdir -p "$OUT"
export TRITON_INTERPRET=0
status=0

python -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" \
  | tee "$OUT/versions.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

python -m pytest -q -rs --durations=25 --junitxml="$OUT/pytest.xml" > "$OUT/pytest.log" 2>&1 || status=1
tail -n 40 "$OUT/pytest.log"

python benchmarks/run_all.py "$@" > "$OUT/bench.log" 2>&1 || status=1
tail -n 20 "$OUT/bench.log"
python benchmarks/parity_report.py --out "$OUT/parity.csv" > "$OUT/parity.log" 2>&1 || status=1
tail -n 40 "$OUT/parity.log"
python benchmarks/make_table.py > "$OUT/make_table.log" 2>&1 || status=1
cp -r benchmarks/results "$OUT/results"
exit "$status"
