"""Swin V2 window attention (cosine attention, per-head logit scale, continuous position bias): the
core op and the fused block path against fastnote.reference, the modules against timm's and
torchvision's own V2 attention, forward and every gradient."""
import copy
import math

import pytest
import torch
from torch import nn

import fastnote
from fastnote import reference
from fastnote.nn import ShiftedWindowAttentionV2, WindowAttentionV2
from fastnote.testing import UNIT_ROUNDOFF, assert_close, assert_rms_close

KIND = "two_matmul"
# as tests/test_window_attention.py: fp16/bf16 gradients RMS-relative to the fp32 reference
HALF_RMS_BOUND = 8


def v2_inputs(B_, heads, N, d, nW=1, with_mask=True, dtype=torch.float32, device="cpu"):
    """Small V2 core inputs: q, k, v [B_, heads, N, d], logit_scale [heads, 1, 1] around Swin V2's
    initial log(10) (scales 5 to 20), the dense bias in V2's range (16 * sigmoid: 0 to 16) and
    Swin's 0 / -100 shift mask (or None). Leaves that require grad except the mask."""
    g = dict(device=device, dtype=dtype)
    q, k, v = (torch.randn(B_, heads, N, d, **g).requires_grad_() for _ in range(3))
    logit_scale = (math.log(10) + 0.3 * torch.randn(heads, 1, 1, device=device)).requires_grad_()
    bias = (16 * torch.sigmoid(torch.randn(heads, N, N, device=device))).to(dtype).requires_grad_()
    mask = torch.where(torch.rand(nW, N, N, device=device) < 0.3, -100.0, 0.0).to(dtype) if with_mask else None
    return q, k, v, logit_scale, bias, mask


def _grads(out, leaves, grad):
    return torch.autograd.grad(out, [t for t in leaves if t is not None], grad)


CORE_CASES = [
    # B*nW, heads, N, d, nW, mask
    pytest.param(4, 2, 64, 16, 2, True, id="window8-h2-d16-mask"),
    pytest.param(2, 3, 64, 32, 1, False, id="window8-h3-d32-nomask"),
    pytest.param(2, 2, 144, 16, 2, True, id="window12-h2-d16-mask"),
    pytest.param(2, 3, 144, 32, 1, False, id="window12-h3-d32-nomask"),
    pytest.param(2, 1, 256, 16, 2, True, id="window16-h1-d16-mask"),
    pytest.param(2, 1, 576, 16, 1, False, id="window24-h1-d16-nomask"),
]


@pytest.mark.parametrize("B_,heads,N,d,nW,with_mask", CORE_CASES)
def test_core_forward_backward(device, B_, heads, N, d, nW, with_mask):
    q, k, v, ls, bias, mask = v2_inputs(B_, heads, N, d, nW, with_mask, device=device)
    out = fastnote.window_attention_v2(q, k, v, ls, bias=bias, mask=mask)
    ref = reference.window_attention_v2(q, k, v, ls, bias=bias, mask=mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, KIND)
    grad = torch.randn_like(ref)
    leaves = (q, k, v, ls, bias)
    for name, a, b in zip(("q", "k", "v", "logit_scale", "bias"), _grads(out, leaves, grad), _grads(ref, leaves, grad)):
        assert_close(a, b, KIND, msg=name)


def test_core_logit_scale_clamp_and_zero_rows(device):
    # Head 0 above the clamp (log 100 = 4.605): its scale is 100 and its gradient 0, as torch.clamp
    # gives; head 1 below it. One all-zero q row and k row: F.normalize's eps clamp, where the
    # gradient is dx^ / eps with no projection term.
    q, k, v, ls, bias, mask = v2_inputs(2, 2, 64, 16, 1, True, device=device)
    with torch.no_grad():
        ls.copy_(torch.tensor([5.0, 2.0]).view(2, 1, 1))
        q[0, 1, 3].zero_()
        k[1, 0, 7].zero_()
    out = fastnote.window_attention_v2(q, k, v, ls, bias=bias, mask=mask)
    ref = reference.window_attention_v2(q, k, v, ls, bias=bias, mask=mask)
    assert_close(out, ref, KIND)
    grad = torch.randn_like(ref)
    leaves = (q, k, v, ls, bias)
    got, want = _grads(out, leaves, grad), _grads(ref, leaves, grad)
    assert got[3][0].item() == 0.0 and want[3][0].item() == 0.0 and got[3][1].item() != 0.0
    # the zero rows' gradients are of order 1 / eps = 1e12: compare each tensor relative to its size
    for name, a, b in zip(("q", "k", "v", "logit_scale", "bias"), got, want):
        s = max(1.0, b.abs().max().item())
        assert_close(a / s, b / s, KIND, msg=name)
    assert got[0][0, 1, 3].abs().max() > 1e9   # the clamped row's gradient really is dx^ / eps


