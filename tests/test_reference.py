"""fastnote.reference against literal transcriptions of the code it replaces.

The seed code (SAGAN Self_Attn, the perceptual loss's gram / style / TV terms, CUT's
PatchNCELoss), timm / Swin window attention, torchvision's SqueezeExcitation and torch's
spectral_norm are written out below as their authors wrote them; reference.py was written from
docs/ops.md independently. Forward values and the gradient of every input that gets one are
compared in float64 (so only a difference in the maths can show), and gradcheck runs in float64.
"""

import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastnote import reference as ref
from transcriptions import CUTPatchNCELoss, Self_Attn, TorchvisionSqueezeExcitation, seed_gram

ATOL = RTOL = 2e-5


def close(actual, expected, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def grads_of(out_fn, inputs):
    """Run out_fn(*inputs), backprop a fixed random cotangent, return (output, grads)."""
    out = out_fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(1234)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    gs = torch.autograd.grad(loss, inputs)
    return out, gs


def compare_with_grads(fn_ref, fn_expected, inputs, atol=1e-10, rtol=1e-9):
    """Same maths, compared in float64: the two sides sum in different orders, and in float32
    that rounding (about 1e-4 relative after cancellation, and different per CPU's BLAS) would
    hide a real difference of the same size."""
    inputs = [t.double() if t.is_floating_point() else t for t in inputs]
    a_inputs = [leaf(t) for t in inputs]
    b_inputs = [leaf(t) for t in inputs]
    out_a, g_a = grads_of(fn_ref, a_inputs)
    out_b, g_b = grads_of(fn_expected, b_inputs)
    close(out_a, out_b, atol, rtol)
    for ga, gb in zip(g_a, g_b):
        close(ga, gb, atol, rtol)


def gradcheck(fn, *inputs):
    inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


# ============================================================================================
# 1. hard-swish / hard-sigmoid / squeeze-excitation
# ============================================================================================

def boundary_points():
    # the kinks exactly, plus random values on both sides and far out
    return torch.cat([torch.tensor([-3.0, 3.0, 0.0, -6.0, 6.0]), torch.randn(64) * 4])


def test_hard_sigmoid_hard_swish_forward_matches_formula():
    x = boundary_points()
    close(ref.hard_sigmoid(x), torch.clamp(x + 3, 0, 6) / 6)
    close(ref.hard_swish(x), x * torch.clamp(x + 3, 0, 6) / 6)
    close(ref.hard_sigmoid(x), F.hardsigmoid(x))
    close(ref.hard_swish(x), F.hardswish(x))


def test_hard_swish_grad_matches_torch_including_kinks():
    x = boundary_points()
    compare_with_grads(ref.hard_swish, F.hardswish, [x])
    compare_with_grads(ref.hard_sigmoid, F.hardsigmoid, [x])


def test_hard_swish_grad_matches_spec_away_from_kinks():
    x = torch.randn(200) * 4
    x = x[(x.abs() - 3).abs() > 1e-3]
    xs = leaf(x)
    (g,) = torch.autograd.grad(ref.hard_swish(xs).sum(), xs)
    expected = torch.where(x <= -3, torch.zeros_like(x),
                           torch.where(x >= 3, torch.ones_like(x), x / 3 + 0.5))
    close(g, expected)
    xs = leaf(x)
    (g,) = torch.autograd.grad(ref.hard_sigmoid(xs).sum(), xs)
    close(g, torch.where(x.abs() < 3, torch.full_like(x, 1 / 6), torch.zeros_like(x)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hard_swish_low_precision_dtype(dtype):
    x = (torch.randn(100) * 4).to(dtype)
    y = ref.hard_swish(x)
    assert y.dtype == dtype
    close(y, F.hardswish(x.float()).to(dtype), atol=0, rtol=0)


ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "hard_swish": nn.Hardswish}
GATES = {"hard_sigmoid": nn.Hardsigmoid, "sigmoid": nn.Sigmoid}


def se_params(C, Cr):
    # large enough that the hard-sigmoid gate saturates for some channels
    return [torch.randn(Cr, C, 1, 1), torch.randn(Cr), torch.randn(C, Cr, 1, 1) * 3,
            torch.randn(C)]


def run_torchvision_se(x, w1, b1, w2, b2, activation, gate, pre=None):
    C, Cr = x.shape[1], w1.shape[0]
    m = TorchvisionSqueezeExcitation(C, Cr, ACTIVATIONS[activation], GATES[gate])
    # the module's parameters are replaced by the test's leaves so that gradients reach them
    del m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias
    m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias = w1, b1, w2, b2
    return m(pre(x) if pre is not None else x)


@pytest.mark.parametrize("activation", ["relu", "silu", "hard_swish"])
@pytest.mark.parametrize("gate", ["hard_sigmoid", "sigmoid"])
@pytest.mark.parametrize("conv_shaped", [True, False])
def test_squeeze_excitation_matches_torchvision(activation, gate, conv_shaped):
    B, C, Cr, H, W = 2, 16, 8, 5, 3
    x = torch.randn(B, C, H, W)
    w1, b1, w2, b2 = se_params(C, Cr)

    def ours(x, w1, b1, w2, b2):
        if not conv_shaped:
            w1, w2 = w1.flatten(1), w2.flatten(1)
        return ref.squeeze_excitation(x, w1, b1, w2, b2, activation=activation, gate=gate)

    def theirs(x, w1, b1, w2, b2):
        return run_torchvision_se(x, w1, b1, w2, b2, activation, gate)

    compare_with_grads(ours, theirs, [x, w1, b1, w2, b2])


def test_squeeze_excitation_matches_seed_se_block():
    # the SE block of the MobileNet notes (002): it returns the gate; the caller multiplies
    class SE(nn.Module):
        def __init__(self, in_chnls, ratio):
            super(SE, self).__init__()
            self.squeeze = nn.AdaptiveAvgPool2d((1, 1))
            self.compress = nn.Conv2d(in_chnls, in_chnls // ratio, 1, 1, 0)
            self.excitation = nn.Conv2d(in_chnls // ratio, in_chnls, 1, 1, 0)

        def forward(self, x):
            out = self.squeeze(x)
            out = self.compress(out)
            out = F.relu(out)
            out = self.excitation(out)
            return torch.sigmoid(out)

    se = SE(12, 4)
    x = torch.randn(3, 12, 4, 4)
    p = se.compress, se.excitation
    close(ref.squeeze_excitation(x, p[0].weight, p[0].bias, p[1].weight, p[1].bias,
                                 activation="relu", gate="sigmoid"),
          x * se(x))


@pytest.mark.parametrize("activation,gate", [("relu", "hard_sigmoid"), ("hard_swish", "sigmoid")])
def test_hswish_se_matches_hardswish_then_torchvision(activation, gate):
    B, C, Cr, H, W = 2, 24, 8, 4, 6
    u = torch.randn(B, C, H, W) * 3
    w1, b1, w2, b2 = se_params(C, Cr)

    def ours(u, w1, b1, w2, b2):
        return ref.hswish_se(u, w1, b1, w2, b2, activation=activation, gate=gate)

    def theirs(u, w1, b1, w2, b2):
        return run_torchvision_se(u, w1, b1, w2, b2, activation, gate, pre=F.hardswish)

    compare_with_grads(ours, theirs, [u, w1, b1, w2, b2])


def test_hard_swish_gradcheck():
    x = torch.randn(40) * 4
    x = x[(x.abs() - 3).abs() > 0.05]
    gradcheck(ref.hard_swish, x)
    gradcheck(ref.hard_sigmoid, x)


def test_squeeze_excitation_gradcheck():
    x = torch.randn(2, 6, 3, 3)
    w1, b1, w2, b2 = torch.randn(4, 6), torch.randn(4), torch.randn(6, 4), torch.randn(6)
    gradcheck(lambda *a: ref.squeeze_excitation(*a, activation="silu", gate="sigmoid"),
              x, w1, b1, w2, b2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hswish_se_low_precision(dtype):
    u = torch.randn(2, 8, 4, 4)
    w1, b1, w2, b2 = [t.to(dtype) for t in se_params(8, 4)]
    out = ref.hswish_se(u.to(dtype), w1, b1, w2, b2)
    assert out.dtype == dtype
    expected = ref.hswish_se(u.to(dtype).float(), *[t.float() for t in (w1, b1, w2, b2)])
    close(out.float(), expected, atol=2e-2, rtol=2e-2)


# ============================================================================================
# 2. gram, style loss, total variation (seed 000: PerceptualLoss)
# ============================================================================================

def seed_style_term(y_hat_feature, style_gram):
    mse_sum = nn.MSELoss(reduction='sum')
    _, c_l, h_l, w_l = y_hat_feature.shape
    return mse_sum(seed_gram(y_hat_feature), style_gram) / float(c_l * h_l * w_l)


def seed_tv(y_hat):
    b, c, h, w = y_hat.shape
    diff_i = torch.sum(torch.abs(y_hat[:, :, :, 1:] - y_hat[:, :, :, :-1]))
    diff_j = torch.sum(torch.abs(y_hat[:, :, 1:, :] - y_hat[:, :, :-1, :]))
    L_tv = (diff_i + diff_j) / float(c * h * w)
    return L_tv


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 3, 4, 4), (3, 1, 1, 6)])
def test_gram_matches_seed(shape):
    compare_with_grads(ref.gram, seed_gram, [torch.randn(shape)])


@pytest.mark.parametrize("normalize,divisor", [("chw", 5 * 11), ("hw", 11), ("none", 1)])
def test_gram_3d_and_normalize(normalize, divisor):
    x = torch.randn(2, 5, 11)

    def theirs(x):
        return torch.bmm(x, x.transpose(1, 2)) / divisor

    compare_with_grads(lambda x: ref.gram(x, normalize), theirs, [x])
    x4 = torch.randn(2, 5, 3, 4)
    n4 = {"chw": 5 * 12, "hw": 12, "none": 1}[normalize]
    close(ref.gram(x4, normalize), torch.bmm(x4.flatten(2), x4.flatten(2).transpose(1, 2)) / n4)


def test_style_loss_matches_seed_batch_target():
    # the seed repeats the style image batch_size times: style_gram is [B, C, C]
    B, C, H, W = 3, 6, 5, 4
    style = torch.randn(1, C, H, W).repeat(B, 1, 1, 1)
    with torch.no_grad():
        style_gram = seed_gram(style)
    x = torch.randn(B, C, H, W)
    compare_with_grads(ref.style_loss, seed_style_term, [x, style_gram])


@pytest.mark.parametrize("target_shape", ["cc", "1cc"])
def test_style_loss_broadcast_target(target_shape):
    B, C, H, W = 2, 4, 3, 5
    t = seed_gram(torch.randn(1, C, H, W))
    target = t[0] if target_shape == "cc" else t

    def ours(x, target):
        return ref.style_loss(x, target)

    def theirs(x, target):
        full = target.expand(B, C, C) if target.dim() == 3 else target.unsqueeze(0).expand(B, C, C)
        return seed_style_term(x, full)

    compare_with_grads(ours, theirs, [torch.randn(B, C, H, W), target])


def test_style_loss_normalize_hw():
    B, C, H, W = 2, 4, 3, 5
    x, target = torch.randn(B, C, H, W), torch.randn(C, C)
    f = x.flatten(2)
    expected = ((f @ f.transpose(1, 2) / (H * W) - target) ** 2).sum() / (C * H * W)
    close(ref.style_loss(x, target, normalize="hw"), expected)


@pytest.mark.parametrize("shape", [(2, 3, 6, 5), (1, 1, 2, 9)])
def test_tv_loss_matches_seed(shape):
    compare_with_grads(ref.tv_loss, seed_tv, [torch.randn(shape)])


def test_gram_style_tv_gradcheck():
    x = torch.randn(2, 3, 4, 3)
    gradcheck(ref.gram, x)
    gradcheck(lambda x: ref.gram(x, "none"), torch.randn(2, 3, 5))
    gradcheck(ref.style_loss, x, torch.randn(3, 3))
    gradcheck(ref.tv_loss, x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gram_and_losses_low_precision(dtype):
    x = torch.randn(2, 4, 6, 6)
    g = ref.gram(x.to(dtype))
    assert g.dtype == dtype
    close(g.float(), ref.gram(x.to(dtype).float()), atol=1e-2, rtol=1e-2)
    loss = ref.style_loss(x.to(dtype), torch.zeros(4, 4, dtype=dtype))
    assert loss.dtype == torch.float32
    close(loss, ref.style_loss(x.to(dtype).float(), torch.zeros(4, 4)))
    assert ref.tv_loss(x.to(dtype)).dtype == torch.float32


# ============================================================================================
# 3. PatchNCE (seed 003: CUT) and CLIP
# ============================================================================================

SeedPatchNCELoss = CUTPatchNCELoss  # CUT's PatchNCELoss, transcribed once in tests/transcriptions.py


def nce_feats(B, P, d, scale=1.0):
    q = F.normalize(torch.randn(B * P, d), dim=1) * scale
    k = F.normalize(q + 0.5 * torch.randn(B * P, d), dim=1) * scale
    return q, k


NCE_CASES = [(2, 5, 8, False), (2, 5, 8, True), (3, 4, 16, False), (1, 7, 4, True),
             (4, 3, 8, True)]


@pytest.mark.parametrize("B,P,d,all_neg", NCE_CASES)
@pytest.mark.parametrize("nce_T", [0.07, 0.5])
def test_patch_nce_loss_matches_cut(B, P, d, all_neg, nce_T):
    q, k = (t.double() for t in nce_feats(B, P, d))
    opt = types.SimpleNamespace(nce_T=nce_T, batch_size=B,
                                nce_includes_all_negatives_from_minibatch=all_neg)
    seed = SeedPatchNCELoss(opt)

    def ours(q):
        return ref.patch_nce_loss(q, k, nce_T=nce_T, batch_size=B,
                                  include_all_negatives_from_minibatch=all_neg)

    compare_with_grads(ours, lambda q: seed(q, k), [q])


@pytest.mark.parametrize("B,P,d,all_neg", NCE_CASES)
def test_patch_nce_logits_match_cut(B, P, d, all_neg):
    q, k = (t.double() for t in nce_feats(B, P, d))
    opt = types.SimpleNamespace(nce_T=0.07, batch_size=B,
                                nce_includes_all_negatives_from_minibatch=all_neg)
    seed = SeedPatchNCELoss(opt)
    captured = {}

    def capture(module, args, output):
        captured["logits"] = args[0]   # the `out` that forward hands to the cross-entropy

    seed.cross_entropy_loss.register_forward_hook(capture)

    def ours(q):
        return ref.patch_nce_logits(q, k, nce_T=0.07, batch_size=B,
                                    include_all_negatives_from_minibatch=all_neg)

    def theirs(q):
        seed(q, k)
        return captured["logits"]

    compare_with_grads(ours, theirs, [q])
    M = B * P if all_neg else P
    assert ours(q).shape == (B * P, M + 1)


def test_patch_nce_feat_k_gets_no_gradient_and_inputs_untouched():
    q, k = nce_feats(2, 4, 8)
    q0, k0 = q.clone(), k.clone()
    qs, ks = leaf(q), leaf(k)
    ref.patch_nce_loss(qs, ks, batch_size=2).sum().backward()
    assert ks.grad is None and qs.grad is not None
    assert torch.equal(qs.detach(), q0) and torch.equal(ks.detach(), k0)


def test_patch_nce_gradcheck():
    q, k = nce_feats(2, 3, 4)
    k = k.double()
    gradcheck(lambda q: ref.patch_nce_loss(q, k, nce_T=0.07, batch_size=2), q)
    gradcheck(lambda q: ref.patch_nce_loss(q, k, nce_T=0.2, batch_size=2,
                                           include_all_negatives_from_minibatch=True), q)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_patch_nce_low_precision(dtype):
    q, k = nce_feats(2, 6, 16)
    loss = ref.patch_nce_loss(q.to(dtype), k.to(dtype), batch_size=2)
    assert loss.dtype == torch.float32
    close(loss, ref.patch_nce_loss(q.to(dtype).float(), k.to(dtype).float(), batch_size=2))
    assert ref.patch_nce_logits(q.to(dtype), k.to(dtype), batch_size=2).dtype == dtype


def clip_loss_obvious(image_embeds, text_embeds, logit_scale):
    logits_per_image = logit_scale.exp() * image_embeds @ text_embeds.t()
    logits_per_text = logits_per_image.t()
    labels = torch.arange(image_embeds.shape[0])
    return (F.cross_entropy(logits_per_image, labels)
            + F.cross_entropy(logits_per_text, labels)) / 2


@pytest.mark.parametrize("n,d", [(6, 8), (1, 4), (9, 3)])
def test_clip_loss_matches_obvious(n, d):
    img = F.normalize(torch.randn(n, d), dim=1)
    txt = F.normalize(torch.randn(n, d), dim=1)
    t = torch.tensor(2.0)
    compare_with_grads(ref.clip_loss, clip_loss_obvious, [img, txt, t])


def test_clip_loss_gradcheck():
    gradcheck(ref.clip_loss, torch.randn(4, 3), torch.randn(4, 3), torch.tensor(0.7))


# ============================================================================================
# 4. Swin window attention (timm WindowAttention, Swin block path)
# ============================================================================================

def swin_window_partition(x, window_size):
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)
    return windows


def swin_window_reverse(windows, window_size, H, W):
    B = int(windows.shape[0] / (H * W / window_size / window_size))
    x = windows.view(B, H // window_size, W // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)
    return x


def swin_attn_mask(Hp, Wp, window_size, shift_size):
    """BasicLayer.forward of Swin (object-detection version, H, W padded up to Hp, Wp)."""
    img_mask = torch.zeros((1, Hp, Wp, 1))
    h_slices = (slice(0, -window_size),
                slice(-window_size, -shift_size),
                slice(-shift_size, None))
    w_slices = (slice(0, -window_size),
                slice(-window_size, -shift_size),
                slice(-shift_size, None))
    cnt = 0
    for h in h_slices:
        for w in w_slices:
            img_mask[:, h, w, :] = cnt
            cnt += 1
    mask_windows = swin_window_partition(img_mask, window_size)
    mask_windows = mask_windows.view(-1, window_size * window_size)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(
        attn_mask == 0, float(0.0))
    return attn_mask


def timm_relative_position_index(window_size):
    coords_h = torch.arange(window_size[0])
    coords_w = torch.arange(window_size[1])
    coords = torch.stack(torch.meshgrid([coords_h, coords_w], indexing='ij'))  # 2, Wh, Ww
    coords_flatten = torch.flatten(coords, 1)  # 2, Wh*Ww
    relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]  # 2, Wh*Ww, Wh*Ww
    relative_coords = relative_coords.permute(1, 2, 0).contiguous()  # Wh*Ww, Wh*Ww, 2
    relative_coords[:, :, 0] += window_size[0] - 1  # shift to start from 0
    relative_coords[:, :, 1] += window_size[1] - 1
    relative_coords[:, :, 0] *= 2 * window_size[1] - 1
    return relative_coords.sum(-1)  # Wh*Ww, Wh*Ww


class WindowAttentionOfLeaves(nn.Module):
    """timm / Swin WindowAttention, written out with its parameters replaced by test leaves (for
    float64 gradcheck); the module form is ``transcriptions.SwinWindowAttention``."""

    def __init__(self, dim, window_size, num_heads):
        super().__init__()
        self.dim = dim
        self.window_size = (window_size, window_size)
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.register_buffer("relative_position_index",
                             timm_relative_position_index(self.window_size))
        self.softmax = nn.Softmax(dim=-1)

    def set_params(self, qkv_w, qkv_b, table, proj_w, proj_b):
        self.qkv_w, self.qkv_b, self.relative_position_bias_table = qkv_w, qkv_b, table
        self.proj_w, self.proj_b = proj_w, proj_b
        return self

    def qkv(self, x):
        return F.linear(x, self.qkv_w, self.qkv_b)

    def proj(self, x):
        return F.linear(x, self.proj_w, self.proj_b)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(
            2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # make torchscript happy (cannot use tensor as tuple)

        q = q * self.scale
        attn = (q @ k.transpose(-2, -1))

        relative_position_bias = self.relative_position_bias_table[
            self.relative_position_index.view(-1)].view(
            self.window_size[0] * self.window_size[1], self.window_size[0] * self.window_size[1],
            -1)  # Wh*Ww,Wh*Ww,nH
        relative_position_bias = relative_position_bias.permute(2, 0, 1).contiguous()
        attn = attn + relative_position_bias.unsqueeze(0)

        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
            attn = self.softmax(attn)
        else:
            attn = self.softmax(attn)

        x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
        x = self.proj(x)
        return x


def swin_block_attention_path(x, qkv_w, qkv_b, proj_w, proj_b, table, window_size, num_heads,
                              shift_size):
    """SwinTransformerBlock.forward's attention path (between norm1 and the residual)."""
    B, H, W, C = x.shape
    attn = WindowAttentionOfLeaves(C, window_size, num_heads).set_params(
        qkv_w, qkv_b, table, proj_w, proj_b)
    # pad feature maps to multiples of window size
    pad_l = pad_t = 0
    pad_r = (window_size - W % window_size) % window_size
    pad_b = (window_size - H % window_size) % window_size
    x = F.pad(x, (0, 0, pad_l, pad_r, pad_t, pad_b))
    _, Hp, Wp, _ = x.shape

    # cyclic shift
    if shift_size > 0:
        shifted_x = torch.roll(x, shifts=(-shift_size, -shift_size), dims=(1, 2))
        attn_mask = swin_attn_mask(Hp, Wp, window_size, shift_size)
    else:
        shifted_x = x
        attn_mask = None

    # partition windows
    x_windows = swin_window_partition(shifted_x, window_size)  # nW*B, window_size, window_size, C
    x_windows = x_windows.view(-1, window_size * window_size, C)  # nW*B, window_size*window_size, C

    # W-MSA/SW-MSA
    attn_windows = attn(x_windows, mask=attn_mask)  # nW*B, window_size*window_size, C

    # merge windows
    attn_windows = attn_windows.view(-1, window_size, window_size, C)
    shifted_x = swin_window_reverse(attn_windows, window_size, Hp, Wp)  # B H' W' C

    # reverse cyclic shift
    if shift_size > 0:
        x = torch.roll(shifted_x, shifts=(shift_size, shift_size), dims=(1, 2))
    else:
        x = shifted_x

    if pad_r > 0 or pad_b > 0:
        x = x[:, :H, :W, :].contiguous()
    return x


@pytest.mark.parametrize("ws", [1, 2, 3, 4, 7])
def test_relative_position_index_matches_timm(ws):
    idx = ref.relative_position_index(ws)
    expected = timm_relative_position_index((ws, ws))
    assert idx.dtype == torch.long
    assert torch.equal(idx, expected)


@pytest.mark.parametrize("Hp,Wp,ws,shift", [(8, 8, 4, 2), (12, 8, 4, 2), (14, 21, 7, 3),
                                            (6, 6, 3, 1), (8, 8, 4, 0)])
def test_shift_mask_matches_swin(Hp, Wp, ws, shift):
    m = ref.shift_mask(Hp, Wp, ws, shift)
    expected = swin_attn_mask(Hp, Wp, ws, shift) if shift > 0 else torch.zeros(
        (Hp // ws) * (Wp // ws), ws * ws, ws * ws)
    assert m.shape == expected.shape and m.dtype == torch.float32
    assert torch.equal(m, expected)
    if shift > 0:
        assert (m == -100.0).any()


@pytest.mark.parametrize("B,H,W,C,ws", [(2, 8, 12, 3, 4), (1, 7, 7, 5, 7), (3, 6, 4, 2, 2)])
def test_window_partition_reverse_match_swin(B, H, W, C, ws):
    x = torch.randn(B, H, W, C)
    win = ref.window_partition(x, ws)
    assert torch.equal(win, swin_window_partition(x, ws).view(-1, ws * ws, C))
    assert torch.equal(ref.window_reverse(win, ws, H, W), x)
    assert torch.equal(ref.window_reverse(win, ws, H, W),
                       swin_window_reverse(win.view(-1, ws, ws, C), ws, H, W))


def swin_params(C, heads, ws):
    return [torch.randn(3 * C, C) * C ** -0.5, torch.randn(3 * C) * 0.1,
            torch.randn(C, C) * C ** -0.5, torch.randn(C) * 0.1,
            torch.randn((2 * ws - 1) ** 2, heads) * 0.5]


@pytest.mark.parametrize("B,Hp,Wp,C,heads,ws,shift", [
    (2, 8, 8, 8, 2, 4, 2),     # SW-MSA, nW = 4
    (1, 8, 12, 6, 3, 4, 0),    # W-MSA, no mask
    (2, 6, 9, 4, 1, 3, 1),     # N = 9, odd
])
def test_window_attention_matches_timm(B, Hp, Wp, C, heads, ws, shift):
    x = torch.randn(B, Hp, Wp, C)
    windows = swin_window_partition(x, ws).view(-1, ws * ws, C)
    qkv_w, qkv_b, proj_w, proj_b, table = swin_params(C, heads, ws)
    mask = swin_attn_mask(Hp, Wp, ws, shift) if shift > 0 else None
    index = ref.relative_position_index(ws)

    def ours(xw, qkv_w, qkv_b, table, proj_w, proj_b):
        B_, N, _ = xw.shape
        qkv = F.linear(xw, qkv_w, qkv_b).reshape(B_, N, 3, heads, C // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = ref.relative_position_bias(table, index, heads)
        out = ref.window_attention(q, k, v, bias=bias, mask=mask)
        return F.linear(out.transpose(1, 2).reshape(B_, N, C), proj_w, proj_b)

    def theirs(xw, qkv_w, qkv_b, table, proj_w, proj_b):
        m = WindowAttentionOfLeaves(C, ws, heads).set_params(qkv_w, qkv_b, table, proj_w, proj_b)
        return m(xw, mask=mask)

    compare_with_grads(ours, theirs, [windows, qkv_w, qkv_b, table, proj_w, proj_b])


def test_window_attention_direct_and_scale():
    Bn, heads, N, d, nW = 6, 2, 5, 3, 3
    q, k, v = torch.randn(Bn, heads, N, d), torch.randn(Bn, heads, N, d), torch.randn(
        Bn, heads, N, d)
    bias = torch.randn(heads, N, N)
    mask = torch.where(torch.rand(nW, N, N) < 0.3, -100.0, 0.0)

    def theirs(q, k, v, bias, scale):
        a = q @ k.transpose(-2, -1) * scale + bias[None]
        a = a + mask[torch.arange(Bn) % nW][:, None]   # row r uses mask[r % nW]
        return a.softmax(-1) @ v

    for scale in (None, 0.3):
        compare_with_grads(lambda q, k, v, b: ref.window_attention(q, k, v, b, mask, scale),
                           lambda q, k, v, b: theirs(q, k, v, b, d ** -0.5 if scale is None
                                                     else scale),
                           [q, k, v, bias])


def test_window_attention_gradcheck():
    Bn, heads, N, d, nW = 4, 2, 4, 3, 2
    mask = torch.where(torch.rand(nW, N, N) < 0.3, -100.0, 0.0).double()
    gradcheck(lambda q, k, v, b: ref.window_attention(q, k, v, b, mask),
              torch.randn(Bn, heads, N, d), torch.randn(Bn, heads, N, d),
              torch.randn(Bn, heads, N, d), torch.randn(heads, N, N))


@pytest.mark.parametrize("B,H,W,C,heads,ws,shift", [
    (2, 10, 10, 8, 2, 4, 2),   # padded to 12x12, shifted
    (1, 10, 10, 8, 2, 4, 0),   # padded, no shift
    (2, 8, 8, 6, 3, 4, 2),     # exact multiple, shifted
    (1, 7, 9, 4, 2, 3, 0),     # padded on one axis only
    (1, 5, 11, 4, 1, 3, 1),    # padded both, shifted, N = 9
])
def test_swin_block_attention_matches_swin(B, H, W, C, heads, ws, shift):
    x = torch.randn(B, H, W, C)
    params = swin_params(C, heads, ws)

    def ours(x, qkv_w, qkv_b, proj_w, proj_b, table):
        return ref.swin_block_attention(x, qkv_w, qkv_b, proj_w, proj_b, table, ws, heads,
                                        shift_size=shift)

    def theirs(x, qkv_w, qkv_b, proj_w, proj_b, table):
        return swin_block_attention_path(x, qkv_w, qkv_b, proj_w, proj_b, table, ws, heads,
                                         shift)

    compare_with_grads(ours, theirs, [x] + params)
    assert ours(x, *params).shape == (B, H, W, C)


def test_swin_block_attention_shift_changes_result():
    # guards against a shift that is silently ignored
    x = torch.randn(1, 8, 8, 4)
    params = swin_params(4, 2, 4)
    a = ref.swin_block_attention(x, *params[:4], params[4], 4, 2, shift_size=0)
    b = ref.swin_block_attention(x, *params[:4], params[4], 4, 2, shift_size=2)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swin_low_precision(dtype):
    x = torch.randn(1, 10, 10, 8)
    params = swin_params(8, 2, 4)
    out = ref.swin_block_attention(x.to(dtype), *[p.to(dtype) for p in params], 4, 2, 2)
    assert out.dtype == dtype
    expected = ref.swin_block_attention(x.to(dtype).float(),
                                        *[p.to(dtype).float() for p in params], 4, 2, 2)
    close(out.float(), expected, atol=3e-2, rtol=3e-2)


# ============================================================================================
# 5. SAGAN self-attention (seed 001)
# ============================================================================================

@pytest.mark.parametrize("B,C,W,H", [(2, 16, 4, 5), (1, 8, 3, 3), (2, 24, 6, 2)])
def test_sagan_attention_matches_self_attn(B, C, W, H):
    m = Self_Attn(C)
    with torch.no_grad():
        m.gamma.fill_(0.7)
        for conv in (m.query_conv, m.key_conv):   # larger energies: a peaked softmax
            conv.weight.mul_(3)
    x = torch.randn(B, C, W, H)
    names = ["query_conv.weight", "query_conv.bias", "key_conv.weight", "key_conv.bias",
             "value_conv.weight", "value_conv.bias", "gamma"]
    params = dict(m.named_parameters())
    inputs = [x] + [params[n] for n in names]

    def theirs(x, *ps):
        out, attn = torch.func.functional_call(m, dict(zip(names, ps)), (x,))
        return out, attn

    def ours(x, qw, qb, kw, kb, vw, vb, gamma):
        N = W * H
        q = F.conv2d(x, qw, qb).view(B, -1, N)
        k = F.conv2d(x, kw, kb).view(B, -1, N)
        v = F.conv2d(x, vw, vb).view(B, -1, N)
        return ref.sagan_attention(q, k, v, x=x, gamma=gamma, return_attention=True)

    compare_with_grads(ours, theirs, inputs)
    out, attn = ours(*inputs)
    assert out.shape == (B, C, W, H) and attn.shape == (B, W * H, W * H)


def test_sagan_attention_fewer_keys_and_no_residual():
    # BigGAN: keys/values max-pooled, N_k = N / 4
    B, dqk, dv, N, Nk = 2, 4, 12, 16, 4
    q, k, v = torch.randn(B, dqk, N) * 2, torch.randn(B, dqk, Nk) * 2, torch.randn(B, dv, Nk)
    x, gamma = torch.randn(B, dv, N), torch.tensor(-0.4)

    def theirs(q, k, v, x, gamma):
        energy = torch.einsum("bcn,bcm->bnm", q, k)
        attn = torch.exp(energy - energy.amax(-1, keepdim=True))
        attn = attn / attn.sum(-1, keepdim=True)
        return gamma * torch.einsum("bcm,bnm->bcn", v, attn) + x, attn

    compare_with_grads(lambda *a: ref.sagan_attention(*a, return_attention=True), theirs,
                       [q, k, v, x, gamma])
    out = ref.sagan_attention(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == (B, dv, N)
    close(out, (theirs(q, k, v, torch.zeros(B, dv, N), torch.tensor(1.0))[0]))


def test_sagan_attention_gradcheck():
    B, dqk, dv, N, Nk = 2, 2, 3, 5, 4
    gradcheck(lambda q, k, v, x, g: ref.sagan_attention(q, k, v, x=x, gamma=g,
                                                        return_attention=True),
              torch.randn(B, dqk, N), torch.randn(B, dqk, Nk), torch.randn(B, dv, Nk),
              torch.randn(B, dv, N), torch.tensor([0.6]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sagan_low_precision_large_energies(dtype):
    # |energy| ~ 1e5 would overflow exp in fp16 without the upcast and max subtraction
    q, k, v = torch.randn(1, 8, 16) * 100, torch.randn(1, 8, 16) * 100, torch.randn(1, 8, 16)
    out, attn = ref.sagan_attention(q.to(dtype), k.to(dtype), v.to(dtype), return_attention=True)
    assert out.dtype == dtype and attn.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(attn).all()
    exp_out, _ = ref.sagan_attention(q.to(dtype).float(), k.to(dtype).float(),
                                     v.to(dtype).float(), return_attention=True)
    close(out.float(), exp_out, atol=2e-2, rtol=2e-2)


# ============================================================================================
# 6. Spectral normalisation
# ============================================================================================

def torch_power_iteration(weight_mat, u, v, n_power_iterations, eps):
    """torch.nn.utils.spectral_norm's compute_weight, written out."""
    u, v = u.clone(), v.clone()
    with torch.no_grad():
        for _ in range(n_power_iterations):
            v = F.normalize(torch.mv(weight_mat.t(), u), dim=0, eps=eps, out=v)
            u = F.normalize(torch.mv(weight_mat, v), dim=0, eps=eps, out=u)
        if n_power_iterations > 0:
            u = u.clone(memory_format=torch.contiguous_format)
            v = v.clone(memory_format=torch.contiguous_format)
    sigma = torch.dot(u, torch.mv(weight_mat, v))
    return sigma, u, v


def l2normalize(v, eps=1e-12):
    return v / (v.norm() + eps)


def sagan_spectral_norm(w, u, v, power_iterations, eps=1e-12):
    """SAGAN's SpectralNorm._update_u_v, written out (returns instead of setattr)."""
    u, v = u.clone(), v.clone()
    height = w.data.shape[0]
    for _ in range(power_iterations):
        v.data = l2normalize(torch.mv(torch.t(w.view(height, -1).data), u.data), eps)
        u.data = l2normalize(torch.mv(w.view(height, -1).data, v.data), eps)
    sigma = u.dot(w.view(height, -1).mv(v))
    return w / sigma.expand_as(w), u, v


@pytest.mark.parametrize("h,w,n_iter", [(5, 7, 1), (8, 3, 3), (1, 4, 2), (6, 6, 0)])
def test_power_iteration_matches_torch(h, w, n_iter):
    W = torch.randn(h, w)
    u0, v0 = F.normalize(torch.randn(h), dim=0), F.normalize(torch.randn(w), dim=0)
    u_keep, v_keep = u0.clone(), v0.clone()
    Wa, Wb = leaf(W), leaf(W)
    sa, ua, va = ref.power_iteration(Wa, u0, v0, n_iter)
    sb, ub, vb = torch_power_iteration(Wb, u0, v0, n_iter, 1e-12)
    close(sa, sb)
    close(ua, ub)
    close(va, vb)
    assert torch.equal(u0, u_keep) and torch.equal(v0, v_keep)   # inputs not modified
    assert ua.data_ptr() != u0.data_ptr() and va.data_ptr() != v0.data_ptr()
    assert not ua.requires_grad and not va.requires_grad
    (ga,) = torch.autograd.grad(sa, Wa)
    (gb,) = torch.autograd.grad(sb, Wb)
    close(ga, gb)
    close(ga, torch.outer(ua, va))   # d sigma / dW = u v^T


def test_power_iteration_eps_rules():
    # eps large enough to matter: 'max' clamps the norm, 'add' adds eps to it
    W = torch.randn(4, 5) * 1e-3
    u0, v0 = F.normalize(torch.randn(4), dim=0), F.normalize(torch.randn(5), dim=0)
    eps = 1e-2
    s_max, u_max, v_max = ref.power_iteration(W, u0, v0, 2, eps=eps, rule="max")
    s_exp, u_exp, v_exp = torch_power_iteration(W, u0, v0, 2, eps)
    close(s_max, s_exp)
    close(u_max, u_exp)
    close(v_max, v_exp)
    W2 = torch.randn(4, 5)
    w_add, u_add, v_add = ref.spectral_norm_weight(W2, u0, v0, n_power_iterations=2, eps=0.5,
                                                   rule="add")
    w_exp, u_exp, v_exp = sagan_spectral_norm(W2, u0, v0, 2, eps=0.5)
    close(w_add, w_exp)
    close(u_add, u_exp)
    close(v_add, v_exp)
    assert not torch.allclose(u_add, F.normalize(u_add, dim=0))   # the eps really mattered


@pytest.mark.parametrize("make,dim", [
    (lambda: nn.Linear(7, 5), 0),
    (lambda: nn.Conv2d(3, 6, 3), 0),
    (lambda: nn.ConvTranspose2d(4, 6, 3), 1),
])
@pytest.mark.parametrize("n_iter", [1, 3])
def test_spectral_norm_weight_matches_torch_spectral_norm(make, dim, n_iter):
    module = torch.nn.utils.spectral_norm(make(), n_power_iterations=n_iter)
    module.train()
    u0, v0 = module.weight_u.clone(), module.weight_v.clone()
    w_orig = module.weight_orig
    weight = leaf(w_orig)
    out, u, v = ref.spectral_norm_weight(weight, u0, v0, dim=dim, n_power_iterations=n_iter)

    x = torch.randn((2,) + ((7,) if isinstance(module, nn.Linear) else (module.in_channels, 5, 5)))
    module(x)   # the forward pre-hook computes module.weight and updates u, v
    close(out, module.weight)
    close(u, module.weight_u)
    close(v, module.weight_v)

    R = torch.randn(out.shape)
    (g_ours,) = torch.autograd.grad((out * R).sum(), weight)
    (g_torch,) = torch.autograd.grad((module.weight * R).sum(), w_orig)
    close(g_ours, g_torch)


def test_spectral_norm_weight_grad_matches_spec_formula():
    # dL/dW = G / sigma - (<G, W> / sigma^2) u v^T
    W = torch.randn(6, 4)
    u0, v0 = F.normalize(torch.randn(6), dim=0), F.normalize(torch.randn(4), dim=0)
    Wl = leaf(W)
    w_sn, u, v = ref.spectral_norm_weight(Wl, u0, v0, n_power_iterations=2)
    G = torch.randn(6, 4)
    (grad,) = torch.autograd.grad((w_sn * G).sum(), Wl)
    sigma = torch.dot(u, W @ v)
    close(grad, G / sigma - ((G * W).sum() / sigma ** 2) * torch.outer(u, v))


def test_spectral_norm_weight_gradcheck_and_double_backward():
    # u, v are constants of the gradient; with n_power_iterations=0 they stay fixed while
    # gradcheck perturbs W, so the numerical Jacobian sees the same function autograd does.
    W = torch.randn(3, 2, 2).double()
    u0 = F.normalize(torch.randn(3), dim=0).double()
    v0 = F.normalize(torch.randn(4), dim=0).double()
    _, u0, v0 = ref.spectral_norm_weight(W, u0, v0, n_power_iterations=5)
    fn = lambda w: ref.spectral_norm_weight(w, u0, v0, n_power_iterations=0)[0]   # noqa: E731
    gradcheck(fn, W)
    assert torch.autograd.gradgradcheck(fn, [W.double().requires_grad_(True)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_spectral_norm_low_precision(dtype):
    W = torch.randn(6, 5)
    u0, v0 = F.normalize(torch.randn(6), dim=0), F.normalize(torch.randn(5), dim=0)
    w_sn, u, v = ref.spectral_norm_weight(W.to(dtype), u0.to(dtype), v0.to(dtype))
    assert w_sn.dtype == dtype and u.dtype == dtype and v.dtype == dtype
    w_exp, _, _ = ref.spectral_norm_weight(W.to(dtype).float(), u0.to(dtype).float(),
                                           v0.to(dtype).float())
    close(w_sn.float(), w_exp, atol=2e-2, rtol=2e-2)


def test_autocast_does_not_lower_reference_precision():
    # The oracle computes in fp32 under torch.autocast too (its matmuls would otherwise run in bf16).
    torch.manual_seed(0)
    q, k = torch.randn(2, 8, 16) * 10, torch.randn(2, 8, 16) * 10
    v = torch.randn(2, 64, 16)
    plain = ref.sagan_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = ref.sagan_attention(q, k, v)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, atol=0, rtol=0)
