"""SigLIP's sigmoid loss (docs/ops.md section 3.3), streaming: the [n_x, n_y] logits never reach
memory.

For rows x_i of X [n_x, D] against rows y_j of Y [n_y, D], with s = ``logit_scale`` (the multiplier
itself, already exponentiated) and b = ``logit_bias``, both read from device pointers (no host
sync):

    t_ij = s * x_i . y_j + b,   z_ij = l_ij t_ij,   l_ij = +1 if j = i + offset (HAS_DIAG) else -1
    loss = sum_ij -logsigmoid(z_ij) / n_x = sum_ij softplus(-z_ij) / n_x
    softplus(-z) = max(-z, 0) + log1p(exp(-|t|))          (|z| = |t|: the log1p part has no label)
    h_ij = d softplus(-z_ij) / d t_ij = -l_ij sigmoid(-z_ij) in [-1, 1]

Two kernels serve every case, both symmetric in the roles of X and Y (the logit is x_i . y_j either
way), so the text side's gradient is the image side's kernel with X and Y swapped and the offset
negated (column j's positive is row j - offset):

``_forward_kernel``  grid (ceil(n_x / BLOCK_X),). A program owns BLOCK_X rows of X and streams Y
          BLOCK_Y rows at a time, each [BLOCK_X, BLOCK_Y] tile of x . y computed in fp32 registers
          (``score_tile``), and writes each row's sum_j softplus(-z_ij) (fp32 [n_x]); the op sums
          the rows and divides by n_x. No logits are written.
``_backward_kernel`` grid (ceil(n_x / BLOCK_X), ceil(D / BLOCK_G)). Recomputes each tile, forms h
          and writes dx_i = c g s sum_j h_ij y_j for its BLOCK_G slice of channels (c = 1 / n_img,
          the loss's normaliser, g the upstream gradient read from memory; applied after the matmul,
          so 1/n never meets a half operand), and, when asked (WITH_R, on the image side), each
          row's share of the two scalar gradients, c g sum_j h_ij x_i . y_j (logit_scale) and
          c g sum_j h_ij (logit_bias), into a fp32 [2, n_x] buffer that the op sums in a fixed
          order. Every output element is written by one program: no atomics, bitwise repeatable.

``offset`` and ``HAS_DIAG`` place the positives: one process, (0, True); across ranks, each rank's
own text chunk (0, True) and every chunk received from another rank (HAS_DIAG False: all
negatives, open_clip's ``negative_only``).

logsigmoid in base 2: e = exp2(-|t| log2(e)) and log1p(e) = ln 2 log2(1 + e), except for e < 1/64,
where 1 + e in fp32 keeps too few of e's bits (SigLIP's negatives sit at t ~ -10, e ~ 4.5e-5) and the
series e - e^2/2 + e^3/3 (error < e^4/4) is used instead.

Saved for backward: the inputs only (nothing O(n) or more is kept).

Bytes and FLOPs (n = n_x = n_y, itemsize b; Y blocks re-read from L2, counted once):
  fwd  read X, Y: 2 n D b; write the row sums: 4 n               FLOPs 2 n^2 D (+ ~12 n^2 elementwise)
  bwd  read X, Y twice, write dX, dY: 6 n D b + 8 n              FLOPs 2 n^2 D (2 + 2 n_slices)
       (each of the two passes recomputes the scores once per BLOCK_G slice of the gradient and
       multiplies h by the other side: 2 n^2 D for the products, n_slices * 2 n^2 D for scores)
  the minimum, which benchmarks/contrastive.py states results against (as CLIP's): fwd 2 n^2 D
  FLOPs and 2 n D b bytes, bwd 2 * 2 n^2 D FLOPs (the two gradient products, no recomputation) and
  4 n D b bytes (inputs read once, gradients written once).
n_slices = ceil(D / BLOCK_G), BLOCK_G the gradient slice (``contrastive_tiles.GRADIENT_SLICES``): 3 at
D = 768 in fp16/bf16 and fp32 with TF32 (BLOCK_G 256), 6 in fp32 with 3xTF32 (128); it was 12 and
24 with slices as wide as the score chunk (BLOCK_D 64 and 32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .contrastive_tiles import config, grid_d, load_rows, score_tile
from .utils import LN2, LOG2E, cdiv, dot, launch


@triton.jit
def _log1p_small(e):
    """log1p(e) for e in [0, 1] in fp32: the series below 1/64, ln 2 log2(1 + e) above."""
    series = e * (1.0 - e * (0.5 - e * (1.0 / 3.0)))
    return tl.where(e < 0.015625, series, tl.log2(1.0 + e) * LN2)


@triton.jit
def _forward_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, loss_ptr, NX, NY, D, offset,
                    HAS_DIAG: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr,
                    SINGLE_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_X + tl.arange(0, BLOCK_X)
    row_ok = rows < NX
    ch = tl.arange(0, BLOCK_D)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    xt = rows
    if SINGLE_D:
        xt = load_rows(x_ptr, rows, row_ok, ch, D)
    acc = tl.zeros([BLOCK_X], tl.float32)
    for start in range(0, NY, BLOCK_Y):
        cols = (start + tl.arange(0, BLOCK_Y)).to(tl.int64)
        col_ok = cols < NY
        raw = score_tile(x_ptr, y_ptr, rows, row_ok, cols, col_ok, D, xt,
                         BLOCK_X, BLOCK_Y, BLOCK_D, SINGLE_D, PRECISION, UPCAST)
        t = raw * scale + bias
        z = -t
        if HAS_DIAG:
            z = tl.where(cols[None, :] == rows[:, None] + offset, t, z)
        e = tl.exp2(-tl.abs(t) * LOG2E)
        term = tl.maximum(-z, 0.0) + _log1p_small(e)
        acc += tl.sum(tl.where(col_ok[None, :], term, 0.0), 1)
    tl.store(loss_ptr + rows, acc, mask=row_ok)


@triton.jit
def _backward_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, g_ptr, dx_ptr, r_ptr, NX, NY, D, offset, coef,
                     HAS_DIAG: tl.constexpr, WITH_R: tl.constexpr, PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr,
                     BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr, BLOCK_G: tl.constexpr):
    pid_d = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_X + tl.arange(0, BLOCK_X)
    row_ok = rows < NX
    co = pid_d * BLOCK_G + tl.arange(0, BLOCK_G)
    ch = tl.arange(0, BLOCK_D)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    xt = rows
    if SINGLE_D:
        xt = load_rows(x_ptr, rows, row_ok, ch, D)
    acc = tl.zeros([BLOCK_X, BLOCK_G], tl.float32)
    r_s = tl.zeros([BLOCK_X], tl.float32)     # sum_j h_ij raw_ij
    r_b = tl.zeros([BLOCK_X], tl.float32)     # sum_j h_ij
    for start in range(0, NY, BLOCK_Y):
        cols = (start + tl.arange(0, BLOCK_Y)).to(tl.int64)
        col_ok = cols < NY
        raw = score_tile(x_ptr, y_ptr, rows, row_ok, cols, col_ok, D, xt,
                         BLOCK_X, BLOCK_Y, BLOCK_D, SINGLE_D, PRECISION, UPCAST)
        t = raw * scale + bias
        e = tl.exp2(-tl.abs(t) * LOG2E)
        inv = 1.0 / (1.0 + e)
        # negatives (label -1, z = -t): h = sigmoid(t); positives (z = t): h = -sigmoid(-t)
        # (each from its own branch, not 1 - the other: no cancellation when |t| is large)
        h = tl.where(t >= 0.0, inv, e * inv)               # sigmoid(t)
        if HAS_DIAG:
            h = tl.where(cols[None, :] == rows[:, None] + offset, -tl.where(t >= 0.0, e * inv, inv), h)
        h = tl.where(col_ok[None, :], h, 0.0)
        yc = load_rows(y_ptr, cols, col_ok, co, D)
        acc += dot(h.to(yc.dtype), yc, PRECISION, UPCAST)
        if WITH_R:
            r_s += tl.sum(h * raw, 1)
            r_b += tl.sum(h, 1)
    cg = coef * tl.load(g_ptr).to(tl.float32)
    tl.store(dx_ptr + rows[:, None] * D + co[None, :], (acc * (cg * scale)).to(dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (co < D)[None, :])
    if WITH_R:
        if pid_d == 0:
            tl.store(r_ptr + rows, r_s * cg, mask=row_ok)
            tl.store(r_ptr + NX + rows, r_b * cg, mask=row_ok)


# ------------------------------------------------------------------------------------------------
# launchers (keyword-only, in the op's order; every buffer comes from the caller)

def forward(*, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int,
            has_diag: bool, loss_rows: torch.Tensor) -> None:
    """loss_rows: contiguous fp32 [n_x], each row's sum_j softplus(-z_ij) (unnormalised).
    x [n_x, D], y [n_y, D] contiguous, one dtype; scale, bias: 1-element fp32 tensors."""
    NX, D = x.shape
    NY = y.shape[0]
    if NX == 0:
        return
    cfg = config(x, NX, NY, backward=False)
    launch(_forward_kernel, (cdiv(NX, cfg["BLOCK_X"]),), x, y, scale, bias, loss_rows, NX, NY, D, offset,
                                                 HAS_DIAG=has_diag, num_stages=2, **cfg)


def backward(*, grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
             bias: torch.Tensor, offset: int, has_diag: bool, coef: float, dx: torch.Tensor,
             r=None) -> None:
    """dx [n_x, D] (x's dtype): c g s sum_j h_ij y_j, and, unless None, r: contiguous fp32 [2, n_x],
    each row's share of d logit_scale (r[0]) and d logit_bias (r[1]). grad: the upstream gradient,
    a 1-element tensor; coef: the loss's 1 / n_img. For Y's gradient call with x and y swapped and
    -offset."""
    NX, D = x.shape
    NY = y.shape[0]
    if NX == 0 or D == 0:
        return
    cfg = config(x, NX, NY, backward=True)
    grid = (cdiv(NX, cfg["BLOCK_X"]), grid_d(cfg, D))
    launch(_backward_kernel, grid, x, y, scale, bias, grad, dx, r if r is not None else scale, NX, NY, D, offset,
                           coef, HAS_DIAG=has_diag, WITH_R=r is not None, **cfg)
