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


def config(x: torch.Tensor, n_rows: int, n_cols: int, backward: bool) -> dict:
    """Tiles and warps for programs owning ``n_rows`` rows of a [*, D] input and streaming
    ``n_cols`` rows of the other one. BLOCK_D is the channel chunk of the score tile and, in the
    backward kernels, the width of the gradient slice a program accumulates. fp32 holds twice
    the registers per element and its IEEE/TF32 dots more again: smaller tiles. Chosen so that
    ptxas for sm_90 reports no spills (tests/aot_compile.py --report: 142-238 registers at
    D = 256, 512, 1000; 128- or 256-wide channel chunks, or 64 x 64 score tiles in backward,
    spilled 140-990 bytes); not tuned by timing. The price of the narrow chunks is in backward, which
    recomputes the score tiles once per BLOCK_D slice of the gradient."""
    return _config(dot_key(x.dtype, x.device), x.shape[1], n_rows, n_cols)


@functools.lru_cache(maxsize=1024)
def _config(key: tuple, D: int, n_rows: int, n_cols: int) -> dict:
    # one dict per shape and dot setting, shared (passed on as keyword arguments, never changed)
    return dict(_blocks(key[0] == torch.float32, D, n_rows, n_cols), **switches_for_key(*key))


@functools.lru_cache(maxsize=1024)
def _blocks(fp32: bool, D: int, n_rows: int, n_cols: int) -> tuple:
    # One configuration for forward and backward: backward recomputes the forward's score tiles
    # with the same tiles and channel chunks, hence the same rounding (see patch_nce.py). Cached:
    # the launchers' host time is paid on every call.
    if fp32:
        block_x, block_y, max_d, warps = 64, 32, 32, 8
    else:
        block_x, block_y, max_d, warps = 64, 32, 64, 8
    block_d = _tile(D, max_d)
    return (("BLOCK_X", _tile(n_rows, block_x)), ("BLOCK_Y", _tile(n_cols, block_y)), ("BLOCK_D", block_d),
            ("SINGLE_D", D <= block_d), ("num_warps", warps))


def grid_d(cfg: dict, D: int) -> int:
    """Programs along the channel axis of a backward grid (one per BLOCK_D slice of the gradient)."""
    return cdiv(D, cfg["BLOCK_D"])
