"""Anisotropic total variation, the perceptual loss's ``L_tv`` (docs/ops.md section 2.3).

``_tv_forward_kernel``, grid (B*C * tiles per plane): a [BLOCK_H, BLOCK_W] tile of one plane
(any strides) adds |y[h, w+1] - y[h, w]| and |y[h+1, w] - y[h, w]| for its positions to a
per-program fp32 partial (summed by torch). ``_tv_backward_kernel``, same grid: dy = g/(CHW) *
(sgn(y - left) - sgn(right - y) + sgn(y - up) - sgn(down - y)), sgn(0) = 0 as torch's abs
backward. The neighbour loads overlap the centre tile (cache hits): one pass over y each way.

BYTES MODEL (minimum HBM traffic, per call; s = itemsize of y, E = B*C*H*W)
    forward   read y:             E*s
    backward  read y, write dy:   2*E*s
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import cdiv, launch

BLOCK_H = 16
BLOCK_W = 64


@triton.jit
def _tv_tile(pid, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    n_h = tl.cdiv(H, BLOCK_H)
    n_w = tl.cdiv(W, BLOCK_W)
    plane = pid // (n_h * n_w)
    rest = pid % (n_h * n_w)
    hs = (rest // n_w) * BLOCK_H + tl.arange(0, BLOCK_H)
    ws = (rest % n_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    return plane, hs, ws


@triton.jit
def _tv_forward_kernel(y_ptr, part_ptr, C, H, W, sy_b, sy_c, sy_h, sy_w, inv_chw,
                       BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    pid = tl.program_id(0)
    plane, hs, ws = _tv_tile(pid, H, W, BLOCK_H, BLOCK_W)
    base = y_ptr + (plane // C).to(tl.int64) * sy_b + (plane % C).to(tl.int64) * sy_c
    h_off = hs.to(tl.int64)[:, None] * sy_h
    w_off = ws.to(tl.int64)[None, :] * sy_w
    inside = (hs < H)[:, None] & (ws < W)[None, :]
    right_ok = inside & (ws + 1 < W)[None, :]
    down_ok = inside & (hs + 1 < H)[:, None]
    y = tl.load(base + h_off + w_off, mask=inside, other=0.0).to(tl.float32)
    right = tl.load(base + h_off + w_off + sy_w, mask=right_ok, other=0.0).to(tl.float32)
    down = tl.load(base + h_off + w_off + sy_h, mask=down_ok, other=0.0).to(tl.float32)
    acc = tl.where(right_ok, tl.abs(right - y), 0.0) + tl.where(down_ok, tl.abs(down - y), 0.0)
    tl.store(part_ptr + pid, tl.sum(tl.sum(acc, 1), 0) * inv_chw)


@triton.jit
def _sgn(d):
    return tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))


@triton.jit
def _tv_backward_kernel(y_ptr, grad_ptr, dy_ptr, C, H, W, sy_b, sy_c, sy_h, sy_w,
                        sd_b, sd_c, sd_h, sd_w, inv_chw,
                        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    pid = tl.program_id(0)
    plane, hs, ws = _tv_tile(pid, H, W, BLOCK_H, BLOCK_W)
    bi = (plane // C).to(tl.int64)
    ci = (plane % C).to(tl.int64)
    base = y_ptr + bi * sy_b + ci * sy_c
    h64 = hs.to(tl.int64)[:, None]
    w64 = ws.to(tl.int64)[None, :]
    offs = h64 * sy_h + w64 * sy_w
    inside = (hs < H)[:, None] & (ws < W)[None, :]
    left_ok = inside & (ws >= 1)[None, :]
    right_ok = inside & (ws + 1 < W)[None, :]
    up_ok = inside & (hs >= 1)[:, None]
    down_ok = inside & (hs + 1 < H)[:, None]
    y = tl.load(base + offs, mask=inside, other=0.0).to(tl.float32)
    left = tl.load(base + offs - sy_w, mask=left_ok, other=0.0).to(tl.float32)
    right = tl.load(base + offs + sy_w, mask=right_ok, other=0.0).to(tl.float32)
    up = tl.load(base + offs - sy_h, mask=up_ok, other=0.0).to(tl.float32)
    down = tl.load(base + offs + sy_h, mask=down_ok, other=0.0).to(tl.float32)
    d = tl.where(left_ok, _sgn(y - left), 0.0) - tl.where(right_ok, _sgn(right - y), 0.0) \
        + tl.where(up_ok, _sgn(y - up), 0.0) - tl.where(down_ok, _sgn(down - y), 0.0)
    g = tl.load(grad_ptr).to(tl.float32) * inv_chw
    tl.store(dy_ptr + bi * sd_b + ci * sd_c + h64 * sd_h + w64 * sd_w, (d * g).to(dy_ptr.dtype.element_ty),
             mask=inside)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def programs(y: torch.Tensor) -> int:
    """Programs of either kernel, i.e. the length of the forward's partial-sum buffer."""
    B, C, H, W = y.shape
    return B * C * cdiv(H, BLOCK_H) * cdiv(W, BLOCK_W)


def forward(*, y: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """part, fp32 [programs(y)]: per-program partial sums of the TV / (C*H*W) (to be summed)."""
    B, C, H, W = y.shape
    launch(_tv_forward_kernel, (part.shape[0],), y, part, C, H, W, *y.stride(), 1.0 / (C * H * W),
                                         BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W, num_warps=4)
    return part


def backward(*, y: torch.Tensor, grad: torch.Tensor, dy: torch.Tensor) -> None:
    """dy = d tv / dy * grad (grad a one-element tensor), any strides for y and dy."""
    B, C, H, W = y.shape
    launch(_tv_backward_kernel, (programs(y),), y, grad, dy, C, H, W, *y.stride(), *dy.stride(), 1.0 / (C * H * W),
                                        BLOCK_H=BLOCK_H, BLOCK_W=BLOCK_W, num_warps=4)
