"""Squeeze-excitation on NCHW or channels_last (NHWC in memory), optionally fused with the
hard-swish that precedes it in MobileNetV3.

With ``y = pre(x)`` (identity, or hard_swish for ``hswish_se``) and ``g = gate(MLP(mean_hw(y)))``:

forward   pass 1 ``plane_reduce``: s[b, c] = mean_hw y             reads x
          ``mlp_forward``:         g = gate(fc2(act(fc1(s))))   one program per image
          pass 2 ``apply``:        out = y * g[b, c]              reads x, writes out
backward  pass A ``plane_reduce``: dg[b, c] = sum_hw grad * y      reads grad, x
          ``mlp_backward``: dz2, dz1, ds per image; the weight gradients
                           dW = dZ^T @ S are two small matmuls in torch
          pass B ``input_grad``:   dx = (grad * g + ds / HW) * pre'(x)   reads grad, x, writes dx

Traffic of these passes, with T = B*C*H*W*itemsize: forward 3T, backward 5T, against the
computation's minimum of 2T and 3T (each input read once, each output written once); eager
PyTorch with a separate hard-swish moves about 2T + 1T + 3T forward and more than 8T backward. ``y`` is never
written. All passes accumulate in fp32; offsets are int64 so tensors past 2^31 elements work.
The streaming passes tile [planes, positions] over a 3-D grid, so no element needs its plane index
computed by division. ``channels_last`` (constexpr ``CL``): the same tiles, addressed
``b*HW*C + hw*C + c``, with the channels the contiguous axis of the tile; a channels_last model
(timm's and torchvision's training scripts offer it) keeps its layout through the SE, with no copy
in or out.
"""
from __future__ import annotations

import functools

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
    next_pow2,
    sigmoid_f32,
)

# Codes for the constexpr switches of the MLP kernels.
ACTIVATION_CODES = {"relu": 0, "silu": 1, "hard_swish": 2}
GATE_CODES = {"hard_sigmoid": 0, "sigmoid": 1}