@pytest.mark.parametrize("N,nW,tile", [(64, 2, None), (64, 2, 32), (144, 1, 32)],
                         ids=["single-tile", "tiles-32", "tiled"])
def test_core_large_scale_error_against_float64(device, monkeypatch, N, nW, tile):
    # Scales of 99 (just under the clamp, so d logit_scale flows): logits of +-100, where the fp32
    # lse's rounding (up to 8e-6) makes a recomputed softmax row sum to 1 + eps. Each tensor's
    # error against a float64 run stays within 4x the fp32 reference's own error (before the
    # single-tile backward normalised its rows again, d logit_scale was 140x off at N=64). fp32
    # with exact products takes 32 x 32 tiles by default, forward and backward; tile None is the
    # one tile per window the other dtypes (and TF32) use.
    from fastnote.triton_kernels import window_attention as kernels

    monkeypatch.setattr(kernels, "EXACT_FP32_TILE", tile)
    torch.manual_seed(0)
    q, k, v, ls, bias, mask = v2_inputs(2 * nW, 2, N, 16, nW, True, device=device)
    with torch.no_grad():
        ls.fill_(math.log(99.0))
    grad = torch.randn(q.shape, device=device)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, ls, bias)]
        out = fn(*leaves[:4], bias=leaves[4], mask=mask.to(dtype))
        return [out.detach(), *torch.autograd.grad(out, leaves, grad.to(dtype))]

    exact = run(reference.window_attention_v2, torch.float64)
    ours, fp32 = run(fastnote.window_attention_v2, torch.float32), run(reference.window_attention_v2, torch.float32)
    for name, a, b, e in zip(("out", "q", "k", "v", "bias"), ours[:4] + ours[5:], fp32[:4] + fp32[5:],
                             exact[:4] + exact[5:]):
        assert_close(a, b, KIND, msg=name)
        err, own = (a.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
        assert err <= 4 * own, f"{name}: error {err:.3g} against float64, the fp32 reference's {own:.3g}"
    # d logit_scale sums dS * cos * scale over every (window, query, key), and each softmax row of
    # dS sums to zero: a sum that cancels (|d logit_scale| 1.5 to 60 here, its terms' magnitudes
    # 5e3 to 1e4), so neither a bound relative to its value nor one input's fp32 error is a
    # measure. The fp32 reference's own error ranged 0.1-2 units of fp32 roundoff times the sum of
    # the terms' magnitudes over inputs; per head, ours stays within 4x the reference's, taken no
    # smaller than one such unit.
    err, own = (ours[4].double() - exact[4]).abs().flatten(), (fp32[4].double() - exact[4]).abs().flatten()
    unit = UNIT_ROUNDOFF[torch.float32] * _logit_scale_terms(q, k, v, ls, bias, mask, grad)
    assert (err <= 4 * torch.maximum(own, unit)).all(), (
        f"logit_scale: error {err.tolist()} against float64, the fp32 reference's {own.tolist()}, "
        f"unit {unit.tolist()}")


def _logit_scale_terms(q, k, v, logit_scale, bias, mask, grad):
    """Per head, sum |dS * cos * scale| (float64): the magnitude of the terms that d logit_scale
    adds up, for an error scale."""
    q, k, v, bias, grad = (t.detach().double() for t in (q, k, v, bias, grad))
    scale = logit_scale.detach().double().clamp(max=reference.LOGIT_SCALE_MAX).exp()
    cos = nn.functional.normalize(q, dim=-1) @ nn.functional.normalize(k, dim=-1).transpose(-2, -1)
    s = cos * scale + bias
    nW = mask.shape[0]
    s = (s.view(-1, nW, *s.shape[1:]) + mask.double()[None, :, None]).view_as(s)
    p = s.softmax(-1)
    dp = grad @ v.transpose(-2, -1)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    return (ds * cos * scale).abs().sum((0, 2, 3))


def test_core_matches_timm_attention_maths(device):
    # The reference itself against timm's formula written out (F.normalize, clamp, exp).
    q, k, v, ls, bias, mask = v2_inputs(4, 2, 64, 16, 2, True, device=device)
    attn = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-2, -1)
    attn = attn * torch.clamp(ls, max=math.log(1.0 / 0.01)).exp() + bias.unsqueeze(0)
    attn = (attn.view(2, 2, 2, 64, 64) + mask.unsqueeze(1).unsqueeze(0)).view(4, 2, 64, 64)
    want = attn.softmax(-1) @ v
    assert_close(fastnote.window_attention_v2(q, k, v, ls, bias=bias, mask=mask), want, KIND)


