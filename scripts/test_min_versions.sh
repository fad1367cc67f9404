#!/usr/bin/env bash
# The suite on the oldest releases setup.py declares: torch 2.11.0 with triton 3.6.0 (the reference
# GPU image's pair), numpy < 2.4 (triton 3.6's interpreter fails on numpy >= 2.4, see README.md).
# On demand only, not part of CI. Arguments go to pytest (default: the whole suite), e.g.
#
#   scripts/test_min_versions.sh tests/test_spectral_norm.py tests/test_reference.py
#   scripts/test_min_versions.sh --report-only     # just `python -m fastnote report`
#   scripts/test_min_versions.sh --report ...      # the report, then pytest with the rest
#
# Layout, all under .venv-min/ (git-ignored):
#   .venv-min/          a virtual environment with those releases, made once and kept
#   .venv-min/src/      a copy of the working tree, refreshed on every run, installed editable
#                       there; the tests run in it
#
# Why a copy: `pip install -e .` builds fastnote/_C*.so into the source tree, and a _C built
# against torch 2.11 does not load into torch 2.13 (nor the other way round), so building it in
# the shared checkout would break .venv/'s fastnote._C. The copy has its own _C and build/; it is
# rebuilt when csrc/, setup.py or pyproject.toml change. The checkout itself is only read.
#
# torch 2.11.0 comes from PyPI as its CUDA build (it runs on a CPU), with its nvidia-* wheels:
# they cannot be left out (`pip install --no-deps torch` then fails at `import torch`, on
# libcudnn.so.9: the CUDA build links them at import). The environment takes about 5 GB (2.7 GB
# of it nvidia-*); making it stops at once when the disk has less than MIN_VERSIONS_FREE_GB
# (default 8) GB free.
#
# Environment: PYTHON (the interpreter to make the environment with, default python3),
# MIN_VERSIONS_VENV (default .venv-min), MIN_VERSIONS_FREE_GB, FASTNOTE_CPU_EXTENSION (see below).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

TORCH_VERSION=2.11.0
TRITON_VERSION=3.6.0
NUMPY_SPEC="numpy<2.4"
TORCHVISION_VERSION=0.26.0   # torch 2.N pairs with torchvision 0.(N+15)
TEST_TOOLS=(pytest pytest-xdist hypothesis pytest-benchmark matplotlib ninja setuptools wheel)