@triton.jit
def _plane_reduce_kernel(x_ptr, grad_ptr, out_ptr, C, HW, scale,
                         HSWISH: tl.constexpr, HAS_GRAD: tl.constexpr, CL: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    # out[b, c] = scale * sum_hw (grad *) pre(x) over a [BLOCK_C, BLOCK_HW] tile of planes.
    b = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    if CL:
        base = b * C * HW + cs.to(tl.int64)
    else:
        base = (b * C + cs.to(tl.int64)) * HW
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        if CL:
            offs = base[:, None] + hw.to(tl.int64)[None, :] * C
        else:
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
def _planes_tile(C, HW, CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """This program's [BLOCK_C planes, BLOCK_HW positions] tile of a [B, C, HW] tensor, contiguous
    or (``CL``) channels_last, grid (B, C blocks, HW blocks): the plane index of every element is
    known without dividing (a per-element 64-bit division would cost more than the memory traffic
    it serves)."""
    b = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    planes = b * C + cs
    c_ok = cs < C
    hw = tl.program_id(2) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = c_ok[:, None] & (hw < HW)[None, :]
    if CL:
        offs = b * C * HW + hw.to(tl.int64)[None, :] * C + cs[:, None]
    else:
        offs = planes[:, None] * HW + hw[None, :]
    return planes, offs, mask, c_ok


@triton.jit
def _apply_kernel(x_ptr, g_ptr, out_ptr, C, HW, HSWISH: tl.constexpr, CL: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    planes, offs, mask, c_ok = _planes_tile(C, HW, CL, BLOCK_C, BLOCK_HW)
    y = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    if HSWISH:
        y = hard_swish_f32(y)
    g = tl.load(g_ptr + planes, mask=c_ok)
    tl.store(out_ptr + offs, (y * g[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _input_grad_kernel(grad_ptr, x_ptr, g_ptr, ds_ptr, dx_ptr, C, HW, inv_hw,
                       HSWISH: tl.constexpr, CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    planes, offs, mask, c_ok = _planes_tile(C, HW, CL, BLOCK_C, BLOCK_HW)
    grad = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + planes, mask=c_ok)
    ds = tl.load(ds_ptr + planes, mask=c_ok)
    dy = grad * g[:, None] + (ds * inv_hw)[:, None]
    if HSWISH:
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        dy = dy * hard_swish_grad_f32(x)
    tl.store(dx_ptr + offs, dy.to(dx_ptr.dtype.element_ty), mask=mask)


# the channels_last tiles' width along the (contiguous) channels: 64 channels of fp16 are one
# 128-byte line per position
CL_BLOCK_C = 64


@functools.lru_cache(maxsize=256)
def _reduce_blocks(C: int, HW: int, channels_last: bool):
    if channels_last:
        block_c = min(next_pow2(C), CL_BLOCK_C)
        return block_c, max(1, min(next_pow2(HW), 4096 // block_c))
    block_hw = min(next_pow2(HW), 256)
    block_c = max(1, min(next_pow2(C), 4096 // block_hw))
    return block_c, block_hw


def plane_reduce(*, x: torch.Tensor, grad, hswish: bool, scale: float, out: torch.Tensor,
                 channels_last: bool = False) -> torch.Tensor:
    """out, fp32 [B, C] = ``scale * sum_hw((grad *) pre(x))`` for x (and grad) [B, C, H, W], both
    contiguous or both ``channels_last``."""
    B, C, H, W = x.shape
    HW = H * W
    if B * C * HW == 0:
        return out.zero_()
    block_c, block_hw = _reduce_blocks(C, HW, channels_last)
    grid = (B, cdiv(C, block_c))
    launch(_plane_reduce_kernel, grid,
        x, grad if grad is not None else x, out, C, HW, scale,
        HSWISH=hswish, HAS_GRAD=grad is not None, CL=channels_last, BLOCK_C=block_c, BLOCK_HW=block_hw,
        num_warps=4,
    )
    return out


def _streaming_grid(x: torch.Tensor, channels_last: bool):
    """(grid, C, HW, constexprs) for the streaming passes over x [B, C, H, W], contiguous or
    channels_last: tiles of about ELEMENTWISE_BLOCK elements, [BLOCK_C planes, BLOCK_HW positions]."""
    B, C = x.shape[0], x.shape[1]
    HW = x.numel() // (B * C)
    return _streaming_config(B, C, HW, channels_last)


@functools.lru_cache(maxsize=256)
def _streaming_config(B: int, C: int, HW: int, channels_last: bool):
    # cached per shape, as the other launch configurations here: host time is per call
    if channels_last:
        block_c = min(next_pow2(C), CL_BLOCK_C)
        block_hw = max(1, min(next_pow2(HW), ELEMENTWISE_BLOCK // block_c))
    else:
        block_hw = min(next_pow2(HW), 1024)
        block_c = max(1, min(next_pow2(C), ELEMENTWISE_BLOCK // block_hw))
    grid = (B, cdiv(C, block_c), cdiv(HW, block_hw))
    return grid, C, HW, dict(CL=channels_last, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=ELEMENTWISE_WARPS)


def apply(*, x: torch.Tensor, g: torch.Tensor, hswish: bool, out: torch.Tensor,
          channels_last: bool = False) -> torch.Tensor:
    """out = pre(x) * g[b, c]; g fp32 contiguous [B, C]; x and out contiguous or both channels_last."""
    if x.numel():
        grid, C, HW, blocks = _streaming_grid(x, channels_last)
        launch(_apply_kernel, grid, x, g, out, C, HW, HSWISH=hswish, **blocks)
    return out


def input_grad(*, grad, x, g, ds, hswish: bool, out: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """dx = (grad * g + ds / HW) * pre'(x); g, ds fp32 contiguous [B, C] (ds = dL/d mean); grad, x
    and out contiguous or all channels_last."""
    if x.numel():
        grid, C, HW, blocks = _streaming_grid(x, channels_last)
        launch(_input_grad_kernel, grid, grad, x, g, ds, out, C, HW, 1.0 / HW, HSWISH=hswish, **blocks)
    return out


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:
        return tl.maximum(z, 0.0)
    elif ACT == 1:
        return z * sigmoid_f32(z)
    else:
        return hard_swish_f32(z)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    # torch's formulas: threshold_backward (0 at z = 0), silu_backward, hardswish_backward.
    if ACT == 0:
        return tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 1:
        sg = sigmoid_f32(z)
        return sg * (1.0 + z * (1.0 - sg))
    else:
        return hard_swish_grad_f32(z)


@triton.jit
def _gate(z, GATE: tl.constexpr):
    if GATE == 0:
        return hard_sigmoid_f32(z)
    else:
        return sigmoid_f32(z)


@triton.jit
def _gate_grad(z, GATE: tl.constexpr):
    if GATE == 0:
        return hard_sigmoid_grad_f32(z)
    else:
        sg = sigmoid_f32(z)
        return sg * (1.0 - sg)


@triton.jit
def _hidden(s_ptr, w1_ptr, b1_ptr, b, C, CR, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """z1 = fc1(s[b]) as a [BLOCK_R] fp32 vector (rows past CR are 0)."""
    rs = tl.arange(0, BLOCK_R)
    r_mask = rs < CR
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_mask = cs < C
        s = tl.load(s_ptr + b * C + cs, mask=c_mask, other=0.0)
        w = tl.load(w1_ptr + rs[:, None] * C + cs[None, :], mask=r_mask[:, None] & c_mask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * s[None, :], axis=1)
    return acc + tl.load(b1_ptr + rs, mask=r_mask, other=0.0).to(tl.float32)


@triton.jit
def _mlp_forward_kernel(s_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, g_ptr, C, CR,
                        ACT: tl.constexpr, GATE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rs = tl.arange(0, BLOCK_R)
    r_mask = rs < CR
    a = tl.where(r_mask, _act(_hidden(s_ptr, w1_ptr, b1_ptr, b, C, CR, BLOCK_C, BLOCK_R), ACT), 0.0)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_mask = cs < C
        w = tl.load(w2_ptr + cs[:, None] * CR + rs[None, :], mask=c_mask[:, None] & r_mask[None, :],
                    other=0.0).to(tl.float32)
        z2 = tl.sum(w * a[None, :], axis=1) + tl.load(b2_ptr + cs, mask=c_mask, other=0.0).to(tl.float32)
        tl.store(g_ptr + b * C + cs, _gate(z2, GATE), mask=c_mask)


@triton.jit
def _mlp_backward_kernel(s_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, dg_ptr, a_ptr, dz1_ptr, dz2_ptr, ds_ptr, C, CR,
                         ACT: tl.constexpr, GATE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    # Per image b: recompute z1, a, z2; dz2 = dg * gate'(z2); da = W2^T dz2; dz1 = da * act'(z1);
    # ds = W1^T dz1. Writes a, dz1 [B, CR] and dz2, ds [B, C] for the weight gradients.
    b = tl.program_id(0).to(tl.int64)
    rs = tl.arange(0, BLOCK_R)
    r_mask = rs < CR
    z1 = _hidden(s_ptr, w1_ptr, b1_ptr, b, C, CR, BLOCK_C, BLOCK_R)
    a = tl.where(r_mask, _act(z1, ACT), 0.0)
    tl.store(a_ptr + b * CR + rs, a, mask=r_mask)
    da = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_mask = cs < C
        w = tl.load(w2_ptr + cs[:, None] * CR + rs[None, :], mask=c_mask[:, None] & r_mask[None, :],
                    other=0.0).to(tl.float32)
        z2 = tl.sum(w * a[None, :], axis=1) + tl.load(b2_ptr + cs, mask=c_mask, other=0.0).to(tl.float32)
        dz2 = tl.load(dg_ptr + b * C + cs, mask=c_mask, other=0.0) * _gate_grad(z2, GATE)
        dz2 = tl.where(c_mask, dz2, 0.0)
        tl.store(dz2_ptr + b * C + cs, dz2, mask=c_mask)
        da += tl.sum(w * dz2[:, None], axis=0)
    dz1 = tl.where(r_mask, da * _act_grad(z1, ACT), 0.0)
    tl.store(dz1_ptr + b * CR + rs, dz1, mask=r_mask)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_mask = cs < C
        w = tl.load(w1_ptr + rs[:, None] * C + cs[None, :], mask=r_mask[:, None] & c_mask[None, :],
                    other=0.0).to(tl.float32)
        tl.store(ds_ptr + b * C + cs, tl.sum(w * dz1[:, None], axis=0), mask=c_mask)


@functools.lru_cache(maxsize=256)
def _mlp_blocks(C: int, CR: int):
    block_r = next_pow2(CR)
    return max(1, min(next_pow2(C), 8192 // block_r)), block_r


def mlp_forward(*, s, w1, b1, w2, b2, activation: str, gate: str, g: torch.Tensor) -> torch.Tensor:
    """g, fp32 [B, C] = gate(fc2(act(fc1(s)))); weights contiguous [CR, C], [C, CR]."""
    B, C = s.shape
    CR = w1.shape[0]
    if B:
        block_c, block_r = _mlp_blocks(C, CR)
        launch(_mlp_forward_kernel, (B,), s, w1, b1, w2, b2, g, C, CR, ACT=ACTIVATION_CODES[activation],
                                  GATE=GATE_CODES[gate], BLOCK_C=block_c, BLOCK_R=block_r, num_warps=4)
    return g


def mlp_backward(*, s, w1, b1, w2, b2, dg, activation: str, gate: str, a, dz1, dz2, ds):
    """(ds, dw1, db1, dw2, db2) in fp32 for dg = dL/dg [B, C]; a, dz1 [B, CR] and dz2, ds [B, C]
    are fp32 buffers for the hidden activation and the pre-activation gradients."""
    B, C = s.shape
    CR = w1.shape[0]
    if B:
        block_c, block_r = _mlp_blocks(C, CR)
        launch(_mlp_backward_kernel, (B,), s, w1, b1, w2, b2, dg, a, dz1, dz2, ds, C, CR,
                                   ACT=ACTIVATION_CODES[activation], GATE=GATE_CODES[gate],
                                   BLOCK_C=block_c, BLOCK_R=block_r, num_warps=4)
    return ds, dz1.t() @ s, dz1.sum(0), dz2.t() @ a, dz2.sum(0)
