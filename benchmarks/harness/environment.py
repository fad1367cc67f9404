"""What a run is measured on: device and CPU names, torch/triton versions, the git commit, the
fastnote backend in use, the measured copy bandwidth and the nominal peaks; also the device calls
the measurements share (synchronise, free memory, recognise an OOM) and the results paths."""
from __future__ import annotations

import gc
import os
import platform
import re
import subprocess
from typing import Dict

import torch

from .spec import QUANTILES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
COPY_BYTES = 1 << 30

# Nominal peaks (dense, no sparsity) by a substring of torch.cuda.get_device_name().
_NOMINAL = (
    ("H200", {"gbps": 4800.0, "bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("H100 80GB HBM3", {"gbps": 3350.0, "bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("H100 SXM", {"gbps": 3350.0, "bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}),
)


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def git_commit() -> str:
    """The code a result was measured on: ``FASTNOTE_COMMIT`` when set (``run_gpu.sh`` sets it once
    at its start, before its own steps rewrite tracked files such as the README's tables), else
    ``git describe --always --dirty``: the short hash, with ``-dirty`` when tracked files differ
    from it (a run of uncommitted changes must not carry the commit's name alone)."""
    pinned = os.environ.get("FASTNOTE_COMMIT", "").strip()
    if pinned:
        return pinned
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except Exception:
        return "unknown"


def triton_version() -> str:
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:
        return "absent"


def _backend_name(device: torch.device) -> str:
    try:
        from fastnote import backend

        if backend.use_triton(device):
            return "triton (interpreter)" if device.type == "cpu" else "triton"
        return "reference"
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    # gc.collect costs ~0.1 s with torch loaded: only worth it where memory is measured.
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


_COPY_GBPS: Dict[str, float] = {}


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device copy bandwidth, (read + write bytes) / time of a 1 GiB ``copy_``, measured once."""
    key = str(device)
    if key not in _COPY_GBPS:
        import triton.testing

        src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), quantiles=QUANTILES)[0]
        _COPY_GBPS[key] = 2 * COPY_BYTES / (ms * 1e-3) / 1e9
        del src, dst
        _free(device)
    return _COPY_GBPS[key]


def nominal_peak(gpu: str) -> Dict[str, float]:
    for key, peaks in _NOMINAL:
        if key.lower() in gpu.lower():
            return peaks
    return {}
