#!/usr/bin/env bash
# Everything a GPU machine should run, on an image that already has torch + triton (no registry
# needed): install, the whole test suite with the interpreter off, every benchmark, the parity
# report and the README table.
#
#   bash benchmarks/run_gpu.sh [all|tests|bench|parity] [arguments for run_all.py, e.g. --only window_attention]
#
# Stages exist so each fits a bounded command (a full run takes longer than ten minutes). Results
# land in benchmarks/results/<gpu>/ (commit them); logs, the results and a summary are packed into
# $OUT/gpu-run-<stage>.tar.gz (default OUT=out/gpu-run) next to $OUT/summary-<stage>.txt, two
# files in all, for machines that hand back only a few.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
shift || true
OUT=${OUT:-out/gpu-run}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export TRITON_INTERPRET=0
status=0
summary="$OUT/summary-$stage.txt"
: > "$summary"

note() { printf '%s\n' "$*" | tee -a "$summary"; }

python -m pip install --no-build-isolation --no-deps -e . > "$LOGS/install.log" 2>&1 \
  || { tail -n 40 "$LOGS/install.log"; exit 1; }
grep -i "fastnote: building the CUDA part" "$LOGS/install.log" | tee -a "$summary"
python -c "import torch, triton, fastnote._C as C; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0), 'fastnote._C with CUDA:', C.with_cuda)" \
  | tee -a "$summary"
nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1 || true

if [ "$stage" = all ] || [ "$stage" = tests ]; then
  python -m pytest -q -rs --durations=25 --junitxml="$LOGS/pytest.xml" > "$LOGS/pytest.log" 2>&1 || status=1
  note "== tests"; tail -n 30 "$LOGS/pytest.log" | tee -a "$summary"
fi
if [ "$stage" = all ] || [ "$stage" = bench ]; then
  python benchmarks/run_all.py "$@" > "$LOGS/bench.log" 2>&1 || status=1
  python benchmarks/make_table.py > "$LOGS/make_table.log" 2>&1 || status=1
  note "== benchmarks"; tail -n 15 "$LOGS/bench.log" | tee -a "$summary"
fi
if [ "$stage" = all ] || [ "$stage" = parity ]; then
  python benchmarks/parity_report.py --out "$LOGS/parity.csv" > "$LOGS/parity.log" 2>&1 || status=1
  note "== parity"; grep -E "FAIL|passed" "$LOGS/parity.log" | tail -n 20 | tee -a "$summary"
fi

cp README.md "$LOGS/README.md"
tar -czf "$OUT/gpu-run-$stage.tar.gz" benchmarks/results -C "$LOGS" .
rm -rf "$LOGS"
note "status $status; archive $OUT/gpu-run-$stage.tar.gz"
exit "$status"
