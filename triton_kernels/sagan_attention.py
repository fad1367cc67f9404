"""SAGAN self-attention, flash style (docs/ops.md section 5.1), in SAGAN's channels-first layout.

q [B, d_qk, N], k [B, d_qk, N_k], v [B, d_v, N_k]; P = softmax(q^T k) (no 1/sqrt(d) scaling),
O = v P^T [B, d_v, N], out = gamma * O + x. Nothing of size N * N_k ever reaches memory.

forward   ``_forward_kernel``, grid (batch x query tile, d_v tile). Each program streams the key
          tiles with an online softmax (running max and sum in fp32) and accumulates its
          [BLOCK_M, BLOCK_DV] slice of O; the epilogue writes gamma * O + x straight into
          [B, d_v, N] (and O itself in fp32, which backward needs for r below), plus the per-row
          log-sum-exp [B, N] fp32 (from the d_v tile 0 programs only).
          Why a grid over d_v tiles rather than a loop: the accumulator stays in registers at
          d_v = 512, the programs need no synchronisation, and the price -- q^T k and the exps
          recomputed once per d_v tile -- is small for SAGAN, where d_qk = d_v / 8: with fp16/bf16
          d_v <= 128 is a single tile, and d_v = 512 takes 4 tiles, about 1.3x the minimum
          matmul FLOPs.
backward  all gradients are computed for the attention O with upstream dO = dOut, then scaled
          by gamma in the epilogues (dO_attn = gamma * dOut and D = gamma * r factor out of
          dS = P * (dP - D)).
          ``_preprocess_kernel``: r[b, n] = sum_c dOut[b, c, n] * O[b, c, n] (fp32);
          gamma's gradient is sum(r), and D = gamma * r.
          ``_dkdv_kernel``, grid (batch x key tile, d_v tile): each program owns a block of keys
          and loops over all queries, recomputing P^T from q, k and the log-sum-exp, and
          accumulates dv = P^T dO for its d_v tile; the d_v tile 0 programs also compute
          dP^T = v^T dO over all of d_v (a loop over d_v chunks) and dk = dS^T q^T. When d_v fits
          one tile (SAGAN up to C = 128 in fp16/bf16) this is one fused launch; otherwise a second
          launch of the same kernel, without dk, covers the remaining d_v tiles.
          ``_dq_kernel``, grid (batch x query tile): loops over key tiles, dq = dS k^T.
          No atomics: every output element is written by exactly one program.

All accumulation is fp32; P and dS are cast to the input dtype before their matmuls (as flash
attention does), so fp16/bf16 inputs use the tensor cores. Logits are never scaled or
exponentiated before the running max is subtracted, so unscaled SAGAN logits of any size stay
finite in every dtype. Offsets: the batch offset and each program's first value channel (the
products that pass 2^31 first: d_v * N elements in one image) are int64 scalars; offsets within a
tile stay int32, which keeps the address arithmetic of the [BLOCK, BLOCK] tiles in 32-bit
registers (int64 tile offsets cost the fp16/bf16 forward 150 bytes of spills at sm_90). So a
tensor of any size is addressed in place, provided one image's q, k and one d_v tile (128
channels) span fewer than 2^31 elements, i.e. N below 16M positions; ``check_sizes`` raises
beyond that. The batch is folded into grid axis 0 with the tiles, so it has no 65,535 limit.
"""
from __future__ import annotations

import functools
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .utils import MIN_DOT, PlanCache, cdiv, dot, dot_key, launch, next_pow2, switches_for_key, tf32_key
MAX_BLOCK_DV = 128    # value channels per program, fp16/bf16 (tiles for each case: _config)
PREPROCESS_BLOCK_N = 128
PREPROCESS_BLOCK_C = 32


