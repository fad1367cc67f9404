"""Gram matrix and style loss (docs/ops.md section 2).

F = x viewed as [B, C, K] (K = H*W); G = F F^T / norm with norm = C*K ("chw"), K ("hw") or 1.

Strides: F is read in x's own strides (sb, sc, sk). The launchers take F as [B, C, K], or as x
itself, [B, C, H, W], whenever H and W merge into one stride (``flat_layout``) -- NCHW-contiguous
(sk = 1), channels-last (sc = 1, sk = C), batch or channel slices -- so those layouts are never
copied, and no view is made either (``x.flatten(2)`` costs ~1.5 us of host time a call); only
layouts where H and W do not merge (e.g. ``x[..., :W - 1]``) are copied once, by the caller's
``flatten``. Offsets are int64 throughout.

Gram forward
    ``_forward_kernel``, grid (B * T, SPLIT). G is symmetric, so only the T = nt (nt + 1) / 2
    tiles on or above the diagonal (nt = cdiv(C, BLOCK_M)) are computed; axis 0 enumerates
    them batch-major (the programs of one image run together and share F's panels in L2),
    axis 1 splits K. A program accumulates F[i-tile, k-chunk] F[j-tile, k-chunk]^T in fp32.
    With C <= BLOCK_M (one tile) the K-panel is loaded once and serves as both operands.
    Tiles (``_forward_config``): fp16/bf16 gram 128x128 (BLOCK_K 64, 8 warps; one tile up to
    C = 128), 64x64 for C <= 64 (BLOCK_K 128); the style loss and fp32 use 64-wide tiles (the
    style epilogue's target and D tiles beside a 128x128 accumulator spilled on sm_90).
    SPLIT = 1: the epilogue normalises in fp32, then writes the tile and (off the diagonal) its
    mirror G[j-tile, i-tile] in x's dtype. The unnormalised sum over K reaches |F|^2 * K, past
    fp16's range for VGG activations at 256x256, so the down-cast comes after the division.
    SPLIT > 1 (few output tiles, long K): every program writes its fp32 partial tile to a
    [SPLIT, B*T, BLOCK_M, BLOCK_M] scratch buffer and ``_reduce_kernel``, grid (B * T * row
    blocks), sums the SPLIT partials in a fixed order and runs the same epilogue. No atomics: the
    result is bitwise reproducible.
    Split rule (``_split``): aim at 3 programs per SM (132 SMs on an H100/H200; the device's own
    count on a GPU), i.e. SPLIT = cdiv(3 * SMs, B * T), but keep >= 4 BLOCK_K steps per program
    so its load pipeline fills. VGG-16 at 256x256, batch 4, bf16 gram: relu1_2 (C 64, K 65536)
    SPLIT 99 (each program 5 steps of 128), relu4_3 (C 512, K 1024, T 10) SPLIT 4.
Style loss forward
    The same kernels in STYLE mode: the epilogue computes D = G - T for the tile and, off the
    diagonal, D' = G^T - T for the mirrored tile (T may be any [C, C], symmetric or not: the
    mirrored tile reads T's own entries, which for a symmetric T is "off-diagonal tiles counted
    twice"), and writes the tile's sum(D^2) / (C*K) to a per-program partial (summed by torch:
    fixed order). G itself never reaches memory. The target is read through its strides, batch
    stride 0 for a [C, C] or [1, C, C] target broadcast over the batch.
    Saved for backward: D in fp32 [B, C, C] (written by the same epilogue only when a gradient
    is needed), besides x. Backward needs dG = 2 (G - T) / (C*K) and nothing else of G; storing
    D costs B*C^2*4 bytes, at most F's own size at the VGG shapes (relu4_3: C^2 = C*K/2), while
    recomputing G would cost backward another C^2 K FLOPs and a pass over F.
Gram / style backward
    ``_backward_kernel``, grid (B * row tiles * K tiles): dF = (A + A^T) F * scale, one kernel:
    each program owns a [BLOCK_M, BLOCK_N] tile of dF and loops over C in BLOCK_J chunks,
    building the symmetric matrix's chunk from A[i, j] and A[j, i] (two strided loads, so A may
    be any strided or expanded upstream gradient) and multiplying it into F[j-chunk, k-tile].
    gram: A = dG, dF = 2 sym(dG) F / norm. style: A = D, dF = 4 g / (C norm^2) sym(D') F with
    sym(D') = (D + D^T) / 2 * norm / K, a per-position-mean Gram difference whose size is that of
    the activations squared whatever ``normalize`` is; it is rounded to x's dtype for the tensor
    cores and the remaining (tiny: ~1e-13 for relu1_2) factor is applied to the fp32 accumulator,
    so nothing underflows fp16.
BYTES MODEL (these kernels' HBM traffic, per call; s = itemsize of x, E = B*C*K; the style loss's
    minimum, without D, is E*s + C^2*s forward and 2*E*s + C^2*s backward, as benchmarks/gram.py
    counts)
    gram fwd        read F, write G:              E*s + B*C^2*s;   useful FLOPs B*C*(C+1)*K
                    (triangle + diagonal; eager bmm does 2*B*C^2*K)
    style fwd       read F and T (+ write D fp32 when grad is needed):
                    E*s + C^2*4 (or B*C^2*4) [+ B*C^2*4];           FLOPs B*C*(C+1)*K
    style/gram bwd  read F, D (or dG), write dF:  2*E*s + B*C^2*4;  FLOPs 2*B*C^2*K
The split-K scratch adds SPLIT * B*T * BLOCK_M^2 * 8 bytes (written and read once; 6.5 MB for
relu1_2 at batch 16 against 134 MB of F).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .utils import (CPU, MIN_DOT, PlanCache, cdiv, dot, dot_key, dot_switches, launch, next_pow2, switches_for_key,
                    tf32_key)

DEFAULT_SMS = 132       # H100 / H200 SXM
PROGRAMS_PER_SM = 3
MIN_K_STEPS = 4         # BLOCK_K steps per split-K program, at least
# Whether the forward splits K where its tiles alone cannot fill the GPU (``_split``). False: one
# launch and no fp32 scratch at every shape. At VGG relu4_3, batch 4, bf16 (split 4 and a second,
# reduce launch) the first GPU run had the Gram at 17.7 us against bmm's 12.3; the benchmarks time
# both ("fastnote no split") so that a GPU can say which small shapes the split helps.
SPLIT_K = True


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def _tile_coords(t):
    """Upper-triangle tile t -> (ti, tj), ti <= tj, enumerated column by column:
    t = tj (tj + 1) / 2 + ti. The float square root is corrected by one step either way."""
    tj = ((tl.sqrt(8.0 * t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where(tj * (tj + 1) // 2 > t, tj - 1, tj)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= t, tj + 1, tj)
    return t - tj * (tj + 1) // 2, tj


@triton.jit
def _epilogue(acc, b, rows, cols, C, mirror, inv_norm, out_ptr, tgt_ptr, st_b, st_i, st_j, diff_ptr,
              loss_ptr, pid, inv_ck, STYLE: tl.constexpr, SAVE_DIFF: tl.constexpr):
    """acc: fp32 F F^T for G[rows, cols] of image b. gram: write G (and its mirror when
    ``mirror``); style: sum of squared differences with the target for both tiles -> loss_ptr."""
    g = acc * inv_norm
    row_ok = rows < C
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    # Offsets within one image in int32 (C^2 < 2^31 for any C a Gram matrix fits in memory for),
    # the image's base as a 64-bit scalar: int64 offset tiles of 128x128 would spill.
    direct = rows[:, None] * C + cols[None, :]       # [b, rows, cols]
    mirrored = cols[None, :] * C + rows[:, None]     # [b, cols, rows], same tile shape
    if STYLE:
        t_base = tgt_ptr + b * st_b
        diff_base = diff_ptr + b * C * C
        t1 = tl.load(t_base + rows[:, None] * st_i + cols[None, :] * st_j, mask=mask, other=0.0)
        # Padded rows and columns hold 0 in both g (masked loads of F) and t1: d1 = 0 there.
        d1 = g - t1.to(tl.float32)
        total = tl.sum(tl.sum(d1 * d1, 1), 0)
        if SAVE_DIFF:
            tl.store(diff_base + direct, d1, mask=mask)
        if mirror:
            # G[cols, rows] = g^T: transposed once in shared memory, so that the target is read
            # and D written in their own orientation.
            mask_t = col_ok[:, None] & row_ok[None, :]
            t2 = tl.load(t_base + cols[:, None] * st_i + rows[None, :] * st_j, mask=mask_t, other=0.0)
            d2 = tl.trans(g) - t2.to(tl.float32)
            total += tl.sum(tl.sum(d2 * d2, 1), 0)
            if SAVE_DIFF:
                tl.store(diff_base + cols[:, None] * C + rows[None, :], d2, mask=mask_t)
        tl.store(loss_ptr + pid, total * inv_ck)
    else:
        out_base = out_ptr + b * C * C
        y = g.to(out_ptr.dtype.element_ty)
        tl.store(out_base + direct, y, mask=mask)
        if mirror:
            tl.store(out_base + mirrored, y, mask=mask)


@triton.jit
def _forward_kernel(f_ptr, out_ptr, part_ptr, tgt_ptr, diff_ptr, loss_ptr,
                    C, K, T, K_CHUNK, sf_b, sf_c, sf_k, st_b, st_i, st_j, inv_norm, inv_ck,
                    SPLIT_K: tl.constexpr, SINGLE_TILE: tl.constexpr, STYLE: tl.constexpr,
                    SAVE_DIFF: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // T).to(tl.int64)
    t = pid % T
    if SINGLE_TILE:
        ti = 0
        tj = 0
    else:
        ti, tj = _tile_coords(t)
    rows = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tj * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < C
    col_ok = cols < C
    f_base = f_ptr + b * sf_b
    row_off = rows.to(tl.int64) * sf_c
    col_off = cols.to(tl.int64) * sf_c
    k_start = split * K_CHUNK
    k_stop = tl.minimum(k_start + K_CHUNK, K)
    acc = tl.zeros([BLOCK_M, BLOCK_M], tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_stop
        k_off = ks.to(tl.int64) * sf_k
        a = tl.load(f_base + row_off[:, None] + k_off[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if SINGLE_TILE:
            bt = tl.trans(a)          # one K-panel serves as both operands: F is read once
        else:
            bt = tl.load(f_base + k_off[:, None] + col_off[None, :], mask=k_ok[:, None] & col_ok[None, :],
                         other=0.0)
        acc += dot(a, bt, PRECISION, UPCAST)
    if SPLIT_K:
        # Whole tile, padding included (zeros), so the reduce pass never reads unwritten memory.
        loc = tl.arange(0, BLOCK_M)
        n_tiles = tl.num_programs(0).to(tl.int64)
        offs = (split * n_tiles + pid) * (BLOCK_M * BLOCK_M) + loc[:, None] * BLOCK_M + loc[None, :]
        tl.store(part_ptr + offs, acc)
    else:
        _epilogue(acc, b, rows, cols, C, ti != tj, inv_norm, out_ptr, tgt_ptr, st_b, st_i, st_j, diff_ptr,
                  loss_ptr, pid, inv_ck, STYLE, SAVE_DIFF)


@triton.jit
def _reduce_kernel(part_ptr, out_ptr, tgt_ptr, diff_ptr, loss_ptr, C, T, BT, SPLIT,
                   st_b, st_i, st_j, inv_norm, inv_ck,
                   SINGLE_TILE: tl.constexpr, STYLE: tl.constexpr, SAVE_DIFF: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    # Program = (tile of the triangular grid, block of BLOCK_R of its rows).
    pid = tl.program_id(0)
    row_blocks = BLOCK_M // BLOCK_R
    tile = pid // row_blocks
    rb = pid % row_blocks
    b = (tile // T).to(tl.int64)
    t = tile % T
    if SINGLE_TILE:
        ti = 0
        tj = 0
    else:
        ti, tj = _tile_coords(t)
    loc_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    loc_c = tl.arange(0, BLOCK_M)
    offs = tile.to(tl.int64) * (BLOCK_M * BLOCK_M) + loc_r[:, None] * BLOCK_M + loc_c[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    for s in range(0, SPLIT):     # fixed order: deterministic
        acc += tl.load(part_ptr + s * BT * (BLOCK_M * BLOCK_M) + offs)
    _epilogue(acc, b, ti * BLOCK_M + loc_r, tj * BLOCK_M + loc_c, C, ti != tj, inv_norm, out_ptr, tgt_ptr,
              st_b, st_i, st_j, diff_ptr, loss_ptr, pid, inv_ck, STYLE, SAVE_DIFF)


@triton.jit
def _backward_kernel(a_ptr, f_ptr, df_ptr, coef_ptr, C, K, pre, post,
                     sa_b, sa_i, sa_j, sf_b, sf_c, sf_k, sd_b, sd_c, sd_k,
                     HAS_COEF: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    # dF[b, rows, ks] = post (* coef) * sum_j cast(pre * (A[b, rows, j] + A[b, j, rows])) F[b, j, ks]
    pid = tl.program_id(0)
    n_m = tl.cdiv(C, BLOCK_M)
    n_n = tl.cdiv(K, BLOCK_N)
    b = (pid // (n_m * n_n)).to(tl.int64)
    rest = pid % (n_m * n_n)
    rows = (rest // n_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = (rest % n_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < C
    k_ok = ks < K
    r64 = rows.to(tl.int64)
    k64 = ks.to(tl.int64)
    a_base = a_ptr + b * sa_b
    f_base = f_ptr + b * sf_b
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for j0 in range(0, C, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        j_ok = js < C
        j64 = js.to(tl.int64)
        m = row_ok[:, None] & j_ok[None, :]
        a1 = tl.load(a_base + r64[:, None] * sa_i + j64[None, :] * sa_j, mask=m, other=0.0).to(tl.float32)
        a2 = tl.load(a_base + j64[None, :] * sa_i + r64[:, None] * sa_j, mask=m, other=0.0).to(tl.float32)
        fj = tl.load(f_base + j64[:, None] * sf_c + k64[None, :] * sf_k, mask=j_ok[:, None] & k_ok[None, :],
                     other=0.0)
        s = ((a1 + a2) * pre).to(fj.dtype)
        acc += dot(s, fj, PRECISION, UPCAST)
    scale = post
    if HAS_COEF:
        scale = scale * tl.load(coef_ptr).to(tl.float32)
    tl.store(df_ptr + b * sd_b + r64[:, None] * sd_c + k64[None, :] * sd_k,
             (acc * scale).to(df_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _sm_count(device: torch.device) -> int:
    if device != CPU and device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_SMS


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _forward_config(fp32: bool, C: int, style: bool) -> dict:
    if fp32:
        # fp32 operands take twice the registers and shared memory of half ones.
        block_m = min(max(next_pow2(C), MIN_DOT), 64)
        return dict(BLOCK_M=block_m, BLOCK_K=32, num_warps=4, num_stages=2)
    block_m = min(max(next_pow2(C), MIN_DOT), 128)
    if block_m <= 64:
        return dict(BLOCK_M=block_m, BLOCK_K=128, num_warps=4, num_stages=3)
    if style:
        # The style epilogue holds target tiles, D and the transposed tile beside the
        # accumulator: a 128x128 tile spilled 72 bytes per thread on sm_90; 64x64 tiles do not.
        return dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=block_m, BLOCK_K=64, num_warps=8, num_stages=3)


def _split(K: int, programs: int, block_k: int, device: torch.device) -> int:
    """K-splits so that ~PROGRAMS_PER_SM programs run per SM, each with >= MIN_K_STEPS steps."""
    return _split_for(cdiv(K, block_k), programs, _sm_count(device))


def _split_for(steps: int, programs: int, sms: int) -> int:
    want = cdiv(PROGRAMS_PER_SM * sms, max(programs, 1))
    return max(1, min(want, steps // MIN_K_STEPS))


def _reduce_rows(block_m: int, tiles: int, sms: int) -> int:
    """Rows per reduce program: the fewest programs that still give every SM two."""
    rows = block_m
    while rows > 1 and tiles * (block_m // rows) < 2 * sms:
        rows //= 2
    return rows


class ForwardPlan(NamedTuple):
    """A forward launch per shape, strides and setting: F's sizes B, C, K and strides as [B, C, K]
    (``f_strides``; None for a [B, C, H, W] F whose H and W do not merge: the caller flattens it,
    one copy, and plans again), the tile config, tiles per side ``nt``, triangle tiles ``T``,
    ``BT = B*T``, the K-splits and K per split, rows per reduce program (0 without a split),
    1 / (C*K), and the keyword arguments of the launches (tiles, warps, dot switches and the
    STYLE / SINGLE_TILE / SPLIT_K flags: one dict each, built once; indexed by SAVE_DIFF)."""
    B: int
    C: int
    K: int
    f_strides: Optional[Tuple[int, int, int]]
    cfg: dict
    nt: int
    T: int
    BT: int
    n_split: int
    k_chunk: int
    rows: int
    inv_ck: float
    forward_kwargs: Tuple[dict, dict]
    reduce_kwargs: Tuple[dict, dict]

    @property
    def part_shape(self) -> Optional[Tuple[int, int, int, int]]:
        """The fp32 split-K scratch the caller passes as ``part`` (None: no split)."""
        if self.n_split == 1:
            return None
        return (self.n_split, self.BT, self.cfg["BLOCK_M"], self.cfg["BLOCK_M"])

    @property
    def loss_programs(self) -> int:
        """Length of the style loss's fp32 per-program partials (``losses``)."""
        return self.BT * (self.cfg["BLOCK_M"] // self.rows) if self.n_split > 1 else self.BT


def flat_layout(shape, strides) -> Tuple[int, int, int, Optional[Tuple[int, int, int]]]:
    """(B, C, K, strides as [B, C, K]) of a [B, C, K] tensor, or of a [B, C, H, W] one read as its
    [B, C, H*W] view without making it (``x.flatten(2)`` costs ~1.5 us of host time); the strides
    are None when H and W do not merge into one stride (no such view exists)."""
    if len(shape) == 3:
        return shape[0], shape[1], shape[2], tuple(strides)
    B, C, H, W = shape
    if W == 1:
        sk = strides[2]
    elif H == 1 or strides[2] == W * strides[3]:
        sk = strides[3]
    else:
        return B, C, H * W, None
    return B, C, H * W, (strides[0], strides[1], sk)


def _forward_plan(style: bool, shape, strides, split, sms: int, *key) -> ForwardPlan:
    B, C, K, f_strides = flat_layout(shape, strides)
    cfg = _forward_config(key[0] == torch.float32, C, style)
    nt = cdiv(C, cfg["BLOCK_M"])
    T = nt * (nt + 1) // 2
    BT = B * T
    steps = cdiv(K, cfg["BLOCK_K"])
    n_split = split if split is not None else _split_for(steps, BT, sms)
    n_split = max(1, min(n_split, steps))
    k_chunk = cdiv(cdiv(K, n_split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    n_split = cdiv(K, k_chunk)   # no empty split
    rows = _reduce_rows(cfg["BLOCK_M"], BT, sms) if n_split > 1 else 0
    common = dict(STYLE=style, SINGLE_TILE=nt == 1)
    forward_kwargs = dict(SPLIT_K=n_split > 1, **common, **switches_for_key(*key), **cfg)
    reduce_kwargs = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_R=rows, num_warps=4, **common)
    return ForwardPlan(B, C, K, f_strides, cfg, nt, T, BT, n_split, k_chunk, rows, 1.0 / (C * K),
                       tuple(dict(forward_kwargs, SAVE_DIFF=d) for d in (False, True)),
                       tuple(dict(reduce_kwargs, SAVE_DIFF=d) for d in (False, True)))


_PLANS = PlanCache()   # per (style, shape, strides, dtype, device, split, TF32 allowed)


def forward_plan(f: torch.Tensor, style: bool, split: Optional[int] = None) -> ForwardPlan:
    """The plan of ``forward`` for f, [B, C, K] or [B, C, H, W] (see ``flat_layout``; a plan whose
    ``f_strides`` is None cannot run: flatten f first); ``split`` forces the K-split (tests; 1
    wherever ``SPLIT_K`` is off)."""
    if split is None and not SPLIT_K:
        split = 1
    shape, strides, dtype, device = f.shape, f.stride(), f.dtype, f.device
    key = (style, shape, strides, dtype, device, split, tf32_key(dtype))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS.put(key, _forward_plan(style, shape, strides, split, _sm_count(device), *dot_key(dtype, device)))
    return plan


def forward(*, f: torch.Tensor, inv_norm: float, plan: ForwardPlan, out=None, target=None, diff=None,
            part=None, losses=None) -> None:
    """f: [B, C, K] or [B, C, H, W], any strides where H and W merge; ``plan`` from
    ``forward_plan(f, style)`` (with ``style`` as here), ``part`` its ``part_shape`` scratch
    (fp32) when it splits K. gram mode (``out`` [B, C, C] contiguous, f's dtype): G = f f^T *
    inv_norm. style mode (``target`` [Bt, C, C] with Bt in (1, B), any strides): writes the
    per-program partial losses to ``losses`` (fp32 [plan.loss_programs], to be summed), and
    D = G - target (fp32 contiguous [B, C, C]) to ``diff`` when given."""
    C, K, sf = plan.C, plan.K, plan.f_strides
    if sf is None:
        raise ValueError(f"f's last two dimensions do not merge into one stride (shape {list(f.shape)}, strides "
                         f"{list(f.stride())}): pass f.flatten(2)")
    style = target is not None
    if style:
        st = (0 if target.shape[0] == 1 else target.stride(0), target.stride(1), target.stride(2))
    else:
        st = (0, 0, 0)
    dummy = out if out is not None else f
    save_diff = diff is not None
    split = plan.n_split > 1
    launch(_forward_kernel, (plan.BT, plan.n_split),
        f, dummy, part if split else dummy, target if style else dummy,
        diff if save_diff else dummy, losses if style and not split else dummy,
        C, K, plan.T, plan.k_chunk, *sf, *st, inv_norm, plan.inv_ck, **plan.forward_kwargs[save_diff],
    )
    if split:
        launch(_reduce_kernel, (plan.BT * (plan.cfg["BLOCK_M"] // plan.rows),),
            part, dummy, target if style else dummy, diff if save_diff else dummy,
            losses if style else dummy, C, plan.T, plan.BT, plan.n_split, *st, inv_norm, plan.inv_ck,
            **plan.reduce_kwargs[save_diff],
        )


@functools.lru_cache(maxsize=256)
def _backward_config(fp32: bool, C: int) -> dict:
    block_m = min(max(next_pow2(C), MIN_DOT), 64 if fp32 else 128)
    if fp32:
        return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_J=32, num_warps=8, num_stages=2)
    # The two strided loads of A (a [BLOCK_M, BLOCK_J] tile and its mirror) sit in registers
    # beside the accumulator: BLOCK_J 32 keeps them from spilling.
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_J=min(max(next_pow2(C), MIN_DOT), 32),
                num_warps=8, num_stages=3)


def backward(*, a: torch.Tensor, f: torch.Tensor, df: torch.Tensor, pre: float, post: float, coef=None) -> None:
    """df = post (* coef) * cast(pre * (a + a^T)) f: a [B, C, C] (any strides, stride 0 included), f
    and df [B, C, K] (any strides), coef None or a one-element tensor (the loss's upstream
    gradient, read on the device: no host sync). f and df may also be [B, C, H, W] with H and W
    merging into one stride (see ``flat_layout``)."""
    B, C, K, sf = flat_layout(f.shape, f.stride())
    sd = flat_layout(df.shape, df.stride())[3]
    if sf is None or sd is None:
        raise ValueError("f's and df's last two dimensions must merge into one stride: pass them flattened")
    cfg = _backward_config(f.dtype == torch.float32, C)
    grid = (B * cdiv(C, cfg["BLOCK_M"]) * cdiv(K, cfg["BLOCK_N"]),)
    launch(_backward_kernel, grid,
        a, f, df, coef if coef is not None else a, C, K, pre, post,
        *a.stride(), *sf, *sd, HAS_COEF=coef is not None,
        **dot_switches(f.dtype, f.device), **cfg,
    )
