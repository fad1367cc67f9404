"""Swin window attention, forward and backward: the core op (``window_attention``) and the fused
W-MSA / SW-MSA block path (``swin_window_attention``).

Providers: eager (Swin's own code: ``q * scale @ k^T + bias (+ mask)``, softmax, ``@ v``; for the
block also pad, roll, partition, qkv/proj Linears, reverse, roll back, crop), the same with
``F.scaled_dot_product_attention`` and the additive bias + mask as ``attn_mask`` (windows folded
into the head axis, so the ``[nW*heads, N, N]`` mask broadcasts over the batch and is never
expanded), ``torch.compile`` of eager, and fastnote.

Shapes: Swin-T (224x224, window 7, shift 3; x axis = stage 1..4: 56x56 C=96 3 heads ... 7x7 C=768
24 heads, where Swin uses no shift) at batch 128, and Swin-B at 384x384 (window 12, shift 6;
96x96 C=128 4 heads ... 12x12 C=1024 32 heads) at batch 32; head_dim 32 throughout; bf16, fp16, fp32.
In fp32 with exact products (torch's default: TF32 not allowed) forward and backward run on 32 x 32
tiles, chosen from the build report (the 64 x 64 backward spills ~1 KB per thread there); two more
providers ("fastnote tile 64", "fastnote tile 16") time them on 64 x 64 and 16 x 16 tiles (``EXACT_FP32_TILE`` in fastnote/triton_kernels/window_attention.py),
for the GPU's numbers to confirm or change that default. In fp16/bf16 the V1 kernels (one tile
per window) are software-pipelined over each program's windows (two stages: the next window loads
while this one computes); "fastnote one stage" times them built as before (``PIPELINED``).

Speed of light: the minimum bytes (each input read once, each output written once) and the useful
FLOPs (each matmul of the maths once, no recomputation) of the computation, whatever computes it;
the bound is the larger of bytes / copy bandwidth and FLOPs / dense peak, the same for every provider.
Core, T = B*nW * heads * N * d * itemsize; the bias [heads, N, N] and, in shifted stages, the mask
[nW, N, N] in the same dtype:
  fwd   reads q, k, v, bias, mask, writes o                      4T + bias + mask
  bwd   reads q, k, v, do, bias, mask, writes dq, dk, dv, dbias  7T + 2 bias + mask
        (softmax's backward needs rowsum(P * dP), which equals rowsum(O * dO); the kernel takes
        the first from registers when one tile holds a whole row, N <= 64, and reads O, 8T, only
        for larger N)
  both  the sum
FLOPs (core): fwd 4 * B*nW*heads*N^2*d (q k^T, P v); bwd 8 * B*nW*heads*N^2*d (dv, dP, dq, dk; the
kernels also recompute q k^T, 2 * B*nW*heads*N^2*d more, not counted as useful).
Block, M = B*H*W tokens, X = M*C*itemsize, weights Wb = (4 C^2 + 4 C + (2 window - 1)^2 heads) *
itemsize (qkv and proj with biases, the bias table; the shift mask is computed from coordinates):
  fwd   reads x and the weights, writes y                        2X + Wb
  bwd   reads x, dy and the weights, writes dx and their grads   3X + 2 Wb
  FLOPs fwd 8 M C^2 (qkv 6, proj 2) + 4 M N C (attention); bwd 16 M C^2 + 8 M N C (each GEMM's
  input and weight gradients; the attention's four products). The GEMMs make most stages
  compute-bound. What fastnote's path moves is more: its qkv and proj GEMMs write and read qkv
  and the attention output (10X forward, 18X backward).

Swin V2 (``window_attention_v2``, ``swin_window_attention_v2``: cosine attention, per-head logit
scale, continuous position bias) on the same kernels with COSINE on. Minimum bytes are V1's: the
row norms of q and k are computed from the tiles the kernels load anyway (forward and backward,
nothing saved) and the per-head scale is ``heads * 4`` bytes (the block's q and v biases and its
continuous-position-bias MLP are counted as V1's qkv bias and table: a difference of a few KB).
FLOPs (core): V1's plus the normalisation, ``3 * B*nW*heads*N*d`` per pass over q and over k in
the forward (squares, sum, scale), and in the backward the projection
``dx = (dx^ - x^ (x^ . dx^)) / ||x||`` (``~7 * B*nW*heads*N*d`` for each of q, k), all O(N d)
against the O(N^2 d) products, so 4 and 8 * B*nW*heads*N^2*d still describe it.
Shapes: Swin V2-T at 256x256 (x axis = stage 1..4: 64x64 C=96 3 heads ... 8x8 C=768 24 heads),
window 8 (shift 4) and window 16 (shift 8; the 8x8 last stage is one window there, and its
window shrinks to 8 as timm and torchvision build it), batch 64. Providers: eager (timm's
WindowAttention maths on q, k, v for the core; torchvision's ShiftedWindowAttentionV2 module for
the block, and timm's SwinTransformerV2Block._attn, which rolls before padding), SDPA (normalised
q scaled per head, the bias + mask as ``attn_mask``, ``scale=1``), torch.compile of eager, and
fastnote (``fastnote.nn.ShiftedWindowAttentionV2.from_torchvision`` on the same module).

    python benchmarks/window_attention.py [--smoke] [--out DIR] [--modes fwd,bwd,both] [--dtypes bf16,fp16]
"""
import torch
import torch.nn.functional as F
import triton

