#!/usr/bin/env bash
# Everything a GPU machine should run, on an image that already has torch + triton (no registry
# needed), as stages that each fit one ten-minute command:
#
#   bash benchmarks/run_gpu.sh [quick|compile|tests|bench|parity] [arguments for run_all.py]
#
# quick (about 6 minutes on an H200; the first GPU run took 341 s for these steps):
#   install (pip -e, builds fastnote._C with CUDA)         budget 150 s   (took 58 s)
#   parity report, every op in fp32/fp16/bf16              budget 120 s   (took 62 s)
#   the gpu-marked tests, all families in one pytest run
#     with pytest-xdist (-n 12 --dist loadfile: the Triton
#     compiles spread over the cores)                      budget 180 s   (took 55 s)
#   the benchmarks' Triton kernels built in parallel
#     (benchmarks/precompile.py: their launches recorded
#     on the CPU, then built on every core into Triton's
#     cache, where the benchmarks' own launches find them) budget 90 s
#   each op family's quick benchmark, no torch.compile     budget 75 s each (took 17-30 s, compiling
#     its kernels one at a time; the window attention family now launches 48 distinct variants)
#   the whole-model headline (SAGAN, timm Swin-T), no
#     torch.compile                                        budget 120 s
#   host overhead per op call (host time, CUDA-graph GPU time)  budget 60 s
#   the README tables                                      budget 30 s
# compile: the torch.compile providers of the same quick cases, merged into the same CSVs
#   (per-op, then the models).
# tests / bench / parity: the whole suite, every benchmark case and provider, the parity report.
#
# The whole stage stops by its deadline (STAGE_BUDGET seconds, default 560: a ten-minute command
# with the machine's transfers around it): each step runs under `timeout -s INT -k 20` for the
# smaller of its budget and what is left, and a step with under 10 s left is skipped (noted).
# Every step runs with PYTHONUNBUFFERED=1; pytest with -rfE and a junit XML. After every step the
# results and logs are packed again, so a command stopped from outside still leaves what was done:
# $OUT/gpu-run-<stage>.tar.gz (benchmarks/results/ and the logs) and $OUT/summary-<stage>.txt,
# two files, for machines that hand back only a few. OUT defaults to out/gpu-run.
#
# FASTNOTE_GPU_SIMULATE=1 runs every step of the same plan on a CPU: the interpreter on, smoke
# sizes, one test per family, the install replaced by an import check (the project is installed
# already where this runs), the README tables printed instead of written. It writes the same
# files and exits 0 when every step passed; CI runs it (tests/test_run_gpu.py).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-quick}
shift || true
case "$stage" in quick|compile|tests|bench|parity) ;; *) echo "unknown stage: $stage" >&2; exit 2 ;; esac
SIMULATE=${FASTNOTE_GPU_SIMULATE:-0}
PY=${PYTHON:-python}   # the interpreter (the image's own by default)
OUT=${OUT:-out/gpu-run}
STAGE_BUDGET=${STAGE_BUDGET:-560}
RESERVE=25          # the -k 20 grace after a step's SIGINT, and the packing
LOGS=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# the code measured, named once before any step rewrites tracked files (README tables): every CSV's
# fastnote_commit (benchmarks/harness/environment.py), "-dirty" for uncommitted changes
FASTNOTE_COMMIT=${FASTNOTE_COMMIT:-$(git describe --always --dirty --abbrev=7 2>/dev/null || echo unknown)}
export FASTNOTE_COMMIT
if [ "$SIMULATE" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
  export TRITON_INTERPRET=0
fi
status=0
summary="$OUT/summary-$stage.txt"
: > "$summary"
deadline=$((SECONDS + STAGE_BUDGET))

note() { printf '%s\n' "$*" | tee -a "$summary"; }
pack() {
  cp README.md "$LOGS/README.md"
  tar -czf "$OUT/gpu-run-$stage.tar.gz.tmp" benchmarks/results -C "$LOGS" . \
    && mv "$OUT/gpu-run-$stage.tar.gz.tmp" "$OUT/gpu-run-$stage.tar.gz"
}
step() {  # step NAME BUDGET LOG COMMAND...: run under min(budget, time left), note how it ended, repack
  local name=$1 budget=$2 log=$3 rc
  shift 3
  local left=$((deadline - SECONDS - RESERVE))
  [ "$budget" -lt "$left" ] || budget=$left
  if [ "$budget" -lt 10 ]; then
    note "== $name: skipped, ${left} s left of the stage's $STAGE_BUDGET"
    status=1
    return 0
  fi
  local t0=$SECONDS
  timeout -s INT -k 20 "$budget" "$@" > "$LOGS/$log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || status=1
  note "== $name: exit $rc in $((SECONDS - t0)) s (budget $budget s)$([ "$rc" -eq 124 ] && echo ", stopped at its budget")"
  pack
  return 0
}
have_xdist() { "$PY" -c "import xdist" > /dev/null 2>&1; }

# ---- install ------------------------------------------------------------------------------------
if [ "$SIMULATE" = 1 ]; then
  step "install (simulated: import check)" 30 install.log "$PY" -c "import fastnote, fastnote._C"
else
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  step "install" 150 install.log "$PY" -m pip install --no-build-isolation --no-deps -e .
  grep -i "fastnote: building" "$LOGS/install.log" | tee -a "$summary"
fi
"$PY" - <<'PYEOF' 2>&1 | tee -a "$summary"
import torch, triton
try:
    import fastnote._C as C
    ext = f"fastnote._C with CUDA: {C.with_cuda}"
except Exception as exc:   # reported, and the steps after say the rest
    ext = f"fastnote._C does not import: {exc}"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (simulated)"
print("torch", torch.__version__, "triton", triton.__version__, gpu, ext)
PYEOF
nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1 || true
pack

# ---- the steps of each stage --------------------------------------------------------------------
families=$("$PY" - <<'PYEOF'
import os, sys
sys.path.insert(0, "benchmarks")
from run_all import discover
print(" ".join(os.path.basename(p)[:-3] for p in discover() if not p.endswith("models.py")))
PYEOF
)
if [ "$SIMULATE" = 1 ]; then
  # no plots: tests/test_benchmarks.py checks them; here they cost ~4 s a family
  bench_mode=(--smoke --no-plot --out "$LOGS/bench")
  # the smoke benchmarks run under the interpreter: building one family's kernels checks the step
  precompile=(--smoke --only gram --jobs 2)
  # one quick test per family (CPU-runnable: the gpu-marked ones skip here)
  tests=(tests/test_squeeze_excitation.py::test_no_bias
         tests/test_gram.py::test_target_shapes tests/test_tv_loss.py::test_strides
         tests/test_patch_nce.py::test_reductions tests/test_clip_loss.py::test_logit_scales
         tests/test_sagan_attention.py::test_gamma_shapes_and_zero
         tests/test_window_attention.py::test_core_non_contiguous_and_qkv_views
         tests/test_spectral_norm.py::test_power_iteration_dtypes)
  pytest_sel=("${tests[@]}")
  tables=(--stdout)
else
  bench_mode=(--quick)
  precompile=(--quick)
  pytest_sel=(-m "(gpu or autocast) and not slow" tests)
  tables=()
fi
xdist=()
have_xdist && xdist=(-n "$([ "$SIMULATE" = 1 ] && echo 2 || echo 12)" --dist loadfile)

if [ "$stage" = quick ] || [ "$stage" = parity ]; then
  step "parity" 120 parity.log "$PY" benchmarks/parity_report.py --out "$LOGS/parity.csv"
  grep -E "FAIL|passed" "$LOGS/parity.log" | tail -n 20 | tee -a "$summary"
fi
if [ "$stage" = quick ]; then
  step "gpu tests" 180 pytest.log "$PY" -m pytest -q -rfE "${xdist[@]}" --durations=15 \
    --junitxml="$LOGS/pytest.xml" "${pytest_sel[@]}"
  tail -n 25 "$LOGS/pytest.log" | tee -a "$summary"
  step "precompile (benchmark kernels)" 90 precompile.log "$PY" benchmarks/precompile.py "${precompile[@]}"
  grep -E "^(recorded|built|problem)" "$LOGS/precompile.log" | tee -a "$summary"
  for fam in $families; do
    step "bench $fam (quick, no compile)" 75 "bench-$fam.log" \
      "$PY" benchmarks/run_all.py "${bench_mode[@]}" --no-compile --only "$fam" "$@"
  done
  step "models (quick, no compile)" 120 models.log "$PY" benchmarks/models.py "${bench_mode[@]}" --no-compile
  grep -hE "^  models " "$LOGS/models.log" | tee -a "$summary"
  step "host overhead" 60 overhead.log "$PY" benchmarks/overhead.py --out "$LOGS/overhead.csv"
  tail -n 30 "$LOGS/overhead.log" >> "$summary"
fi
if [ "$stage" = compile ]; then
  for fam in $families; do
    step "bench $fam (quick, torch.compile providers)" 120 "bench-compile-$fam.log" \
      "$PY" benchmarks/run_all.py "${bench_mode[@]}" --merge --compile --providers "torch.compile" \
      --only "$fam" "$@"
  done
  step "models (quick, torch.compile)" 300 models-compile.log "$PY" benchmarks/models.py "${bench_mode[@]}" \
    --merge --compile --providers "torch.compile,torch.compile(fastnote)"
  grep -hE "^  models " "$LOGS/models-compile.log" | tee -a "$summary"
fi
if [ "$stage" = tests ]; then
  step "tests" 580 pytest.log "$PY" -m pytest -q -rfE "${xdist[@]}" --durations=25 --junitxml="$LOGS/pytest.xml"
  tail -n 30 "$LOGS/pytest.log" | tee -a "$summary"
fi
if [ "$stage" = bench ]; then
  step "benchmarks" 580 bench.log "$PY" benchmarks/run_all.py "$@"
  tail -n 15 "$LOGS/bench.log" | tee -a "$summary"
fi
if [ "$stage" = quick ] || [ "$stage" = compile ] || [ "$stage" = bench ]; then
  step "README tables" 30 make_table.log "$PY" benchmarks/make_table.py "${tables[@]}"
fi

note "status $status in $SECONDS s; archive $OUT/gpu-run-$stage.tar.gz"
pack
rm -rf "$LOGS"
exit "$status"
