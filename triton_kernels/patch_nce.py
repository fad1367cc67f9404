"""PatchNCE loss (CUT, docs/ops.md section 3.1), streaming: the [G, M, M] negative logits never reach memory.

q, k: contiguous [R, D], R = G * M rows in G groups of M (G = batch_size, M = patches per image;
or G = 1, M = R with negatives from the whole minibatch). Row i = g * M + a of group g has the
logits  l_pos = q_i . k_i  (column 0)  and  q_i . k_{gM+j} for j < M, the diagonal j = a set to
-10 (the positive's own column, masked exactly as CUT: -10 before the division by T, so it still
adds exp(-10/T) to the denominator), all divided by T; loss_i = lse_i - l_pos_i / T.

forward   ``_forward_kernel``, grid (G * ceil(M / BLOCK_X),) -- groups and row blocks flattened
          on axis 0 (no 65535 limit). A program owns BLOCK_X rows of one group, computes their
          l_pos, and streams the group's keys BLOCK_Y at a time with an online max / sum-exp in
          fp32 (base 2, log2(e)/T folded into one multiply), starting from the l_pos column.
          Writes loss [R] and the row statistics [2, R] (fp32: running max, log2 of the sum).
saved     q, k, loss, stats. p0_i = softmax of the positive column = exp(-loss_i), so l_pos is not
          kept separately; every other probability is recomputed from q, k and the stats (flash style).
backward  ``_dq_kernel``, grid (G * ceil(M / BLOCK_X), ceil(D / BLOCK_G)): the forward's walk,
          recomputing P = exp(S - lse) with the diagonal zeroed (a constant logit has no
          gradient), and dq_i = g_i / T * (sum_j P_ij k_j + (p0_i - 1) k_i) for the program's
          BLOCK_G slice of channels (D > BLOCK_G: S is recomputed once per slice).
          ``_dk_kernel`` (only when the gradient reaches k, ``detach_k=False``), grid
          (G * ceil(M / BLOCK_Y), ceil(D / BLOCK_G)): a program owns a block of keys and streams
          the group's query rows, dk_j = 1 / T * (sum_{i != j} g_i P_ij q_i + g_j (p0_j - 1) q_j).
          Every output element is written by one program: no atomics, deterministic.
          g arrives divided by max |g| (and that factor is applied at the end), so per-row
          weights as small as 1/R (reduction="mean") do not underflow in fp16 products.
          Computing dq already in the forward (Liger's cross-entropy trick) was considered and
          not done, by reasoning, not by measurement: the backward would still need a launch to
          scale by the upstream gradient (per row for reduction="none"), so the launch count stays
          the same, and the forward would pay the backward's FLOPs and an [R, D] fp32 buffer
          also when no gradient is wanted (evaluation).

Bytes model (minimum HBM traffic, itemsize s; the streamed key blocks are re-read from L2):
  fwd   read q, k: 2 R D s; write loss, stats: 12 R                    FLOPs 2 R M D (+ 2 R D l_pos)
  bwd   read q, k, g, loss, stats; write dq: 3 R D s + 16 R          FLOPs 2 R M D (1 + n_slices)
        with dk: read q, k again, write dk: + 3 R D s                 FLOPs doubled
n_slices = ceil(D / BLOCK_G), BLOCK_G the gradient slice (``contrastive_tiles.GRADIENT_SLICES``): 1 at
CUT's D = 256 in fp16/bf16 and fp32 with TF32 (BLOCK_G 256), 2 in fp32 with 3xTF32 (128); it was 4
and 8 with slices as wide as the score chunk (BLOCK_D 64 and 32). The tiles are the largest ptxas
compiles for sm_90 without spilling (``contrastive_tiles.config``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .contrastive_tiles import config, grid_d, load_rows, online_logsumexp, row_dot, score_tile
from .utils import LN2, LOG2E_F, cdiv, dot, launch


@triton.jit
def _forward_kernel(q_ptr, k_ptr, loss_ptr, stats_ptr, R, M, D, tiles, scale2,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_X: tl.constexpr,
                    BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr):
    pid = tl.program_id(0)
    base = (pid // tiles).to(tl.int64) * M
    loc = (pid % tiles) * BLOCK_X + tl.arange(0, BLOCK_X)
    row_ok = loc < M
    rows = base + loc
    ch = tl.arange(0, BLOCK_D)
    lpos = row_dot(q_ptr, k_ptr, rows, rows, row_ok, D, BLOCK_X, BLOCK_D) * scale2
    qt = lpos
    if SINGLE_D:
        qt = load_rows(q_ptr, rows, row_ok, ch, D)
    # The l_pos column starts the online sum: m finite from the outset.
    m_i = lpos
    l_i = tl.full([BLOCK_X], 1.0, tl.float32)
    masked = -10.0 * scale2
    for start in range(0, M, BLOCK_Y):
        cols = start + tl.arange(0, BLOCK_Y)
        col_ok = cols < M
        s = score_tile(q_ptr, k_ptr, rows, row_ok, base + cols, col_ok, D, qt,
                       BLOCK_X, BLOCK_Y, BLOCK_D, SINGLE_D, PRECISION, UPCAST) * scale2
        s = tl.where(loc[:, None] == cols[None, :], masked, s)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_i, l_i = online_logsumexp(m_i, l_i, s)
    log_l = tl.log2(l_i)
    # The max and the log of the sum, not their sum: backward forms P = exp2((s - m) - log_l),
    # exact at the max as the reference's own softmax is, where exp2(s - lse) would carry lse's
    # rounding (one ulp of |lse| ~ 1e-5 at logits ~ 128) into every probability. Likewise the
    # loss is (m - l_pos) + log_l, which keeps its digits when the positive dominates.
    tl.store(stats_ptr + rows, m_i, mask=row_ok)
    tl.store(stats_ptr + R + rows, log_l, mask=row_ok)
    tl.store(loss_ptr + rows, ((m_i - lpos) + log_l) * LN2, mask=row_ok)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, g_ptr, loss_ptr, stats_ptr, gmax_ptr, dq_ptr, R, M, D, tiles, scale2, inv_t,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_X: tl.constexpr,
               BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
               BLOCK_G: tl.constexpr):
    pid = tl.program_id(0)
    co = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    base = (pid // tiles).to(tl.int64) * M
    loc = (pid % tiles) * BLOCK_X + tl.arange(0, BLOCK_X)
    row_ok = loc < M
    rows = base + loc
    ch = tl.arange(0, BLOCK_D)
    qt = loc
    if SINGLE_D:
        qt = load_rows(q_ptr, rows, row_ok, ch, D)
    m_i = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
    log_l = tl.load(stats_ptr + R + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_X, BLOCK_G], tl.float32)
    for start in range(0, M, BLOCK_Y):
        cols = start + tl.arange(0, BLOCK_Y)
        col_ok = cols < M
        s = score_tile(q_ptr, k_ptr, rows, row_ok, base + cols, col_ok, D, qt,
                       BLOCK_X, BLOCK_Y, BLOCK_D, SINGLE_D, PRECISION, UPCAST) * scale2
        p = tl.exp2((s - m_i[:, None]) - log_l[:, None])
        p = tl.where(col_ok[None, :] & (loc[:, None] != cols[None, :]), p, 0.0)
        kc = load_rows(k_ptr, base + cols, col_ok, co, D)
        acc += dot(p.to(kc.dtype), kc, PRECISION, UPCAST)
    p0 = tl.exp(-tl.load(loss_ptr + rows, mask=row_ok, other=0.0))
    own = load_rows(k_ptr, rows, row_ok, co, D).to(tl.float32)
    acc += (p0 - 1.0)[:, None] * own
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0) * (tl.load(gmax_ptr) * inv_t)
    tl.store(dq_ptr + rows[:, None] * D + co[None, :], (acc * g[:, None]).to(dq_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (co < D)[None, :])


@triton.jit
def _dk_kernel(q_ptr, k_ptr, g_ptr, loss_ptr, stats_ptr, gmax_ptr, dk_ptr, R, M, D, tiles, scale2, inv_t,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_X: tl.constexpr,
               BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
               BLOCK_G: tl.constexpr):
    # Transposed walk: a program owns a block of keys and streams the group's queries, so each
    # key block's dk stays in registers.
    pid = tl.program_id(0)
    co = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    base = (pid // tiles).to(tl.int64) * M
    locj = (pid % tiles) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    key_ok = locj < M
    keys = base + locj
    ch = tl.arange(0, BLOCK_D)
    if SINGLE_D:
        kt = load_rows(k_ptr, keys, key_ok, ch, D)
    acc = tl.zeros([BLOCK_Y, BLOCK_G], tl.float32)
    for start in range(0, M, BLOCK_X):
        loci = start + tl.arange(0, BLOCK_X)
        row_ok = loci < M
        rows = base + loci
        # The scores as the forward computed them (q k^T, same tiles and channel chunks), then
        # transposed: recomputed bit for bit, so (s - m) is exact at each row's max.
        if SINGLE_D:
            s = dot(load_rows(q_ptr, rows, row_ok, ch, D), tl.trans(kt), PRECISION, UPCAST)
        else:
            s = score_tile(q_ptr, k_ptr, rows, row_ok, keys, key_ok, D, rows,
                           BLOCK_X, BLOCK_Y, BLOCK_D, SINGLE_D, PRECISION, UPCAST)
        st = tl.trans(s) * scale2
        m_i = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
        log_l = tl.load(stats_ptr + R + rows, mask=row_ok, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        p = tl.exp2((st - m_i[None, :]) - log_l[None, :]) * g[None, :]
        p = tl.where(row_ok[None, :] & (locj[:, None] != loci[None, :]), p, 0.0)
        qc = load_rows(q_ptr, rows, row_ok, co, D)
        acc += dot(p.to(qc.dtype), qc, PRECISION, UPCAST)
    # The positive column: l_pos_j = q_j . k_j.
    p0 = tl.exp(-tl.load(loss_ptr + keys, mask=key_ok, other=0.0))
    gj = tl.load(g_ptr + keys, mask=key_ok, other=0.0)
    own = load_rows(q_ptr, keys, key_ok, co, D).to(tl.float32)
    acc += (gj * (p0 - 1.0))[:, None] * own
    acc = acc * (tl.load(gmax_ptr) * inv_t)
    tl.store(dk_ptr + keys[:, None] * D + co[None, :], acc.to(dk_ptr.dtype.element_ty),
             mask=key_ok[:, None] & (co < D)[None, :])


# ------------------------------------------------------------------------------------------------
# launchers

def forward(*, q: torch.Tensor, k: torch.Tensor, groups: int, nce_T: float, loss: torch.Tensor,
            stats: torch.Tensor) -> None:
    """loss: contiguous fp32 [R]; stats: contiguous fp32 [2, R], the running max and log2 of the
    sum of each row (base-2 units of the scaled logits); q, k contiguous [R, D], R = groups * M."""
    R, D = q.shape
    if R == 0:
        return
    M = R // groups
    cfg = config(q, M, M, backward=False)
    tiles = cdiv(M, cfg["BLOCK_X"])
    launch(_forward_kernel, (groups * tiles,), q, k, loss, stats, R, M, D, tiles, LOG2E_F / nce_T, num_stages=2, **cfg)


def backward(*, grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, groups: int, nce_T: float, loss: torch.Tensor,
             stats: torch.Tensor, dq: torch.Tensor, dk) -> None:
    """dq (and dk unless None): contiguous [R, D] in q's dtype, for upstream ``grad`` [R] of loss."""
    R, D = q.shape
    if R == 0:
        return
    M = R // groups
    # Normalised per-row weights: see the module docstring.
    gmax = grad.abs().amax().clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
    g = (grad / gmax).contiguous()
    cfg = config(q, M, M, backward=True)
    n_d = grid_d(cfg, D)
    args = (q, k, g, loss, stats, gmax)
    scalars = (R, M, D)
    tiles = cdiv(M, cfg["BLOCK_X"])
    launch(_dq_kernel, (groups * tiles, n_d), *args, dq, *scalars, tiles, LOG2E_F / nce_T, 1.0 / nce_T, **cfg)
    if dk is not None:
        tiles = cdiv(M, cfg["BLOCK_Y"])
        launch(_dk_kernel, (groups * tiles, n_d), *args, dk, *scalars, tiles, LOG2E_F / nce_T, 1.0 / nce_T, **cfg)
