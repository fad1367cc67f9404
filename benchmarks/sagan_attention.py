"""SAGAN self-attention with its residual, out = gamma * v softmax(q^T k)^T + x, forward and backward.

Providers, all on the same q [B, C/8, N], k [B, C/8, N_k], v [B, C, N_k], x [B, C, N], gamma [1]
(the 1x1 convs are not timed):
  eager          SAGAN's Self_Attn.forward maths as written (bmm, softmax, bmm): materialises the
                 [B, N, N_k] energy and attention
  torch.compile  of that eager function
  sdpa           F.scaled_dot_product_attention(scale=1.0) on [B, 1, N, d] transposed copies; q and k
                 are zero-padded to v's width (exact: zero channels add nothing to q.k) so the fused
                 backends, which want one head dim, can take it; flash only up to d = 256
  fastnote       fastnote.sagan_attention (flash style; never writes the attention map)
  fastnote square tiles
                 the same op with the backward tiles it had before (``BACKWARD_TILES = "square"`` in
                 fastnote/triton_kernels/sagan_attention.py: 64 x 64 in bf16, each program owning
                 half the positions the default's do), bwd and both modes only: the default was
                 chosen from the sm_90 build (registers, spills, resident warps), and this
                 provider is the GPU's check of that choice

Shapes: SAGAN's attention layers at batch 64 -- generator 64x64 (N = 4096, C = 64) and 32x32
(C = 128), discriminator 32x32 (C = 256) and 16x16 (C = 512) -- plus a 128x128 map (N = 16384,
C = 64) at batch 64 too, where eager's fp32 energy and attention maps are 69 GB each (more than an
H200's 139 GB together, so eager is expected to run out of memory there; bf16 34 GB each); bf16 and
fp32.

FLOP model (matmuls only; softmax, exp and the recomputation in backward not counted):
  fwd   2 * B * N * N_k * (d_qk + d_v)          q^T k and v P^T
  bwd   2 * B * N * N_k * 2 * (d_qk + d_v)      dv, dP, dq, dk
  both  the sum
Bytes model (minimum traffic, s = itemsize; gamma is an fp32 [1], so the output and its gradient
are fp32 whatever the inputs' dtype, as torch promotes them):
  fwd   reads q, k, v, x (s), writes out (4 bytes)
  bwd   reads q, k, v (s) and dout (4), writes dq, dk, dv (s) and, for bf16 / fp16 inputs, dx
        (dout cast to x's dtype; in fp32 dx is dout itself, no bytes)
Compute-bound at the generator's layers and at 128x128 (TFLOP/s is the figure of merit there);
the discriminator's 16x16 layer in bf16 (N = 256, C = 512) is bandwidth-bound. Memory rows show
what O(N) memory buys.

    python benchmarks/sagan_attention.py [--smoke] [--out DIR] [--modes fwd,bwd,both] [--dtypes bf16,fp32]
"""
import torch
import torch.nn.functional as F

import fastnote
import harness
from fastnote.triton_kernels import sagan_attention as kernels
from harness import Benchmark, Case, Provider
from harness.modes import under_setting

BATCH = 64
# (label, C, W*H, N_k, batch)
LAYERS = [
    ("G 64x64", 64, 64 * 64, 64 * 64, BATCH),
    ("G 32x32", 128, 32 * 32, 32 * 32, BATCH),
    ("D 32x32", 256, 32 * 32, 32 * 32, BATCH),
    ("D 16x16", 512, 16 * 16, 16 * 16, BATCH),
    ("128x128", 64, 128 * 128, 128 * 128, BATCH),   # eager needs two [B, N, N] maps: 137 GB in fp32
]
SMOKE_LAYERS = [("smoke", 16, 7 * 7, 7 * 7, 2), ("smoke pooled", 24, 6 * 6, 3 * 3, 1)]


def _cases(layers, dtypes):
    return [Case("N", N, {"dtype": dtype, "layer": label, "B": B, "C": C, "N": N, "N_k": N_k})
            for dtype in dtypes for label, C, N, N_k, B in layers]


def make_inputs(case, device):
    cfg = case.config
    B, C, N, N_k = cfg["B"], cfg["C"], cfg["N"], cfg["N_k"]

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(case.dtype).requires_grad_()

    # logits of a few units: a softmax neither uniform nor one-hot
    return {"q": leaf(B, C // 8, N, scale=0.7), "k": leaf(B, C // 8, N_k, scale=0.7), "v": leaf(B, C, N_k),
            "x": leaf(B, C, N), "gamma": torch.full((1,), 0.5, device=device, requires_grad=True)}


def _eager(q, k, v, x, gamma):
    # Self_Attn.forward after the convs: energy = q^T k, softmax over keys, v attention^T.
    energy = torch.bmm(q.permute(0, 2, 1), k)
    attention = torch.softmax(energy, dim=-1)
    out = torch.bmm(v, attention.permute(0, 2, 1))
    return gamma * out + x


def _sdpa(q, k, v, x, gamma):
    # The fused SDPA backends want one head dim and a unit-stride last axis: pad, then copy to
    # [B, 1, N, d] (part of what using SDPA on SAGAN's channels-first tensors costs).
    pad = v.shape[1] - q.shape[1]
    qh = F.pad(q, (0, 0, 0, pad)).transpose(1, 2).contiguous().unsqueeze(1)     # [B, 1, N, d_v]
    kh = F.pad(k, (0, 0, 0, pad)).transpose(1, 2).contiguous().unsqueeze(1)
    vh = v.transpose(1, 2).contiguous().unsqueeze(1)
    out = F.scaled_dot_product_attention(qh, kh, vh, scale=1.0)     # [B, 1, N, d_v]
    return gamma * out.squeeze(1).transpose(1, 2) + x


def _provider(fn):
    def setup(inputs, case):
        args = [inputs[n] for n in ("q", "k", "v", "x", "gamma")]
        return lambda: fn(*args)
    return setup


def flops(case, mode):
    cfg = case.config
    d = cfg["C"] // 8 + cfg["C"]
    fwd = 2.0 * cfg["B"] * cfg["N"] * cfg["N_k"] * d
    return {"fwd": fwd, "bwd": 2 * fwd, "both": 3 * fwd}[mode]


def bytes_moved(case, mode):
    cfg = case.config
    B, C, N, N_k, s = cfg["B"], cfg["C"], cfg["N"], cfg["N_k"], case.itemsize
    qkv = B * (C // 8 * (N + N_k) + C * N_k) * s
    fwd = qkv + B * C * N * s + B * C * N * 4
    bwd = 2 * qkv + B * C * N * 4 + (B * C * N * s if s != 4 else 0)
    return {"fwd": fwd, "bwd": bwd, "both": fwd + bwd}[mode]


BENCHMARKS = [Benchmark(
    op="sagan_attention",
    make_inputs=make_inputs,
    providers=[
        Provider("eager", _provider(_eager)),
        Provider("torch.compile", _provider(_eager), compile=True),
        Provider("sdpa", _provider(_sdpa)),
        Provider("fastnote", _provider(fastnote.sagan_attention)),
        Provider("fastnote square tiles",
                 under_setting(_provider(fastnote.sagan_attention), kernels, "BACKWARD_TILES", "square")),
    ],
    cases=_cases(LAYERS, ["bf16", "fp32"]),
    smoke_cases=_cases(SMOKE_LAYERS, ["fp32", "bf16"]),
    flops=flops,
    bytes_moved=bytes_moved,
    plot_by=("dtype", "C"),
)]

if __name__ == "__main__":
    harness.main(BENCHMARKS)