import fastnote
import harness
from fastnote import reference
from fastnote.triton_kernels import window_attention as kernels
from fastnote.triton_kernels.utils import fp32_matmul_allows_tf32
from harness import Benchmark, Case, Provider
from harness.modes import under_setting

# (model, batch, [(H, W, C, heads)] per stage, window, shift)
SWIN_T = ("swin_t_224", 128, [(56, 56, 96, 3), (28, 28, 192, 6), (14, 14, 384, 12), (7, 7, 768, 24)], 7, 3)
SWIN_B_384 = ("swin_b_384", 32, [(96, 96, 128, 4), (48, 48, 256, 8), (24, 24, 512, 16), (12, 12, 1024, 32)], 12, 6)
SMOKE = ("smoke", 1, [(14, 14, 32, 2), (7, 7, 64, 4)], 7, 3)


def _cases(models, dtypes):
    cases = []
    for model, batch, stages, ws, shift in models:
        for dtype in dtypes:
            for i, (H, W, C, heads) in enumerate(stages, start=1):
                # Swin turns the shift off when a stage is a single window.
                s = shift if min(H, W) > ws else 0
                cases.append(Case("stage", i, {"dtype": dtype, "model": model, "B": batch, "H": H, "W": W,
                                               "C": C, "heads": heads, "window": ws, "shift": s}))
    return cases


def _padded(cfg):
    """(Hp, Wp): the feature map padded up to multiples of the window."""
    ws = cfg["window"]
    return triton.cdiv(cfg["H"], ws) * ws, triton.cdiv(cfg["W"], ws) * ws


