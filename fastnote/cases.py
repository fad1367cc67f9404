"""One table of op cases, read by everything that runs every op.

Each ``OpCase`` names an op, the fastnote function and the plain-PyTorch reference it is compared
with, the tolerance kinds (``fastnote.testing.tolerance``), the dtypes, and makers of inputs for
each purpose. A maker returns a dict of keyword arguments: tensors that require grad get their
gradient checked, anything else is passed as is.

- ``inputs(dtype, device)``: the parity inputs (shapes a real model gives, awkward where it
  matters), read by ``python -m fastnote report`` (fp32, this machine's device) and
  ``benchmarks/parity_report.py`` (every dtype on a GPU), through the one comparison ``compare``.
- ``precision(device)``: small fp32 inputs for ops with an fp32 ``tl.dot``
  (``tests/test_precision.py``: torch's fp32 matmul setting honoured, either API); None for ops
  without one.
- ``repeat``: label -> maker(device) of bf16 inputs at the sizes where a backward could stop being
  repeatable (``tests/test_determinism.py``, bit for bit on a GPU); ``deterministic_mode`` lists the
  labels compared under ``torch.use_deterministic_algorithms(True)``.
- ``build(dtype, device)``: a list of input dicts at the shapes that pick each tile configuration
  real models get (``tests/aot_compile.py`` compiles every launch they make, forward and backward,
  for sm_90/sm_80/sm_89); empty for ops without Triton kernels.

Adding an op adds one ``OpCase`` to ``CASES``; nothing else lists the ops.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from . import reference
from . import testing

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPE_NAMES = {FP32: "fp32", FP16: "fp16", BF16: "bf16"}
Maker = Callable[[torch.dtype, torch.device], Dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class OpCase:
    name: str
    ours: Callable[..., Any]
    reference: Callable[..., Any]
    kind: str
    inputs: Maker
    grad_kind: Optional[str] = None
    dtypes: Sequence[torch.dtype] = (FP32, FP16, BF16)
    precision: Optional[Callable[[torch.device], Dict[str, Any]]] = None
    repeat: Mapping[str, Callable[[torch.device], Dict[str, Any]]] = dataclasses.field(default_factory=dict)
    deterministic_mode: FrozenSet[str] = frozenset()
    build: Callable[[torch.dtype, torch.device], List[Dict[str, Any]]] = lambda dtype, device: []


# ------------------------------------------------------------------------------------------------
# Input helpers
# ------------------------------------------------------------------------------------------------

def _leaf(*shape, dtype=FP32, device=None, std=1.0, grad=True):
    return (torch.randn(*shape, device=device) * std).to(dtype).requires_grad_(grad)


def _normalized_pair(n, d, dtype, device, noise=1.0, grad_k=True):
    """Rows L2-normalised, the second a noisy copy of the first (contrastive pairs)."""
    a = F.normalize(torch.randn(n, d, device=device), dim=1)
    b = F.normalize(a + noise * torch.randn_like(a), dim=1)
    return a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_(grad_k)


def _bf16(device):
    return lambda *s, dtype=BF16: torch.randn(*s, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# Squeeze-excitation
# ------------------------------------------------------------------------------------------------

def _se_inputs(shape, squeeze):
    def make(dtype, device):
        B, C, H, W = shape

        def param(*s, fan_in):
            return ((torch.rand(*s, device=device) * 2 - 1) / fan_in ** 0.5).to(dtype).requires_grad_()

        x = (torch.randn(B, C, H, W, device=device) * 3).to(dtype).requires_grad_()
        return {"x": x, "fc1_weight": param(squeeze, C, 1, 1, fan_in=C), "fc1_bias": param(squeeze, fan_in=C),
                "fc2_weight": param(C, squeeze, 1, 1, fan_in=squeeze), "fc2_bias": param(C, fan_in=squeeze)}
    return make


def _se_weights(device):
    return {"fc1_weight": _leaf(24, 72, device=device), "fc1_bias": _leaf(24, device=device),
            "fc2_weight": _leaf(72, 24, device=device), "fc2_bias": _leaf(72, device=device)}


def _channels_last_leaf(*shape, dtype, device):
    return _leaf(*shape, dtype=dtype, device=device).detach().to(memory_format=torch.channels_last).requires_grad_()


def _se_build(dtype, device):
    # NCHW, and a channels_last model's layout (the kernels' channels-last variants)
    return [dict(x=_leaf(4, 72, 28, 28, dtype=dtype, device=device), **_se_weights(device)),
            dict(x=_channels_last_leaf(4, 72, 28, 28, dtype=dtype, device=device), **_se_weights(device))]


def _hswish_se_build(dtype, device):
    # MobileNetV3's gate and the two other (activation, gate) pairs people use; MobileNetV3's in
    # channels_last too
    return [dict(x=_leaf(4, 72, 28, 28, dtype=dtype, device=device), activation=act, gate=gate,
                 **_se_weights(device))
            for act, gate in (("relu", "hard_sigmoid"), ("silu", "sigmoid"), ("hard_swish", "hard_sigmoid"))] + [
        dict(x=_channels_last_leaf(4, 72, 28, 28, dtype=dtype, device=device), activation="relu",
             gate="hard_sigmoid", **_se_weights(device))]


def _se_repeat(device):
    r = _bf16(device)
    return {"x": r(64, 240, 14, 14), "fc1_weight": r(64, 240, dtype=FP32), "fc1_bias": r(64, dtype=FP32),
            "fc2_weight": r(240, 64, dtype=FP32), "fc2_bias": r(240, dtype=FP32)}


def _se(fn):
    def call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation="relu", gate="hard_sigmoid"):
        return fn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate)
    return call


def _plain_se(fn):
    return lambda x, fc1_weight, fc1_bias, fc2_weight, fc2_bias: fn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)


# ------------------------------------------------------------------------------------------------
# Window attention (Swin)
# ------------------------------------------------------------------------------------------------

def _window_inputs(dtype, device):
    # Swin-T stage 3 per window (N = 49, head_dim 32), 2 images x 2 windows, Swin's 0/-100 mask.
    q, k, v = (_leaf(4, 3, 49, 32, dtype=dtype, device=device) for _ in range(3))
    bias = _leaf(3, 49, 49, dtype=dtype, device=device)
    mask = torch.where(torch.rand(2, 49, 49, device=device) < 0.3, -100.0, 0.0)
    return {"q": q, "k": k, "v": v, "bias": bias, "mask": mask}


def _window_precision(device):
    q, k, v, bias = (_leaf(*s, device=device) for s in ((4, 2, 9, 16), (4, 2, 9, 16), (4, 2, 9, 16), (2, 9, 9)))
    return {"q": q, "k": k, "v": v, "bias": bias}


def _window_build(dtype, device):
    # windows 7 (one tile per window), 12 (tiled), 3, 8; heads 3, head_dim 32, 16, 64, 128.
    # 40 images of Swin-T stage 1 already give the backward its full GROUP (15) at N = 49
    cases = []
    for n, d, nW, imgs in ((49, 32, 64, 40), (144, 32, 16, 2), (9, 16, 4, 2), (49, 64, 16, 2), (64, 128, 4, 2)):
        q, k, v = (_leaf(imgs * nW, 3, n, d, dtype=dtype, device=device) for _ in range(3))
        cases.append({"q": q, "k": k, "v": v, "bias": _leaf(3, n, n, dtype=dtype, device=device),
                      "mask": torch.zeros(nW, n, n, dtype=dtype, device=device)})
    return cases


def _window_repeat(shape, heads, N):
    def make(device):
        r = _bf16(device)
        return {"q": r(*shape), "k": r(*shape), "v": r(*shape), "bias": r(heads, N, N)}
    return make


def _swin_block(C, heads, ws, shape, shift, dtype, device, weight_std=None):
    w_std = C ** -0.5 if weight_std is None else weight_std
    return {"x": _leaf(*shape, C, dtype=dtype, device=device),
            "qkv_weight": _leaf(3 * C, C, std=w_std, dtype=dtype, device=device),
            "qkv_bias": _leaf(3 * C, std=0.1, dtype=dtype, device=device),
            "proj_weight": _leaf(C, C, std=w_std, dtype=dtype, device=device),
            "proj_bias": _leaf(C, std=0.1, dtype=dtype, device=device),
            "relative_position_bias_table": _leaf((2 * ws - 1) ** 2, heads, std=0.5, dtype=dtype, device=device),
            "window_size": ws, "num_heads": heads, "shift_size": shift}


def _swin_block_inputs(dtype, device):
    # 9x11 is not a multiple of the window (padding) and the shift is on (the in-kernel mask).
    return _swin_block(64, 2, 7, (2, 9, 11), 3, dtype, device)


def _swin_block_precision(device):
    return _swin_block(16, 2, 4, (1, 6, 7), 2, FP32, device, weight_std=1.0)


def _swin_block_build(dtype, device):
    # Swin-T stage 1 at 40 images, shifted: ShiftedWindowAttention(96, 7, 3, shift_size=3)
    return [_swin_block(96, 3, 7, (40, 56, 56), 3, dtype, device)]


def _swin_block_repeat(device):
    r = _bf16(device)
    return {"x": r(8, 30, 33, 96), "qkv_weight": r(288, 96) * 0.1, "qkv_bias": r(288),
            "proj_weight": r(96, 96) * 0.1, "proj_bias": r(96), "relative_position_bias_table": r(169, 3),
            "window_size": 7, "num_heads": 3, "shift_size": 3}


def _window(fn):
    return lambda q, k, v, bias=None, mask=None: fn(q, k, v, bias=bias, mask=mask)


# ------------------------------------------------------------------------------------------------
# Swin V2 window attention (cosine attention, per-head logit scale)
# ------------------------------------------------------------------------------------------------

def _logit_scale(heads, device):
    # around log(10), Swin V2's initialisation (scales 5 to 20); the clamp at log(100) has its own
    # tests in tests/test_window_attention_v2.py
    return (math.log(10) + 0.3 * torch.randn(heads, 1, 1, device=device)).requires_grad_()


def _window_v2_inputs(dtype, device):
    # Swin V2-T stage 1 per window (window 8: N = 64, head_dim 32), 2 images x 2 windows, shift mask
    q, k, v = (_leaf(4, 3, 64, 32, dtype=dtype, device=device) for _ in range(3))
    bias = (16 * torch.sigmoid(torch.randn(3, 64, 64, device=device))).to(dtype).requires_grad_()
    mask = torch.where(torch.rand(2, 64, 64, device=device) < 0.3, -100.0, 0.0)
    return {"q": q, "k": k, "v": v, "logit_scale": _logit_scale(3, device), "bias": bias, "mask": mask}


def _window_v2_precision(device):
    q, k, v = (_leaf(4, 2, 9, 16, device=device) for _ in range(3))
    return {"q": q, "k": k, "v": v, "logit_scale": _logit_scale(2, device), "bias": _leaf(2, 9, 9, device=device)}


def _window_v2_build(dtype, device):
    # windows 8 (one 64x64 tile per window; 40 images of stage 1 give full groups), 12 (tiled), 16
    cases = []
    for n, heads, nW, imgs in ((64, 3, 64, 40), (144, 4, 16, 2), (256, 3, 16, 2)):
        q, k, v = (_leaf(imgs * nW, heads, n, 32, dtype=dtype, device=device) for _ in range(3))
        cases.append({"q": q, "k": k, "v": v, "logit_scale": _logit_scale(heads, device),
                      "bias": _leaf(heads, n, n, dtype=dtype, device=device),
                      "mask": torch.zeros(nW, n, n, dtype=dtype, device=device)})
    return cases


def _window_v2_repeat(device):
    r = _bf16(device)
    return {"q": r(512, 3, 64, 32), "k": r(512, 3, 64, 32), "v": r(512, 3, 64, 32),
            "logit_scale": torch.full((3, 1, 1), math.log(10), device=device), "bias": r(3, 64, 64)}


def _window_v2(fn):
    return lambda q, k, v, logit_scale, bias=None, mask=None: fn(q, k, v, logit_scale, bias=bias, mask=mask)


def _swin_v2_block(C, heads, ws, shape, shift, dtype, device, roll_first=False):
    w_std = C ** -0.5
    return {"x": _leaf(*shape, C, dtype=dtype, device=device),
            "qkv_weight": _leaf(3 * C, C, std=w_std, dtype=dtype, device=device),
            "q_bias": _leaf(C, std=0.1, dtype=dtype, device=device),
            "v_bias": _leaf(C, std=0.1, dtype=dtype, device=device),
            "proj_weight": _leaf(C, C, std=w_std, dtype=dtype, device=device),
            "proj_bias": _leaf(C, std=0.1, dtype=dtype, device=device),
            "logit_scale": _logit_scale(heads, device),
            # the continuous position bias table after its 16 * sigmoid, [(2W-1)^2, heads]
            "relative_position_bias": (16 * torch.sigmoid(torch.randn((2 * ws - 1) ** 2, heads, device=device)))
            .to(dtype).requires_grad_(),
            "window_size": ws, "num_heads": heads, "shift_size": shift, "roll_first": roll_first}


def _swin_v2_block_inputs(dtype, device):
    # 10x13 is not a multiple of the window 8 (padding), shifted, timm's order (roll, then pad)
    return _swin_v2_block(64, 2, 8, (2, 10, 13), 4, dtype, device, roll_first=True)


def _swin_v2_block_precision(device):
    return _swin_v2_block(16, 2, 4, (1, 6, 7), 2, FP32, device)


def _swin_v2_block_build(dtype, device):
    # Swin V2-T 256 stage 1 (C 96, 3 heads, 64x64 map): windows 8 and 16, shifted; then at a
    # training batch (48 images: 16 per backward program, one dbias slot each), at Hugging Face
    # Swinv2Config's default window 7 (224: 56x56), and on a map that needs padding (60x60)
    return [_swin_v2_block(96, 3, ws, (2, 64, 64), ws // 2, dtype, device) for ws in (8, 16)] + \
        [_swin_v2_block(96, 3, ws, (48, hw, hw), ws // 2, dtype, device) for ws, hw in ((8, 64), (7, 56), (8, 60))]


def _swin_v2_block_reference(x, qkv_weight, q_bias, v_bias, proj_weight, proj_bias, logit_scale,
                             relative_position_bias, window_size, num_heads, shift_size=0, roll_first=False):
    return reference.swin_block_attention_v2(x, qkv_weight, q_bias, v_bias, proj_weight, proj_bias, logit_scale,
                                             relative_position_bias, window_size, num_heads, shift_size,
                                             roll_first=roll_first)


# ------------------------------------------------------------------------------------------------
# SAGAN attention
# ------------------------------------------------------------------------------------------------

def _sagan_inputs(dtype, device):
    # SAGAN's generator attention at C = 64 (d_qk = 8) on a ragged 9x7 map, keys 2x2-pooled
    # (BigGAN); logits in the hundreds, beyond what a naive fp16 exp survives.
    return {"q": _leaf(2, 8, 63, std=4, dtype=dtype, device=device),
            "k": _leaf(2, 8, 16, std=4, dtype=dtype, device=device),
            "v": _leaf(2, 64, 16, dtype=dtype, device=device), "x": _leaf(2, 64, 63, dtype=dtype, device=device),
            "gamma": torch.full((1,), 0.7, device=device, requires_grad=True)}


def _sagan_precision(device):
    return {"q": _leaf(2, 8, 20, device=device), "k": _leaf(2, 8, 12, device=device),
            "v": _leaf(2, 16, 12, device=device), "x": _leaf(2, 16, 20, device=device),
            "gamma": torch.full((1,), 0.5, device=device)}


def _sagan_build(dtype, device):
    # generator 64x64 (d_qk 8, d_v 64), discriminator 16x16 (64, 512), pooled keys
    return [{"q": _leaf(1, d_qk, n, dtype=dtype, device=device), "k": _leaf(1, d_qk, n_k, dtype=dtype, device=device),
             "v": _leaf(1, d_v, n_k, dtype=dtype, device=device), "x": _leaf(1, d_v, n, dtype=dtype, device=device),
             "gamma": torch.zeros(1, device=device, requires_grad=True)}
            for d_qk, d_v, n, n_k in ((8, 64, 4096, 4096), (64, 512, 4096, 1024), (32, 256, 1024, 256))]


def _sagan_repeat(device):
    r = _bf16(device)
    return {"q": r(4, 64, 4096), "k": r(4, 64, 1024), "v": r(4, 512, 1024), "x": r(4, 512, 4096),
            "gamma": torch.full((1,), 0.5, device=device)}


# ------------------------------------------------------------------------------------------------
# Spectral norm's power iteration (C++/CUDA: no Triton build)
# ------------------------------------------------------------------------------------------------

def _power_iteration_inputs(dtype, device):
    # A SAGAN discriminator weight (128 x 1024, a 4x4 conv flattened), three iterations from
    # normalised random vectors; gradients flow to the weight only (u, v are constants).
    w = torch.randn(128, 1024, device=device)
    u = F.normalize(torch.randn(128, device=device), dim=0)
    v = F.normalize(torch.randn(1024, device=device), dim=0)
    return {"weight_mat": w.to(dtype).requires_grad_(), "u": u.to(dtype), "v": v.to(dtype), "n_power_iterations": 3}


# ------------------------------------------------------------------------------------------------
# Gram matrix, style loss, total variation
# ------------------------------------------------------------------------------------------------

def _gram_inputs(dtype, device):
    # VGG-16-like features: 70 channels (a triangular grid of three 64-wide tiles in fp32), 9x9 map
    return {"x": torch.randn(2, 70, 9, 9, device=device).relu().to(dtype).requires_grad_()}


def _style_inputs(dtype, device):
    # activations ~30 so that the loss and its gradients are O(1), not below the absolute
    # tolerance; the style target [1, C, C] broadcast over the batch and given a gradient too
    x = torch.randn(2, 70, 9, 9, device=device).relu() * 30
    style = torch.randn(1, 70, 81, device=device).relu() * 30
    target = torch.bmm(style, style.transpose(1, 2)) / (70 * 81) * 1.1
    return {"x": x.to(dtype).requires_grad_(), "target_gram": target.requires_grad_()}


def _gram_precision(device):
    return {"x": _leaf(2, 5, 9, device=device)}


def _style_precision(device):
    return {"x": _leaf(2, 5, 9, device=device), "target_gram": torch.randn(5, 5, device=device)}


# VGG-16 relu1_2 (C 64, one tile, split-K) and relu4_3 (C 512, triangular grid, split-K), and
# C 512 on a 4x4 map (K too short to split)
_GRAM_BUILD = ((64, 256), (512, 32), (512, 4))


def _gram_build(dtype, device):
    return [{"x": _leaf(1, c, hw, hw, dtype=dtype, device=device)} for c, hw in _GRAM_BUILD]


def _style_build(dtype, device):
    return [{"x": _leaf(1, c, hw, hw, dtype=dtype, device=device), "target_gram": _leaf(c, c, device=device)}
            for c, hw in _GRAM_BUILD]


def _tv_inputs(dtype, device):
    return {"y": torch.rand(2, 3, 37, 70, device=device).to(dtype).requires_grad_()}


# ------------------------------------------------------------------------------------------------
# Contrastive losses
# ------------------------------------------------------------------------------------------------

def _patch_nce_inputs(B, P, d, all_negatives, grad_k):
    # L2-normalised features, keys a noisy copy of the queries (CUT's default d = 256 per image;
    # negatives from the whole minibatch with the gradient reaching the keys too).
    def make(dtype, device):
        q, k = _normalized_pair(B * P, d, dtype, device, noise=0.5, grad_k=grad_k)
        return {"feat_q": q, "feat_k": k, "batch_size": B, "all_negatives": all_negatives, "detach_k": not grad_k}
    return make


def _patch_nce(feat_q, feat_k, batch_size, all_negatives=False, detach_k=True, reduction="none"):
    import fastnote

    return fastnote.patch_nce_loss(feat_q, feat_k, batch_size, 0.07, all_negatives, reduction=reduction,
                                   detach_k=detach_k)


def _patch_nce_reference(feat_q, feat_k, batch_size, all_negatives=False, detach_k=True, reduction="none"):
    out = reference.patch_nce_loss(feat_q, feat_k, 0.07, batch_size, all_negatives, detach_k=detach_k)
    return {"none": out, "mean": out.mean(), "sum": out.sum()}[reduction]


def _patch_nce_precision(device):
    return {"feat_q": _leaf(12, 16, device=device), "feat_k": _leaf(12, 16, device=device), "batch_size": 2}


def _patch_nce_build(dtype, device):
    # CUT's d 256 (per image, P 256; whole minibatch with dk), d 1000 (channel chunks)
    cases = []
    for rows, d, batch, all_neg in ((2 * 256, 256, 2, False), (1024, 256, 1, True), (64, 1000, 1, False)):
        cases.append({"feat_q": _leaf(rows, d, dtype=dtype, device=device),
                      "feat_k": _leaf(rows, d, dtype=dtype, device=device), "batch_size": batch,
                      "all_negatives": all_neg, "detach_k": not all_neg, "reduction": "mean"})
    return cases


def _patch_nce_repeat(device):
    # k not detached (CUT detaches it by default), so the key-side kernel is compared too
    r = _bf16(device)
    return {"feat_q": r(1024, 256), "feat_k": r(1024, 256), "batch_size": 4, "all_negatives": True,
            "detach_k": False, "reduction": "mean"}


def _clip_inputs(dtype, device):
    # 100 pairs (a partial last tile), d = 64, open_clip's maximal logit scale 100.
    img, txt = _normalized_pair(100, 64, dtype, device)
    return {"image_emb": img, "text_emb": txt, "logit_scale": torch.tensor(100.0, device=device, requires_grad=True)}


def _clip_reference(image_emb, text_emb, logit_scale):
    return reference.clip_loss(image_emb, text_emb, logit_scale, exponentiated=True)


def _clip_precision(device):
    return {"image_emb": _leaf(10, 16, device=device), "text_emb": _leaf(10, 16, device=device),
            "logit_scale": torch.tensor(3.0, device=device)}


def _clip_build(dtype, device):
    # d 512 (open_clip's ViT-B width), 512 pairs
    return [{"image_emb": _leaf(512, 512, dtype=dtype, device=device),
             "text_emb": _leaf(512, 512, dtype=dtype, device=device),
             "logit_scale": torch.tensor(14.3, device=device, requires_grad=True)}]


def _clip_repeat(device):
    r = _bf16(device)
    return {"image_emb": r(8192, 512), "text_emb": r(8192, 512), "logit_scale": torch.tensor(14.3, device=device)}


def _clip_row_inputs(dtype, device):
    # One rank's rows of a 2-rank batch: its 40 image rows (offset 40) against all 80 texts.
    img, txt = _normalized_pair(80, 64, dtype, device)
    return {"a": img[40:].detach().requires_grad_(), "b": txt, "logit_scale": torch.tensor(30.0, device=device,
                                                                                            requires_grad=True),
            "offset": 40}


def _clip_row_build(dtype, device):
    return [{"a": _leaf(128, 512, dtype=dtype, device=device), "b": _leaf(512, 512, dtype=dtype, device=device),
             "logit_scale": torch.tensor(14.3, device=device, requires_grad=True), "offset": 128}]


def _clip_row(a, b, logit_scale, offset):
    # the one-sided loss of clip_loss(..., group=g, local_loss=True): the op itself, no group needed
    return torch.ops.fastnote.clip_row_loss(a, b, logit_scale, offset)[0]


def _clip_row_reference(a, b, logit_scale, offset):
    from .ops.clip_loss import _row_loss_reference

    return _row_loss_reference(a, b, logit_scale, offset)


def _siglip_inputs(dtype, device):
    # 100 pairs (a partial last tile), d 64, SigLIP's initial scale 10 and bias -10
    img, txt = _normalized_pair(100, 64, dtype, device)
    return {"image_emb": img, "text_emb": txt, "logit_scale": torch.tensor(10.0, device=device, requires_grad=True),
            "logit_bias": torch.tensor(-10.0, device=device, requires_grad=True)}


def _siglip_precision(device):
    return {"image_emb": _leaf(10, 16, device=device), "text_emb": _leaf(10, 16, device=device),
            "logit_scale": torch.tensor(3.0, device=device), "logit_bias": torch.tensor(-1.0, device=device)}


def _siglip_build(dtype, device):
    # d 768 (SigLIP's width: channel chunks) and d 64 half (all channels in one block)
    shapes = ((512, 768), (1000, 64)) if dtype != FP32 else ((512, 768),)
    return [{"image_emb": _leaf(n, d, dtype=dtype, device=device), "text_emb": _leaf(n, d, dtype=dtype, device=device),
             "logit_scale": torch.tensor(10.0, device=device, requires_grad=True),
             "logit_bias": torch.tensor(-10.0, device=device, requires_grad=True)} for n, d in shapes]


def _siglip_repeat(device):
    r = _bf16(device)
    return {"image_emb": r(8192, 768), "text_emb": r(8192, 768), "logit_scale": torch.tensor(10.0, device=device),
            "logit_bias": torch.tensor(-10.0, device=device)}


def _siglip_chunk(image_emb, text_emb, logit_scale, logit_bias):
    # another rank's text chunk (no matching pairs: no diagonal), the op itself, no group needed
    return torch.ops.fastnote.siglip_loss(image_emb, text_emb, logit_scale, logit_bias, 0, False)


def _siglip_chunk_reference(image_emb, text_emb, logit_scale, logit_bias):
    from .ops.siglip_loss import _chunk_reference

    return _chunk_reference(image_emb, text_emb, logit_scale, logit_bias, False)


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------

def _cases() -> List[OpCase]:
    import fastnote

    return [
        # A MobileNetV3 channel count with a ragged plane (7x7) and its squeeze width make_divisible(72 // 4, 8).
        OpCase("squeeze_excitation", _plain_se(fastnote.squeeze_excitation), _plain_se(reference.squeeze_excitation),
               "reduction", _se_inputs((2, 72, 7, 7), 24), build=_se_build),
        OpCase("hswish_se", _se(fastnote.hswish_se), _se(reference.hswish_se), "reduction",
               _se_inputs((3, 40, 5, 5), 16), repeat={"hswish_se": _se_repeat}, build=_hswish_se_build),
        OpCase("sagan_attention", fastnote.sagan_attention, reference.sagan_attention, "two_matmul", _sagan_inputs,
               precision=_sagan_precision, repeat={"sagan_attention": _sagan_repeat}, build=_sagan_build),
        OpCase("window_attention", _window(fastnote.window_attention), _window(reference.window_attention),
               "two_matmul", _window_inputs, precision=_window_precision,
               repeat={"window_attention N=49": _window_repeat((512, 3, 49, 32), 3, 49),
                       # 64 windows of 144 tokens: over 10 programs per shared dbias slot by default
                       # (see test_shared_slots_for_few_large_windows), so compared in the deterministic mode
                       "window_attention N=144": _window_repeat((64, 4, 144, 32), 4, 144)},
               deterministic_mode=frozenset({"window_attention N=144"}), build=_window_build),
        OpCase("swin_window_attention", fastnote.swin_window_attention, reference.swin_block_attention, "two_matmul",
               _swin_block_inputs, precision=_swin_block_precision, repeat={"swin block, padded": _swin_block_repeat},
               build=_swin_block_build),
        OpCase("power_iteration", fastnote.power_iteration, reference.power_iteration, "reduction",
               _power_iteration_inputs),
        OpCase("gram", fastnote.gram, reference.gram, "reduction", _gram_inputs, precision=_gram_precision,
               build=_gram_build),
        OpCase("style_loss", fastnote.style_loss, reference.style_loss, "reduction", _style_inputs,
               precision=_style_precision,
               repeat={"style_loss": lambda device: {"x": _bf16(device)(4, 256, 64, 64),
                                                     "target_gram": _bf16(device)(256, 256, dtype=FP32)}},
               build=_style_build),
        OpCase("tv_loss", fastnote.tv_loss, reference.tv_loss, "reduction", _tv_inputs,
               repeat={"tv_loss": lambda device: {"y": _bf16(device)(8, 3, 256, 256)}},
               build=lambda dtype, device: [{"y": _leaf(2, 3, 256, 256, dtype=dtype, device=device)}]),
        OpCase("patch_nce", _patch_nce, _patch_nce_reference, "reduction", _patch_nce_inputs(2, 64, 256, False, False),
               precision=_patch_nce_precision, repeat={"patch_nce_loss": _patch_nce_repeat}, build=_patch_nce_build),
        OpCase("patch_nce_all", _patch_nce, _patch_nce_reference, "reduction",
               _patch_nce_inputs(2, 40, 64, True, True)),
        OpCase("clip_loss", fastnote.clip_loss, _clip_reference, "reduction", _clip_inputs, precision=_clip_precision,
               repeat={"clip_loss": _clip_repeat}, build=_clip_build),
        OpCase("clip_row_loss", _clip_row, _clip_row_reference, "reduction", _clip_row_inputs, build=_clip_row_build),
        OpCase("siglip_loss", fastnote.siglip_loss, reference.siglip_loss, "reduction", _siglip_inputs,
               precision=_siglip_precision, repeat={"siglip_loss": _siglip_repeat}, build=_siglip_build),
        OpCase("siglip_chunk_loss", _siglip_chunk, _siglip_chunk_reference, "reduction", _siglip_inputs,
               build=_siglip_build),
        OpCase("window_attention_v2", _window_v2(fastnote.window_attention_v2), _window_v2(reference.window_attention_v2),
               "two_matmul", _window_v2_inputs, precision=_window_v2_precision,
               repeat={"window_attention_v2 N=64": _window_v2_repeat}, build=_window_v2_build),
        OpCase("swin_window_attention_v2", fastnote.swin_window_attention_v2, _swin_v2_block_reference, "two_matmul",
               _swin_v2_block_inputs, precision=_swin_v2_block_precision, build=_swin_v2_block_build),
    ]


_TABLE: Optional[List[OpCase]] = None


def all_cases() -> List[OpCase]:
    """The table (built on first use: it refers to fastnote's public functions)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _cases()
    return _TABLE


def by_name(names: Sequence[str] = ()) -> List[OpCase]:
    """The cases named (all if none); unknown names raise ValueError listing the known ones."""
    table = all_cases()
    known = [c.name for c in table]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; known: {known}")
    return [c for c in table if not names or c.name in names]


# ------------------------------------------------------------------------------------------------
# The comparison (the report and the parity report)
# ------------------------------------------------------------------------------------------------

def _tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def _clone(inputs, to_fp32: bool):
    """Fresh leaves with the same values: as given, or upcast to fp32 for the reference."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            t = v.detach().clone()
            if to_fp32 and t.is_floating_point():
                t = t.float()
            out[k] = t.requires_grad_(v.requires_grad)
        else:
            out[k] = v
    return out


def _row(case, dtype, tensor, actual, expected, kind):
    atol, rtol = testing.tolerance(dtype, kind)
    err = testing.max_error(actual, expected)
    try:
        testing.assert_close(actual, expected, kind, dtype=dtype)
        status = "PASS"
    except AssertionError:
        status = "FAIL"
    return {"op": case.name, "dtype": DTYPE_NAMES[dtype], "tensor": tensor, "max_abs_err": err,
            "atol": atol, "rtol": rtol, "status": status, "note": ""}


def failed_row(case: OpCase, dtype: torch.dtype, note: str, tensor: str = "-") -> dict:
    return {"op": case.name, "dtype": DTYPE_NAMES[dtype], "tensor": tensor, "max_abs_err": float("nan"),
            "atol": float("nan"), "rtol": float("nan"), "status": "FAIL", "note": note}


def compare(case: OpCase, dtype: torch.dtype, device: torch.device) -> List[dict]:
    """Forward outputs and the gradient of every input that requires one, against the reference
    run in fp32 on the same values with the same upstream gradient (rounded to the output dtype):
    one row per tensor (op, dtype, tensor, max_abs_err, atol, rtol, status, note)."""
    torch.manual_seed(0)
    inputs = case.inputs(dtype, device)
    ours_in, ref_in = _clone(inputs, False), _clone(inputs, True)
    ours = _tensors(case.ours(**ours_in))
    ref = _tensors(case.reference(**ref_in))
    names = ["out"] if len(ours) == 1 else [f"out[{i}]" for i in range(len(ours))]
    rows = [_row(case, dtype, n, a, e, case.kind) for n, a, e in zip(names, ours, ref)]

    pairs = [(a, e) for a, e in zip(ours, ref) if a.requires_grad and e.requires_grad]
    if pairs:
        grads = [torch.randn(a.shape, device=device).to(a.dtype) for a, _ in pairs]
        torch.autograd.backward([a for a, _ in pairs], grads)
        torch.autograd.backward([e for _, e in pairs], [g.float() for g in grads])
        grad_kind = case.grad_kind or case.kind
        for k, v in ours_in.items():
            if isinstance(v, torch.Tensor) and v.requires_grad:
                if v.grad is None or ref_in[k].grad is None:
                    rows.append(failed_row(case, dtype, "gradient missing", f"grad {k}"))
                    continue
                rows.append(_row(case, dtype, f"grad {k}", v.grad, ref_in[k].grad, grad_kind))
    return rows


def compare_safely(case: OpCase, dtype: torch.dtype, device: torch.device) -> List[dict]:
    """``compare``, with a crash reported as a failed row (a crash is a failure to report, not to hide)."""
    try:
        return compare(case, dtype, device)
    except Exception as exc:  # noqa: BLE001
        return [failed_row(case, dtype, f"{type(exc).__name__}: {exc}"[:200])]
