"""Hard-swish and hard-sigmoid, forward and backward: one streaming pass each.

Minimum traffic: forward reads x and writes y (2 * numel * itemsize bytes); backward reads
grad and x and writes dx (3 * numel * itemsize). Both are purely bandwidth-bound (a handful of
FLOPs per element), so the figure of merit is achieved GB/s against the GPU's copy bandwidth.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (
    cdiv,
    ELEMENTWISE_BLOCK,
    ELEMENTWISE_WARPS,
    hard_sigmoid_f32,
    hard_sigmoid_grad_f32,
    hard_swish_f32,
    hard_swish_grad_f32,
    launch,
)

KINDS = ("hard_swish", "hard_sigmoid")


@triton.jit
def _forward_kernel(x_ptr, y_ptr, n, SWISH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    if SWISH:
        y = hard_swish_f32(x)
    else:
        y = hard_sigmoid_f32(x)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(g_ptr, x_ptr, dx_ptr, n, SWISH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    if SWISH:
        d = hard_swish_grad_f32(x)
    else:
        d = hard_sigmoid_grad_f32(x)
    tl.store(dx_ptr + offs, (g * d).to(dx_ptr.dtype.element_ty), mask=mask)


def _grid(n):
    return (cdiv(n, ELEMENTWISE_BLOCK),)


def forward(*, x: torch.Tensor, kind: str, out: torch.Tensor) -> torch.Tensor:
    """y = act(x) into ``out`` (both contiguous, same shape and dtype)."""
    n = x.numel()
    if n:
        launch(_forward_kernel, _grid(n),
            x, out, n, SWISH=kind == "hard_swish", BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS
        )
    return out


def backward(*, grad: torch.Tensor, x: torch.Tensor, kind: str, out: torch.Tensor) -> torch.Tensor:
    """dx = grad * act'(x) into ``out`` (all contiguous, same shape and dtype)."""
    n = x.numel()
    if n:
        launch(_backward_kernel, _grid(n),
            grad, x, out, n, SWISH=kind == "hard_swish", BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS
        )
    return out
