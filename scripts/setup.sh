# Sourced by scripts/main.sh and scripts/test.sh: installs what is missing, then the project.
# Leaves $PY pointing at the interpreter to use.
#
# - A Python that already has torch (e.g. a GPU image) is used as it is.
# - Otherwise a virtual environment .venv/ is made; torch comes as the CPU wheel
#   (torch==2.13.0) unless an NVIDIA driver is present, never the multi-GB CUDA build by accident.
# - Packages already importable are not reinstalled, so a machine without a registry works
#   when they are there.
# - The project installs editable without build isolation (isolation would download a CUDA torch
#   just to compile the extension against).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[setup] %s\n' "$*"; }

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
  elif python3 -c "import torch" >/dev/null 2>&1; then
    PY=$(command -v python3)
  else
    log "creating .venv"
    python3 -m venv .venv
    PY=.venv/bin/python
  fi
fi
log "python: $PY"

# pip's status is kept; only its noise about absent local index folders is filtered.
pip_install() {
  "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
  return "${PIPESTATUS[0]}"
}
has() { "$PY" -c "import $1" >/dev/null 2>&1; }
# installed, whether or not it imports on its own (torchvision beside a CPU torch does not)
installed() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" >/dev/null 2>&1; }

if ! has torch; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    log "installing torch (CUDA build: an NVIDIA driver is present)"
    pip_install "torch>=2.11" || exit 1
  else
    log "installing torch==2.13.0 (CPU wheel)"
    pip_install torch==2.13.0 || exit 1
  fi
fi
missing=()
for pair in triton:triton numpy:numpy pytest:pytest hypothesis:hypothesis pytest_benchmark:pytest-benchmark \
            xdist:pytest-xdist matplotlib:matplotlib ninja:ninja setuptools:setuptools wheel:wheel; do
  has "${pair%%:*}" || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  pip_install "${missing[@]}" || exit 1
fi
# Triton before 3.7 (3.6 is the one torch 2.11 pins) has its interpreter int() a 1-element numpy
# array, which numpy >= 2.4 refuses: without a GPU every kernel runs under the interpreter, so
# such a triton gets numpy < 2.4. With a GPU the compiled kernels never take that path and the
# environment is left as it is. (No requirement in setup.py can say this: an environment marker
# cannot depend on another package's version.)
old_triton_new_numpy() {
  "$PY" - <<'PYEOF'
import sys
from importlib.metadata import version
major_minor = lambda name: tuple(int(p) for p in version(name).split("+")[0].split(".")[:2])
sys.exit(0 if major_minor("triton") < (3, 7) and major_minor("numpy") >= (2, 4) else 1)
PYEOF
}
if old_triton_new_numpy 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    log "note: triton < 3.7 with numpy >= 2.4: the Triton interpreter (CPU runs) would fail; GPU runs are fine"
  else
    log "triton < 3.7 with numpy >= 2.4 (its interpreter fails on that numpy): installing numpy<2.4"
    pip_install "numpy<2.4" || exit 1
  fi
fi
# Real models for the compatibility tests (best effort: the tests skip where these cannot be had).
# torchvision's wheel without its dependencies, at the release paired with the installed torch
# (torch 2.N pairs with torchvision 0.(N+15)), so pip never swaps the CPU torch for a CUDA one;
# beside a CPU torch its CUDA extension does not load, which tests/conftest.py handles.
if ! installed torchvision; then
  tv=$("$PY" -c "import torch; major, minor = torch.__version__.split('+')[0].split('.')[:2]; print(f'0.{int(minor) + 15}.*' if major == '2' else '')")
  if [ -n "$tv" ]; then
    log "installing torchvision==$tv (no dependencies) and pillow"
    pip_install --no-deps "torchvision==$tv" pillow || log "torchvision not installed: its model tests will skip"
  fi
fi
if ! installed timm && installed torchvision; then
  log "installing timm"
  pip_install timm || log "timm not installed: its model tests will skip"
fi
# open_clip, whose SigLipLoss the SigLIP tests and benchmark compare with: the package without its
# dependencies (they would bring another torch), plus the two its import needs beyond timm's
# (torchvision, timm, huggingface_hub, safetensors, tqdm). Best effort, as timm.
if ! installed open_clip && installed timm; then
  log "installing open_clip_torch (no dependencies), ftfy and regex"
  { pip_install --no-deps open_clip_torch && pip_install ftfy regex; } \
    || log "open_clip not installed: its comparisons will skip"
fi
# Hugging Face transformers (Swin, Swinv2) and spandrel (SwinIR, Swin2SR), whose models fastnote.patch
# is tested on. transformers asks for no torch; spandrel does, so it comes without its dependencies,
# plus the two its import needs beyond torch and torchvision. Best effort, as timm.
if ! installed transformers && installed torch; then
  log "installing transformers"
  pip_install transformers || log "transformers not installed: its Swin tests will skip"
fi
# peft, whose LoRA adapters tests/test_patch_peft.py puts into Swin models before and after
# fastnote.patch: without its dependencies (they would bring another torch), plus accelerate and
# psutil, which its import needs beyond transformers'. Best effort, as timm.
if ! installed peft && installed transformers; then
  log "installing peft and accelerate (no dependencies) and psutil"
  { pip_install --no-deps peft accelerate && pip_install psutil; } || log "peft not installed: its tests will skip"
fi
if ! installed spandrel && installed torchvision; then
  log "installing spandrel (no dependencies), einops and safetensors"
  { pip_install --no-deps spandrel && pip_install einops safetensors; } \
    || log "spandrel not installed: its SwinIR / Swin2SR tests will skip"
fi
# pytorch-pretrained-biggan, whose SelfAttn fastnote.patch is tested on: without its dependencies
# (boto3, requests, scipy serve only its downloads and noise sampling; tests/test_patch_biggan.py
# loads its model.py without them). Best effort, as timm.
if ! installed pytorch_pretrained_biggan && installed torch; then
  log "installing pytorch-pretrained-biggan (no dependencies)"
  pip_install --no-deps pytorch-pretrained-biggan || log "pytorch-pretrained-biggan not installed: its tests will skip"
fi
for mod in torch triton pytest; do
  has "$mod" || { log "could not install $mod"; exit 1; }
done

log "installing fastnote (editable, builds fastnote._C)"
pip_install --no-build-isolation --no-deps -e . || { log "installing fastnote failed"; exit 1; }
"$PY" -c "import fastnote" || { log "fastnote does not import"; exit 1; }
"$PY" - <<'PYEOF'
import torch, triton
print(f"[setup] torch {torch.__version__}, triton {triton.__version__}, "
      f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
PYEOF
export PY