def test_core_without_bias_and_partial_grads(device):
    q, k, v, ls, _, mask = v2_inputs(2, 2, 64, 16, 1, True, device=device)
    k.requires_grad_(False)
    out = fastnote.window_attention_v2(q, k, v, ls, mask=mask)
    ref = reference.window_attention_v2(q, k, v, ls, mask=mask)
    assert_close(out, ref, KIND)
    g = torch.randn_like(ref)
    for name, a, b in zip(("q", "v", "logit_scale"), _grads(out, (q, v, ls), g), _grads(ref, (q, v, ls), g)):
        assert_close(a, b, KIND, msg=name)


@pytest.mark.parametrize("group,slots", [(2, "own"), (1, "one")])
def test_program_grouping_and_slots(device, monkeypatch, group, slots):
    # several images per program and shared dbias slots, with a ragged last group: the logit-scale
    # partials are per program, whatever the grouping
    from fastnote.triton_kernels import window_attention as kernels

    monkeypatch.setattr(kernels, "forward_group", lambda *a: group)
    monkeypatch.setattr(kernels, "backward_group", lambda *a: group)
    monkeypatch.setattr(kernels, "dbias_slots", {"own": lambda p, *a: p, "one": lambda *a: 1}[slots])
    q, k, v, ls, bias, mask = v2_inputs(5 * 2, 2, 64, 16, 2, True, device=device)
    out = fastnote.window_attention_v2(q, k, v, ls, bias=bias, mask=mask)
    ref = reference.window_attention_v2(q, k, v, ls, bias=bias, mask=mask)
    assert_close(out, ref, KIND)
    g = torch.randn_like(ref)
    leaves = (q, k, v, ls, bias)
    for name, a, b in zip("qkvlb", _grads(out, leaves, g), _grads(ref, leaves, g)):
        assert_close(a, b, KIND, msg=name)


@pytest.mark.no_kernel
def test_core_empty_batch(device):
    q = torch.randn(0, 2, 64, 16, device=device, requires_grad=True)
    ls = torch.zeros(2, 1, 1, device=device, requires_grad=True)
    bias = torch.randn(2, 64, 64, device=device, requires_grad=True)
    out = fastnote.window_attention_v2(q, q, q, ls, bias=bias)
    assert out.shape == q.shape
    out.sum().backward()
    assert torch.equal(ls.grad, torch.zeros_like(ls)) and torch.equal(bias.grad, torch.zeros_like(bias))


# ------------------------------------------------------------------------------------------------
# Fused block path vs reference.swin_block_attention_v2
# ------------------------------------------------------------------------------------------------

def _block_params(C, heads, ws, device, qkv_bias=True, dense=False):
    w = (torch.randn(3 * C, C, device=device) * C ** -0.5).requires_grad_()
    qb = (torch.randn(C, device=device) * 0.5).requires_grad_() if qkv_bias else None
    vb = (torch.randn(C, device=device) * 0.5).requires_grad_() if qkv_bias else None
    pw = (torch.randn(C, C, device=device) * C ** -0.5).requires_grad_()
    pb = torch.randn(C, device=device).requires_grad_()
    ls = (math.log(10) + 0.3 * torch.randn(heads, 1, 1, device=device)).requires_grad_()
    n = ws * ws
    shape = (heads, n, n) if dense else ((2 * ws - 1) ** 2, heads)
    pos = (16 * torch.sigmoid(torch.randn(*shape, device=device))).requires_grad_()
    return w, qb, vb, pw, pb, ls, pos


