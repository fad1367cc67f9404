"""Plain-PyTorch versions of every fastnote op, written from docs/ops.md.

This module is the parity oracle for the Triton / CUDA kernels and the CPU fallback. It is
forward-only: autograd supplies the gradients. It stands alone (torch only) and does no
input validation; the ops in ``fastnote.ops`` check their inputs before calling it.

Numerics: fp16 and bf16 inputs are upcast to float32, all maths is done in float32, and the
result is cast back to the input dtype. float32 and float64 inputs are computed in their own
dtype (float64 is what ``torch.autograd.gradcheck`` needs). The scalar losses (``style_loss``,
``tv_loss``, ``patch_nce_loss``, ``clip_loss``) stay in the compute dtype, i.e. float32
for half inputs. Each docstring says which applies.
"""

import functools
import math

import torch
import torch.nn.functional as F

__all__ = [
    "hard_sigmoid",
    "hard_swish",
    "squeeze_excitation",
    "hswish_se",
    "gram",
    "style_loss",
    "tv_loss",
    "patch_nce_logits",
    "patch_nce_loss",
    "clip_loss",
    "relative_position_index",
    "relative_position_bias",
    "shift_mask",
    "window_partition",
    "window_reverse",
    "window_attention",
    "swin_block_attention",
    "window_attention_v2",
    "swin_block_attention_v2",
    "sagan_attention",
    "power_iteration",
    "spectral_norm_weight",
    "siglip_loss",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _exact(fn):
    """Run ``fn`` with autocast off on its tensors' device: under torch.autocast the matmuls
    would otherwise drop back to fp16/bf16 despite the fp32 upcast, and the oracle (and the CPU
    fallback) would lose the precision it promises."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
        device_type = first.device.type if first is not None else "cpu"
        with torch.autocast(device_type, enabled=False):
            return fn(*args, **kwargs)
    return wrapper


def _up(t):
    """Upcast fp16/bf16 tensors to float32; leave anything else (other dtypes, None) as is."""
    if isinstance(t, torch.Tensor) and t.dtype in _LOW_PRECISION:
        return t.float()
    return t


# --------------------------------------------------------------------------------------------
# 1. Hard-swish, hard-sigmoid, squeeze-excitation (MobileNetV3)
# --------------------------------------------------------------------------------------------

def hard_sigmoid(x):
    """relu6(x + 3) / 6, elementwise. Any shape; returns x's dtype.

    Goes through ``F.hardsigmoid`` so the gradient at x = -3 and 3 is exactly torch's (docs/ops.md section 1.1).
    """
    return F.hardsigmoid(_up(x)).to(x.dtype)


def hard_swish(x):
    """x * relu6(x + 3) / 6, elementwise. Any shape; returns x's dtype.

    Goes through ``F.hardswish`` so the gradient at x = -3 and 3 is exactly torch's (docs/ops.md section 1.1).
    """
    return F.hardswish(_up(x)).to(x.dtype)


_SE_ACTIVATIONS = {"relu": F.relu, "silu": F.silu, "hard_swish": F.hardswish}
_SE_GATES = {"hard_sigmoid": F.hardsigmoid, "sigmoid": torch.sigmoid}


@_exact
def squeeze_excitation(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                       activation="relu", gate="hard_sigmoid"):
    """Squeeze-excitation: ``x * gate(fc2(act(fc1(mean_hw(x)))))[:, :, None, None]``.

    x: [B, C, H, W]; fc1_weight: [Cr, C] or [Cr, C, 1, 1]; fc1_bias: [Cr] or None;
    fc2_weight: [C, Cr] or [C, Cr, 1, 1]; fc2_bias: [C] or None.
    activation: "relu" | "silu" | "hard_swish"; gate: "hard_sigmoid" | "sigmoid".
    Returns [B, C, H, W] in x's dtype.
    """
    act = _SE_ACTIVATIONS[activation]
    gate_fn = _SE_GATES[gate]
    xf = _up(x)
    w1 = _up(fc1_weight).reshape(fc1_weight.shape[0], -1)  # 1x1 conv weight -> Linear weight
    w2 = _up(fc2_weight).reshape(fc2_weight.shape[0], -1)
    s = xf.mean(dim=(2, 3))                                 # [B, C]
    z = act(F.linear(s, w1, _up(fc1_bias)))                 # [B, Cr]
    g = gate_fn(F.linear(z, w2, _up(fc2_bias)))             # [B, C]
    return (xf * g[:, :, None, None]).to(x.dtype)


def hswish_se(u, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
              activation="relu", gate="hard_sigmoid"):
    """``squeeze_excitation(hard_swish(u), ...)``; u: [B, C, H, W], returns u's dtype.

    hard_swish(u) is kept in float32 between the two steps (no intermediate rounding).
    """
    y = hard_swish(_up(u))
    return squeeze_excitation(y, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                              activation=activation, gate=gate).to(u.dtype)


# --------------------------------------------------------------------------------------------
# 2. Gram matrix, style loss, total variation (perceptual loss)
# --------------------------------------------------------------------------------------------

@_exact
def gram(x, normalize="chw"):
    """Gram matrix ``F @ F^T / norm`` with ``F = x.view(B, C, N)``.

    x: [B, C, H, W] or [B, C, N]. normalize: "chw" (norm = C*N, the default, as in Johnson et
    al.), "hw" (norm = N) or "none" (norm = 1). Returns [B, C, C] in x's dtype.
    """
    B, C = x.shape[0], x.shape[1]
    f = _up(x).reshape(B, C, -1)                  # [B, C, N]
    n = f.shape[2]
    norm = {"chw": C * n, "hw": n, "none": 1}[normalize]
    g = torch.bmm(f, f.transpose(1, 2)) / norm
    return g.to(x.dtype)


@_exact
def style_loss(x, target_gram, normalize="chw"):
    """``sum((gram(x, normalize) - target_gram) ** 2) / (C*H*W)``; a 0-dim tensor.

    x: [B, C, H, W] or [B, C, N]; target_gram: [C, C], [1, C, C] or [B, C, C] (broadcast over
    the batch). The divisor is always C*H*W, whatever ``normalize`` says. Returned in the
    compute dtype (float32 for half inputs). target_gram is not detached: it gets a gradient if
    it requires one, as with ``nn.MSELoss``.
    """
    C = x.shape[1]
    n = x[0, 0].numel()                            # H*W (or N)
    g = gram(_up(x), normalize)                    # float32 for half inputs: no rounding here
    diff = g - _up(target_gram)
    return diff.pow(2).sum() / (C * n)


def tv_loss(y):
    """Anisotropic total variation of y: [B, C, H, W]; a 0-dim tensor.

    ``(sum|y[..., :, 1:] - y[..., :, :-1]| + sum|y[..., 1:, :] - y[..., :-1, :]|) / (C*H*W)``
    (not divided by B, as in the perceptual-loss code). Returned in the compute dtype.
    """
    yf = _up(y)
    C, H, W = y.shape[1], y.shape[2], y.shape[3]
    diff_w = (yf[:, :, :, 1:] - yf[:, :, :, :-1]).abs().sum()
    diff_h = (yf[:, :, 1:, :] - yf[:, :, :-1, :]).abs().sum()
    return (diff_w + diff_h) / (C * H * W)


# --------------------------------------------------------------------------------------------
# 3. PatchNCE (CUT) and CLIP contrastive loss
# --------------------------------------------------------------------------------------------

def _patch_nce_logits(feat_q, feat_k, nce_T, batch_size, include_all_negatives_from_minibatch,
                      detach_k=True):
    """Logits in the compute dtype; see ``patch_nce_logits``."""
    q = _up(feat_q)
    k = _up(feat_k).detach() if detach_k else _up(feat_k)
    rows, dim = q.shape
    l_pos = (q * k).sum(dim=1, keepdim=True)                    # [B*P, 1]
    groups = 1 if include_all_negatives_from_minibatch else batch_size
    qg = q.reshape(groups, -1, dim)                             # [G, M, d]
    kg = k.reshape(groups, -1, dim)
    m = qg.shape[1]
    l_neg = torch.bmm(qg, kg.transpose(1, 2))                   # [G, M, M]
    diagonal = torch.eye(m, device=q.device, dtype=torch.bool)[None, :, :]
    l_neg = l_neg.masked_fill(diagonal, -10.0)                  # before the division by T
    l_neg = l_neg.reshape(-1, m)                                # [B*P, M]
    return torch.cat((l_pos, l_neg), dim=1) / nce_T            # [B*P, M+1]


@_exact
def patch_nce_logits(feat_q, feat_k, nce_T=0.07, batch_size=1,
                     include_all_negatives_from_minibatch=False, *, detach_k=True):
    """CUT's PatchNCE logits ``cat([l_pos, l_neg], 1) / nce_T``: [B*P, M+1].

    feat_q, feat_k: [B*P, d] (rows L2-normalised by the caller); feat_k is detached (as in CUT)
    unless ``detach_k=False``. Column 0 is l_pos[i] = <q_i, k_i>; the other M columns are
    q_i . k_j over i's group (G = batch_size groups of M = P rows, or G = 1, M = B*P when
    include_all_negatives_from_minibatch), with the diagonal set to -10.0 before dividing by
    nce_T. Returned in feat_q's dtype.
    """
    logits = _patch_nce_logits(feat_q, feat_k, nce_T, batch_size,
                               include_all_negatives_from_minibatch, detach_k)
    return logits.to(feat_q.dtype)


@_exact
def patch_nce_loss(feat_q, feat_k, nce_T=0.07, batch_size=1,
                   include_all_negatives_from_minibatch=False, *, detach_k=True):
    """Per-row PatchNCE loss ``cross_entropy(logits, 0, reduction='none')``: [B*P].

    Same arguments as ``patch_nce_logits``; gradient to feat_q only (and to feat_k with
    ``detach_k=False``). Returned in the compute dtype (float32 for half inputs).
    """
    logits = _patch_nce_logits(feat_q, feat_k, nce_T, batch_size,
                               include_all_negatives_from_minibatch, detach_k)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction="none")


@_exact
def clip_loss(image_embeds, text_embeds, logit_scale, *, exponentiated=False):
    """Symmetric CLIP loss; a 0-dim tensor.

    image_embeds, text_embeds: [n, d]; logit_scale: 0-dim learnable log-temperature.
    ``logits = exp(logit_scale) * image_embeds @ text_embeds^T`` [n, n];
    ``(CE(logits, arange(n)) + CE(logits^T, arange(n))) / 2``. Gradients to all three inputs.
    ``exponentiated=True``: logit_scale is the multiplier itself (already exp(t), as CLIP's
    and open_clip's training code pass it), ``logits = logit_scale * image_embeds @ text_embeds^T``.
    Returned in the compute dtype (float32 for half inputs).
    """
    img = _up(image_embeds)
    txt = _up(text_embeds)
    scale = _up(logit_scale) if exponentiated else _up(logit_scale).exp()
    logits = scale * (img @ txt.t())
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


# --------------------------------------------------------------------------------------------
# 4. Swin window attention (W-MSA / SW-MSA)
# --------------------------------------------------------------------------------------------

# Swin's and timm's additive mask value for token pairs from different regions (not -inf).
MASK_VALUE = -100.0


def relative_position_index(window_size, device=None):
    """Swin/timm relative position index: [N, N] int64, N = Wh * Ww.

    ``window_size`` is an int (square window) or a pair (Wh, Ww). index[i, j] =
    (dh + Wh - 1) * (2*Ww - 1) + (dw + Ww - 1) with (dh, dw) = coords_i - coords_j.
    """
    wh, ww = (window_size, window_size) if isinstance(window_size, int) else tuple(window_size)
    coords_h = torch.arange(wh, device=device)
    coords_w = torch.arange(ww, device=device)
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"))  # [2, Wh, Ww]
    coords_flatten = torch.flatten(coords, 1)                                # [2, N]
    relative = coords_flatten[:, :, None] - coords_flatten[:, None, :]       # [2, N, N]
    relative = relative.permute(1, 2, 0)                                     # [N, N, 2]
    row = (relative[:, :, 0] + wh - 1) * (2 * ww - 1)
    col = relative[:, :, 1] + ww - 1
    return row + col


def relative_position_bias(table, index, num_heads):
    """Gather the bias: table [(2Ws-1)^2, heads], index [N, N] (or flat [N*N], as torchvision
    stores it) -> [heads, N, N] (table dtype)."""
    n = index.shape[0] if index.dim() == 2 else math.isqrt(index.numel())
    bias = table[index.reshape(-1)].view(n, n, num_heads)
    return bias.permute(2, 0, 1).contiguous()


def window_partition(x, window_size):
    """[B, H, W, C] -> [B*nW, Ws*Ws, C]; windows ordered image-major, then row-major.

    H and W must be multiples of window_size.
    """
    B, H, W, C = x.shape
    ws = window_size
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)


def window_reverse(windows, window_size, H, W):
    """Inverse of ``window_partition``: [B*nW, Ws*Ws, C] (or [B*nW, Ws, Ws, C]) -> [B, H, W, C]."""
    ws = window_size
    C = windows.shape[-1]
    B = windows.shape[0] // ((H // ws) * (W // ws))
    x = windows.reshape(B, H // ws, W // ws, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def shift_mask(H, W, window_size, shift, device=None, mask_value=MASK_VALUE):
    """Swin's SW-MSA attention mask: [nW, N, N] float32, 0 within a region, ``mask_value``
    (Swin's and timm's -100.0) across.

    H, W are the (padded) sizes, multiples of window_size; ``shift`` is an int or a per-axis
    pair (sh, sw). Built as Swin does: label the regions (three slices per shifted axis, one per
    unshifted axis) of an [1, H, W, 1] image, partition into windows, and mask every pair of
    tokens whose labels differ. (With no shift every label is the same and the mask is all zeros.)
    """
    ws = window_size
    sh, sw = (shift, shift) if isinstance(shift, int) else tuple(shift)

    def slices(s):
        return (slice(0, -ws), slice(-ws, -s), slice(-s, None)) if s > 0 else (slice(0, None),)

    img_mask = torch.zeros((1, H, W, 1), dtype=torch.float32, device=device)
    cnt = 0
    for h in slices(sh):
        for w in slices(sw):
            img_mask[:, h, w, :] = cnt
            cnt += 1
    mask_windows = window_partition(img_mask, ws).squeeze(-1)            # [nW, N]
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)     # [nW, N, N]
    return attn_mask.masked_fill(attn_mask != 0, mask_value).masked_fill(attn_mask == 0, 0.0)


@_exact
def window_attention(q, k, v, bias=None, mask=None, scale=None):
    """``softmax(q @ k^T * scale + bias + mask) @ v`` per window and head.

    q, k, v: [B*nW, heads, N, d]; bias: [heads, N, N] or None; mask: [nW, N, N] or None, shared
    over the batch (row r of B*nW uses mask[r % nW]); scale defaults to d ** -0.5.
    Returns [B*nW, heads, N, d] in q's dtype.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    qf, kf, vf = _up(q), _up(k), _up(v)
    attn = (qf @ kf.transpose(-2, -1)) * scale                       # [B_, heads, N, N]
    if bias is not None:
        attn = attn + _up(bias).unsqueeze(0)
    if mask is not None:
        b_, heads, n, _ = attn.shape
        nw = mask.shape[0]
        attn = attn.view(b_ // nw, nw, heads, n, n) + _up(mask)[None, :, None, :, :]
        attn = attn.view(b_, heads, n, n)
    attn = attn.softmax(dim=-1)
    return (attn @ vf).to(q.dtype)


@_exact
def swin_block_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias,
                         relative_position_bias_table, window_size, num_heads, shift_size=0,
                         index=None, scale=None, mask_value=MASK_VALUE, roll_first=False):
    """The W-MSA / SW-MSA path of one Swin block (no norm, MLP or residual).

    x: [B, H, W, C]; qkv_weight [3C, C], qkv_bias [3C] or None; proj_weight [C, C], proj_bias
    [C] or None; relative_position_bias_table [(2Ws-1)^2, heads].
    Pads H, W with zeros at the bottom/right up to multiples of window_size (before the qkv
    projection, as Swin pads the normed x), rolls by -shift_size along each axis that the window
    does not cover (torchvision's rule: along an axis with window >= padded size the shift is
    dropped, and with it that axis's part of the mask), partitions, runs window attention with
    the relative position bias (and the shift mask of the padded size), merges heads, projects,
    reverses, rolls back and crops.
    ``roll_first`` (timm's order): roll the H x W map by -shift_size first (no axis dropped: timm
    zeroes the shift when it builds such a block), then pad; the output is cropped, then rolled back.
    index (the [N, N] relative position index) defaults to Swin's, scale to head_dim ** -0.5,
    mask_value to -100.0.
    Returns [B, H, W, C] in x's dtype.
    """
    head_dim = x.shape[3] // num_heads

    def attend(windows, mask):
        b_, n, C = windows.shape
        qkv = F.linear(windows, _up(qkv_weight), _up(qkv_bias))
        qkv = qkv.reshape(b_, n, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                                 # [B_, heads, N, d]
        bias = relative_position_bias(_up(relative_position_bias_table),
                                      index if index is not None else
                                      relative_position_index(window_size, device=x.device), num_heads)
        out = window_attention(q, k, v, bias=bias, mask=mask, scale=scale)
        return F.linear(out.transpose(1, 2).reshape(b_, n, C), _up(proj_weight), _up(proj_bias))

    return _windowed(x, window_size, shift_size, roll_first, mask_value, attend)


def _windowed(x, ws, shift_size, roll_first, mask_value, attend):
    """A Swin block's attention path around ``attend(windows [B_, N, C] fp32, mask)``: pad and
    roll (in the order ``roll_first`` picks), partition, attend, reverse, roll back and crop."""
    B, H, W, C = x.shape
    xf = _up(x)
    pad_b = (ws - H % ws) % ws
    pad_r = (ws - W % ws) % ws
    Hp, Wp = H + pad_b, W + pad_r
    if roll_first:
        shifts = (shift_size, shift_size)
        xf = torch.roll(xf, shifts=(-shifts[0], -shifts[1]), dims=(1, 2)) if any(shifts) else xf
        xf = F.pad(xf, (0, 0, 0, pad_r, 0, pad_b))
    else:
        xf = F.pad(xf, (0, 0, 0, pad_r, 0, pad_b))
        shifts = (shift_size if ws < Hp else 0, shift_size if ws < Wp else 0)
        xf = torch.roll(xf, shifts=(-shifts[0], -shifts[1]), dims=(1, 2)) if any(shifts) else xf
    mask = shift_mask(Hp, Wp, ws, shifts, device=x.device, mask_value=mask_value) if any(shifts) else None
    out = window_reverse(attend(window_partition(xf, ws), mask), ws, Hp, Wp)   # [B, Hp, Wp, C]
    if roll_first:
        out = out[:, :H, :W, :]
        out = torch.roll(out, shifts=shifts, dims=(1, 2)) if any(shifts) else out
        return out.contiguous().to(x.dtype)
    out = torch.roll(out, shifts=shifts, dims=(1, 2)) if any(shifts) else out
    return out[:, :H, :W, :].contiguous().to(x.dtype)


# --------------------------------------------------------------------------------------------
# 5. SAGAN self-attention
# --------------------------------------------------------------------------------------------

def sagan_output_dtype(q, x=None, gamma=None) -> torch.dtype:
    """The dtype of SAGAN's ``gamma * out + x`` with ``out`` (the attention output) in q's dtype,
    by torch's type promotion: x takes part, and gamma too unless it is 0-dim (a 0-dim tensor
    does not promote within its category). Without x, q's dtype. Under bf16 autocast SAGAN's
    ``Self_Attn`` (an fp32 gamma of shape [1]) thus returns fp32."""
    if x is None:
        return q.dtype
    q_dtype = q.dtype
    if x.dtype is q_dtype and gamma.dtype is q_dtype:   # the common case, without promote_types
        return q_dtype
    dtype = q_dtype if gamma.dim() == 0 else torch.promote_types(q_dtype, gamma.dtype)
    return torch.promote_types(dtype, x.dtype)


@_exact
def sagan_attention(q, k, v, x=None, gamma=None, return_attention=False):
    """SAGAN attention: ``out = v @ softmax(q^T @ k, -1)^T`` (no 1/sqrt(d) scaling).

    q: [B, d_qk, N]; k: [B, d_qk, N_k]; v: [B, d_v, N_k]. attention: [B, N, N_k];
    out: [B, d_v, N]. If both gamma (scalar or [1]) and x are given, out is reshaped to x's
    shape (x: [B, d_v, N] or [B, d_v, W, H]) and ``gamma * out + x`` is returned instead;
    otherwise out is returned as is. Returns out, or (out, attention) if return_attention; the
    attention in q's dtype, out in ``sagan_output_dtype(q, x, gamma)``.
    """
    qf, kf, vf = _up(q), _up(k), _up(v)
    energy = torch.bmm(qf.transpose(1, 2), kf)                         # [B, N, N_k]
    attention = energy.softmax(dim=-1)
    out = torch.bmm(vf, attention.transpose(1, 2))                     # [B, d_v, N]
    if gamma is not None and x is not None:
        out = _up(gamma) * out.reshape(x.shape) + _up(x)
    out = out.to(sagan_output_dtype(q, x, gamma))
    if return_attention:
        return out, attention.to(q.dtype)
    return out


# --------------------------------------------------------------------------------------------
# 6. Spectral normalisation (power iteration)
# --------------------------------------------------------------------------------------------

def _l2_normalize(a, eps, rule):
    if rule == "max":
        return F.normalize(a, dim=0, eps=eps)        # a / max(||a||, eps), torch's rule
    if rule == "add":
        return a / (a.norm() + eps)                  # SAGAN's l2normalize
    raise ValueError(f"rule must be 'max' or 'add', got {rule!r}")


@_exact
def power_iteration(weight_mat, u, v, n_power_iterations=1, eps=1e-12, rule="max"):
    """Power iteration for the largest singular value of weight_mat [h, w].

    u: [h], v: [w]. Each iteration, without grad: ``v = normalize(W^T u)``, then
    ``u = normalize(W v)``; rule "max" is torch's ``a / max(||a||, eps)``, rule "add" SAGAN's
    ``a / (||a|| + eps)``. Returns (sigma, u, v): ``sigma = u . (W v)`` is 0-dim and carries a
    gradient to weight_mat only (u, v are constants); u, v are new tensors (the inputs are not
    modified), detached, in their input dtypes. sigma is in weight_mat's dtype.
    """
    w = _up(weight_mat)
    u_new = u.detach().to(w.dtype, copy=True)
    v_new = v.detach().to(w.dtype, copy=True)
    with torch.no_grad():
        for _ in range(n_power_iterations):
            v_new = _l2_normalize(torch.mv(w.t(), u_new), eps, rule)
            u_new = _l2_normalize(torch.mv(w, v_new), eps, rule)
    sigma = torch.dot(u_new, torch.mv(w, v_new))
    return sigma.to(weight_mat.dtype), u_new.to(u.dtype), v_new.to(v.dtype)


@_exact
def spectral_norm_weight(weight, u, v, dim=0, n_power_iterations=1, eps=1e-12, rule="max"):
    """Spectrally normalised weight: (weight / sigma, u, v).

    weight: any shape, viewed as a matrix [h, w] with axis ``dim`` moved first then flattened
    (dim=1 for ConvTranspose, as in torch); u: [h], v: [w]. See ``power_iteration`` for the
    rest. The result has weight's shape and dtype and is differentiable (double backward
    included) w.r.t. weight.
    """
    dim = dim % weight.dim()
    wf = _up(weight)
    mat = wf
    if dim != 0:
        mat = mat.permute(dim, *[d for d in range(mat.dim()) if d != dim])
    mat = mat.reshape(mat.shape[0], -1)
    sigma, u_new, v_new = power_iteration(mat, u, v, n_power_iterations, eps, rule)
    return (wf / sigma).to(weight.dtype), u_new, v_new


# --------------------------------------------------------------------------------------------
# 3.3 SigLIP sigmoid loss (appended after section 6; docs/ops.md section 3.3)
# --------------------------------------------------------------------------------------------

@_exact
def siglip_loss(image_emb, text_emb, logit_scale, logit_bias):
    """SigLIP's pairwise sigmoid loss (open_clip's ``SigLipLoss`` on one process); a 0-dim tensor.

    image_emb, text_emb: [n, d]; logit_scale: the multiplier itself (already exponentiated, as
    open_clip's ``get_logits`` takes it), logit_bias: the additive bias; both 0-dim or
    one-element tensors. ``logits = logit_scale * image_emb @ text_emb^T + logit_bias`` [n, n],
    labels +1 on the diagonal and -1 elsewhere, ``loss = -sum(logsigmoid(labels * logits)) / n``.
    Gradients to all four inputs. Returned in the compute dtype (float32 for half inputs).
    """
    img = _up(image_emb)
    txt = _up(text_emb)
    logits = _up(logit_scale).reshape(()) * (img @ txt.t()) + _up(logit_bias).reshape(())
    n = img.shape[0]
    labels = 2 * torch.eye(n, device=img.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


# --------------------------------------------------------------------------------------------
# 4.4 Swin V2 window attention: cosine attention (appended; docs/ops.md section 4.4)
# --------------------------------------------------------------------------------------------

# Swin V2 clamps each head's logit scale at log(1 / 0.01) before exponentiating it.
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)


def window_attention_v2(q, k, v, logit_scale, bias=None, mask=None):
    """Swin V2's ``softmax(q^ @ k^^T * exp(min(logit_scale, log 100)) + bias + mask) @ v``, q^ and
    k^ the rows of q and k over max(||row||_2, 1e-12) (``F.normalize``).

    q, k, v: [B*nW, heads, N, d]; logit_scale: [heads, 1, 1]; bias (the dense
    ``16 * sigmoid(cpb)`` gathered to [heads, N, N]) and mask as ``window_attention``.
    Returns [B*nW, heads, N, d] in q's dtype. The head's scale is folded into q^ and the rest is
    ``window_attention`` with scale 1.
    """
    with torch.autocast(q.device.type, enabled=False):
        scale = torch.clamp(_up(logit_scale), max=LOGIT_SCALE_MAX).exp()
        qn = F.normalize(_up(q), dim=-1) * scale
        kn = F.normalize(_up(k), dim=-1)
    return window_attention(qn, kn, v, bias=bias, mask=mask, scale=1.0).to(q.dtype)


@_exact
def swin_block_attention_v2(x, qkv_weight, q_bias, v_bias, proj_weight, proj_bias, logit_scale,
                            position_bias, window_size, num_heads, shift_size=0, index=None,
                            mask_value=MASK_VALUE, roll_first=False):
    """The W-MSA / SW-MSA path of one Swin V2 block: ``swin_block_attention``'s pad, roll,
    partition (and its two orders, ``roll_first``), with qkv bias ``cat(q_bias, 0, v_bias)`` (or
    none) and ``window_attention_v2`` as the core. ``position_bias``: the dense
    ``[heads, N, N]`` additive bias, or a table ``[(2Ws-1)^2, heads]`` gathered with ``index``
    (Swin's by default).
    """
    head_dim = x.shape[3] // num_heads

    def attend(windows, mask):
        b_, n, C = windows.shape
        qkv_bias = None
        if q_bias is not None:
            qkv_bias = torch.cat((_up(q_bias), torch.zeros_like(_up(q_bias)), _up(v_bias)))
        qkv = F.linear(windows, _up(qkv_weight), qkv_bias)
        qkv = qkv.reshape(b_, n, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        bias = _up(position_bias)
        if bias.dim() == 2:
            bias = relative_position_bias(bias, index if index is not None else
                                          relative_position_index(window_size, device=x.device), num_heads)
        out = window_attention_v2(qkv[0], qkv[1], qkv[2], logit_scale, bias=bias, mask=mask)
        return F.linear(out.transpose(1, 2).reshape(b_, n, C), _up(proj_weight), _up(proj_bias))

    return _windowed(x, window_size, shift_size, roll_first, mask_value, attend)