def _geometry(cfg):
    ws = cfg["window"]
    Hp, Wp = _padded(cfg)
    return (Hp // ws) * (Wp // ws), ws * ws, cfg["C"] // cfg["heads"]


# ------------------------------------------------------------------------------------------------
# Core: q, k, v [B*nW, heads, N, d]
# ------------------------------------------------------------------------------------------------

def core_inputs(case, device):
    cfg = case.config
    nW, N, d = _geometry(cfg)
    B_, heads = cfg["B"] * nW, cfg["heads"]
    q, k, v = (torch.randn(B_, heads, N, d, device=device, dtype=case.dtype).requires_grad_() for _ in range(3))
    bias = (torch.randn(heads, N, N, device=device) * 0.5).to(case.dtype).requires_grad_()
    mask = None
    if cfg["shift"]:
        Hp, Wp = _padded(cfg)
        mask = reference.shift_mask(Hp, Wp, cfg["window"], cfg["shift"], device=device).to(case.dtype)
    return {"q": q, "k": k, "v": v, "bias": bias, "mask": mask}


def eager_core(q, k, v, bias, mask):
    """Swin's WindowAttention after the qkv projection."""
    B_, heads, N, d = q.shape
    attn = (q * d ** -0.5) @ k.transpose(-2, -1) + bias.unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        attn = (attn.view(B_ // nW, nW, heads, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, N, N)
    return attn.softmax(dim=-1) @ v


def sdpa_core(q, k, v, bias, mask):
    B_, heads, N, d = q.shape
    nW = mask.shape[0] if mask is not None else 1
    add = bias.unsqueeze(0) if mask is None else bias.unsqueeze(0) + mask.unsqueeze(1)   # [nW, heads, N, N]
    fold = lambda t: t.reshape(B_ // nW, nW * heads, N, d)  # noqa: E731  (views: windows of an image adjacent)
    out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), attn_mask=add.reshape(1, nW * heads, N, N))
    return out.reshape(B_, heads, N, d)


def _core_provider(fn):
    def setup(inputs, case):
        return lambda: fn(**inputs)
    return setup


def core_bytes(case, mode):
    cfg = case.config
    nW, N, d = _geometry(cfg)
    s = case.itemsize
    T = cfg["B"] * nW * cfg["heads"] * N * d * s
    bias = cfg["heads"] * N * N * s
    mask = nW * N * N * s if cfg["shift"] else 0
    fwd, bwd = 4 * T + bias + mask, 7 * T + 2 * bias + mask
    return {"fwd": fwd, "bwd": bwd, "both": fwd + bwd}[mode]


def core_flops(case, mode):
    nW, N, d = _geometry(case.config)
    base = case.config["B"] * nW * case.config["heads"] * N * N * d
    return {"fwd": 4, "bwd": 8, "both": 12}[mode] * base


# ------------------------------------------------------------------------------------------------
# Block: x [B, H, W, C] -> W-MSA / SW-MSA -> [B, H, W, C]
# ------------------------------------------------------------------------------------------------

def block_inputs(case, device):
    cfg = case.config
    C, heads, ws = cfg["C"], cfg["heads"], cfg["window"]

    def param(*shape, std):
        return (torch.randn(*shape, device=device) * std).to(case.dtype).requires_grad_()

    x = torch.randn(cfg["B"], cfg["H"], cfg["W"], C, device=device, dtype=case.dtype).requires_grad_()
    inputs = {"x": x, "qkv_weight": param(3 * C, C, std=C ** -0.5), "qkv_bias": param(3 * C, std=0.02),
              "proj_weight": param(C, C, std=C ** -0.5), "proj_bias": param(C, std=0.02),
              "relative_position_bias_table": param((2 * ws - 1) ** 2, heads, std=0.02)}
    Hp, Wp = _padded(cfg)
    # Swin keeps the index and the shift mask in buffers: built once, outside the timed region.
    extra = {"index": reference.relative_position_index(ws, device=device),
             "mask": reference.shift_mask(Hp, Wp, ws, cfg["shift"], device=device).to(case.dtype)
             if cfg["shift"] else None}
    return inputs, extra


def eager_block(x, qkv_weight, qkv_bias, proj_weight, proj_bias, relative_position_bias_table, index, mask,
                window, heads, shift, core=eager_core):
    """Swin's SwinTransformerBlock attention path (pad, roll, partition, WindowAttention, reverse, roll, crop)."""
    B, H, W, C = x.shape
    ws = window
    x = F.pad(x, (0, 0, 0, (ws - W % ws) % ws, 0, (ws - H % ws) % ws))
    Hp, Wp = x.shape[1], x.shape[2]
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    win = reference.window_partition(x, ws)
    B_, N, _ = win.shape
    qkv = F.linear(win, qkv_weight, qkv_bias).reshape(B_, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    bias = relative_position_bias_table[index.view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous()
    out = core(qkv[0], qkv[1], qkv[2], bias, mask)
    out = F.linear(out.transpose(1, 2).reshape(B_, N, C), proj_weight, proj_bias)
    out = reference.window_reverse(out, ws, Hp, Wp)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    return out[:, :H, :W, :].contiguous()


def _block_provider(core):
    def setup(all_inputs, case):
        inputs, extra = all_inputs
        cfg = case.config
        return lambda: eager_block(**inputs, **extra, window=cfg["window"], heads=cfg["heads"], shift=cfg["shift"],
                                   core=core)
    return setup


def fastnote_block(all_inputs, case):
    inputs, extra = all_inputs
    cfg = case.config
    return lambda: fastnote.swin_window_attention(**inputs, window_size=cfg["window"], num_heads=cfg["heads"],
                                                  shift_size=cfg["shift"], relative_position_index=extra["index"])


def block_bytes(case, mode):
    cfg = case.config
    C = cfg["C"]
    X = cfg["B"] * cfg["H"] * cfg["W"] * C * case.itemsize
    weights = (4 * C * C + 4 * C + (2 * cfg["window"] - 1) ** 2 * cfg["heads"]) * case.itemsize
    fwd, bwd = 2 * X + weights, 3 * X + 2 * weights
    return {"fwd": fwd, "bwd": bwd, "both": fwd + bwd}[mode]


def block_flops(case, mode):
    cfg = case.config
    M, C = cfg["B"] * cfg["H"] * cfg["W"], cfg["C"]
    N = cfg["window"] ** 2
    fwd = 8 * M * C * C + 4 * M * N * C
    return {"fwd": fwd, "bwd": 2 * fwd, "both": 3 * fwd}[mode]


CASES = _cases([SWIN_T, SWIN_B_384], ["bf16", "fp16", "fp32"])
SMOKE_CASES = _cases([SMOKE], ["fp32"])


# ------------------------------------------------------------------------------------------------
# Swin V2: cosine attention, per-head logit scale, continuous position bias
# ------------------------------------------------------------------------------------------------

SWIN_V2_T = [(64, 64, 96, 3), (32, 32, 192, 6), (16, 16, 384, 12), (8, 8, 768, 24)]
SWIN_V2_T_W8 = ("swinv2_t_256_w8", 64, SWIN_V2_T, 8, 4)
SWIN_V2_T_W16 = ("swinv2_t_256_w16", 64, SWIN_V2_T, 16, 8)
SMOKE_V2 = ("smoke_v2", 1, [(16, 16, 32, 2), (8, 8, 64, 4)], 8, 4)


def _v2_cases(models, dtypes):
    cases = []
    for model, batch, stages, ws, shift in models:
        for dtype in dtypes:
            for i, (H, W, C, heads) in enumerate(stages, start=1):
                w = min(ws, H, W)                       # the window shrinks to a smaller map
                s = shift if min(H, W) > w else 0       # and a map of one window is not shifted
                cases.append(Case("stage", i, {"dtype": dtype, "model": model, "B": batch, "H": H, "W": W,
                                               "C": C, "heads": heads, "window": w, "shift": s}))
    return cases


def core_v2_inputs(case, device):
    inputs = core_inputs(case, device)
    heads = case.config["heads"]
    inputs["logit_scale"] = torch.full((heads, 1, 1), 2.3, device=device).requires_grad_()
    with torch.no_grad():
        inputs["bias"].copy_(16 * torch.sigmoid(inputs["bias"].float()))
    return inputs


def eager_core_v2(q, k, v, logit_scale, bias, mask):
    """timm's WindowAttention (swin_transformer_v2) after the qkv projection."""
    B_, heads, N, d = q.shape
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    attn = attn * torch.clamp(logit_scale, max=4.605170185988092).exp().to(q.dtype) + bias.unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        attn = (attn.view(B_ // nW, nW, heads, N, N) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, N, N)
    return attn.softmax(dim=-1) @ v


def sdpa_core_v2(q, k, v, logit_scale, bias, mask):
    scale = torch.clamp(logit_scale, max=4.605170185988092).exp().to(q.dtype)
    qn, kn = F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1)
    B_, heads, N, d = q.shape
    nW = mask.shape[0] if mask is not None else 1
    add = bias.unsqueeze(0) if mask is None else bias.unsqueeze(0) + mask.unsqueeze(1)
    fold = lambda t: t.reshape(B_ // nW, nW * heads, N, d)  # noqa: E731
    out = F.scaled_dot_product_attention(fold(qn), fold(kn), fold(v), attn_mask=add.reshape(1, nW * heads, N, N),
                                         scale=1.0)
    return out.reshape(B_, heads, N, d)


def _torchvision_swin():
    try:
        from fastnote.compat import torchvision_op_schemas

        torchvision_op_schemas()
    except ImportError:
        pass
    from torchvision.models import swin_transformer

    return swin_transformer


def block_v2_inputs(case, device):
    """x and torchvision's ShiftedWindowAttentionV2 for the stage (its parameters are the leaves),
    with timm's V2 block around a copy of the same attention parameters."""
    cfg = case.config
    C, heads, ws, shift = cfg["C"], cfg["heads"], cfg["window"], cfg["shift"]
    tv = _torchvision_swin().ShiftedWindowAttentionV2(C, [ws, ws], [shift, shift], heads).to(device, case.dtype)
    x = torch.randn(cfg["B"], cfg["H"], cfg["W"], C, device=device, dtype=case.dtype).requires_grad_()
    return {"x": x, "module": tv}


def _block_v2_provider(kind):
    def setup(inputs, case):
        x, tv = inputs["x"], inputs["module"]
        if kind == "torchvision":
            return lambda: tv(x)
        if kind == "fastnote":
            ours = fastnote.nn.ShiftedWindowAttentionV2.from_torchvision(tv)
            return lambda: ours(x)
        # timm's block (roll, then pad) around torchvision's attention parameters
        from timm.models.swin_transformer_v2 import SwinTransformerV2Block

        cfg = case.config
        block = SwinTransformerV2Block(cfg["C"], (cfg["H"], cfg["W"]), cfg["heads"], window_size=cfg["window"],
                                       shift_size=cfg["shift"], always_partition=True).to(x.device, x.dtype)
        a = block.attn
        C = cfg["C"]
        a.qkv.weight, a.proj, a.cpb_mlp, a.logit_scale = tv.qkv.weight, tv.proj, tv.cpb_mlp, tv.logit_scale
        a.q_bias = torch.nn.Parameter(tv.qkv.bias.detach()[:C].clone())
        a.v_bias = torch.nn.Parameter(tv.qkv.bias.detach()[2 * C:].clone())
        return lambda: block._attn(x)
    return setup


CASES_V2 = _v2_cases([SWIN_V2_T_W8, SWIN_V2_T_W16], ["bf16", "fp16", "fp32"])
SMOKE_CASES_V2 = _v2_cases([SMOKE_V2], ["fp32"])


# ------------------------------------------------------------------------------------------------
# fp32 with exact products: which tile (kernels.EXACT_FP32_TILE, forward and backward)
# ------------------------------------------------------------------------------------------------

def _tile_provider(fastnote_setup, tile):
    """fastnote on ``tile`` x ``tile`` tiles (None: 64 x 64, one per window where it fits) for fp32
    with exact products (torch has not allowed TF32): the alternatives to the default
    ``EXACT_FP32_TILE``. The tile holds for the untimed forward of the bwd mode too (the backward
    recomputes that forward's logits). Only the backward modes, only such cases (others give no
    callable: n/a)."""
    # the choice is the backward's (the forward does not spill)
    return under_setting(fastnote_setup, kernels, "EXACT_FP32_TILE", tile,
                         applies=lambda case: case.dtype == torch.float32 and not fp32_matmul_allows_tf32())


def _with_tiles(name, fastnote_setup):
    # 16 x 16 under the interpreter (smoke runs) takes 1.5-2 s a call: the 64 x 64 provider
    # exercises the same code there
    return [Provider(name, fastnote_setup)] + \
        [Provider(f"{name} tile {label}", _tile_provider(fastnote_setup, t), skip_in_smoke=label == "16")
         for label, t in (("64", None), ("16", 16))]


# ------------------------------------------------------------------------------------------------
# fp16/bf16 V1: pipelined over the program's windows (kernels.PIPELINED) or not
# ------------------------------------------------------------------------------------------------

def _one_stage_provider(fastnote_setup):
    """fastnote with its fp16/bf16 V1 kernels built with one stage, as before they were pipelined
    over each program's windows (``PIPELINED``): fp16 and bf16 only (elsewhere the kernels have one
    stage either way: n/a)."""
    return under_setting(fastnote_setup, kernels, "PIPELINED", False, modes=("fwd", "bwd", "both"),
                         applies=lambda case: case.dtype in (torch.float16, torch.bfloat16))


BENCHMARKS = [
    Benchmark(
        op="window_attention",
        make_inputs=core_inputs,
        providers=[
            Provider("eager", _core_provider(eager_core)),
            Provider("sdpa", _core_provider(sdpa_core)),
            Provider("torch.compile", _core_provider(eager_core), compile=True),
            *_with_tiles("fastnote", _core_provider(fastnote.window_attention)),
            Provider("fastnote one stage", _one_stage_provider(_core_provider(fastnote.window_attention))),
        ],
        cases=CASES,
        smoke_cases=SMOKE_CASES,
        bytes_moved=core_bytes,
        flops=core_flops,
        plot_by=("dtype", "model"),
    ),
    Benchmark(
        op="swin_window_attention",
        make_inputs=block_inputs,
        providers=[
            Provider("eager", _block_provider(eager_core)),
            Provider("sdpa", _block_provider(sdpa_core)),
            Provider("torch.compile", _block_provider(eager_core), compile=True),
            *_with_tiles("fastnote", fastnote_block),
            Provider("fastnote one stage", _one_stage_provider(fastnote_block)),
        ],
        cases=CASES,
        smoke_cases=SMOKE_CASES,
        bytes_moved=block_bytes,
        flops=block_flops,
        plot_by=("dtype", "model"),
    ),
    Benchmark(
        op="window_attention_v2",
        make_inputs=core_v2_inputs,
        providers=[
            Provider("eager", _core_provider(eager_core_v2)),
            Provider("sdpa", _core_provider(sdpa_core_v2)),
            Provider("torch.compile", _core_provider(eager_core_v2), compile=True),
            *_with_tiles("fastnote", _core_provider(fastnote.window_attention_v2)),
        ],
        cases=CASES_V2,
        smoke_cases=SMOKE_CASES_V2,
        bytes_moved=core_bytes,
        flops=core_flops,
        plot_by=("dtype", "model"),
    ),
    Benchmark(
        op="swin_window_attention_v2",
        make_inputs=block_v2_inputs,
        providers=[
            Provider("eager", _block_v2_provider("torchvision")),
            Provider("timm", _block_v2_provider("timm")),
            Provider("torch.compile", _block_v2_provider("torchvision"), compile=True),
            *_with_tiles("fastnote", _block_v2_provider("fastnote")),
        ],
        cases=CASES_V2,
        smoke_cases=SMOKE_CASES_V2,
        bytes_moved=block_bytes,
        flops=block_flops,
        plot_by=("dtype", "model"),
    ),
]

if __name__ == "__main__":
    harness.main(BENCHMARKS)