@triton.jit
def _batch_and_tile(n, BLOCK: tl.constexpr):
    """(batch entry as int64, tile index) of this program: grid axis 0 runs over batch x tiles,
    since axes 1 and 2 are limited to 65,535 and a batch is not."""
    pid = tl.program_id(0)
    tiles = tl.cdiv(n, BLOCK)
    return (pid // tiles).to(tl.int64), pid % tiles


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, x_ptr, gamma_ptr, out_ptr, o_ptr, lse_ptr,
                    N, NK, DQK, DV,
                    sq_b, sq_c, sq_n, sk_b, sk_c, sk_n, sv_b, sv_c, sv_n, sx_b, sx_c, sx_n,
                    HAS_RESIDUAL: tl.constexpr, STORE_O: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    b, pid_m = _batch_and_tile(N, BLOCK_M)
    pid_v = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    ch = tl.arange(0, BLOCK_D)
    ch_ok = ch < DQK
    v0 = pid_v.to(tl.int64) * BLOCK_DV      # this program's first value channel
    cv = tl.arange(0, BLOCK_DV)             # relative to v0
    cv_ok = cv < DV - pid_v * BLOCK_DV      # int32 masks: int64 vectors cost registers
    k_base = k_ptr + b * sk_b
    v_base = v_ptr + b * sv_b + v0 * sv_c

    # q^T tile [BLOCK_M, BLOCK_D]: query positions are q's last (contiguous) axis.
    qt = tl.load(q_ptr + b * sq_b + rows[:, None] * sq_n + ch[None, :] * sq_c,
                 mask=row_ok[:, None] & ch_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(0, NK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < NK
        kk = tl.load(k_base + ch[:, None] * sk_c + cols[None, :] * sk_n,
                     mask=ch_ok[:, None] & col_ok[None, :], other=0.0)
        s = dot(qt, kk, PRECISION, UPCAST)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        # Every tile holds at least one real key, so m_new is finite and no exp sees inf - inf.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + cols[:, None] * sv_n + cv[None, :] * sv_c,
                     mask=col_ok[:, None] & cv_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(vt.dtype), vt, PRECISION, UPCAST)
        m_i = m_new

    o = acc / l_i[:, None]
    # out, o: contiguous [B, DV, N], written transposed from the [query, channel] tile.
    base = (b * DV + v0) * N                # int64 scalar, added to the pointers first:
    offs = cv[None, :] * N + rows[:, None]  # the tile's offsets stay int32
    mask = row_ok[:, None] & cv_ok[None, :]
    y = o
    if HAS_RESIDUAL:
        gamma = tl.load(gamma_ptr).to(tl.float32)
        xt = tl.load(x_ptr + b * sx_b + v0 * sx_c + rows[:, None] * sx_n + cv[None, :] * sx_c, mask=mask, other=0.0)
        y = gamma * o + xt.to(tl.float32)
    tl.store(out_ptr + base + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    if STORE_O:
        tl.store(o_ptr + base + offs, o, mask=mask)
    if pid_v == 0:
        tl.store(lse_ptr + b * N + rows, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _preprocess_kernel(do_ptr, o_ptr, r_ptr, N, DV, sdo_b, sdo_c, sdo_n,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # r[b, n] = sum_c dOut[b, c, n] * O[b, c, n]; O contiguous [B, DV, N].
    b, pid_n = _batch_and_tile(N, BLOCK_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_C, BLOCK_N], tl.float32)
    do_base = do_ptr + b * sdo_b
    o_base = o_ptr + b * DV * N
    ch = tl.arange(0, BLOCK_C)
    for c0 in range(0, DV, BLOCK_C):
        mask = (ch < DV - c0)[:, None] & row_ok[None, :]
        do = tl.load(do_base + ch[:, None] * sdo_c + rows[None, :] * sdo_n, mask=mask, other=0.0)
        o = tl.load(o_base + ch[:, None] * N + rows[None, :], mask=mask, other=0.0)
        do_base += BLOCK_C * sdo_c   # pointers advance by whole chunks: channel offsets stay small
        o_base += BLOCK_C * N
        acc += do.to(tl.float32) * o.to(tl.float32)
    tl.store(r_ptr + b * N + rows, tl.sum(acc, 0), mask=row_ok)


@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, r_ptr, gamma_ptr, dk_ptr, dv_ptr,
                 N, NK, DQK, DV,
                 sq_b, sq_c, sq_n, sk_b, sk_c, sk_n, sv_b, sv_c, sv_n, sdo_b, sdo_c, sdo_n,
                 DV_TILE0, HAS_GAMMA: tl.constexpr, WITH_DK: tl.constexpr, SINGLE_DV: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # Works on the transposed problem: S^T [keys, queries] = k^T q, so each key block's dk, dv
    # rows stay in this program's registers. SINGLE_DV: all of d_v is this program's tile.
    b, pid_n = _batch_and_tile(NK, BLOCK_N)
    pid_v = tl.program_id(1) + DV_TILE0
    v0 = pid_v.to(tl.int64) * BLOCK_DV
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < NK
    ch = tl.arange(0, BLOCK_D)
    ch_ok = ch < DQK
    cv = tl.arange(0, BLOCK_DV)             # relative to v0
    cv_ok = cv < DV - pid_v * BLOCK_DV
    q_base = q_ptr + b * sq_b
    v_base = v_ptr + b * sv_b
    do_base = do_ptr + b * sdo_b
    v_tile = v_base + v0 * sv_c
    do_tile = do_base + v0 * sdo_c

    kt = tl.load(k_ptr + b * sk_b + cols[:, None] * sk_n + ch[None, :] * sk_c,
                 mask=col_ok[:, None] & ch_ok[None, :], other=0.0)
    if SINGLE_DV:
        vt = tl.load(v_tile + cols[:, None] * sv_n + cv[None, :] * sv_c,
                     mask=col_ok[:, None] & cv_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        qq = tl.load(q_base + ch[:, None] * sq_c + rows[None, :] * sq_n,
                     mask=ch_ok[:, None] & row_ok[None, :], other=0.0)
        # Padded query columns get lse = +inf, hence P^T = 0 there.
        lse = tl.load(lse_ptr + b * N + rows, mask=row_ok, other=float("inf"))
        # Padded key rows are never stored, but exp(0 - lse) may overflow there: keep them finite.
        st = dot(kt, qq, PRECISION, UPCAST) - lse[None, :]
        pt = tl.exp(tl.where(col_ok[:, None], st, float("-inf")))
        dout = tl.load(do_tile + cv[:, None] * sdo_c + rows[None, :] * sdo_n,
                       mask=cv_ok[:, None] & row_ok[None, :], other=0.0)
        dv += dot(pt.to(dout.dtype), tl.trans(dout), PRECISION, UPCAST)
        if WITH_DK:
            if SINGLE_DV:
                dpt = dot(vt, dout, PRECISION, UPCAST)
            else:
                dpt = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
                vc_ptr = v_base
                doc_ptr = do_base
                for c0 in range(0, DV, BLOCK_DV):
                    cc_ok = cv < DV - c0
                    vc = tl.load(vc_ptr + cols[:, None] * sv_n + cv[None, :] * sv_c,
                                 mask=col_ok[:, None] & cc_ok[None, :], other=0.0)
                    doc = tl.load(doc_ptr + cv[:, None] * sdo_c + rows[None, :] * sdo_n,
                                  mask=cc_ok[:, None] & row_ok[None, :], other=0.0)
                    dpt += dot(vc, doc, PRECISION, UPCAST)
                    vc_ptr += BLOCK_DV * sv_c
                    doc_ptr += BLOCK_DV * sdo_c
            r = tl.load(r_ptr + b * N + rows, mask=row_ok, other=0.0)
            dst = pt * (dpt - r[None, :])
            dk += dot(dst.to(qq.dtype), tl.trans(qq), PRECISION, UPCAST)

    gamma = 1.0
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr).to(tl.float32)
    # dk, dv: contiguous [B, DQK, NK] and [B, DV, NK].
    tl.store(dv_ptr + (b * DV + v0) * NK + (cv[None, :] * NK + cols[:, None]),
             (gamma * dv).to(dv_ptr.dtype.element_ty), mask=col_ok[:, None] & cv_ok[None, :])
    if WITH_DK:
        tl.store(dk_ptr + b * DQK * NK + ch[None, :] * NK + cols[:, None],
                 (gamma * dk).to(dk_ptr.dtype.element_ty), mask=col_ok[:, None] & ch_ok[None, :])


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, r_ptr, gamma_ptr, dq_ptr,
               N, NK, DQK, DV,
               sq_b, sq_c, sq_n, sk_b, sk_c, sk_n, sv_b, sv_c, sv_n, sdo_b, sdo_c, sdo_n,
               HAS_GAMMA: tl.constexpr, SINGLE_DV: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    b, pid_m = _batch_and_tile(N, BLOCK_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    ch = tl.arange(0, BLOCK_D)
    ch_ok = ch < DQK
    k_base = k_ptr + b * sk_b
    v_base = v_ptr + b * sv_b
    do_base = do_ptr + b * sdo_b

    qt = tl.load(q_ptr + b * sq_b + rows[:, None] * sq_n + ch[None, :] * sq_c,
                 mask=row_ok[:, None] & ch_ok[None, :], other=0.0)
    lse = tl.load(lse_ptr + b * N + rows, mask=row_ok, other=0.0)
    r = tl.load(r_ptr + b * N + rows, mask=row_ok, other=0.0)
    if SINGLE_DV:
        cv = tl.arange(0, BLOCK_DV)
        cv_ok = cv < DV
        dout = tl.load(do_base + rows[:, None] * sdo_n + cv[None, :] * sdo_c,
                       mask=row_ok[:, None] & cv_ok[None, :], other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, NK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < NK
        kk = tl.load(k_base + ch[:, None] * sk_c + cols[None, :] * sk_n,
                     mask=ch_ok[:, None] & col_ok[None, :], other=0.0)
        # Padded keys: logit 0 (k loads as 0), and exp(0 - lse) may overflow (all logits << 0).
        s = dot(qt, kk, PRECISION, UPCAST) - lse[:, None]
        p = tl.exp(tl.where(col_ok[None, :], s, float("-inf")))
        if SINGLE_DV:
            vv = tl.load(v_base + cv[:, None] * sv_c + cols[None, :] * sv_n,
                         mask=cv_ok[:, None] & col_ok[None, :], other=0.0)
            dp = dot(dout, vv, PRECISION, UPCAST)
        else:
            dp = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            cc = tl.arange(0, BLOCK_DV)
            doc_ptr = do_base
            vc_ptr = v_base
            for c0 in range(0, DV, BLOCK_DV):
                cc_ok = cc < DV - c0
                doc = tl.load(doc_ptr + rows[:, None] * sdo_n + cc[None, :] * sdo_c,
                              mask=row_ok[:, None] & cc_ok[None, :], other=0.0)
                vc = tl.load(vc_ptr + cc[:, None] * sv_c + cols[None, :] * sv_n,
                             mask=cc_ok[:, None] & col_ok[None, :], other=0.0)
                dp += dot(doc, vc, PRECISION, UPCAST)
                doc_ptr += BLOCK_DV * sdo_c
                vc_ptr += BLOCK_DV * sv_c
        ds = p * (dp - r[:, None])
        dq += dot(ds.to(kk.dtype), tl.trans(kk), PRECISION, UPCAST)

    gamma = 1.0
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr).to(tl.float32)
    # dq: contiguous [B, DQK, N].
    tl.store(dq_ptr + b * DQK * N + ch[None, :] * N + rows[:, None],
             (gamma * dq).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & ch_ok[None, :])


# ------------------------------------------------------------------------------------------------
# launchers

def _tile(n: int, cap: int) -> int:
    return min(max(next_pow2(n), MIN_DOT), cap)


# The backward's tiles. Each backward program owns a block of positions and streams the other
# side in steps: ``_dkdv_kernel`` owns keys and streams queries, ``_dq_kernel`` owns queries and
# streams keys. The owned block sets how often the streamed operands are read again (q and dO once
# per key block, k and v once per query block); the step sets only the granularity. "wide": in
# fp16/bf16, 128 owned by 32 streamed, as Triton's fused-attention tutorial tiles its backward; in
# fp32 64 owned by 16 streamed. "square": the tiles before, 64 x 64 in fp16/bf16; in fp32 the dk/dv
# program owned 32 keys and streamed 64 queries (wgmma wants 64 rows per warpgroup, so those dots
# were Ampere's mma.sync), the dq program 64 queries by 32 keys. Kept so that
# benchmarks/sagan_attention.py can time both on a GPU: the choice was made from the sm_90 build
# (registers, stack, matrix instructions, resident warps; table in _blocks), not from timings.
BACKWARD_TILES = "wide"


def _config(q: torch.Tensor, N: int, NK: int, DV: int, kernel: str) -> dict:
    """Tiles and warps of ``kernel`` ("forward", "dkdv" or "dq"), chosen so that ptxas for sm_90
    (compiled ahead of time with Triton 3.9) reports no register spills at SAGAN's (d_qk, d_v) =
    (8, 64) ... (64, 512), in fp16/bf16 and in fp32 with 3xTF32 or TF32 dots (which hold more
    registers: smaller tiles), and where it can, two programs per SM. Not yet tuned by timing on a
    GPU. One dict per shape and setting, shared: callers never change it."""
    return _cached_config(q.shape[1], N, NK, DV, kernel, BACKWARD_TILES, *dot_key(q.dtype, q.device))


@functools.lru_cache(maxsize=1024)
def _cached_config(d_qk: int, N: int, NK: int, DV: int, kernel: str, tiles: str, *key) -> dict:
    # the launchers' host time is paid on every call: one cached dict, not one built per call
    return dict(_blocks(key[0] == torch.float32, d_qk, N, NK, DV, kernel, tiles), **switches_for_key(*key))


def _blocks(fp32: bool, d_qk: int, N: int, NK: int, DV: int, kernel: str, tiles: str) -> tuple:
    """(BLOCK_M queries, BLOCK_N keys, ...) of one kernel; called once per configuration, through
    _cached_config. The backward's "wide" tiles against "square", from the sm_90 build with Triton
    3.9 of SAGAN's layer widths (registers a thread, and resident warps of 64 per SM where they
    change; dk/dv = the launch that also computes dk, "other" = its launch for the remaining d_v
    tiles):
      fp16/bf16  d_qk 8, d_v 64:    dk/dv 138 -> 124 (8 -> 16 warps), dq 110 -> 68 (16 -> 24)
      (16 warps from d_v 128)
                 d_qk 16, d_v 128:  dk/dv 176 -> 117 (8 -> 16), dq 106 -> 64 (16 -> 32)
                 d_qk 32, d_v 256:  dk/dv 172 -> 112 (8 -> 16), other 123 -> 74, dq 139 -> 112 (8 -> 16)
                 d_qk 64, d_v 512:  dk/dv 189 -> 118 (8 -> 16), other 124 -> 67, dq 146 -> 118 (8 -> 16)
      (on 8 warps the wide tiles took 160, 191 / 91 / 139 and 206 / 88 / 160 registers there)
      fp32, 3xTF32 (d_qk 8 / 32 / 64):  dk/dv 255 regs with 392 / 104 / 24 bytes of stack and
                 mma.sync -> 200 / 239 / 255 regs, no stack, wgmma; other 255 (24-64 bytes) ->
                 80 / 83 / 126 (8 -> 24 / 16 / 16 warps); dq 220 / 238 / 255 (112 bytes) ->
                 192 / 199 / 247, no stack
      fp32, TF32:  dk/dv 255 / 255 / 248 -> 128 / 126 / 180 (8 -> 16 / 16 / 8 warps); other
                 128 / 144 / 142 -> 58 / 56 / 60 (-> 32 warps); dq 174 / 182 / 202 -> 145 / 149 / 176
    No kernel keeps fewer warps resident or spills more with Triton 3.9, every fp16/bf16 one keeps
    at least 16, and each reads its streamed operands half as often (fp16/bf16; fp32's dk/dv). With
    Triton 3.6 the fp16/bf16 figures are within 10 registers of these (the d_qk 8 dk/dv 148 -> 128,
    so 8 -> 16 warps there too; d_v 128's dk/dv 126); its 3xTF32 dk/dv stack goes from 32 / 88 / 16
    bytes (mma.sync) to 0 / 0 / 192 (wgmma), its dq stack from 0 / 40 / 312 to 0 / 0 / 152."""
    if kernel == "forward":
        if fp32:
            block_m, block_n, max_dv, warps = 64, 32 if d_qk > 16 else 64, 64, 8
        else:
            block_m, block_n, max_dv, warps = 64, 64, MAX_BLOCK_DV, 4 if DV <= 64 else 8
    else:
        warps = 8
        if fp32:
            max_dv = 32
            if tiles == "square":
                owned, step = (32, 64) if kernel == "dkdv" else (64, 32)
            else:
                owned, step = 64, 16
        else:
            # d_v > one tile: 64-wide chunks keep dv, dk and the dP accumulators in registers
            max_dv = 64 if DV > MAX_BLOCK_DV else MAX_BLOCK_DV
            owned, step = (64, 64) if tiles == "square" else (128, 32)
            if tiles != "square" and DV > 64:
                warps = 16     # the accumulators of d_v >= 128 on 8 warps took 139-206 registers
        block_m, block_n = (step, owned) if kernel == "dkdv" else (owned, step)
    return (("BLOCK_M", _tile(N, block_m)), ("BLOCK_N", _tile(NK, block_n)),
            ("BLOCK_D", max(next_pow2(d_qk), MIN_DOT)), ("BLOCK_DV", _tile(DV, max_dv)), ("num_warps", warps))


def check_sizes(q: torch.Tensor, v: torch.Tensor) -> None:
    """The in-tile offsets are int32: one image's rows of q/k and a d_v tile of v, x, out must span
    fewer than 2^31 elements (positions times channel strides; met below 16M positions)."""
    N, NK = q.shape[2], v.shape[2]
    span = max(MAX_BLOCK_DV, q.shape[1]) * max(N, NK)
    if span >= 2**31:
        raise ValueError(f"sagan_attention supports up to {2**31 // max(MAX_BLOCK_DV, q.shape[1]):,} positions per "
                         f"image (the kernels' in-tile offsets are 32-bit), got N = {N:,}, N_k = {NK:,}")


class ForwardPlan(NamedTuple):
    """The forward launch of one (q, v) shape and setting: sizes, grid, and the keyword arguments
    (tiles, warps, dot switches) for each (HAS_RESIDUAL, STORE_O), built once."""
    B: int
    DQK: int
    N: int
    NK: int
    DV: int
    grid: Tuple[int, int]
    kwargs: Dict[Tuple[bool, bool], dict]


_PLANS = PlanCache()   # per (q's shape, v's shape, dtype, device, TF32 allowed, backward tiles)


def forward_plan(q: torch.Tensor, v: torch.Tensor) -> ForwardPlan:
    """The plan of ``forward`` for q [B, d_qk, N] and v [B, d_v, N_k]; raises ``check_sizes``'s
    error (once per shape: nothing is cached then)."""
    q_shape, v_shape, dtype, device = q.shape, v.shape, q.dtype, q.device
    key = (q_shape, v_shape, dtype, device, tf32_key(dtype), BACKWARD_TILES)
    plan = _PLANS.get(key)
    if plan is None:
        check_sizes(q, v)
        B, DQK, N = q_shape
        DV, NK = v_shape[1], v_shape[2]
        cfg = _config(q, max(N, 1), max(NK, 1), DV, "forward")
        kwargs = {(r, s): dict(HAS_RESIDUAL=r, STORE_O=s, num_stages=2, **cfg) for r in (False, True)
                  for s in (False, True)}
        plan = _PLANS.put(key, ForwardPlan(B, DQK, N, NK, DV, (B * cdiv(N, cfg["BLOCK_M"]), cdiv(DV, cfg["BLOCK_DV"])),
                                           kwargs))
    return plan


def forward(*, q, k, v, x, gamma, out, o, lse, plan: Optional[ForwardPlan] = None) -> None:
    """out = gamma * v softmax(q^T k)^T + x (or the attention output alone when x is None); o =
    the attention output O in fp32, or None where backward can read O from ``out`` (fp32 inputs
    without a residual); lse [B, N] fp32. q, k, v, x may be strided (a 4-D x [B, d_v, W, H] with
    mergeable W, H); out ([B, d_v, N] or x's 4-D shape), o, lse are contiguous; gamma a one-element
    tensor of any float dtype, or None when x is None. ``plan``: ``forward_plan(q, v)``, made
    here when not given."""
    if plan is None:
        plan = forward_plan(q, v)
    if plan.B == 0 or plan.N == 0:
        return
    has_res = x is not None
    # x [B, d_v, N], or [B, d_v, W, H] whose last two dimensions merge (stride(2) = H * stride(3))
    if has_res:
        xs = x.stride()
        if len(xs) == 4:
            xs = (xs[0], xs[1], xs[3])
    else:
        xs = (0, 0, 0)
    launch(_forward_kernel, plan.grid,
        q, k, v, x if has_res else q, gamma if has_res else lse, out, o if o is not None else lse, lse,
        plan.N, plan.NK, plan.DQK, plan.DV, *q.stride(), *k.stride(), *v.stride(), *xs,
        **plan.kwargs[has_res, o is not None],
    )


def backward(*, grad, q, k, v, o, lse, gamma, dq, dk, dv, r) -> None:
    """Gradients of out = gamma * O (+ x) for upstream ``grad`` [B, DV, N] (any strides): dq, dk,
    dv (contiguous, input dtype) and r[b, n] = sum_c grad * O (contiguous fp32 [B, N]; gamma's
    gradient is its sum). o: O, contiguous [B, DV, N] (fp32, or the fp32 output itself); gamma
    None means 1."""
    B, DQK, N = q.shape
    DV, NK = v.shape[1], v.shape[2]
    if B == 0:
        return
    if N:
        launch(_preprocess_kernel, (B * cdiv(N, PREPROCESS_BLOCK_N),),
            grad, o, r, N, DV, *grad.stride(), BLOCK_N=PREPROCESS_BLOCK_N, BLOCK_C=PREPROCESS_BLOCK_C,
            num_warps=4,
        )
    if NK == 0:
        return
    cfg = _config(q, max(N, 1), NK, DV, "dkdv")
    n_dv = cdiv(DV, cfg["BLOCK_DV"])
    has_gamma = gamma is not None
    args = (q, k, v, grad, lse, r, gamma if has_gamma else r, dk, dv, N, NK, DQK, DV,
            *q.stride(), *k.stride(), *v.stride(), *grad.stride())
    key_tiles = cdiv(NK, cfg["BLOCK_N"])
    launch(_dkdv_kernel, (B * key_tiles, 1), *args, 0, HAS_GAMMA=has_gamma, WITH_DK=True, SINGLE_DV=n_dv == 1,
           **cfg)
    if n_dv > 1:
        launch(_dkdv_kernel, (B * key_tiles, n_dv - 1), *args, 1, HAS_GAMMA=has_gamma, WITH_DK=False,
               SINGLE_DV=False, **cfg)
    if N:
        cfg = _config(q, N, NK, DV, "dq")     # the same BLOCK_DV, so the same SINGLE_DV
        launch(_dq_kernel, (B * cdiv(N, cfg["BLOCK_M"]),),
            q, k, v, grad, lse, r, gamma if has_gamma else r, dq, N, NK, DQK, DV,
            *q.stride(), *k.stride(), *v.stride(), *grad.stride(), HAS_GAMMA=has_gamma, SINGLE_DV=n_dv == 1,
            **cfg,
        )
