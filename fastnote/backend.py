"""Backend choice, in one place.

``FASTNOTE_BACKEND=auto|triton|reference`` (read on every call, so tests and users can switch it
at run time):

- ``auto`` (default): CUDA tensors run the Triton/CUDA kernels; CPU tensors run ``reference.py``
  unless the Triton interpreter is on (``TRITON_INTERPRET=1``, set before triton is imported),
  in which case the Triton kernels themselves run on the CPU.
- ``triton``: always the kernels (on CPU this needs the interpreter).
- ``reference``: always the plain-PyTorch reference.
"""
from __future__ import annotations

import importlib.util
import os

import torch

_CHOICES = ("auto", "triton", "reference")


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once, without importing triton (TRITON_INTERPRET must be read by triton's own import).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def requested() -> str:
    choice = os.environ.get("FASTNOTE_BACKEND", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"FASTNOTE_BACKEND must be one of {_CHOICES}, got {choice!r}")
    return choice


def use_triton(device: torch.device) -> bool:
    """True when the Triton kernels should run for tensors on ``device``."""
    choice = requested()
    if choice == "reference":
        return False
    kernels_can_run = triton_available() and (device.type == "cuda" or interpreter_on())
    if choice == "triton":
        if not kernels_can_run:
            raise RuntimeError(
                f"FASTNOTE_BACKEND=triton but the Triton kernels cannot run on {device.type} tensors: "
                "use CUDA tensors, or set TRITON_INTERPRET=1 before importing triton"
            )
        return True
    return kernels_can_run


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Fresh output buffer. With ``FASTNOTE_POISON_ALLOC=1`` (the test suite sets it) the buffer
    is filled with NaN, so a kernel that leaves part of its output unwritten fails loudly."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("FASTNOTE_POISON_ALLOC", "0") == "1" and out.is_floating_point():
        out.fill_(float("nan"))
    return out