VENV=${MIN_VERSIONS_VENV:-.venv-min}
case $VENV in /*) ;; *) VENV=$ROOT/$VENV ;; esac
SRC=$VENV/src
PY=$VENV/bin/python
log() { printf '[min-versions] %s\n' "$*"; }

pip_install() {
  "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
  return "${PIPESTATUS[0]}"
}

# ---- the environment (once) ---------------------------------------------------------------------
stamp="torch==$TORCH_VERSION triton==$TRITON_VERSION $NUMPY_SPEC ${TEST_TOOLS[*]}"
if [ ! -f "$VENV/.made" ] || [ "$(cat "$VENV/.made")" != "$stamp" ]; then
  log "making $VENV ($stamp)"
  mkdir -p "$VENV"
  free_gb=$(df -Pk "$VENV" | awk 'NR == 2 {print int($4 / 1048576)}')
  if [ "$free_gb" -lt "${MIN_VERSIONS_FREE_GB:-8}" ]; then
    log "only ${free_gb} GB free where $VENV goes: torch $TORCH_VERSION's CUDA build and its nvidia-* wheels" \
        "need about 5 GB (set MIN_VERSIONS_FREE_GB to change the limit)"
    exit 1
  fi
  [ -x "$PY" ] || "${PYTHON:-python3}" -m venv "$VENV"
  log "torch $TORCH_VERSION (CUDA build from PyPI, with its nvidia-* wheels; ${free_gb} GB free)"
  pip_install "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" || exit 1
  pip_install "$NUMPY_SPEC" "${TEST_TOOLS[@]}" || exit 1
  # Optional: the model tests skip without them. --no-deps (timm's own dependencies named here,
  # less torch and torchvision) keeps pip from moving torch.
  pip_install --no-deps "torchvision==$TORCHVISION_VERSION" pillow \
    || log "torchvision not installed: its model tests will skip"
  { pip_install --no-deps timm && pip_install pyyaml huggingface_hub safetensors; } \
    || log "timm not installed: its model tests will skip"
  # nothing above may have moved the pins
  "$PY" - "$TORCH_VERSION" "$TRITON_VERSION" <<'PYEOF' || exit 1
import sys
from importlib.metadata import version
torch_v, triton_v = sys.argv[1:]
got = {"torch": version("torch").split("+")[0], "triton": version("triton"), "numpy": version("numpy")}
assert got["torch"] == torch_v and got["triton"] == triton_v, got
assert tuple(int(p) for p in got["numpy"].split(".")[:2]) < (2, 4), got
PYEOF
  echo "$stamp" > "$VENV/.made"
fi

# ---- the copy of the working tree ---------------------------------------------------------------
# Files that git tracks or would track (untracked, not ignored); without git, everything but the
# usual build outputs. Files that left the checkout since the last run leave the copy too. The
# copy is the working tree as it is now: edits saved while the tests run are not in this run.
mkdir -p "$SRC"
"$PY" - "$ROOT" "$SRC" <<'PYEOF'
import os, shutil, subprocess, sys

root, dst = sys.argv[1], os.path.abspath(sys.argv[2])
try:
    out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout
    files = [f for f in out.decode().split("\0") if f]
except (OSError, subprocess.CalledProcessError):
    skip = {".git", "build", "out", "__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks"}
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in skip and not x.startswith(".venv") and not x.endswith(".egg-info")]
        files += [os.path.relpath(os.path.join(d, n), root) for n in names if not n.endswith(".so")]
files = sorted(f for f in files if os.path.isfile(os.path.join(root, f)) and not f.startswith(".venv"))
manifest = os.path.join(dst, ".copied-files")
old = set(open(manifest).read().split("\0")) - {""} if os.path.exists(manifest) else set()
for f in old - set(files):
    try:
        os.remove(os.path.join(dst, f))
    except FileNotFoundError:
        pass
for f in files:
    s, d = os.path.join(root, f), os.path.join(dst, f)
    st = os.stat(s)
    try:
        dt = os.stat(d)
        if dt.st_size == st.st_size and dt.st_mtime_ns == st.st_mtime_ns:
            continue
    except FileNotFoundError:
        os.makedirs(os.path.dirname(d), exist_ok=True)
    shutil.copy2(s, d)
with open(manifest, "w") as fh:
    fh.write("\0".join(files))
PYEOF

# ---- fastnote, editable in the copy (rebuilt when the extension's inputs change) ----------------
# Without a GPU only the C++ part of fastnote._C: the CUDA wheel of torch would otherwise have
# setup.py try (and fail) to compile the CUDA part wherever an nvcc is on PATH.
if [ -z "${FASTNOTE_CPU_EXTENSION:-}" ] && ! { command -v nvidia-smi && nvidia-smi; } >/dev/null 2>&1; then
  export FASTNOTE_CPU_EXTENSION=1
fi
build_stamp=$(cd "$SRC" && { echo "FASTNOTE_CPU_EXTENSION=${FASTNOTE_CPU_EXTENSION:-}"; cat setup.py pyproject.toml csrc/*; } 2>/dev/null | cksum)
if [ ! -f "$SRC/.built" ] || [ "$(cat "$SRC/.built")" != "$build_stamp" ] \
    || ! (cd "$SRC" && "$PY" -c "import fastnote._C") >/dev/null 2>&1; then
  log "installing fastnote from $SRC (editable, builds fastnote._C against torch $TORCH_VERSION)"
  (cd "$SRC" && pip_install --no-build-isolation --no-deps -e .) || { log "installing fastnote failed"; exit 1; }
  (cd "$SRC" && "$PY" -c "import fastnote._C") || { log "fastnote._C does not load after the build"; exit 1; }
  echo "$build_stamp" > "$SRC/.built"
fi
cd "$SRC"
"$PY" - <<'PYEOF'
import numpy, torch, triton, fastnote
from fastnote.ops import power_iteration
print(f"[min-versions] torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}, "
      f"fastnote from {fastnote.__file__}, fastnote._C: {'built' if power_iteration.extension_available() else 'MISSING'}")
PYEOF

# ---- run -----------------------------------------------------------------------------------------
rc=0
if [ "${1:-}" = "--report-only" ] || [ "${1:-}" = "--report" ]; then
  first=$1
  shift
  log "python -m fastnote report"
  "$PY" -m fastnote report || rc=$?
  [ "$first" = "--report-only" ] && exit "$rc"
fi
set +e
# numpy < 2.4 warns where numpy >= 2.4 fails (triton 3.6's interpreter, once per kernel call):
# thousands of lines that say nothing about fastnote
"$PY" -m pytest -q -W "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning" "$@"
prc=$?
set -e
if [ "$prc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
[ "$prc" -ne 0 ] && exit "$prc"
exit "$rc"
