"""Pieces shared by the contrastive-loss kernels (``patch_nce.py``, ``clip_loss.py``, ``siglip_loss.py``): the score
tile x_i . y_j over all channels, and the tile configuration.

Both losses are a softmax cross-entropy over rows of a similarity matrix X Y^T that is never
stored: programs own a block of rows of X and stream blocks of rows of Y, computing each
[BLOCK_X, BLOCK_Y] tile of scores in fp32 from ``BLOCK_D``-wide channel chunks. Where all channels
fit one chunk (``SINGLE_D``) the program's own rows stay in registers for the whole stream;
otherwise they are reloaded per chunk (from L1/L2: a program touches only its own rows).
Inputs are contiguous [rows, D]; row offsets are int64 (rows * D may pass 2^31).

Softmax arithmetic is in base 2: scores are multiplied once by ``scale * log2(e)`` and
exponentiated with ``exp2``; log-sum-exps are stored in natural units.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .utils import MIN_DOT, cdiv, dot, dot_key, next_pow2, switches_for_key


@triton.jit
def load_rows(ptr, rows, ok, ch, D):
    """[len(rows), len(ch)] tile of a contiguous [*, D] matrix; rows int64; zeros outside."""
    return tl.load(ptr + rows[:, None] * D + ch[None, :], mask=ok[:, None] & (ch < D)[None, :], other=0.0)


@triton.jit
def online_logsumexp(m_i, l_i, s):
    """One step of the streaming log-sum-exp over a [rows, cols] tile of base-2 scores: the
    running row max ``m_i`` and the sum ``l_i`` of exp2(score - max)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    return m_new, l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)


