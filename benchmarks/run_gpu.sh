#!/usr/bin/env bash
# Everything a GPU machine should run, on an image that already has torch + triton (no registry
# needed): install, the test suite with the interpreter off, the benchmarks, the parity report and
# the README table.
#
#   bash benchmarks/run_gpu.sh [quick|all|tests|bench|parity] [arguments for run_all.py, e.g. --only window_attention]
#
# quick: for a short GPU budget (each step capped at STEP_TIMEOUT): the gpu-marked tests (fp16/bf16
#   parity of every kernel, the CUDA power iteration), each op benchmark's headline case per dtype
#   without the torch.compile providers (run_all.py --quick --no-compile), the whole-model headline
#   (models.py --quick: SAGAN and Swin-T training steps, eager / fastnote / both compiled), the
#   parity report.
# all / tests / bench / parity: the whole suite, every benchmark case and provider (longer than one
#   ten-minute command: run them as separate stages).
# Each step runs under `timeout` (STEP_TIMEOUT seconds, default 240 in quick, else 580) and the archive is rewritten
# after every step, so a command stopped from outside still leaves what was done. Results land in
# benchmarks/results/<gpu>/ (commit them); logs, the results and a summary are packed into
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

if [ "$stage" = quick ]; then STEP_TIMEOUT=${STEP_TIMEOUT:-240}; else STEP_TIMEOUT=${STEP_TIMEOUT:-580}; fi

note() { printf '%s\n' "$*" | tee -a "$summary"; }
pack() {
  cp README.md "$LOGS/README.md"
  tar -czf "$OUT/gpu-run-$stage.tar.gz.tmp" benchmarks/results -C "$LOGS" . \
    && mv "$OUT/gpu-run-$stage.tar.gz.tmp" "$OUT/gpu-run-$stage.tar.gz"
}
step() {  # step NAME LOG COMMAND...: run under the step timeout, note how it ended, repack
  local name=$1 log=$2 rc
  shift 2
  local t0=$SECONDS
  timeout "$STEP_TIMEOUT" "$@" > "$LOGS/$log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || status=1
  note "== $name: exit $rc in $((SECONDS - t0)) s$([ "$rc" -eq 124 ] && echo " (stopped at STEP_TIMEOUT=$STEP_TIMEOUT)")"
  pack
  return 0
}

python -m pip install --no-build-isolation --no-deps -e . > "$LOGS/install.log" 2>&1 \
  || { tail -n 40 "$LOGS/install.log"; exit 1; }
grep -i "fastnote: building the CUDA part" "$LOGS/install.log" | tee -a "$summary"
python -c "import torch, triton, fastnote._C as C; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0), 'fastnote._C with CUDA:', C.with_cuda)" \
  | tee -a "$summary"
nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1 || true
pack

if [ "$stage" = quick ]; then
  step "gpu tests" pytest.log python -m pytest -q -rs -m gpu --durations=15 --junitxml="$LOGS/pytest.xml"
  tail -n 20 "$LOGS/pytest.log" | tee -a "$summary"
  step "benchmarks (quick, no compile)" bench.log python benchmarks/run_all.py --quick --no-compile --skip models "$@"
  tail -n 15 "$LOGS/bench.log" | tee -a "$summary"
  # eager and fastnote first (minutes), then the compiled two merged into the same CSV, so a
  # compilation that runs out of time still leaves the first half
  step "models (quick)" models.log python benchmarks/models.py --quick --no-compile
  step "models (quick, torch.compile)" models-compile.log \
    python benchmarks/models.py --quick --merge --providers "torch.compile,torch.compile(fastnote)"
  grep -hE "^  models " "$LOGS/models.log" "$LOGS/models-compile.log" | tee -a "$summary"
fi
if [ "$stage" = all ] || [ "$stage" = tests ]; then
  step "tests" pytest.log python -m pytest -q -rs --durations=25 --junitxml="$LOGS/pytest.xml"
  tail -n 30 "$LOGS/pytest.log" | tee -a "$summary"
fi
if [ "$stage" = all ] || [ "$stage" = bench ]; then
  step "benchmarks" bench.log python benchmarks/run_all.py "$@"
  tail -n 15 "$LOGS/bench.log" | tee -a "$summary"
fi
if [ "$stage" = quick ] || [ "$stage" = all ] || [ "$stage" = bench ]; then
  step "README table" make_table.log python benchmarks/make_table.py
fi
if [ "$stage" = quick ] || [ "$stage" = all ] || [ "$stage" = parity ]; then
  step "parity" parity.log python benchmarks/parity_report.py --out "$LOGS/parity.csv"
  grep -E "FAIL|passed" "$LOGS/parity.log" | tail -n 20 | tee -a "$summary"
fi

note "status $status; archive $OUT/gpu-run-$stage.tar.gz"
pack
rm -rf "$LOGS"
exit "$status"
