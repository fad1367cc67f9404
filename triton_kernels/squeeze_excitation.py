"""Squeeze-excitation on NCHW, optionally fused with the hard-swish that precedes it in MobileNetV3.

With ``y = pre(x)`` (identity, or hard_swish for ``hswish_se``) and ``g = gate(MLP(mean_hw(y)))``:

forward   pass 1 ``plane_reduce``: s[b, c] = mean_hw y             reads x
          (the tiny MLP on s runs in torch, fp32)
          pass 2 ``apply``:        out = y * g[b, c]              reads x, writes out
backward  pass A ``plane_reduce``: dg[b, c] = sum_hw grad * y      reads grad, x
          (MLP backward in torch gives ds)
          pass B ``input_grad``:   dx = (grad * g + ds / HW) * pre'(x)   reads grad, x, writes dx

Minimum traffic, with T = B*C*H*W*itemsize: forward 3T, backward 5T (eager PyTorch with a
separate hard-swish moves about 2T + 1T + 3T forward and more than 8T backward). ``y`` is never
written. All passes accumulate in fp32; offsets are int64 so tensors past 2^31 elements work.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, hard_swish_f32, hard_swish_grad_f32, next_pow2


@triton.jit
def _plane_reduce_kernel(x_ptr, grad_ptr, out_ptr, C, HW, scale,
                         HSWISH: tl.constexpr, HAS_GRAD: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # out[b, c] = scale * sum_hw (grad *) pre(x) over a [BLOCK_C, BLOCK_HW] tile of planes.
    b = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    base = (b * C + cs.to(tl.int64)) * HW
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        offs = base[:, None] + hw[None, :]
        y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HSWISH:
            y = hard_swish_f32(y)
        if HAS_GRAD:
            y = y * tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += y
    total = tl.sum(acc, axis=1) * scale
    tl.store(out_ptr + b * C + cs, total, mask=c_mask)


@triton.jit
def _apply_kernel(x_ptr, g_ptr, out_ptr, n, HW, HSWISH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    if HSWISH:
        y = hard_swish_f32(y)
    g = tl.load(g_ptr + offs // HW, mask=mask)
    tl.store(out_ptr + offs, (y * g).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _input_grad_kernel(grad_ptr, x_ptr, g_ptr, ds_ptr, dx_ptr, n, HW, inv_hw,
                       HSWISH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    grad = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    plane = offs // HW
    g = tl.load(g_ptr + plane, mask=mask)
    ds = tl.load(ds_ptr + plane, mask=mask)
    dy = grad * g + ds * inv_hw
    if HSWISH:
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        dy = dy * hard_swish_grad_f32(x)
    tl.store(dx_ptr + offs, dy.to(dx_ptr.dtype.element_ty), mask=mask)


def _reduce_blocks(C: int, HW: int):
    block_hw = min(next_pow2(HW), 256)
    block_c = max(1, min(next_pow2(C), 4096 // block_hw))
    return block_c, block_hw


def plane_reduce(x: torch.Tensor, grad, hswish: bool, scale: float) -> torch.Tensor:
    """fp32 [B, C]: ``scale * sum_hw((grad *) pre(x))`` for contiguous x (and grad) [B, C, H, W]."""
    B, C = x.shape[0], x.shape[1]
    HW = x[0, 0].numel() if x.numel() else 0
    out = torch.zeros((B, C), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return out
    block_c, block_hw = _reduce_blocks(C, HW)
    grid = (B, triton.cdiv(C, block_c))
    _plane_reduce_kernel[grid](
        x, grad if grad is not None else x, out, C, HW, scale,
        HSWISH=hswish, HAS_GRAD=grad is not None, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=4,
    )
    return out


def apply(x: torch.Tensor, g: torch.Tensor, hswish: bool, out: torch.Tensor) -> torch.Tensor:
    """out = pre(x) * g[b, c]; g fp32 contiguous [B, C]."""
    n = x.numel()
    if n:
        HW = n // (x.shape[0] * x.shape[1])
        _apply_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](
            x, g, out, n, HW, HSWISH=hswish, BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS
        )
    return out


def input_grad(grad, x, g, ds, hswish: bool, out: torch.Tensor) -> torch.Tensor:
    """dx = (grad * g + ds / HW) * pre'(x); g, ds fp32 contiguous [B, C] (ds = dL/d mean)."""
    n = x.numel()
    if n:
        HW = n // (x.shape[0] * x.shape[1])
        _input_grad_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](
            grad, x, g, ds, out, n, HW, 1.0 / HW,
            HSWISH=hswish, BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS,
        )
    return out
