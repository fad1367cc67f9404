"""Backend choice, in one place.

``FASTNOTE_BACKEND=auto|triton|reference``:

- ``auto`` (default): CUDA tensors run the Triton/CUDA kernels; CPU tensors run ``reference.py``
  unless the Triton interpreter is on (``TRITON_INTERPRET=1``, set before triton is imported),
  in which case the Triton kernels themselves run on the CPU.
- ``triton``: always the kernels (on CPU this needs the interpreter).
- ``reference``: always the plain-PyTorch reference.

float64 inputs run the reference whatever the choice (``kernels_for``): the kernels take fp32,
fp16 and bf16, and float64 is for checking (gradcheck, a model cast with ``.double()``), where
exact maths matters more than speed, as torch's own fused attention falls back to its math path.

``FASTNOTE_BACKEND``, ``TRITON_INTERPRET`` and ``FASTNOTE_POISON_ALLOC`` are read once, when first
needed (the first op call), not on every call: an op's host time is part of every training step.
Code that changes them afterwards (tests, scripts) calls ``refresh()`` to have them read again.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, NamedTuple, Optional

import torch

_CHOICES = ("auto", "triton", "reference")


class Settings(NamedTuple):
    choice: str             # one of _CHOICES, or "" when FASTNOTE_BACKEND is invalid
    error: Optional[str]    # the message raised while FASTNOTE_BACKEND is invalid
    interpret: bool         # TRITON_INTERPRET=1
    poison: bool            # FASTNOTE_POISON_ALLOC=1


# Looked up once, without importing triton (TRITON_INTERPRET must be read by triton's own import).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

_settings: Optional[Settings] = None
_poison: Optional[bool] = None          # _settings.poison, as a plain global for backend.empty
# device -> use the kernels (filled as devices come; keyed by the device itself, as reading
# ``device.type`` builds a string each time: ~0.25 us, on every call)
_decisions: Dict[torch.device, bool] = {}


def refresh() -> Settings:
    """Read ``FASTNOTE_BACKEND``, ``TRITON_INTERPRET`` and ``FASTNOTE_POISON_ALLOC`` from the
    environment again; returns what was read. An invalid ``FASTNOTE_BACKEND`` is not raised here
    but by the next ``requested()`` / ``use_triton()``."""
    global _settings, _poison
    choice = os.environ.get("FASTNOTE_BACKEND", "auto").strip().lower() or "auto"
    error = None
    if choice not in _CHOICES:
        error = f"FASTNOTE_BACKEND must be one of {_CHOICES}, got {choice!r}"
        choice = ""
    _settings = Settings(choice, error, os.environ.get("TRITON_INTERPRET", "0") == "1",
                         os.environ.get("FASTNOTE_POISON_ALLOC", "0") == "1")
    _poison = _settings.poison
    _decisions.clear()
    return _settings


def settings() -> Settings:
    """The settings in force (read from the environment on first use, or by ``refresh()``)."""
    return _settings if _settings is not None else refresh()


def interpreter_on() -> bool:
    return settings().interpret


def triton_available() -> bool:
    return _TRITON_INSTALLED


def requested() -> str:
    s = settings()
    if s.error is not None:
        raise ValueError(s.error)
    return s.choice


def use_triton(device: torch.device) -> bool:
    """True when the Triton kernels should run for tensors on ``device``."""
    decided = _decisions.get(device)
    if decided is not None:
        return decided
    return _decide(device)


def kernels_for(t: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """True when an op whose leading input is ``t`` should run the kernels: ``use_triton`` for
    its device, unless ``t`` or any of ``others`` (its other float inputs; None for one not
    given) is float64, which the reference runs, with torch's type promotion."""
    if t.dtype is torch.float64:
        return False
    for o in others:
        if o is not None and o.dtype is torch.float64:
            return False
    return use_triton(t.device)


def _decide(device: torch.device) -> bool:
    choice = requested()
    if choice == "reference":
        decided = False
    else:
        kernels_can_run = triton_available() and (device.type == "cuda" or interpreter_on())
        if choice == "triton" and not kernels_can_run:
            raise RuntimeError(
                f"FASTNOTE_BACKEND=triton but the Triton kernels cannot run on {device.type} tensors: "
                "use CUDA tensors, or set TRITON_INTERPRET=1 before importing triton"
            )
        decided = kernels_can_run
    _decisions[device] = decided
    return decided


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Fresh output buffer. With ``FASTNOTE_POISON_ALLOC=1`` (the test suite sets it) the buffer
    is filled with NaN, so a kernel that leaves part of its output unwritten fails loudly.

    The sizes go to ``torch.empty`` one by one: its argument parser takes them ~0.5 us faster per
    call than one tuple, and ~1 us faster than a ``torch.Size`` (measured on CPU, torch 2.13)."""
    out = torch.empty(*shape, dtype=dtype, device=device) if len(shape) else torch.empty((), dtype=dtype, device=device)
    poison = _poison if _poison is not None else settings().poison
    if poison and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """``empty(t.shape, t.dtype, t.device)`` for a contiguous ``t`` (cheaper on the host)."""
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    poison = _poison if _poison is not None else settings().poison
    if poison and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-D ``x`` is laid out channels-last (NHWC memory) and not also contiguous (a
    tensor contiguous both ways, H = W = 1 or C = 1, counts as contiguous). The kernels that take
    channels-last read such an ``x`` in place and give its outputs and gradient the same layout,
    as torch's elementwise ops keep it."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def empty_in_layout(x: torch.Tensor) -> torch.Tensor:
    """A fresh buffer shaped like ``x`` (an output or gradient of it): channels-last when
    ``channels_last(x)``, else contiguous."""
    if channels_last(x):
        B, C, H, W = x.shape
        return empty((B, H, W, C), x.dtype, x.device).permute(0, 3, 1, 2)
    return empty_like(x)


def fake_in_layout(x: torch.Tensor) -> torch.Tensor:
    """``empty_in_layout``'s shape and strides, for the fake (meta) registrations."""
    fmt = torch.channels_last if channels_last(x) else torch.contiguous_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
