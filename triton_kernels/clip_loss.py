"""CLIP's symmetric contrastive loss (docs/ops.md section 3.2) and open_clip's one-sided local variant,
streaming: the [n_x, n_y] logits never reach memory.

Two kernels serve every case. For rows x_i of X [n_x, D] against rows y_j of Y [n_y, D] with
logits L_ij = s * x_i . y_j (s = ``logit_scale``, already exponentiated, read from a device
pointer so no host sync) and the positive of row i at column i + offset:

``_forward_kernel``  grid (ceil(n_x / BLOCK_X),). A program owns BLOCK_X rows of X and streams Y
          BLOCK_Y rows at a time with an online max / sum-exp (fp32, base 2, s * log2(e) folded
          into one multiply). Writes each row's max and log-sum ([2, n_x] fp32, together its
          lse_i = log sum_j exp(L_ij)) and ce_i = lse_i - L_{i,i+offset} (fp32 [n_x]): the
          cross-entropy of row i. The column LSE of the symmetric loss is the
          same kernel with X and Y swapped.
``_backward_kernel`` grid (ceil(n_x / BLOCK_X), ceil(D / BLOCK_G)). With optional row LSEs of X
          (weight 1 each) and of Y, it recomputes each tile and forms
              W_ij = [exp(L_ij - lse_x_i)] + [exp(L_ij - lse_y_j)] - (number of LSEs) [j = i + offset]
          and writes dx_i = c g s sum_j W_ij y_j for its BLOCK_G slice of channels (c the loss's
          1 / count, g the upstream gradient, read from memory), and, if asked, the per-row part
          of the scale's gradient from the row LSE alone, r_i = c g sum_j (p_ij - [j = i +
          offset]) (x_i . y_j - x_i . y_{i+offset}) with p the row softmax (centred on the
          positive, see the kernel; summed on the host side, a fixed-order reduction; needs the
          row LSE). W lies in [-2, 2]; c g s is applied after the matmul, so small
          1/n factors never meet fp16.
          symmetric (X = image, Y = text, both LSEs): d_image by (X, Y), d_text by (Y, X), the
          two passes of the default, deterministic path; r from both (each its own row LSE:
          the image-to-text and the text-to-image halves of the loss).
          one-sided (rows A vs all columns B, offset = rank * n_local): dA by (A, B) with lse_x,
          dB by (B, A) with lse_y and offset -offset.
          Every output element is written by one program: no atomics.

Saved for backward: the inputs and the fp32 row statistics ([2, n] per side): O(n) beyond the
inputs.

Bytes model (these kernels' HBM traffic, n = n_x = n_y, itemsize b; Y blocks re-read from L2; the
computation's minimum is 2 n D b forward and 4 n D b backward, with 2 n^2 D useful FLOPs forward
and 4 n^2 D backward, as benchmarks/contrastive.py counts):
  fwd (symmetric)  read X, Y twice: 4 n D b; write stats, ce: 24 n      FLOPs 2 * 2 n^2 D
  bwd (symmetric)  read X, Y twice, write dX, dY: 6 n D b + 8 n        FLOPs 2 * 2 n^2 D (1 + n_slices)
n_slices = ceil(D / BLOCK_G), BLOCK_G the gradient slice (``contrastive_tiles.GRADIENT_SLICES``): 2 at
CLIP's D = 512 in fp16/bf16 and fp32 with TF32 (BLOCK_G 256), 4 in fp32 with 3xTF32 (128); it was
8 and 16 with slices as wide as the score chunk (BLOCK_D 64 and 32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .contrastive_tiles import config, grid_d, load_rows, online_logsumexp, score_tile
from .utils import LN2, LOG2E, cdiv, dot, launch


@triton.jit
def _forward_kernel(x_ptr, y_ptr, scale_ptr, stats_ptr, ce_ptr, NX, NY, D, offset,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_X: tl.constexpr,
                    BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_X + tl.arange(0, BLOCK_X)
    row_ok = rows < NX
    ch = tl.arange(0, BLOCK_D)
    scale2 = tl.load(scale_ptr).to(tl.float32) * LOG2E
    xt = rows
    if SINGLE_D:
        xt = load_rows(x_ptr, rows, row_ok, ch, D)
    m_i = tl.full([BLOCK_X], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_X], tl.float32)
    # The positive logit is taken from the score tile that holds it, not recomputed apart: the
    # same rounding as the entry the max and the sum saw, so m_i >= pos exactly and the
    # cross-entropy (m_i - pos) + log_l cannot go below zero by more than the sum's rounding.
    # A separately summed x_i . y_i differs by ~1e-6 relative, which at logits of 1e4 and more
    # (fp16 and bf16 embeddings of norm 30, scale 100) made the loss negative.
    pos = tl.zeros([BLOCK_X], tl.float32)
    for start in range(0, NY, BLOCK_Y):
        cols = start + tl.arange(0, BLOCK_Y)
        col_ok = cols < NY
        s = score_tile(x_ptr, y_ptr, rows, row_ok, cols.to(tl.int64), col_ok, D, xt,
                       BLOCK_X, BLOCK_Y, BLOCK_D, SINGLE_D, PRECISION, UPCAST) * scale2
        s = tl.where(col_ok[None, :], s, float("-inf"))
        pos += tl.sum(tl.where(cols[None, :] == rows[:, None] + offset, s, 0.0), 1)
        # Every block holds a real column, so the running max stays finite: no inf - inf.
        m_i, l_i = online_logsumexp(m_i, l_i, s)
    # The max and the log of the sum, kept apart: backward forms exp2((t - m) - log_l), which
    # does not carry the rounding of a large lse into every probability (see patch_nce.py).
    log_l = tl.log2(l_i)
    tl.store(stats_ptr + rows, m_i, mask=row_ok)
    tl.store(stats_ptr + NX + rows, log_l, mask=row_ok)
    tl.store(ce_ptr + rows, ((m_i - pos) + log_l) * LN2, mask=row_ok)


@triton.jit
def _backward_kernel(x_ptr, y_ptr, scale_ptr, g_ptr, lse_x_ptr, lse_y_ptr, dx_ptr, r_ptr,
                     NX, NY, D, offset, coef,
                     HAS_LSE_X: tl.constexpr, HAS_LSE_Y: tl.constexpr, WITH_R: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_X: tl.constexpr,
                     BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
                     BLOCK_G: tl.constexpr):
    pid_d = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_X + tl.arange(0, BLOCK_X)
    row_ok = rows < NX
    co = pid_d * BLOCK_G + tl.arange(0, BLOCK_G)
    ch = tl.arange(0, BLOCK_D)
    scale = tl.load(scale_ptr).to(tl.float32)
    scale2 = scale * LOG2E
    xt = rows
    if SINGLE_D:
        xt = load_rows(x_ptr, rows, row_ok, ch, D)
    if HAS_LSE_X:
        m_x = tl.load(lse_x_ptr + rows, mask=row_ok, other=0.0)
        log_lx = tl.load(lse_x_ptr + NX + rows, mask=row_ok, other=0.0)
    n_lse: tl.constexpr = HAS_LSE_X + HAS_LSE_Y
    acc = tl.zeros([BLOCK_X, BLOCK_G], tl.float32)
    r = tl.zeros([BLOCK_X], tl.float32)       # sum_j w_ij raw_ij   (WITH_R: w from the row LSE only)
    sw = tl.zeros([BLOCK_X], tl.float32)      # sum_j w_ij
    diag = tl.zeros([BLOCK_X], tl.float32)    # raw_{i, i + offset}
    for start in range(0, NY, BLOCK_Y):
        cols = (start + tl.arange(0, BLOCK_Y)).to(tl.int64)
        col_ok = cols < NY
        raw = score_tile(x_ptr, y_ptr, rows, row_ok, cols, col_ok, D, xt,
                         BLOCK_X, BLOCK_Y, BLOCK_D, SINGLE_D, PRECISION, UPCAST)
        t = raw * scale2
        is_pos = cols[None, :] == rows[:, None] + offset
        p_x = tl.zeros([BLOCK_X, BLOCK_Y], tl.float32)
        if HAS_LSE_X:
            p_x = tl.exp2((t - m_x[:, None]) - log_lx[:, None])
        w = p_x
        if HAS_LSE_Y:
            m_y = tl.load(lse_y_ptr + cols, mask=col_ok, other=0.0)
            log_ly = tl.load(lse_y_ptr + NY + cols, mask=col_ok, other=0.0)
            w += tl.exp2((t - m_y[None, :]) - log_ly[None, :])
        w = tl.where(is_pos, w - n_lse, w)
        w = tl.where(col_ok[None, :], w, 0.0)
        yc = load_rows(y_ptr, cols, col_ok, co, D)
        acc += dot(w.to(yc.dtype), yc, PRECISION, UPCAST)
        if WITH_R:
            w_r = tl.where(col_ok[None, :], tl.where(is_pos, p_x - 1.0, p_x), 0.0)
            r += tl.sum(w_r * raw, 1)
            sw += tl.sum(w_r, 1)
            diag += tl.sum(tl.where(is_pos, raw, 0.0), 1)
    cg = coef * tl.load(g_ptr).to(tl.float32)
    tl.store(dx_ptr + rows[:, None] * D + co[None, :], (acc * (cg * scale)).to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (co < D)[None, :])
    if WITH_R:
        if pid_d == 0:
            # sum_j (p_ij - [j = i + offset]) (raw_ij - raw_{i,i+offset}): the same value (the
            # weights sum to 0 over j), but when the positive dominates, p_ii - 1 carries the
            # rounding of the recomputed scores (~1e-6), which times raw_ii (~1e3 and more at
            # large norms) swamped the true gradient; centred, that rounding meets raw_ii - raw_ii = 0.
            tl.store(r_ptr + rows, (r - diag * sw) * cg, mask=row_ok)


# ------------------------------------------------------------------------------------------------
# launchers

def row_lse(*, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, offset: int, stats: torch.Tensor,
            ce: torch.Tensor) -> None:
    """stats: contiguous fp32 [2, n_x], each row's running max and log2 of its sum (base-2 units
    of the logits: lse = (max + log2 sum) ln 2); ce: contiguous fp32 [n_x]; x [n_x, D], y [n_y, D]
    contiguous; scale a 1-element fp32 tensor; rows i + offset < n_y."""
    NX, D = x.shape
    NY = y.shape[0]
    if NX == 0:
        return
    cfg = config(x, NX, NY, backward=False)
    launch(_forward_kernel, (cdiv(NX, cfg["BLOCK_X"]),), x, y, scale, stats, ce, NX, NY, D, offset,
                                                        num_stages=2, **cfg)


def row_grad(*, grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, lse_x, lse_y,
             offset: int, coef: float, dx: torch.Tensor, r) -> None:
    """dx [n_x, D] (x's dtype) and, unless None, r [n_x] fp32: see ``_backward_kernel``.
    grad: the upstream gradient of the loss, a 1-element tensor."""
    NX, D = x.shape
    NY = y.shape[0]
    if NX == 0 or D == 0:
        return
    if r is not None and lse_x is None:
        raise ValueError("the scale's gradient r is taken from the row LSE: lse_x is needed")
    cfg = config(x, NX, NY, backward=True)
    grid = (cdiv(NX, cfg["BLOCK_X"]), grid_d(cfg, D))
    dummy = scale
    launch(_backward_kernel, grid,
        x, y, scale, grad, lse_x if lse_x is not None else dummy, lse_y if lse_y is not None else dummy,
        dx, r if r is not None else dummy, NX, NY, D, offset, coef,
        HAS_LSE_X=lse_x is not None, HAS_LSE_Y=lse_y is not None, WITH_R=r is not None, **cfg,
    )