BLOCK_CASES = [
    # B, H, W, C, heads, ws, shift, qkv_bias, dense bias, roll_first
    pytest.param(1, 16, 16, 32, 2, 8, 4, True, False, False, id="16x16-ws8-shift4-table-pad-first"),
    pytest.param(1, 10, 13, 32, 2, 8, 4, True, True, False, id="10x13-ws8-shift4-dense-padded-pad-first"),
    pytest.param(1, 10, 13, 32, 2, 8, 4, True, False, True, id="10x13-ws8-shift4-padded-roll-first"),
    pytest.param(2, 8, 8, 16, 1, 8, 0, False, True, False, id="8x8-ws8-noshift-noqkvbias"),
    pytest.param(1, 13, 12, 32, 1, 12, 6, True, False, False, id="13x12-ws12-shift6-padded"),
]


@pytest.mark.parametrize("B,H,W,C,heads,ws,shift,qkv_bias,dense,roll_first", BLOCK_CASES)
def test_block_forward_backward(device, B, H, W, C, heads, ws, shift, qkv_bias, dense, roll_first):
    x = torch.randn(B, H, W, C, device=device, requires_grad=True)
    params = _block_params(C, heads, ws, device, qkv_bias, dense)
    out = fastnote.swin_window_attention_v2(x, *params, ws, heads, shift_size=shift, roll_first=roll_first)
    ref = reference.swin_block_attention_v2(x, *params, ws, heads, shift_size=shift, roll_first=roll_first)
    assert out.shape == x.shape
    assert_close(out, ref, KIND)
    names = ("x", "qkv_weight", "q_bias", "v_bias", "proj_weight", "proj_bias", "logit_scale", "position_bias")
    leaves = (x,) + params
    g = torch.randn_like(ref)
    for name, a, b in zip([n for n, t in zip(names, leaves) if t is not None], _grads(out, leaves, g),
                          _grads(ref, leaves, g)):
        assert_close(a, b, KIND, msg=name)