@triton.jit
def score_tile(x_ptr, y_ptr, x_rows, x_ok, y_rows, y_ok, D, x_tile,
               BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 [BLOCK_X, BLOCK_Y] tile of x_i . y_j. SINGLE_D: ``x_tile`` holds the x rows (all of
    D); otherwise it is unused and the x rows are read chunk by chunk."""
    ch = tl.arange(0, BLOCK_D)
    if SINGLE_D:
        yt = load_rows(y_ptr, y_rows, y_ok, ch, D)
        acc = dot(x_tile, tl.trans(yt), PRECISION, UPCAST)
    else:
        acc = tl.zeros([BLOCK_X, BLOCK_Y], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            xc = load_rows(x_ptr, x_rows, x_ok, d0 + ch, D)
            yc = load_rows(y_ptr, y_rows, y_ok, d0 + ch, D)
            acc += dot(xc, tl.trans(yc), PRECISION, UPCAST)
    return acc


@triton.jit
def row_dot(x_ptr, y_ptr, x_rows, y_rows, ok, D, BLOCK_X: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 x_i . y_{j(i)} for paired rows, elementwise (no tensor cores: O(rows * D) work)."""
    ch = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_X, BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        xc = load_rows(x_ptr, x_rows, ok, d0 + ch, D)
        yc = load_rows(y_ptr, y_rows, ok, d0 + ch, D)
        acc += xc.to(tl.float32) * yc.to(tl.float32)
    return tl.sum(acc, 1)


def _tile(n: int, cap: int) -> int:
    return min(max(next_pow2(n), MIN_DOT), cap)


# The backward kernels' gradient slice. A backward program accumulates its gradient for BLOCK_G
# channels and recomputes every score tile (over all D channels) for it, so the score work is
# done once per slice: 2 n^2 D (1 + D / BLOCK_G) FLOPs per gradient, and the softmax's
# elementwise work once per slice too. "wide": BLOCK_G up to 256 channels (128 for fp32 with
# 3xTF32 products, whose split operands hold more registers), the wider slices on 16 warps so the
# accumulator fits beside the score tile; "narrow": BLOCK_G = BLOCK_D on 8 warps, the slices
# before (CLIP's D = 512: 8 slices in fp16/bf16, 16 in fp32; SigLIP's 768: 12 and 24). Kept so that
# benchmarks/contrastive.py can time both on a GPU: the choice was made from the sm_90 build
# (registers, stack, resident warps: see _blocks), not from timings.
GRADIENT_SLICES = "wide"


def config(x: torch.Tensor, n_rows: int, n_cols: int, backward: bool) -> dict:
    """Tiles and warps for programs owning ``n_rows`` rows of a [*, D] input and streaming
    ``n_cols`` rows of the other one. BLOCK_D is the channel chunk of the score tile; backward
    adds BLOCK_G, the width of the gradient slice a program accumulates (a multiple of BLOCK_D),
    and its own warp count. fp32 holds twice the registers per element and its 3xTF32/TF32 dots
    more again: smaller tiles. Chosen so that ptxas for sm_90 reports no spills
    (tests/aot_compile.py --report); 128- or 256-wide score chunks, or 64 x 64 score tiles in
    backward, spilled 140-990 bytes. Not tuned by timing."""
    return _config(dot_key(x.dtype, x.device), x.shape[1], n_rows, n_cols, backward and GRADIENT_SLICES)


@functools.lru_cache(maxsize=1024)
def _config(key: tuple, D: int, n_rows: int, n_cols: int, slices) -> dict:
    # one dict per shape and dot setting, shared (passed on as keyword arguments, never changed)
    return dict(_blocks(key[0] == torch.float32, key[2], D, n_rows, n_cols, slices), **switches_for_key(*key))


@functools.lru_cache(maxsize=1024)
def _blocks(fp32: bool, tf32: bool, D: int, n_rows: int, n_cols: int, slices) -> tuple:
    """One configuration for forward and backward: backward recomputes the forward's score tiles
    with the same tiles and channel chunks, hence the same rounding (see patch_nce.py). Cached:
    the launchers' host time is paid on every call. ``slices``: False (forward), or the backward's
    GRADIENT_SLICES. Built for sm_90 with Triton 3.9, CLIP's backward at D = 512 (registers a
    thread, resident warps of 64 per SM), "narrow" -> "wide":
      fp16/bf16    BLOCK_G 64, 8 warps: 119 regs, 16 warps resident -> 256 on 16 warps: 120, 16
      fp32, TF32   32 on 8 warps: 126, 16 -> 256 on 16 warps: 122, 16
      fp32, 3xTF32 32 on 8 warps: 149, 8 -> 128 on 8 warps: 240, 8 (256 on 16 warps spilled 1160
                   bytes, 128 on 16 warps 456)
    none with stack: the same resident warps, and the score tiles computed 2, 2 and 4 times per
    gradient at D = 512 in place of 8, 16 and 16 (beside the one product that makes the gradient).
    SigLIP's and PatchNCE's dq kernels build alike (PatchNCE's dk, whose program owns 32 keys,
    keeps 16 warps resident where it kept 24). A D that
    is not a multiple of 16 (the build's PatchNCE case at D = 1000) leaves the loads without the
    JIT's divisibility hint: its dq and dk spill 136 and 128 bytes on 16 warps. With Triton 3.6
    the fp16/bf16 and TF32 figures are within 4 registers of these; its 3xTF32 CLIP and SigLIP
    backward spill 24 and 16 bytes at BLOCK_G 128."""
    if fp32:
        block_x, block_y, max_d, warps = 64, 32, 32, 8
    else:
        block_x, block_y, max_d, warps = 64, 32, 64, 8
    block_d = _tile(D, max_d)
    blocks = (("BLOCK_X", _tile(n_rows, block_x)), ("BLOCK_Y", _tile(n_cols, block_y)), ("BLOCK_D", block_d),
              ("SINGLE_D", D <= block_d))
    if slices:
        block_g = block_d
        if slices == "wide":
            block_g = max(block_d, _tile(D, 128 if fp32 and not tf32 else 256))
        blocks += (("BLOCK_G", block_g),)
        warps = 16 if block_g >= 256 else 8
    return blocks + (("num_warps", warps),)


def grid_d(cfg: dict, D: int) -> int:
    """Programs along the channel axis of a backward grid (one per BLOCK_G slice of the gradient)."""
    return cdiv(D, cfg["BLOCK_G"])
