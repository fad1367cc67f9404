"""What the family converters share: building a replacement without memory or random draws, and
the probe that checks a candidate's forward is the formula fastnote computes."""
from __future__ import annotations

import itertools
from typing import Callable

import torch
from torch import nn

# The probe recognises structure; it is not a parity test: a module computing another function is
# off the formula by O(1), one computing the same function in another order by rounding (~1e-6 in
# fp32). (atol = rtol) by the dtype of the candidate's weights: ten times the parity tolerance of
# a single reduction (docs/design.md section 3.1).
PROBE_TOLERANCE = {torch.float32: 2e-3, torch.float64: 2e-3, torch.float16: 1e-1, torch.bfloat16: 2e-1}


def _on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """Construct on the meta device (no memory, no random draws); the caller then hands it the
    original's parameters and buffers."""
    with torch.device("meta"):
        return build()


def _no_meta_left(new: nn.Module, what: str) -> nn.Module:
    for name, t in itertools.chain(new.named_parameters(), new.named_buffers()):
        if t.is_meta:
            raise RuntimeError(f"fastnote.patch: {what} kept no tensor for {name!r} (internal error)")
    return new


def _mode_of(old: nn.Module, new: nn.Module) -> nn.Module:
    return new.train(old.training)


def _is_fastnote(m) -> bool:
    return type(m).__module__.startswith("fastnote.")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _probe_input(shape, like: torch.Tensor) -> torch.Tensor:
    # A private generator: the probe draws nothing from the global ones.
    gen = torch.Generator(device=like.device).manual_seed(1234)
    return torch.randn(shape, generator=gen, device=like.device, dtype=torch.float32).to(like.dtype)


def _probe_close(actual, expected, dtype) -> bool:
    tol = PROBE_TOLERANCE.get(dtype)
    if tol is None:
        raise ValueError(f"no tolerance for dtype {dtype}")
    return isinstance(actual, torch.Tensor) and actual.shape == expected.shape and torch.allclose(
        actual.float(), expected.float(), atol=tol, rtol=tol)
