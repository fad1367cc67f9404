"""Swin window attention: ``softmax(q @ k^T * scale + bias[h] + mask[w]) @ v`` per window and head.

Two layouts share the same two kernels (``FUSED`` constexpr):

core   q, k, v ``[B*nW, heads, N, d]`` (any strides with a unit last stride), ``bias`` ``[heads, N, N]``,
       ``mask`` ``[nW, N, N]`` loaded from memory (row ``w`` of ``B*nW`` uses ``mask[w % nW]``).
fused  the Swin block: ``qkv`` ``[B, H, W, 3C]`` as a plain Linear over ``x`` writes it. Window ``w``
       (image ``w // nW``) token ``i`` sits at the rolled, padded coordinate
       ``(ph, pw) = (row(w) * Ws + i // Ws, col(w) * Ws + i % Ws)`` and reads image position
       ``((ph + shift) % Hp, (pw + shift) % Wp)`` (padding first, then rolling, as the original
       Swin code and torchvision; timm rolls first: ``((ph + shift) % H, (pw + shift) % W)`` for
       ``ph < H, pw < W``, see ``_tokens``): cyclic shift and window partition are index
       arithmetic, and the output goes back to that same position in ``[B, H, W, C]`` (reverse and
       roll-back). A position outside ``H x W`` is a zero-padded token, whose q/k/v equal the qkv
       bias: the kernel loads the bias vector instead of memory, and the backward adds those
       tokens' dk/dv to the bias gradient. The shift mask is not loaded: each token's region id
       per axis (0, 1, 2 for ``[0, Hp-Ws)``, ``[Hp-Ws, Hp-shift)``, ``[Hp-shift, Hp)``) comes from its
       padded coordinate, and pairs with different ids get ``mask_value`` (-100.0 as in Swin).

Programs and tiles. ``N`` and ``d`` are padded in registers (masked loads) to powers of two >= 16,
as ``tl.dot`` needs. For ``N <= 64`` (windows 7 and 8; for wide heads ``N`` up to the narrower tile,
see ``blocks``) a program holds the full ``N x N`` score tile of one (window, head) and one pass
does everything (exact softmax over the row). For larger ``N`` (window 12: N = 144, up to 256) tiles
are 64 x 64 (narrower for wide heads: ``blocks``) and the forward runs an online softmax over key
blocks, one program per (window, head, query block). A program takes one head ``h``, one window
place ``j`` in the image (``w % nW``) and ``GROUP`` images: bias[h] and mask[j] (or, fused, the
region labels of place j) are the same for all its windows, so with one tile per window the forward
builds the additive ``(bias + mask) * log2(e)`` tile once per program and keeps it in registers, and
so does V1's backward. V2's (cosine) backward builds it again for each window (the bias tile then
comes from L1/L2): held across the images beside the dbias accumulator it made that backward spill,
while for V1 holding it costs nothing with Triton 3.9 and rebuilding it cost 32 bytes of stack per
thread with Triton 3.6 (Swin-T stage 1). Heads vary fastest
across programs, so neighbouring programs read the same qkv rows. ``GROUP`` is chosen to leave ~1024
programs (8 per SM on an H100), and in the backward it also amortises the dbias write.

Launch: 8 warps for 64 x 64 tiles (4 below). Most variants take ``num_stages=1`` (the key loop
has one iteration for N <= 64, so pipelining it only costs registers); the fp16/bf16 V1 kernels
with one tile per window take 2 and pipeline the loop over their program's windows instead,
loading the next window while this one computes (``_stages``). In the fused layout with one tile
per window the kernels take ``N = WS * WS`` as a compile-time constant: the masks of the padded rows and
columns (N = 49 in 64 x 64 tiles) and the single-iteration loops then fold away, which took the
fused fp16/bf16 forwards from 132-176 registers to 90-128 (at most 128 is two programs of 8 warps
per SM, twice the occupancy) and Swin V2's fused backward off the stack with Triton 3.6 (120 bytes
at window 7, 16 at window 8 on a padded map, before). The tiled path (N > 64) keeps N at run time:
there the constant unrolled the key loop, and the fused window-16 forward went from 114 registers to
138. Compiled offline for sm_90 with Triton 3.9 (``python tests/aot_compile.py --report``:
registers and stack of each cubin), at head_dim 32 the fp16/bf16 forward uses 90-128 registers per
thread and the backward 129-253, none of them spilling (V1 and V2, core and fused, real batches,
window 7, padded maps; a test keeps it so), and none with Triton 3.6 either. The V2 backward had
spilled 16-120 bytes until the additive tile, V2's per-row logit-scale sums and the padded tokens'
sums stopped being carried across a program's images. fp32 with exact products (3xTF32) takes
32 x 32 tiles (``EXACT_FP32_TILE``: at 64 x 64 the backward spilled up to 1 KB, 1.7 KB with
Triton 3.6), the forward too, so that both compute
the same logits. The first thing to tune on a GPU is
occupancy (warps, GROUP) against these numbers.

Saved for backward: the per-row log-sum-exp only (base 2, ``[B*nW, heads, N]`` fp32); the
``N x N`` probabilities are recomputed.

Bias gradient. ``dbias[h] = sum over windows of dS``. Each backward program sums ``dS`` over its
``GROUP`` windows in fp32 registers and writes one ``[N, N]`` partial, ``partial[g, h]``; torch sums
the ``nW * ceil(B / GROUP)`` partials of each head. Chosen over one ``tl.atomic_add`` per element
per program: every program of a head would hit the same ``N*N`` addresses (Swin-T stage 1, B=128,
GROUP=1: 8192 windows -> 8192 atomics per address, serialised in L2) and the sum order would
change from run to run. The partials are deterministic and cost ``N / (4 * GROUP * d)`` of the
minimum bytes to write and as much to read back (GROUP=15 at N=49, d=32: 2.6% each; Swin-T
stage 4, where few windows share a head and GROUP stays small to keep the GPU busy: 6.6%). Where
they would pass 10% (large N, few windows: Swin-B 384 stage 4) fewer slots are used, each shared
by a few programs through ``tl.atomic_add`` (``dbias_slots``); only then is the sum order
run-dependent.
For ``N > 64`` the tile of one program no longer holds ``dS``; partials and dq (which sums over key
blocks) are then accumulated with uncontended ``tl.atomic_add`` into fp32 buffers owned by the
program (no two programs touch the same element of ``dq``; a partial slot belongs to one program).
In the fused layout the zero-padded tokens' dk/dv (their part of the qkv-bias gradient) are summed
per window and written as one ``[2, d]`` partial per (window, head), which torch sums: no atomics,
and nothing carried across a program's images. Where the image needs no padding (whole windows:
Swin-T at 224, Swin V2 at 256) the launchers pass no qkv bias at all, and the kernels are built
without the padded-token code.

Determinism. Forward and backward give bitwise-identical results from run to run, except where
shared dbias slots are used (large N with few windows, above): where three or more programs add
into one slot the order varies (two adding into a zeroed slot commute exactly). ``torch.use_deterministic_algorithms(True)`` turns the sharing
off (one slot per program, at the partials' extra memory traffic). The other atomics (dq and the
partials for N > 64) add into addresses that only one program touches, in its loop order.

Bytes model (minimum traffic, T = B*nW * heads * N * d * itemsize; bias ``heads*N*N`` and mask
``nW*N*N`` are small and come from L2; with one tile per window a program loads its head's bias
tile once for all its windows, except V2's backward, once per window, from L1/L2):
    forward   reads q, k, v, writes o                         4T (+ lse: 4 bytes per row)
    backward  reads q, k, v, do (+ lse), writes dq, dk, dv     7T (+ dbias partials, see above)
              softmax's backward needs delta = rowsum(P * dP) per query row, which equals
              rowsum(O * dO). With one tile per window (N <= 64) the program has the whole row of
              P and dP in registers and takes the first (the form autograd itself uses), so O is
              never read; for larger N it reads O: 8T.
Eager PyTorch writes and reads the ``[B*nW, heads, N, N]`` scores several times over (N/d = 1.5
times T per pass at N=49, d=32), and the Swin block adds rolled and partitioned copies of x and
of the attention output, which the fused layout never writes.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .utils import LOG2E, LOG2E_F, cdiv, dot, dot_switches, fp32_matmul_allows_tf32, launch, next_pow2

# Largest padded N whose full score tile one program holds; beyond it, 64 x 64 tiles.
SINGLE_TILE_MAX_N = 64
TILE = 64


@triton.jit
def _tokens(w, idx, N, nW, nWw, H, W, Rh, Rw, shift_h, shift_w, WS: tl.constexpr, FUSED: tl.constexpr):
    """(token, in_image, region label) of in-window indices ``idx`` of window ``w``.

    core: token = idx, in_image = idx < N. fused: token = (b * H + y) * W + x, the image position
    the token reads and writes; in_image is False for padded positions and for idx >= N; the
    label is 3 * region(ph) + region(pw) of the rolled padded coordinate.

    ``Rh, Rw``: the extent the roll wraps around. Padding first, then rolling (the original Swin
    code, torchvision): the padded size, ``y = (ph + shift) % Hp``, padded where ``y >= H``.
    Rolling first, then padding (timm): the image size, ``y = (ph + shift) % H`` for ``ph < H``,
    padded where ``ph >= H``. One formula covers both: inside = ph < Rh and y < H."""
    valid = idx < N
    if FUSED:
        b = w // nW
        wi = w % nW
        ph = (wi // nWw) * WS + idx // WS
        pw = (wi % nWw) * WS + idx % WS
        y = (ph + shift_h) % Rh
        x = (pw + shift_w) % Rw
        inside = valid & (ph < Rh) & (pw < Rw) & (y < H) & (x < W)
        tok = (b * H + y) * W + x
        Hp = (nW // nWw) * WS   # the padded size, which the shift mask's regions are taken on
        Wp = nWw * WS
        # With no shift along an axis every window lies in one region along it: no mask there.
        label = ((ph >= Hp - WS).to(tl.int32) + (ph >= Hp - shift_h).to(tl.int32)) * 3 \
            + (pw >= Wp - WS).to(tl.int32) + (pw >= Wp - shift_w).to(tl.int32)
    else:
        tok = idx.to(tl.int64)
        inside = valid
        label = idx
    return tok, inside, label


@triton.jit
def _row_offsets(w, h, tok, cols_d, s_b, s_h, s_n):
    return w * s_b + h * s_h + tok[:, None] * s_n + cols_d[None, :]


@triton.jit
def _load_rows(ptr, w, h, tok, rows_ok, cols_d, d_ok, s_b, s_h, s_n):
    offs = _row_offsets(w, h, tok, cols_d, s_b, s_h, s_n)
    return tl.load(ptr + offs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _with_pad_value(x, rows_ok, inside, qkvb_ptr, sel_off, cols_d, d_ok, HAS_QKV_BIAS: tl.constexpr):
    # A zero-padded token's q/k/v is the qkv bias (zero without one: the masked load already gave 0).
    if HAS_QKV_BIAS:
        b = tl.load(qkvb_ptr + sel_off + cols_d, mask=d_ok, other=0.0).to(x.dtype)
        x = tl.where((rows_ok & ~inside)[:, None], b[None, :], x)
    return x


@triton.jit
def _additive(bias_ptr, mask_ptr, h, j, rows, cols, lab_q, lab_k, N, mask_value,
              HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, FUSED: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr):
    """``(bias[h] + mask[j]) * log2(e)`` on a ``[BM, BN]`` tile, fp32, -inf in padded key columns.
    It depends on the head and on the window's place ``j`` in its image only, not on the image."""
    ok = (rows < N)[:, None] & (cols < N)[None, :]
    t = tl.zeros([BM, BN], dtype=tl.float32)
    if HAS_BIAS:
        t += tl.load(bias_ptr + h * N * N + rows[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        if FUSED:
            t += tl.where(lab_q[:, None] != lab_k[None, :], mask_value, 0.0)
        else:
            t += tl.load(mask_ptr + j * N * N + rows[:, None] * N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    return tl.where((cols < N)[None, :], t * LOG2E, float("-inf"))


@triton.jit
def _load_kv(k_ptr, v_ptr, qkvb_ptr, w, h, cols, cols_d, d_ok, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
             N, nW, nWw, H, W, Rh, Rw, shift_h, shift_w, C,
             D: tl.constexpr, WS: tl.constexpr, FUSED: tl.constexpr, HAS_QKV_BIAS: tl.constexpr):
    """Key and value rows ``cols`` of window ``w``, head ``h`` (padded tokens of the fused path get
    the qkv bias), with their token offsets, in-image flags and region labels."""
    tok_k, in_k, lab_k = _tokens(w, cols, N, nW, nWw, H, W, Rh, Rw, shift_h, shift_w, WS, FUSED)
    k = _load_rows(k_ptr, w, h, tok_k, in_k, cols_d, d_ok, sk_b, sk_h, sk_n)
    v = _load_rows(v_ptr, w, h, tok_k, in_k, cols_d, d_ok, sv_b, sv_h, sv_n)
    if FUSED:
        k = _with_pad_value(k, cols < N, in_k, qkvb_ptr, C + h * D, cols_d, d_ok, HAS_QKV_BIAS)
        v = _with_pad_value(v, cols < N, in_k, qkvb_ptr, 2 * C + h * D, cols_d, d_ok, HAS_QKV_BIAS)
    return tok_k, in_k, lab_k, k, v


@triton.jit
def _place_additive(bias_ptr, mask_ptr, h, j, rows, cols, N, nW, nWw, H, W, Rh, Rw, shift_h, shift_w, mask_value,
                    WS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, FUSED: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """bias[h] + mask of window place j over the (rows, cols) tile: the same for every image, so a
    program that holds whole windows builds it once."""
    lab_r = _tokens(j, rows, N, nW, nWw, H, W, Rh, Rw, shift_h, shift_w, WS, FUSED)[2]
    lab_c = _tokens(j, cols, N, nW, nWw, H, W, Rh, Rw, shift_h, shift_w, WS, FUSED)[2]
    return _additive(bias_ptr, mask_ptr, h, j, rows, cols, lab_r, lab_c, N, mask_value,
                     HAS_BIAS, HAS_MASK, FUSED, BLOCK_M, BLOCK_N)


@triton.jit
def _unit_rows(x, eps):
    """Cosine attention's normalisation, ``x / max(||x||, eps)`` per row as ``F.normalize``: the
    norms in fp32, the rows back in x's dtype (the dot's operand). Also returns the fp32 factor
    ``1 / max(||x||, eps)`` and whether the norm reached eps (else the clamp is active and the
    backward has no projection term)."""
    xf = x.to(tl.float32)
    norm = tl.sqrt_rn(tl.sum(xf * xf, axis=1))
    r = 1.0 / tl.maximum(norm, eps)
    return (xf * r[:, None]).to(x.dtype), r, norm >= eps


@triton.jit
def _unit_rows_grad(x_hat, r, unclamped, g_hat):
    """The gradient through ``_unit_rows``: for x^ = x / ||x||, ``dx = (dx^ - x^ (x^ . dx^)) / ||x||``;
    where the norm was clamped at eps, x^ = x / eps and ``dx = dx^ / eps``. Linear in ``g_hat`` (so
    it applies to each key tile's share of dq). Returns (dx, x^ . dx^ per row)."""
    xf = x_hat.to(tl.float32)
    proj = tl.sum(xf * g_hat, axis=1)
    return r[:, None] * (g_hat - tl.where(unclamped, proj, 0.0)[:, None] * xf), proj


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, bias_ptr, mask_ptr, qkvb_ptr, hs_ptr,
                sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                num_images, N, nW, nWw, H, W, Rh, Rw, shift_h, shift_w, C, qk_scale, mask_value, eps,
                HEADS: tl.constexpr, D: tl.constexpr, WS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, FUSED: tl.constexpr,
                HAS_QKV_BIAS: tl.constexpr, SINGLE: tl.constexpr, COSINE: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Program (head h, window place j, images first .. first + GROUP - 1, query block).
    pid = tl.program_id(0)
    if FUSED and SINGLE:
        N = WS * WS   # a constant: the compiler folds the masks of padded rows and columns (registers)
    h = pid % HEADS
    if COSINE:  # Swin V2: unit q and k rows, the head's own scale exp(min(logit_scale, log 100))
        qk_scale = tl.load(hs_ptr + h) * LOG2E
    rest = pid // HEADS
    j = rest % nW
    first = (rest // nW) * GROUP
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < D
    if SINGLE:  # one tile per window: bias + mask are the same for all the program's windows
        cols = tl.arange(0, BLOCK_N)
        add = _place_additive(bias_ptr, mask_ptr, h, j, rows, cols, N, nW, nWw, H, W, Rh, Rw, shift_h, shift_w,
                              mask_value,
                              WS, HAS_BIAS, HAS_MASK, FUSED, BLOCK_M, BLOCK_N)
    # The program's images: a loop whose trip count is known on entry (no per-image branch), so
    # that with num_stages=2 (``_stages``) Triton's pipeliner loads the next window's q, k
    # and v (cp.async into shared memory) while this one computes. With one tile per window the key
    # loop below has a single, constant trip and folds away, which leaves this the loop to pipeline.
    for i in range(0, tl.minimum(GROUP, num_images - first)):
        w = (first + i).to(tl.int64) * nW + j
        tok_q, in_q, lab_q = _tokens(w, rows, N, nW, nWw, H, W, Rh, Rw, shift_h, shift_w, WS, FUSED)
        q = _load_rows(q_ptr, w, h, tok_q, in_q, cols_d, d_ok, sq_b, sq_h, sq_n)
        if FUSED:
            q = _with_pad_value(q, rows < N, in_q, qkvb_ptr, h * D, cols_d, d_ok, HAS_QKV_BIAS)
        if COSINE:
            q = _unit_rows(q, eps)[0]
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, BLOCK_N if SINGLE else N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            tok_k, in_k, lab_k, k, v = _load_kv(k_ptr, v_ptr, qkvb_ptr, w, h, cols, cols_d, d_ok,
                                                sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                                                N, nW, nWw, H, W, Rh, Rw, shift_h, shift_w, C,
                                                D, WS, FUSED, HAS_QKV_BIAS)
            if COSINE:
                k = _unit_rows(k, eps)[0]
            if not SINGLE:
                add = _additive(bias_ptr, mask_ptr, h, j, rows, cols, lab_q, lab_k, N, mask_value,
                                HAS_BIAS, HAS_MASK, FUSED, BLOCK_M, BLOCK_N)
            # Scores in base-2 units: (q k^T * scale + bias + mask) * log2(e).
            s = dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale + add
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
            m_i = m_new
        o = acc / l_i[:, None]
        o_offs = _row_offsets(w, h, tok_q, cols_d, so_b, so_h, so_n)
        tl.store(o_ptr + o_offs, o.to(o_ptr.dtype.element_ty), mask=in_q[:, None] & d_ok[None, :])
        tl.store(lse_ptr + (w * HEADS + h) * N + rows, m_i + tl.log2(l_i), mask=rows < N)


@triton.jit
def _bwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, bias_ptr, mask_ptr, qkvb_ptr, hs_ptr,
                dq_ptr, dk_ptr, dv_ptr, dbias_ptr, dqkvb_ptr, dhs_ptr,
                sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                sdq_b, sdq_h, sdq_n, sd_b, sd_h, sd_n,
                num_images, N, nW, nWw, H, W, Rh, Rw, shift_h, shift_w, C, qk_scale, scale, mask_value, eps,
                num_slots,
                HEADS: tl.constexpr, D: tl.constexpr, WS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
                HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, SHARED_SLOTS: tl.constexpr,
                HAS_MASK: tl.constexpr,
                FUSED: tl.constexpr, HAS_QKV_BIAS: tl.constexpr, SINGLE: tl.constexpr, COSINE: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Program (head h, window place j, images first .. first + GROUP - 1); its dbias goes to partial
    # slot ``rest % num_slots`` (its own unless SHARED_SLOTS).
    pid = tl.program_id(0)
    if FUSED and SINGLE:
        N = WS * WS   # as in the forward
    h = pid % HEADS
    if COSINE:
        scale = tl.load(hs_ptr + h)
        qk_scale = scale * LOG2E
        # d scale_h = sum of dS * (q^ . k^) = sum over query rows of q^ . (dS @ k^); summed per
        # tile into one fp32 scalar (a per-row vector carried across the images cost registers)
        dhs_acc = 0.0
    rest = pid // HEADS
    j = rest % nW
    first = (rest // nW) * GROUP
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < D
    db_base = ((rest % num_slots).to(tl.int64) * HEADS + h) * N * N
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SINGLE:
        if not COSINE:
            # V1 keeps the program's additive tile in registers for all its images (as the forward)
            add = _place_additive(bias_ptr, mask_ptr, h, j, tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), N, nW,
                                  nWw, H, W, Rh, Rw, shift_h, shift_w, mask_value,
                                  WS, HAS_BIAS, HAS_MASK, FUSED, BLOCK_M, BLOCK_N)
    # V1: the images' loop has a trip count known on entry and nothing to check per image, and with
    # one tile per window the single-trip key and query loops below fold away, so that with
    # num_stages=2 (``_stages``) Triton's pipeliner loads the next window while this one computes,
    # as in the forward. V2 keeps a constant trip and the per-image check: built the V1 way, its
    # fused window-7 backward spilled 56 bytes (Triton 3.9).
    for i in range(0, GROUP if COSINE else tl.minimum(GROUP, num_images - first)):
        img = first + i
        if not COSINE or img < num_images:
            w = img.to(tl.int64) * nW + j
            lse_base = (w * HEADS + h) * N
            pad_base = (w * HEADS + h) * 2 * D
            if FUSED:
                if HAS_QKV_BIAS:
                    pad_dk = tl.zeros([BLOCK_D], dtype=tl.float32)
                    pad_dv = tl.zeros([BLOCK_D], dtype=tl.float32)
            for n0 in range(0, BLOCK_N if SINGLE and not COSINE else N, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                tok_k, in_k, lab_k, k, v = _load_kv(k_ptr, v_ptr, qkvb_ptr, w, h, cols, cols_d, d_ok,
                                                    sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                                                    N, nW, nWw, H, W, Rh, Rw, shift_h, shift_w, C,
                                                    D, WS, FUSED, HAS_QKV_BIAS)
                if COSINE:
                    k, r_k, unclamped_k = _unit_rows(k, eps)
                dk_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
                dv_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
                for m0 in range(0, BLOCK_M if SINGLE and not COSINE else N, BLOCK_M):
                    rows = m0 + tl.arange(0, BLOCK_M)
                    tok_q, in_q, lab_q = _tokens(w, rows, N, nW, nWw, H, W, Rh, Rw, shift_h, shift_w, WS, FUSED)
                    q = _load_rows(q_ptr, w, h, tok_q, in_q, cols_d, d_ok, sq_b, sq_h, sq_n)
                    if FUSED:
                        q = _with_pad_value(q, rows < N, in_q, qkvb_ptr, h * D, cols_d, d_ok, HAS_QKV_BIAS)
                    if COSINE:
                        q, r_q, unclamped_q = _unit_rows(q, eps)
                    # Cropped (padded) query tokens have no output, so do = 0 there and they add nothing.
                    do = _load_rows(do_ptr, w, h, tok_q, in_q, cols_d, d_ok, so_b, so_h, so_n)
                    if not SINGLE:
                        # delta = rowsum(P * dP) = rowsum(O * dO): the row's keys span several tiles
                        o = _load_rows(o_ptr, w, h, tok_q, in_q, cols_d, d_ok, so_b, so_h, so_n)
                        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
                    lse = tl.load(lse_ptr + lse_base + rows, mask=rows < N, other=0.0)
                    # The additive tile: cosine attention builds it again for every window (bias from
                    # L1/L2): held across the images beside dbias' accumulator and the cosine
                    # terms it made the V2 backward spill (see the module docstring).
                    if SINGLE:
                        if COSINE:
                            add = _place_additive(bias_ptr, mask_ptr, h, j, rows, cols, N, nW, nWw, H, W, Rh, Rw,
                                                  shift_h, shift_w, mask_value,
                                                  WS, HAS_BIAS, HAS_MASK, FUSED, BLOCK_M, BLOCK_N)
                    else:
                        add = _additive(bias_ptr, mask_ptr, h, j, rows, cols, lab_q, lab_k, N, mask_value,
                                        HAS_BIAS, HAS_MASK, FUSED, BLOCK_M, BLOCK_N)
                    s = dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale + add
                    tile_ok = (rows < N)[:, None] & (cols < N)[None, :]
                    p = tl.where(tile_ok, tl.exp2(s - lse[:, None]), 0.0)
                    if SINGLE:
                        if COSINE:
                            # Cosine attention's logits reach +-100 (144 in base 2), where the fp32
                            # lse carries up to 8e-6 of rounding: the recomputed row then sums to
                            # 1 + eps, and delta taken from it below puts eps * p * delta into every
                            # dS (x scale 100 in dq, dk and d scale). The row is whole here, so
                            # normalise it again (no-op in exact arithmetic).
                            row = tl.sum(p, axis=1)
                            p = p * tl.where(row > 0.0, 1.0 / row, 0.0)[:, None]
                    dv_acc += dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
                    dp = dot(do, tl.trans(v), PRECISION, UPCAST)
                    if SINGLE:
                        # the whole row is in this tile: softmax's backward as autograd has it,
                        # rowsum(P * dP), without reading O (one tensor less to load)
                        delta = tl.sum(p * dp, axis=1)
                    ds = p * (dp - delta[:, None])
                    if SINGLE:
                        if BIAS_GRAD:
                            db_acc += ds
                    ds_lo = ds.to(q.dtype)
                    dk_acc += dot(tl.trans(ds_lo), q, PRECISION, UPCAST)
                    if COSINE:
                        # this key tile's share of dq^ / scale, through the normalisation (linear),
                        # and of d scale_h = sum of dS * (q^ . k^) = q^ . (dS @ k^) per row
                        dq, proj = _unit_rows_grad(q, r_q, unclamped_q, dot(ds_lo, k, PRECISION, UPCAST))
                        dhs_acc += tl.sum(proj, axis=0)
                        dq = dq * scale
                    else:
                        dq = dot(ds_lo, k, PRECISION, UPCAST) * scale
                    dq_offs = _row_offsets(w, h, tok_q, cols_d, sdq_b, sdq_h, sdq_n)
                    q_ok = in_q[:, None] & d_ok[None, :]
                    if SINGLE:
                        tl.store(dq_ptr + dq_offs, dq.to(dq_ptr.dtype.element_ty), mask=q_ok)
                    else:
                        tl.atomic_add(dq_ptr + dq_offs, dq, mask=q_ok)
                        if BIAS_GRAD:
                            tl.atomic_add(dbias_ptr + db_base + rows[:, None] * N + cols[None, :], ds, mask=tile_ok)
                dk_acc = dk_acc * scale
                if COSINE:
                    dk_acc = _unit_rows_grad(k, r_k, unclamped_k, dk_acc)[0]
                d_offs = _row_offsets(w, h, tok_k, cols_d, sd_b, sd_h, sd_n)
                k_ok = in_k[:, None] & d_ok[None, :]
                tl.store(dk_ptr + d_offs, dk_acc.to(dk_ptr.dtype.element_ty), mask=k_ok)
                tl.store(dv_ptr + d_offs, dv_acc.to(dv_ptr.dtype.element_ty), mask=k_ok)
                if FUSED:
                    if HAS_QKV_BIAS:
                        pad = ((cols < N) & ~in_k)[:, None]
                        if SINGLE:   # the window's only key tile: written at once, nothing carried
                            tl.store(dqkvb_ptr + pad_base + cols_d, tl.sum(tl.where(pad, dk_acc, 0.0), axis=0),
                                     mask=d_ok)
                            tl.store(dqkvb_ptr + pad_base + D + cols_d, tl.sum(tl.where(pad, dv_acc, 0.0), axis=0),
                                     mask=d_ok)
                        else:
                            pad_dk += tl.sum(tl.where(pad, dk_acc, 0.0), axis=0)
                            pad_dv += tl.sum(tl.where(pad, dv_acc, 0.0), axis=0)
            if FUSED:
                if HAS_QKV_BIAS:
                    if not SINGLE:
                        # this window's part of the padded tokens' k/v-bias gradient: partial [w, h, 2, D]
                        tl.store(dqkvb_ptr + pad_base + cols_d, pad_dk, mask=d_ok)
                        tl.store(dqkvb_ptr + pad_base + D + cols_d, pad_dv, mask=d_ok)
    if COSINE:
        # this program's part of d scale_h, one slot per program: partial [rest, h], summed by the op
        tl.store(dhs_ptr + rest.to(tl.int64) * HEADS + h, dhs_acc)
    if SINGLE:
        if BIAS_GRAD:
            r = tl.arange(0, BLOCK_M)
            c = tl.arange(0, BLOCK_N)
            db_offs = db_base + r[:, None] * N + c[None, :]
            db_ok = (r < N)[:, None] & (c < N)[None, :]
            if SHARED_SLOTS:
                tl.atomic_add(dbias_ptr + db_offs, db_acc, mask=db_ok)
            else:
                tl.store(dbias_ptr + db_offs, db_acc, mask=db_ok)


# ------------------------------------------------------------------------------------------------
# Launchers. Tensors arrive checked (fastnote.ops.window_attention), and every buffer, outputs and
# scratch alike, comes allocated from the op, which sizes the scratch with ``backward_plan``. A
# layout is described by its ``Geometry``; strides are (window, head, token) triples.
# ------------------------------------------------------------------------------------------------

class Geometry(NamedTuple):
    """Where the windows of one launch are. The core layout uses only ``num_windows``, ``N`` and
    ``nW`` (the mask's windows per image); the fused layout all of it."""
    num_windows: int      # B * nW
    N: int                # tokens per window
    nW: int               # windows per image
    nWw: int = 1          # windows per image row (fused)
    H: int = 1            # image size (fused)
    W: int = 1
    Hp: int = 1           # padded to multiples of the window (fused)
    Wp: int = 1
    shift_h: int = 0      # cyclic shift per axis, after torchvision's rule (fused_geometry)
    shift_w: int = 0
    C: int = 0            # channels of the attention output (heads * d)
    window_size: int = 1
    roll_first: bool = False   # timm's order: roll the H x W map, then pad (else pad, then roll)

    @property
    def num_images(self) -> int:
        return self.num_windows // self.nW if self.nW else 0    # an empty map has no windows

    @property
    def masked(self) -> bool:
        return self.shift_h > 0 or self.shift_w > 0

    @property
    def padded(self) -> bool:
        """Whether the image is zero-padded up to whole windows (fused layout): only then do tokens
        take the qkv bias as their q/k/v, and the bias a gradient from them."""
        return self.Hp != self.H or self.Wp != self.W


def core_geometry(q: torch.Tensor, mask: Optional[torch.Tensor]) -> Geometry:
    B_, heads, N, d = q.shape
    return Geometry(num_windows=B_, N=N, nW=mask.shape[0] if mask is not None else 1, C=heads * d)


def fused_geometry(B: int, H: int, W: int, C: int, window_size: int, shift: int,
                   roll_first: bool = False) -> Geometry:
    """The fused layout of ``[B, H, W, C]`` attention outputs with square windows.

    H and W are zero-padded up to multiples of the window, after the roll (``roll_first``, timm's
    order) or before it (the original Swin code's and torchvision's). In the pad-first order the
    shift is dropped along an axis whose padded size the window covers (window >= padded size),
    as torchvision's ``shifted_window_attention`` does at every forward (the original Swin code
    decides the same when it builds such a block, by shrinking the window and zeroing the shift):
    rolling one window onto itself would only mask pairs that are neighbours in the image. timm
    makes that choice when it builds the block (its ``shift_size`` is then 0), so in its order the
    shift is taken as given."""
    ws = window_size
    Hp, Wp = cdiv(H, ws) * ws, cdiv(W, ws) * ws
    nW = (Hp // ws) * (Wp // ws)
    keep_h, keep_w = (True, True) if roll_first else (ws < Hp, ws < Wp)
    return Geometry(num_windows=B * nW, N=ws * ws, nW=nW, nWw=Wp // ws, H=H, W=W, Hp=Hp, Wp=Wp,
                    shift_h=shift if keep_h else 0, shift_w=shift if keep_w else 0, C=C, window_size=ws,
                    roll_first=roll_first)


def _geometry_args(g: Geometry) -> dict:
    """The kernels' runtime geometry arguments."""
    return dict(num_images=g.num_images, N=g.N, nW=g.nW, nWw=g.nWw, H=g.H, W=g.W,
                Rh=g.H if g.roll_first else g.Hp, Rw=g.W if g.roll_first else g.Wp,
                shift_h=g.shift_h, shift_w=g.shift_w, C=g.C)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def blocks(N: int, d: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_D, single_tile).

    64x64 tiles, except for wide heads, where the sm_90 build (Triton 3.9's compiler and ptxas)
    spills heavily with them: head_dim 128 in fp16/bf16 (backward 776 bytes of stack per thread,
    forward 48) takes 32x32 tiles (144 and 0 bytes); fp32 with head_dim >= 64 (exact fp32 dots
    on the FMA units; backward 6.7 KB at 64 and 9.6 KB at 128) takes 16x16 tiles (32 bytes and
    856). Chosen from that report (tests/aot_compile.py --report), not from timings. Swin's
    head_dim is 32 in every size, which keeps the 64x64 tiles."""
    bd = max(16, next_pow2(d))
    bn = max(16, next_pow2(N))
    tile = TILE
    if dtype == torch.float32 and bd >= 64:
        tile = 16
    elif bd >= 128:
        tile = 32
    if bn <= min(SINGLE_TILE_MAX_N, tile):
        return bn, bn, bd, True
    return tile, tile, bd, False


# The tile for fp32 with exact products (3xTF32 on a GPU: torch has not allowed TF32), forward and
# backward, where ``blocks`` chose larger ones; None keeps ``blocks``' choice.
# - The backward: each fp32 operand of a 3xTF32 dot is split in two, and at 64 x 64 (one tile per
#   window, or the tiled path for N > 64) the sm_90 backward spills 560-1024 bytes of stack per
#   thread with Triton 3.9 and 890-1700 with 3.6 (its SASS moves ~2.2 KB of local memory per
#   thread per window, ~10x the tensors' own traffic, and 256 threads x 1 KB does not fit beside
#   the kernel's shared memory in L1). At 32 x 32 it spills 104-328 bytes (Triton 3.9; at most 296
#   with 3.6), at 16 x 16 none; smaller tiles cost the tiled path's extra traffic (O read for
#   delta, dq through an fp32 buffer, dbias partials added into).
# - The forward takes the same tiles, so that the logits the backward recomputes are bitwise the
#   ones the forward normalised: a dot's rounding may depend on its tile's shape (numpy's, under
#   the interpreter, does), and at Swin V2's logits of +-100 one ulp of a logit is 5e-6 of its
#   probability. With the forward's 64 x 64 tile and the backward's 32 x 32, d logit_scale (a sum
#   that cancels heavily) came out with 4-10 units of fp32 roundoff times the sum of its terms'
#   magnitudes, against the fp32 reference's 0.1-1.9; with equal tiles, 0.8-3.1.
# 32 is chosen from the build report, not from a timing: benchmarks/window_attention.py times 64
# and 16 beside it (its "fastnote tile 64/16" providers set this), and the default should
# follow the GPU's numbers.
EXACT_FP32_TILE: Optional[int] = 32


def launch_blocks(N: int, d: int, dtype: torch.dtype):
    """The tiles a launch takes, forward and backward alike: ``blocks``', except for fp32 with
    exact products, whose tiles are at most ``EXACT_FP32_TILE`` (the tiled path then, even where
    a window would fit one)."""
    bm, bn, bd, single = blocks(N, d, dtype)
    tile = EXACT_FP32_TILE
    if tile is not None and dtype == torch.float32 and bn > tile and not fp32_matmul_allows_tf32():
        return tile, tile, bd, False
    return bm, bn, bd, single


def forward_group(num_images: int, nW: int, heads: int, N: int) -> int:
    # Images per program: enough programs to fill the GPU (~1024, 8 per SM on an H100) and no more;
    # tiny windows get several per program so each does >= ~64 query rows.
    fill = (num_images * nW * heads) // 1024
    return max(1, min(8, num_images, max(fill, 64 // max(N, 1))))


def backward_group(num_images: int, nW: int, heads: int, N: int, d: int) -> int:
    # The dbias partials cost N / (4 * GROUP * d) of the minimum bytes to write (and as much to read
    # back in the sum): aim at ~2.5% each, while keeping ~512 programs (the backward tile holds one
    # 8-warp program per SM at ~240 registers, so that is ~4 waves on an H100).
    want = min(16, (10 * N) // max(d, 1))
    fill = (num_images * nW * heads) // 512
    return max(1, min(want, fill, num_images))


def dbias_slots(programs_per_head: int, tensor_bytes: int, heads: int, N: int) -> int:
    # One partial per program (deterministic) unless the partials would pass ~10% of the minimum
    # backward traffic (8 * tensor_bytes): then fewer slots, each shared by several programs through
    # tl.atomic_add (a few programs per address; the summation order then varies run to run).
    cap = (8 * tensor_bytes // 10) // max(heads * N * N * 4, 1)
    return max(1, min(programs_per_head, cap))


class BackwardPlan(NamedTuple):
    """How a backward launch is split; the op allocates its scratch buffers from it."""
    group: int        # images per program
    programs: int     # programs per head
    slots: int        # dbias partial slots (== programs unless shared through atomics)
    single: bool      # one tile per window

    @property
    def shared(self) -> bool:
        return self.slots < self.programs

    @property
    def accumulated(self) -> bool:
        """Whether the dbias partials are added into (atomics: zero them first) rather than
        written whole, once per slot."""
        return self.shared or not self.single


def backward_plan(g: Geometry, heads: int, d: int, dtype: torch.dtype, deterministic: bool) -> BackwardPlan:
    """The backward's program split for geometry ``g``: a function of its arguments, torch's fp32
    setting and ``EXACT_FP32_TILE`` only, so the op (which allocates from it) and the
    launcher (which launches from it) agree. ``deterministic``: one dbias slot per program
    (``torch.are_deterministic_algorithms_enabled()``)."""
    single = launch_blocks(g.N, d, dtype)[3]
    group = backward_group(g.num_images, g.nW, heads, g.N, d)
    programs = cdiv(g.num_images, group) * g.nW
    tensor_bytes = g.num_windows * heads * g.N * d * dtype.itemsize
    slots = programs if deterministic else dbias_slots(programs, tensor_bytes, heads, g.N)
    return BackwardPlan(group=group, programs=programs, slots=slots, single=single)


def dbias_partial_shape(plan: BackwardPlan, heads: int, N: int):
    """fp32 partials of the bias gradient, summed over dim 0 by the op (zeroed first where
    ``plan.accumulated``)."""
    return (plan.slots, heads, N, N)


def scale_partial_shape(plan: BackwardPlan, heads: int):
    """Cosine attention: fp32 per-program sums of ``dS * (q^ . k^)``, the gradient of each head's
    scale; summed over dim 0 by the op (no atomics)."""
    return (plan.programs, heads)


def pad_partial_shape(g: Geometry, heads: int, d: int):
    """Fused layout with a qkv bias and padding (``g.padded``): fp32 per-window sums of the
    zero-padded tokens' dk and dv, written whole; summed over dim 0 by the op into the k and v
    parts of the qkv-bias gradient. Per window, not per program, so that the backward carries no
    sums across a program's images (registers): 8 bytes per channel and window, ``4 / (3 N)`` of a
    half-precision qkv (2% at N = 64)."""
    return (g.num_windows, heads, 2, d)


# F.normalize's default: cosine attention divides each q and k row by max(||row||, EPS).
EPS = 1e-12


def _fwd(*, q, k, v, q_strides, k_strides, v_strides, out, out_strides, lse, bias, mask, qkv_bias,
         geometry: Geometry, heads, d, scale, mask_value, fused, has_mask, head_scale=None):
    g = geometry
    if g.num_windows == 0 or g.N == 0:
        return
    bm, bn, bd, single = launch_blocks(g.N, d, q.dtype)
    group = forward_group(g.num_images, g.nW, heads, g.N)
    grid = (cdiv(g.num_images, group) * g.nW * heads, cdiv(g.N, bm))
    dummy = lse  # stands in for absent optional tensors (never read: their HAS_* flag is off)
    (sq_b, sq_h, sq_n), (sk_b, sk_h, sk_n), (sv_b, sv_h, sv_n), (so_b, so_h, so_n) = \
        q_strides, k_strides, v_strides, out_strides
    launch(_fwd_kernel, grid,
        q_ptr=q, k_ptr=k, v_ptr=v, o_ptr=out, lse_ptr=lse,
        bias_ptr=bias if bias is not None else dummy, mask_ptr=mask if mask is not None else dummy,
        qkvb_ptr=qkv_bias if qkv_bias is not None else dummy, hs_ptr=head_scale if head_scale is not None else dummy,
        sq_b=sq_b, sq_h=sq_h, sq_n=sq_n, sk_b=sk_b, sk_h=sk_h, sk_n=sk_n,
        sv_b=sv_b, sv_h=sv_h, sv_n=sv_n, so_b=so_b, so_h=so_h, so_n=so_n,
        **_geometry_args(g), qk_scale=scale * LOG2E_F, mask_value=mask_value, eps=EPS,
        HEADS=heads, D=d, WS=g.window_size, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, GROUP=group,
        HAS_BIAS=bias is not None, HAS_MASK=has_mask, FUSED=fused, HAS_QKV_BIAS=qkv_bias is not None,
        SINGLE=single, COSINE=head_scale is not None, **dot_switches(q.dtype, q.device),
        num_warps=8 if bm * bn >= 64 * 64 else 4, num_stages=_stages(q.dtype, single, head_scale is not None),
    )


def _bwd(*, q, k, v, q_strides, k_strides, v_strides, out, do, out_strides, lse, bias, mask,
         qkv_bias, dq, dq_strides, dk, dv, dkv_strides, dbias_partial, dpad_partial, geometry: Geometry, heads, d,
         scale, mask_value, fused, has_mask, head_scale=None, dscale_partial=None):
    """``dbias_partial``: None or fp32 ``dbias_partial_shape`` (zeroed where the plan accumulates);
    ``dpad_partial``: None or fp32 ``pad_partial_shape`` (fused layout, padded, with a qkv bias). Cosine
    attention (``head_scale`` fp32 [heads]): ``dscale_partial`` fp32 ``scale_partial_shape``, written
    whole."""
    g = geometry
    if g.num_windows == 0 or g.N == 0:
        return
    bm, bn, bd, single = launch_blocks(g.N, d, q.dtype)
    plan = backward_plan(g, heads, d, q.dtype, torch.are_deterministic_algorithms_enabled())
    slots = dbias_partial.shape[0] if dbias_partial is not None else plan.slots
    dummy = lse
    (sq_b, sq_h, sq_n), (sk_b, sk_h, sk_n), (sv_b, sv_h, sv_n), (so_b, so_h, so_n) = \
        q_strides, k_strides, v_strides, out_strides
    (sdq_b, sdq_h, sdq_n), (sd_b, sd_h, sd_n) = dq_strides, dkv_strides
    switches = dot_switches(q.dtype, q.device)
    launch(_bwd_kernel, (plan.programs * heads,),
        q_ptr=q, k_ptr=k, v_ptr=v, o_ptr=out, do_ptr=do, lse_ptr=lse,
        bias_ptr=bias if bias is not None else dummy, mask_ptr=mask if mask is not None else dummy,
        qkvb_ptr=qkv_bias if qkv_bias is not None else dummy,
        dq_ptr=dq, dk_ptr=dk, dv_ptr=dv, dbias_ptr=dbias_partial if dbias_partial is not None else dummy,
        dqkvb_ptr=dpad_partial if dpad_partial is not None else dummy,
        hs_ptr=head_scale if head_scale is not None else dummy,
        dhs_ptr=dscale_partial if dscale_partial is not None else dummy,
        sq_b=sq_b, sq_h=sq_h, sq_n=sq_n, sk_b=sk_b, sk_h=sk_h, sk_n=sk_n,
        sv_b=sv_b, sv_h=sv_h, sv_n=sv_n, so_b=so_b, so_h=so_h, so_n=so_n,
        sdq_b=sdq_b, sdq_h=sdq_h, sdq_n=sdq_n, sd_b=sd_b, sd_h=sd_h, sd_n=sd_n,
        **_geometry_args(g), qk_scale=scale * LOG2E_F, scale=scale, mask_value=mask_value, eps=EPS, num_slots=slots,
        HEADS=heads, D=d, WS=g.window_size, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, GROUP=plan.group,
        HAS_BIAS=bias is not None, BIAS_GRAD=dbias_partial is not None, SHARED_SLOTS=slots < plan.programs,
        HAS_MASK=has_mask, FUSED=fused, HAS_QKV_BIAS=qkv_bias is not None and dpad_partial is not None,
        SINGLE=single, COSINE=head_scale is not None, **switches, num_warps=_backward_warps(bm, bn, switches),
        num_stages=_stages(q.dtype, single, head_scale is not None),
    )


# Whether the fp16/bf16 V1 kernels with one tile per window are software-pipelined over their
# program's windows (``_stages``); False builds them as before, with one stage.
# benchmarks/window_attention.py times both ("fastnote one stage").
PIPELINED = True


def _stages(dtype: torch.dtype, single: bool, cosine: bool) -> int:
    """``num_stages`` of both kernels: 2 for V1 in fp16/bf16 with one tile per window, else 1.

    With 2, Triton's pipeliner issues the loads of the program's next window (q, k and v, and the
    backward's dO and lse: cp.async into shared memory) before this window's dots and softmax,
    so that a program no longer waits a whole memory latency per window: with two programs per SM
    in the forward and one in the backward, little else hides it. Built for sm_90 (Triton 3.9;
    3.6 in parentheses), Swin-T stage 1 (real batches, window 7):

    - forward: the core 118 -> 121 registers (127 -> 115), the fused block 126 -> 111
      (125 -> 128): two 8-warp programs per SM, as before; 12 KB more shared memory.
    - backward: the core 218 -> 244 (246 -> 240), the fused block 226 -> 236 (221 -> 226): one
      program per SM, as before; 16 KB more shared memory. No stack either way.

    Elsewhere a second stage cost occupancy or spilled: the tiled path (N > 64, where it pipelines
    the key loop) went to 130 registers in the bf16 forward and spilled 144 bytes in the head_dim
    128 backward; Swin V2's cosine attention went to 140-186 registers in the forward (one program
    per SM) and spilled 16-56 bytes in the backward; fp32's 3xTF32 products reached 255 registers
    with stack. Those keep one stage."""
    if not PIPELINED or not single or cosine or dtype not in (torch.float16, torch.bfloat16):
        return 1
    return 2


def _backward_warps(bm: int, bn: int, switches: dict) -> int:
    """8 warps for 64 x 64 tiles (4 below), 16 for exact (IEEE) fp32 dots at 64 x 64: built as the
    JIT specialises Swin-T stage 1's core launch (GROUP 15), the IEEE fp32 backward got 32
    registers and 4.8 KB of stack per thread from ptxas at 8 warps (8.5 KB at 4), 440 bytes at 16;
    the 3xTF32 one (split operands, three products) 632-992 bytes at 8 warps but 2128 at 16 (3224
    with Triton 3.6), so it keeps 8."""
    if bm * bn < 64 * 64:
        return 4
    return 16 if switches["PRECISION"] == "ieee" else 8


# Public launchers: keyword-only, the op's arguments in its order, then the buffers it allocated.

def forward(*, q, k, v, bias, mask, scale: float, out, lse, head_scale=None):
    """Core layout. q, k, v [B_, heads, N, d] with unit last stride; bias [heads, N, N] and mask
    [nW, N, N] contiguous or None; out [B_, heads, N, d] and lse [B_, heads, N] fp32, contiguous.
    ``head_scale``: Swin V2's cosine attention (the kernels' COSINE): fp32 [heads],
    exp(min(logit_scale, log 100)), read by the kernels (no host sync), multiplying q^ k^T with
    q^, k^ the rows over max(||row||, 1e-12); ``scale`` is then 1."""
    _, heads, N, d = q.shape
    _fwd(q=q, k=k, v=v, q_strides=_strides(q), k_strides=_strides(k), v_strides=_strides(v),
         out=out, out_strides=_strides(out), lse=lse, bias=bias, mask=mask, qkv_bias=None,
         geometry=core_geometry(q, mask), heads=heads, d=d, scale=scale, mask_value=0.0,
         fused=False, has_mask=mask is not None, head_scale=head_scale)


def backward(*, do, q, k, v, out, lse, bias, mask, scale: float, dq, dk, dv, dbias_partial, head_scale=None,
             dscale_partial=None):
    """Core layout; do and out contiguous like ``out``; dk, dv [B_, heads, N, d] (any strides with
    a unit last one). dq: the output itself where the plan has one tile per window, else an fp32
    zeroed buffer the key tiles add into. ``dbias_partial``: None (no bias gradient) or fp32
    ``dbias_partial_shape``. With ``head_scale`` (cosine attention), ``dscale_partial`` fp32
    ``scale_partial_shape`` receives the per-program parts of d head_scale."""
    _, heads, N, d = q.shape
    _bwd(q=q, k=k, v=v, q_strides=_strides(q), k_strides=_strides(k), v_strides=_strides(v),
         out=out, do=do, out_strides=_strides(out), lse=lse, bias=bias, mask=mask, qkv_bias=None,
         dq=dq, dq_strides=_strides(dq), dk=dk, dv=dv, dkv_strides=_strides(dk),
         dbias_partial=dbias_partial, dpad_partial=None, geometry=core_geometry(q, mask), heads=heads,
         d=d, scale=scale, mask_value=0.0, fused=False, has_mask=mask is not None, head_scale=head_scale,
         dscale_partial=dscale_partial)


def fused_forward(*, qkv, qkv_bias, bias, window_size: int, num_heads: int, shift_size: int, scale: float,
                  mask_value: float, roll_first: bool, out, lse, head_scale=None):
    """Fused layout. qkv [B, H, W, 3C] contiguous, qkv_bias [3C] (q/k/v of padded tokens; not
    passed to the kernel where nothing is padded, which then builds without that code) or None,
    bias [heads, N, N] contiguous or None; out [B, H, W, C] and lse [B*nW, heads, N] fp32."""
    B, H, W, C3 = qkv.shape
    g = fused_geometry(B, H, W, C3 // 3, window_size, shift_size, roll_first)
    C, d = g.C, g.C // num_heads
    qkv_strides = (0, d, 3 * C)   # (window: the token index carries the image, head, token)
    _fwd(q=qkv, k=qkv[..., C:], v=qkv[..., 2 * C:], q_strides=qkv_strides, k_strides=qkv_strides,
         v_strides=qkv_strides, out=out, out_strides=(0, d, C), lse=lse, bias=bias, mask=None,
         qkv_bias=qkv_bias if g.padded else None, geometry=g, heads=num_heads, d=d, scale=scale, mask_value=mask_value,
         fused=True, has_mask=g.masked, head_scale=head_scale)


def fused_backward(*, do, qkv, qkv_bias, bias, out, lse, window_size: int, num_heads: int, shift_size: int,
                   scale: float, mask_value: float, roll_first: bool, dqkv, dq, dbias_partial, dpad_partial,
                   head_scale=None, dscale_partial=None):
    """dqkv [B, H, W, 3C]: its k and v parts written whole, and its q part too when ``dq`` is None
    (one tile per window); else ``dq`` is an fp32 zeroed [B, H, W, C] buffer the key tiles add
    into. ``dbias_partial``: None or fp32 ``dbias_partial_shape``; ``dpad_partial``: None or fp32
    ``pad_partial_shape`` (with a qkv bias and padding, ``geometry.padded``: the padded tokens' dk, dv
    per window; must be None where nothing is padded)."""
    B, H, W, C3 = qkv.shape
    g = fused_geometry(B, H, W, C3 // 3, window_size, shift_size, roll_first)
    C, d = g.C, g.C // num_heads
    qkv_strides = (0, d, 3 * C)
    dq_buf, dq_strides = (dqkv, qkv_strides) if dq is None else (dq, (0, d, C))
    _bwd(q=qkv, k=qkv[..., C:], v=qkv[..., 2 * C:], q_strides=qkv_strides, k_strides=qkv_strides,
         v_strides=qkv_strides, out=out, do=do, out_strides=(0, d, C), lse=lse, bias=bias, mask=None,
         qkv_bias=qkv_bias if g.padded else None, dq=dq_buf, dq_strides=dq_strides, dk=dqkv[..., C:], dv=dqkv[..., 2 * C:],
         dkv_strides=qkv_strides, dbias_partial=dbias_partial, dpad_partial=dpad_partial, geometry=g,
         heads=num_heads, d=d, scale=scale, mask_value=mask_value, fused=True, has_mask=g.masked,
         head_scale=head_scale, dscale_partial=dscale_partial)