def test_block_matches_timm_v2_block_attn(device):
    """timm's SwinTransformerV2Block._attn (its order: roll, then pad) against the fused path with
    roll_first=True on the block's own attention parameters, forward and gradients."""
    timm_v2 = pytest.importorskip("timm.models.swin_transformer_v2")
    torch.manual_seed(0)
    block = timm_v2.SwinTransformerV2Block(32, (10, 13), num_heads=2, window_size=8, shift_size=4,
                                           always_partition=True).to(device)
    a = block.attn
    with torch.no_grad():
        a.q_bias.normal_(0, 0.5), a.v_bias.normal_(0, 0.5), a.logit_scale.normal_(math.log(10), 0.3)
    ours = WindowAttentionV2.from_timm(a)
    x = torch.randn(1, 10, 13, 32, device=device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = block._attn(xa)
    got = fastnote.swin_window_attention_v2(xb, a.qkv.weight, a.q_bias, a.v_bias, a.proj.weight, a.proj.bias,
                                            a.logit_scale, ours.position_bias_table(), 8, 2, shift_size=4,
                                            roll_first=True)
    assert_close(got, want, KIND)
    g = torch.randn_like(want)
    params = [xa] + list(a.parameters())
    ga = torch.autograd.grad(want, params, g)
    gb = torch.autograd.grad(got, [xb] + list(a.parameters()), g)
    for (name, _), u, w in zip([("x", None)] + list(a.named_parameters()), gb, ga):
        assert_close(u, w, KIND, msg=name)


def test_timm_init_hooks_after_to_empty(device):
    """timm's meta-device flow: ``to_empty``, load a checkpoint, then ``init_non_persistent_buffers``
    (what ``timm.models._manipulate.reinit_non_persistent_buffers`` calls on every module that has
    it): k_bias, the coordinates table and the index are not in the state_dict, so without the hook
    they keep whatever memory they got. ``reset_parameters`` (``init_weights(needs_reset=True)``)
    sets what timm's does."""
    timm_v2 = pytest.importorskip("timm.models.swin_transformer_v2")
    if not hasattr(timm_v2.WindowAttention, "init_non_persistent_buffers"):
        pytest.skip("this timm's WindowAttention has no init_non_persistent_buffers")
    torch.manual_seed(0)
    theirs = timm_v2.WindowAttention(8, (4, 4), 2, pretrained_window_size=(6, 6)).to(device).eval()
    _randomise(theirs)
    state = copy.deepcopy(theirs.state_dict())
    x = torch.randn(3, 16, 8, device=device)
    with torch.no_grad():
        want = theirs(x)
    for ours in (WindowAttentionV2.from_timm(copy.deepcopy(theirs)),
                 WindowAttentionV2(8, (4, 4), 2, pretrained_window_size=(6, 6)).to(device).eval()):
        ours.to_empty(device=device)
        with torch.no_grad():
            for b in ours.buffers():
                b.fill_(3)
        ours.load_state_dict(state)
        ours.init_non_persistent_buffers()
        with torch.no_grad():
            assert_close(ours(x), want, KIND)
        for name, b in theirs.named_buffers():
            assert torch.equal(getattr(ours, name), b), name
        ours.reset_parameters()
        reset = copy.deepcopy(theirs)
        reset.reset_parameters()
        for name in ("logit_scale", "q_bias", "v_bias"):
            assert torch.equal(getattr(ours, name), getattr(reset, name)), name


# ------------------------------------------------------------------------------------------------
# Modules against timm's and torchvision's V2 attention
# ------------------------------------------------------------------------------------------------

def _randomise(m):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "logit_scale":
                p.normal_(math.log(10), 0.3)
            elif p.dim() == 1:
                p.normal_(0, 0.5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_timm_window_attention_v2(device, training):
    timm_v2 = pytest.importorskip("timm.models.swin_transformer_v2")
    dim, heads, ws, nW = 32, 2, 8, 2
    theirs = timm_v2.WindowAttention(dim, (ws, ws), heads).to(device).train(training)
    _randomise(theirs)
    ours = WindowAttentionV2(dim, (ws, ws), heads).to(device).train(training)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for name in ("relative_coords_table", "relative_position_index", "k_bias"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    x = torch.randn(2 * nW, ws * ws, dim, device=device)
    mask = torch.where(torch.rand(nW, ws * ws, ws * ws, device=device) < 0.3, -100.0, 0.0)
    for m in (None, mask):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        want, got = theirs(xa, mask=m), ours(xb, mask=m)
        assert_close(got, want, KIND)
        g = torch.randn_like(want)
        ga = torch.autograd.grad(want, [xa] + list(theirs.parameters()), g)
        gb = torch.autograd.grad(got, [xb] + list(ours.parameters()), g)
        names = ["x"] + [n for n, _ in theirs.named_parameters()]
        assert names == ["x"] + [n for n, _ in ours.named_parameters()]
        for name, u, w in zip(names, gb, ga):
            assert_close(u, w, KIND, msg=name)
    # and back, strict both ways; from_timm shares the parameters themselves
    timm_v2.WindowAttention(dim, (ws, ws), heads).load_state_dict(ours.state_dict(), strict=True)
    shared = WindowAttentionV2.from_timm(theirs)
    assert shared.logit_scale is theirs.logit_scale and shared.cpb_mlp is theirs.cpb_mlp
    assert shared.training == training and list(shared.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        assert_close(shared(x, mask=mask), theirs(x, mask=mask), KIND)


def test_timm_window_attention_v2_options(device):
    timm_v2 = pytest.importorskip("timm.models.swin_transformer_v2")
    for kwargs in (dict(qkv_bias=False), dict(qkv_bias_separate=True), dict(pretrained_window_size=(12, 12))):
        theirs = timm_v2.WindowAttention(32, (8, 8), 2, **kwargs).to(device).eval()
        _randomise(theirs)
        ours = WindowAttentionV2(32, (8, 8), 2, **kwargs).to(device).eval()
        ours.load_state_dict(theirs.state_dict(), strict=True)
        assert torch.equal(ours.relative_coords_table, theirs.relative_coords_table), kwargs
        x = torch.randn(2, 64, 32, device=device)
        with torch.no_grad():
            assert_close(ours(x), theirs(x), KIND, msg=str(kwargs))
            assert_close(WindowAttentionV2.from_timm(theirs)(x), theirs(x), KIND, msg=str(kwargs))


@pytest.mark.parametrize("H,W,shift,training", [
    pytest.param(16, 16, 4, True, id="16x16-shift4-train"),
    pytest.param(16, 16, 0, False, id="16x16-noshift-eval"),
    pytest.param(10, 13, 4, True, id="10x13-shift4-padded-train"),
    pytest.param(6, 7, 4, False, id="6x7-shift4-one-window-shift-dropped-eval"),
])
def test_torchvision_shifted_window_attention_v2(device, H, W, shift, training):
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    dim, heads, ws = 32, 2, 8
    theirs = swin.ShiftedWindowAttentionV2(dim, [ws, ws], [shift, shift], heads).to(device).train(training)
    _randomise(theirs)
    with torch.no_grad():
        theirs.qkv.bias[dim:2 * dim].zero_()   # as torchvision keeps it (its forward ignores it)
    ours = ShiftedWindowAttentionV2(dim, [ws, ws], [shift, shift], heads).to(device).train(training)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, H, W, dim, device=device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = theirs(xa), ours(xb)
    assert_close(got, want, KIND)
    g = torch.randn_like(want)
    ga = torch.autograd.grad(want, [xa] + list(theirs.parameters()), g)
    gb = torch.autograd.grad(got, [xb] + list(ours.parameters()), g)
    names = ["x"] + [n for n, _ in theirs.named_parameters()]
    assert names == ["x"] + [n for n, _ in ours.named_parameters()]
    for name, u, w in zip(names, gb, ga):
        assert_close(u, w, KIND, msg=name)
    assert torch.equal(gb[names.index("qkv.bias")][dim:2 * dim], torch.zeros(dim, device=device))
    # and back; from_torchvision shares the parameters and buffers themselves
    swin.ShiftedWindowAttentionV2(dim, [ws, ws], [shift, shift], heads).load_state_dict(ours.state_dict(), strict=True)
    shared = ShiftedWindowAttentionV2.from_torchvision(theirs)
    assert shared.qkv is theirs.qkv and shared.relative_coords_table is theirs.relative_coords_table
    assert shared.training == training and list(shared.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        assert_close(shared(x), theirs(x), KIND)


@pytest.mark.no_kernel
def test_module_errors(device):
    with pytest.raises(ValueError, match="attention dropout"):
        WindowAttentionV2(32, (8, 8), 2, attn_drop=0.1).to(device).train()(torch.randn(2, 64, 32, device=device))
    with pytest.raises(ValueError, match="window_size"):
        ShiftedWindowAttentionV2(32, [8, 4], [0, 0], 2)
    with pytest.raises(ValueError, match="shift_size"):
        ShiftedWindowAttentionV2(32, [8, 8], [4, 2], 2)


# ------------------------------------------------------------------------------------------------
# Errors, torch.library, torch.compile
# ------------------------------------------------------------------------------------------------

@pytest.mark.no_kernel
def test_core_errors(device):
    q = torch.randn(4, 2, 64, 16, device=device)
    ls = torch.zeros(2, 1, 1, device=device)
    with pytest.raises(ValueError, match=r"logit_scale must have shape \[2, 1, 1\]"):
        fastnote.window_attention_v2(q, q, q, torch.zeros(3, 1, 1, device=device))
    with pytest.raises(ValueError, match="logit_scale must have 3 dimensions"):
        fastnote.window_attention_v2(q, q, q, torch.zeros(2, device=device))
    with pytest.raises(TypeError, match="logit_scale must be a torch.Tensor"):
        fastnote.window_attention_v2(q, q, q, 2.3)
    with pytest.raises(TypeError, match="logit_scale must have dtype"):
        fastnote.window_attention_v2(q, q, q, ls.long())
    with pytest.raises(ValueError, match="bias"):
        fastnote.window_attention_v2(q, q, q, ls, bias=torch.zeros(2, 63, 63, device=device))
    with pytest.raises(ValueError, match="mask"):
        fastnote.window_attention_v2(q, q, q, ls, mask=torch.zeros(3, 64, 64, device=device))
    with pytest.raises(TypeError, match="dtype"):
        fastnote.window_attention_v2(q, q.half(), q, ls)


@pytest.mark.no_kernel
def test_block_errors(device):
    x = torch.randn(1, 8, 8, 32, device=device)
    w, qb, vb, pw, pb, ls, table = _block_params(32, 2, 4, device)
    with pytest.raises(ValueError, match="q_bias and v_bias"):
        fastnote.swin_window_attention_v2(x, w, qb, None, pw, pb, ls, table, 4, 2)
    with pytest.raises(ValueError, match="q_bias"):
        fastnote.swin_window_attention_v2(x, w, qb[:16], vb, pw, pb, ls, table, 4, 2)
    with pytest.raises(ValueError, match="logit_scale"):
        fastnote.swin_window_attention_v2(x, w, qb, vb, pw, pb, ls[:1], table, 4, 2)
    with pytest.raises(ValueError, match="relative_position_bias_table"):
        fastnote.swin_window_attention_v2(x, w, qb, vb, pw, pb, ls, table[:5], 4, 2)
    with pytest.raises(ValueError, match=r"relative_position_bias must have shape \[2, 16, 16\]"):
        fastnote.swin_window_attention_v2(x, w, qb, vb, pw, pb, ls, torch.zeros(2, 9, 9, device=device), 4, 2)
    with pytest.raises(ValueError, match="shift_size"):
        fastnote.swin_window_attention_v2(x, w, qb, vb, pw, pb, ls, table, 4, 2, shift_size=4)


def test_opcheck(device):
    q, k, v, ls, bias, mask = v2_inputs(4, 2, 16, 16, 2, True, device=device)
    op = torch.ops.fastnote.window_attention_v2.default
    torch.library.opcheck(op, (q, k, v, ls, bias, mask))
    torch.library.opcheck(op, (q, k, v, ls, None, None))
    out, lse = torch.ops.fastnote.window_attention_v2(q, k, v, ls, bias, mask)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), ls.detach(),
            bias.detach(), mask, True)
    torch.library.opcheck(torch.ops.fastnote.window_attention_v2_backward.default, args)


def test_opcheck_block(device, roll_first=True):
    x = torch.randn(1, 5, 6, 32, device=device)
    w, qb, vb, _, _, ls, _ = _block_params(32, 2, 4, device)
    qkv_bias = torch.cat((qb, torch.zeros_like(qb), vb)).detach().requires_grad_()
    qkv = torch.nn.functional.linear(x, w, qkv_bias).detach().requires_grad_()
    bias = (16 * torch.sigmoid(torch.randn(2, 16, 16, device=device))).requires_grad_()
    args = (qkv, qkv_bias, ls, bias, 4, 2, 2, -100.0, roll_first)
    torch.library.opcheck(torch.ops.fastnote.swin_window_attention_v2.default, args)
    out, lse = torch.ops.fastnote.swin_window_attention_v2(*args)
    bargs = (torch.randn_like(out), qkv.detach(), qkv_bias.detach(), ls.detach(), bias.detach(), out.detach(),
             lse.detach(), 4, 2, 2, -100.0, roll_first, True)
    torch.library.opcheck(torch.ops.fastnote.swin_window_attention_v2_backward.default, bargs)


def test_compile_fullgraph(device, compile_backend):
    q, k, v, ls, bias, mask = v2_inputs(4, 2, 64, 16, 2, True, device=device)

    def f(q, k, v, ls, bias, mask):
        return fastnote.window_attention_v2(q * 1.5, k, v, ls, bias=bias, mask=mask).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    got = compiled(q, k, v, ls, bias, mask)
    want = reference.window_attention_v2(q * 1.5, k, v, ls, bias=bias, mask=mask).square().sum()
    assert_close(got, want, KIND)
    leaves = (q, k, v, ls, bias)
    for name, a, b in zip("qkvlb", torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        assert_close(a, b, KIND, msg=name)


def test_reference_backend_path(device, monkeypatch):
    # FASTNOTE_BACKEND=reference takes the oracle; the kernels agree with it
    q, k, v, ls, bias, mask = v2_inputs(2, 2, 64, 16, 1, True, device=device)
    monkeypatch.setenv("FASTNOTE_BACKEND", "reference")
    fastnote.backend.refresh()
    want = fastnote.window_attention_v2(q, k, v, ls, bias=bias, mask=mask)
    monkeypatch.delenv("FASTNOTE_BACKEND")
    fastnote.backend.refresh()
    assert_close(fastnote.window_attention_v2(q, k, v, ls, bias=bias, mask=mask), want, KIND)


# ------------------------------------------------------------------------------------------------
# Half precision on a GPU
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,nW,heads,N,d", [(8, 64, 3, 64, 32), (8, 16, 6, 144, 32), (2, 4, 4, 256, 32),
                                            (4, 4, 2, 64, 64)])
def test_core_half_gpu(device, dtype, B, nW, heads, N, d):
    q, k, v, ls, bias, mask = v2_inputs(B * nW, heads, N, d, nW, True, dtype=dtype, device=device)
    out = fastnote.window_attention_v2(q, k, v, ls, bias=bias, mask=mask)
    qf, kf, vf, bf = (t.detach().float().requires_grad_() for t in (q, k, v, bias))
    lf = ls.detach().clone().requires_grad_()
    ref = reference.window_attention_v2(qf, kf, vf, lf, bias=bf, mask=mask.float())
    assert out.dtype == dtype
    assert_close(out, ref, KIND)
    grad = torch.randn_like(ref)
    got = _grads(out, (q, k, v, ls, bias), grad.to(dtype))
    want = _grads(ref, (qf, kf, vf, lf, bf), grad)
    for name, a, b in zip(("q", "k", "v", "logit_scale", "bias"), got, want):
        assert_rms_close(a, b, HALF_RMS_BOUND * UNIT_ROUNDOFF[dtype], msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,W,C,heads,ws,shift,roll_first", [
    (4, 64, 64, 96, 3, 8, 4, False), (4, 32, 32, 192, 6, 8, 4, True), (2, 64, 64, 96, 3, 16, 8, False),
    (2, 30, 33, 64, 2, 8, 4, False), (2, 30, 33, 64, 2, 8, 4, True)])
def test_block_half_gpu(device, dtype, B, H, W, C, heads, ws, shift, roll_first):
    x = torch.randn(B, H, W, C, device=device, requires_grad=True)
    params = _block_params(C, heads, ws, device)
    ref = reference.swin_block_attention_v2(x, *params, ws, heads, shift_size=shift, roll_first=roll_first)
    xh = x.detach().to(dtype).requires_grad_()
    ph = [p.detach().to(dtype).requires_grad_() if i != 5 else p.detach().clone().requires_grad_()
          for i, p in enumerate(params)]   # the logit scale stays fp32, as a module under autocast keeps it
    out = fastnote.swin_window_attention_v2(xh, *ph, ws, heads, shift_size=shift, roll_first=roll_first)
    assert_close(out, ref, KIND)
    grad = torch.randn_like(ref)
    names = ("x", "qkv_weight", "q_bias", "v_bias", "proj_weight", "proj_bias", "logit_scale", "position_bias")
    for name, a, b in zip(names, _grads(out, [xh] + ph, grad.to(dtype)), _grads(ref, (x,) + params, grad)):
        assert_rms_close(a, b, HALF_RMS_BOUND * UNIT_ROUNDOFF[dtype], msg=name)


@pytest.mark.gpu
def test_modules_autocast_bf16(device):
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    theirs = swin.ShiftedWindowAttentionV2(96, [8, 8], [4, 4], 3).to(device)
    ours = ShiftedWindowAttentionV2.from_torchvision(copy.deepcopy(theirs))
    x = torch.randn(2, 30, 33, 96, device=device)
    want = theirs(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = ours(x)
    assert got.dtype == torch.bfloat16
    assert_close(got, want, KIND, dtype=torch.bfloat16)
