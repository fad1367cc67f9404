"""Swin window attention: the core op, the WindowAttention drop-in and the fused block path, forward
and backward, against fastnote.reference (and against transcribed Swin / timm modules)."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnote
from fastnote import reference
from fastnote.ops import window_attention as ops
from fastnote.testing import UNIT_ROUNDOFF, assert_close, assert_rms_close
from transcriptions import SwinWindowAttention, TimmWindowAttention

KIND = "two_matmul"
# fp16/bf16 gradients, RMS-relative to the fp32 reference, in units of the dtype's roundoff u: the
# inputs are rounded (u), P and dS are rounded before their matmuls (u each), the fp32 result is
# rounded (u), and the errors of the chained steps add in quadrature over many terms: 8u bounds
# the whole chain per tensor (bf16: 3.1e-2, fp16: 3.9e-3), whatever the tensor's scale.
HALF_RMS_BOUND = 8


def _swin_mask(nW, N, generator=None):
    # Swin's values: 0 within a region, -100 across.
    return torch.where(torch.rand(nW, N, N, generator=generator) < 0.3, -100.0, 0.0)


def _inputs(B_, heads, N, d, nW, with_bias, with_mask, device, dtype=torch.float32):
    q, k, v = (torch.randn(B_, heads, N, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(heads, N, N, device=device, dtype=dtype, requires_grad=True) if with_bias else None
    mask = _swin_mask(nW, N).to(device) if with_mask else None
    return q, k, v, bias, mask


def _grads(out, tensors, grad):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(out, tensors, grad)


CORE_CASES = [
    # B*nW, heads, N, d, nW, bias, mask
    pytest.param(2, 1, 1, 16, 1, True, True, id="B2-h1-N1-d16-nW1-bias-mask"),
    pytest.param(4, 2, 9, 16, 2, True, True, id="B4-h2-N9-d16-nW2-bias-mask"),
    pytest.param(4, 3, 49, 32, 4, True, True, id="B4-h3-N49-d32-nW4-bias-mask"),
    pytest.param(2, 6, 49, 16, 1, False, False, id="B2-h6-N49-d16-nW1-nobias-nomask"),
    pytest.param(3, 2, 50, 32, 3, True, False, id="B3-h2-N50-d32-nW3-bias-nomask"),
    pytest.param(2, 4, 50, 16, 2, False, True, id="B2-h4-N50-d16-nW2-nobias-mask"),
    pytest.param(2, 5, 64, 32, 1, True, True, id="B2-h5-N64-d32-nW1-bias-mask"),
    pytest.param(2, 1, 65, 16, 2, True, True, id="B2-h1-N65-d16-nW2-bias-mask-just-past-one-tile"),
    pytest.param(2, 1, 144, 32, 1, True, True, id="B2-h1-N144-d32-nW1-bias-mask-window-12"),
    pytest.param(2, 1, 49, 64, 1, True, True, id="B2-h1-N49-d64-nW1-bias-mask-wide-head-in-fp32"),
    pytest.param(2, 2, 20, 128, 2, True, True, id="B2-h2-N20-d128-nW2-bias-mask-head-dim-128"),
]


@pytest.mark.parametrize("B_,heads,N,d,nW,with_bias,with_mask", CORE_CASES)
def test_core_forward_backward(device, B_, heads, N, d, nW, with_bias, with_mask):
    q, k, v, bias, mask = _inputs(B_, heads, N, d, nW, with_bias, with_mask, device)
    out = fastnote.window_attention(q, k, v, bias=bias, mask=mask)
    ref = reference.window_attention(q, k, v, bias=bias, mask=mask)
    assert out.shape == (B_, heads, N, d) and out.dtype == q.dtype
    assert_close(out, ref, KIND)
    grad = torch.randn_like(ref)
    for name, a, b in zip(("q", "k", "v", "bias"), _grads(out, (q, k, v, bias), grad),
                          _grads(ref, (q, k, v, bias), grad)):
        assert_close(a, b, KIND, msg=name)


@pytest.mark.parametrize("tile", [None, 32, 16], ids=["tile-64", "tile-32", "tile-16"])
@pytest.mark.parametrize("op", ["window_attention", "swin_window_attention", "window_attention_v2",
                                "swin_window_attention_v2"])
def test_exact_fp32_backward_tiles(device, monkeypatch, op, tile):
    # Every backward tile for fp32 with exact products (EXACT_FP32_TILE: 32 by default,
    # None the one 64 x 64 tile per window the other dtypes use; benchmarks/window_attention.py
    # times them): V1 and V2, core (N 49 and 64, bias and mask) and block (padded, qkv bias),
    # against the reference, forward and every gradient; and the backward took that path.
    from fastnote import cases
    from fastnote.triton_kernels import window_attention as kernels

    if device.type == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")
    monkeypatch.setattr(kernels, "EXACT_FP32_TILE", tile)
    chosen = []
    launch_blocks = kernels.launch_blocks
    monkeypatch.setattr(kernels, "launch_blocks", lambda *a: chosen.append(launch_blocks(*a)) or chosen[-1])
    case = next(c for c in cases.all_cases() if c.name == op)
    rows = cases.compare(case, torch.float32, device)
    assert len(rows) >= 5 and all(r["status"] == "PASS" for r in rows), [r for r in rows if r["status"] != "PASS"]
    expected = (tile, tile, False) if tile is not None else (64, 64, True)
    assert chosen and all((b[0], b[1], b[3]) == expected for b in chosen), chosen


@pytest.mark.parametrize("group,slots", [(1, "own"), (2, "own"), (3, "one"), (2, "two")])
def test_program_grouping_and_dbias_slots(device, monkeypatch, group, slots):
    # Real shapes give several images per program (GROUP > 1) and one dbias partial per program;
    # small ones would not: force both, with a ragged last group (5 images), and the shared-slot
    # (atomic) dbias too, for the core (one tile and tiled) and the fused path.
    from fastnote.triton_kernels import window_attention as kernels

    monkeypatch.setattr(kernels, "forward_group", lambda *a: group)
    monkeypatch.setattr(kernels, "backward_group", lambda *a: group)
    monkeypatch.setattr(kernels, "dbias_slots", {"own": lambda p, *a: p, "one": lambda *a: 1,
                                                 "two": lambda p, *a: min(p, 2)}[slots])
    for N in (9, 65):
        q, k, v, bias, mask = _inputs(5 * 2, 2, N, 16, 2, True, True, device)
        out = fastnote.window_attention(q, k, v, bias=bias, mask=mask)
        ref = reference.window_attention(q, k, v, bias=bias, mask=mask)
        assert_close(out, ref, KIND)
        grad = torch.randn_like(ref)
        for a, b in zip(_grads(out, (q, k, v, bias), grad), _grads(ref, (q, k, v, bias), grad)):
            assert_close(a, b, KIND)
    x = torch.randn(5, 6, 7, 16, device=device, requires_grad=True)
    params = _block_params(16, 2, 4, device)
    out = fastnote.swin_window_attention(x, *params, 4, 2, shift_size=2)
    ref = reference.swin_block_attention(x, *params, 4, 2, shift_size=2)
    assert_close(out, ref, KIND)
    grad = torch.randn_like(ref)
    for a, b in zip(_grads(out, (x,) + params, grad), _grads(ref, (x,) + params, grad)):
        assert_close(a, b, KIND)


def test_core_custom_scale_and_extreme_logits(device):
    # Large logits (|q.k| * scale ~ 1e3) must not overflow: the softmax subtracts the row max.
    q, k, v, bias, mask = _inputs(4, 2, 49, 32, 2, True, True, device)
    with torch.no_grad():
        q.mul_(30.0)
    out = fastnote.window_attention(q, k, v, bias=bias, mask=mask, scale=1.0)
    ref = reference.window_attention(q, k, v, bias=bias, mask=mask, scale=1.0)
    assert torch.isfinite(out).all()
    assert_close(out, ref, KIND)


def test_core_non_contiguous_and_qkv_views(device):
    B_, heads, N, d = 4, 3, 49, 32
    qkv = torch.randn(B_, N, 3, heads, d, device=device, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)              # Swin's strided views
    bias = torch.randn(N, N, heads, device=device, requires_grad=True)
    mask = _swin_mask(2, N).to(device).transpose(1, 2)           # non-contiguous mask
    out = fastnote.window_attention(q, k, v, bias=bias.permute(2, 0, 1), mask=mask)
    ref = reference.window_attention(q, k, v, bias=bias.permute(2, 0, 1), mask=mask)
    assert_close(out, ref, KIND)
    grad = torch.randn_like(ref).transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous grad
    for a, b in zip(_grads(out, (qkv, bias), grad), _grads(ref, (qkv, bias), grad)):
        assert_close(a, b, KIND)
    # A feature dimension that is not contiguous is copied, not misread.
    qt = torch.randn(B_, heads, d, N, device=device).transpose(2, 3)
    assert_close(fastnote.window_attention(qt, qt, qt), reference.window_attention(qt, qt, qt), KIND)


@pytest.mark.no_kernel
def test_core_empty_batch(device):
    q = torch.randn(0, 2, 49, 32, device=device, requires_grad=True)
    bias = torch.randn(2, 49, 49, device=device, requires_grad=True)
    out = fastnote.window_attention(q, q, q, bias=bias, mask=torch.zeros(4, 49, 49, device=device))
    assert out.shape == (0, 2, 49, 32)
    out.sum().backward()
    assert q.grad.shape == q.shape and torch.equal(bias.grad, torch.zeros_like(bias))


def test_core_bias_only_grad_and_no_bias_grad(device):
    q, k, v, bias, mask = _inputs(2, 2, 9, 16, 1, True, True, device)
    q.requires_grad_(False), k.requires_grad_(False), v.requires_grad_(False)
    out = fastnote.window_attention(q, k, v, bias=bias, mask=mask)
    ref = reference.window_attention(q, k, v, bias=bias, mask=mask)
    g = torch.randn_like(ref)
    assert_close(torch.autograd.grad(out, bias, g)[0], torch.autograd.grad(ref, bias, g)[0], KIND)
    bias2 = bias.detach()
    q.requires_grad_(True)
    out = fastnote.window_attention(q, k, v, bias=bias2, mask=mask)
    ref = reference.window_attention(q, k, v, bias=bias2, mask=mask)
    assert_close(torch.autograd.grad(out, q, g)[0], torch.autograd.grad(ref, q, g)[0], KIND)


def test_core_autocast_bf16(device):
    q, k, v, bias, mask = _inputs(4, 2, 49, 32, 2, True, True, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = fastnote.window_attention(q, k, v, bias=bias, mask=mask)
    assert out.dtype == torch.bfloat16
    ref = reference.window_attention(q, k, v, bias=bias, mask=mask)
    assert_close(out, ref, KIND, dtype=torch.bfloat16)
    grad = torch.randn_like(ref)
    for a, b in zip(_grads(out.float(), (q, k, v, bias), grad), _grads(ref, (q, k, v, bias), grad)):
        assert a.dtype == torch.float32
        assert_close(a, b, KIND, dtype=torch.bfloat16)


def test_core_gradcheck_reference_float64():
    # The oracle's own gradients (fastnote's ops take fp32/fp16/bf16 only).
    q, k, v, bias, _ = _inputs(2, 2, 5, 4, 1, True, False, "cpu", dtype=torch.float64)
    mask = _swin_mask(2, 5).double()
    assert torch.autograd.gradcheck(lambda *t: reference.window_attention(*t, mask=mask), (q, k, v, bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,nW,heads,N,d", [(8, 64, 3, 49, 32), (8, 1, 24, 49, 32), (4, 4, 4, 144, 32),
                                            (2, 4, 2, 64, 64), (2, 9, 2, 49, 128), (2, 3, 5, 200, 16)])
@pytest.mark.gpu
def test_core_half_gpu(device, dtype, B, nW, heads, N, d):
    q, k, v, bias, mask = _inputs(B * nW, heads, N, d, nW, True, True, device, dtype=dtype)
    out = fastnote.window_attention(q, k, v, bias=bias, mask=mask)
    qf, kf, vf, bf = (t.detach().float().requires_grad_() for t in (q, k, v, bias))
    ref = reference.window_attention(qf, kf, vf, bias=bf, mask=mask)
    assert out.dtype == dtype
    assert_close(out, ref, KIND)
    grad = torch.randn_like(ref)
    for name, a, b in zip("qkvb", _grads(out, (q, k, v, bias), grad.to(dtype)), _grads(ref, (qf, kf, vf, bf), grad)):
        # bias gradient sums over all B*nW windows: compare relative to its magnitude.
        scale = max(1.0, b.abs().max().item()) if name == "b" else 1.0
        assert_close(a.float() / scale, b / scale, KIND, dtype=dtype, msg=name)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.no_kernel
def test_core_errors(device):
    q = torch.randn(4, 2, 9, 16, device=device)
    with pytest.raises(ValueError, match="mask"):
        fastnote.window_attention(q, q, q, mask=torch.zeros(3, 9, 9, device=device))
    with pytest.raises(ValueError, match="mask"):
        fastnote.window_attention(q, q, q, mask=torch.zeros(2, 8, 8, device=device))
    with pytest.raises(ValueError, match="mask"):
        fastnote.window_attention(q, q, q, mask=torch.zeros(2, 9, 9, device=device, requires_grad=True))
    with pytest.raises(ValueError, match="bias"):
        fastnote.window_attention(q, q, q, bias=torch.zeros(3, 9, 9, device=device))
    with pytest.raises(ValueError, match="q"):
        fastnote.window_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="k"):
        fastnote.window_attention(q, q[:, :1], q)
    with pytest.raises(TypeError, match="dtype"):
        fastnote.window_attention(q, q.half(), q)
    with pytest.raises(TypeError, match="bias"):
        fastnote.window_attention(q.half(), q.half(), q.half(), bias=torch.zeros(2, 9, 9, device=device,
                                                                                 dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="q"):
        fastnote.window_attention(q.long(), q.long(), q.long())
    with pytest.raises(TypeError, match="scale"):
        fastnote.window_attention(q, q, q, scale="0.25")


def test_block_errors(device):
    x = torch.randn(1, 8, 8, 32, device=device)
    w, b, pw, pb, table = _block_params(32, 2, 4, device)
    with pytest.raises(ValueError, match="shift_size"):
        fastnote.swin_window_attention(x, w, b, pw, pb, table, 4, 2, shift_size=4)
    with pytest.raises(ValueError, match="num_heads"):
        fastnote.swin_window_attention(x, w, b, pw, pb, table, 4, 3)
    with pytest.raises(ValueError, match="relative_position_bias_table"):
        fastnote.swin_window_attention(x, w, b, pw, pb, table, 3, 2)
    with pytest.raises(ValueError, match="window_size"):
        fastnote.swin_window_attention(x, w, b, pw, pb, table, (4, 2), 2)
    with pytest.raises(ValueError, match="x"):
        fastnote.swin_window_attention(x[0], w, b, pw, pb, table, 4, 2)
    with pytest.raises(ValueError, match="qkv_weight"):
        fastnote.swin_window_attention(x, w[:32], b, pw, pb, table, 4, 2)
    with pytest.raises(TypeError, match="dtype"):
        fastnote.swin_window_attention(x.double(), w, b, pw, pb, table, 4, 2)
    # The module leaves the shift's range to the op: the same message, at the first call.
    with pytest.raises(ValueError, match=r"shift_size must be in \[0, 4\) \(0 to window_size - 1\), got 4"):
        fastnote.nn.ShiftedWindowAttention(32, 4, 2, shift_size=4).to(device)(x)
    m = fastnote.nn.WindowAttention(32, 4, 2).to(device)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 15, 32, device=device))
    with pytest.raises(ValueError, match="attn_drop"):
        fastnote.nn.WindowAttention(32, 4, 2, attn_drop=0.1).to(device).train()(torch.randn(2, 16, 32, device=device))
    fastnote.nn.WindowAttention(32, 4, 2, attn_drop=0.1).to(device).eval()(torch.randn(2, 16, 32, device=device))
    with pytest.raises(TypeError, match="window_size"):
        fastnote.nn.WindowAttention(32, 4.0, 2)


# ------------------------------------------------------------------------------------------------
# torch.library / torch.compile
# ------------------------------------------------------------------------------------------------

def test_opcheck_core(device):
    q, k, v, bias, mask = _inputs(4, 2, 9, 16, 2, True, True, device)
    torch.library.opcheck(torch.ops.fastnote.window_attention.default, (q, k, v, bias, mask, 0.25))
    torch.library.opcheck(torch.ops.fastnote.window_attention.default, (q, k, v, None, None, 0.25))
    out, lse = torch.ops.fastnote.window_attention(q, k, v, bias, mask, 0.25)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), bias.detach(),
            mask, 0.25, True)
    torch.library.opcheck(torch.ops.fastnote.window_attention_backward.default, args)


@pytest.mark.parametrize("roll_first", [False, True], ids=["pad-first", "roll-first"])
def test_opcheck_block(device, roll_first):
    x = torch.randn(1, 5, 6, 32, device=device)
    w, b, _, _, table = _block_params(32, 2, 4, device)
    qkv = F.linear(x, w, b).detach().requires_grad_()
    index = reference.relative_position_index(4, device)
    bias = reference.relative_position_bias(table, index, 2).detach().requires_grad_()
    qb = b.detach().requires_grad_()
    args = (qkv, qb, bias, 4, 2, 2, 0.25, -100.0, roll_first)
    torch.library.opcheck(torch.ops.fastnote.swin_window_attention.default, args)
    out, lse = torch.ops.fastnote.swin_window_attention(*args)
    bargs = (torch.randn_like(out), qkv.detach(), qb.detach(), bias.detach(), out.detach(), lse.detach(), 4, 2, 2, 0.25,
             -100.0, roll_first, True)
    torch.library.opcheck(torch.ops.fastnote.swin_window_attention_backward.default, bargs)


def test_compile_fullgraph(device, compile_backend):
    q, k, v, bias, mask = _inputs(4, 2, 9, 16, 2, True, True, device)

    def f(q, k, v, bias, mask):
        return fastnote.window_attention(q * 1.5, k, v, bias=bias, mask=mask).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    got = compiled(q, k, v, bias, mask)
    want = reference.window_attention(q * 1.5, k, v, bias=bias, mask=mask).square().sum()
    assert_close(got, want, KIND)
    for a, b in zip(torch.autograd.grad(got, (q, k, v, bias)), torch.autograd.grad(want, (q, k, v, bias))):
        assert_close(a, b, KIND)


def test_compile_fullgraph_block(device, compile_backend):
    torch._dynamo.reset()
    m = fastnote.nn.ShiftedWindowAttention(32, 4, 2, shift_size=2).to(device)
    x = torch.randn(1, 6, 7, 32, device=device, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend=compile_backend)
    got = compiled(x)
    params = (m.qkv.weight, m.qkv.bias, m.proj.weight, m.proj.bias, m.relative_position_bias_table)
    want = reference.swin_block_attention(x, *params, 4, 2, 2)
    assert_close(got, want, KIND)
    g = torch.randn_like(want)
    for name, a, b in zip(("x", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "table"),
                          torch.autograd.grad(got, (x,) + params, g), torch.autograd.grad(want, (x,) + params, g)):
        assert_close(a, b, KIND, msg=name)


# ------------------------------------------------------------------------------------------------
# Modules: Swin's and timm's WindowAttention (transcribed in tests/transcriptions.py)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", [SwinWindowAttention, TimmWindowAttention])
@pytest.mark.parametrize("window,heads,nW", [(7, 3, 2), (3, 2, 1), ((2, 3), 2, 2)])
def test_module_state_dict_and_parity(device, source, window, heads, nW):
    ws = window if isinstance(window, tuple) else (window, window)
    N = ws[0] * ws[1]
    dim = 16 * heads
    eager = source(dim, ws, heads).to(device)
    with torch.no_grad():
        eager.relative_position_bias_table.normal_()
    sd = eager.state_dict()
    assert ("relative_position_index" in sd) == source.persistent_index
    ours = fastnote.nn.WindowAttention(dim, window, heads).to(device)
    ours.load_state_dict(sd, strict=True)
    assert torch.equal(ours.relative_position_index, eager.relative_position_index)
    x = torch.randn(2 * nW, N, dim, device=device, requires_grad=True)
    mask = _swin_mask(nW, N).to(device)
    for m in (None, mask):
        got, want = ours(x, mask=m), eager(x, mask=m)
        assert_close(got, want, KIND)
        g = torch.randn_like(want)
        def params(mod):
            return x, mod.qkv.weight, mod.qkv.bias, mod.proj.weight, mod.relative_position_bias_table

        for name, a, b in zip(("x", "qkv.weight", "qkv.bias", "proj.weight", "table"),
                              torch.autograd.grad(got, params(ours), g), torch.autograd.grad(want, params(eager), g)):
            assert_close(a, b, KIND, msg=name)
    # And back: fastnote's state_dict (index included) loads into Swin's module.
    source(dim, ws, heads).to(device).load_state_dict(ours.state_dict(), strict=source.persistent_index)


def test_module_index_matches_reference():
    for ws in (1, 2, 7, 12):
        assert torch.equal(ops.relative_position_index(ws), reference.relative_position_index(ws))


def test_module_qk_scale_head_dim_and_4d_input(device):
    m = fastnote.nn.WindowAttention(32, (4, 4), 2, qk_scale=0.1, head_dim=8).to(device)
    assert m.qkv.out_features == 48 and m.proj.in_features == 16
    x = torch.randn(3, 4, 4, 32, device=device)
    y = m(x)
    assert y.shape == x.shape
    qkv = m.qkv(x.reshape(3, 16, 32)).reshape(3, 16, 3, 2, 8).permute(2, 0, 3, 1, 4)
    ref = reference.window_attention(qkv[0], qkv[1], qkv[2], bias=m.relative_position_bias(), scale=0.1)
    assert_close(y, m.proj(ref.transpose(1, 2).reshape(3, 16, 16)).reshape(3, 4, 4, 32), KIND)


@pytest.mark.no_kernel
def test_module_empty_batch(device):
    m = fastnote.nn.WindowAttention(32, 7, 2).to(device)
    x = torch.randn(0, 49, 32, device=device, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 49, 32)
    y.sum().backward()


# ------------------------------------------------------------------------------------------------
# Fused block path vs reference.swin_block_attention
# ------------------------------------------------------------------------------------------------

def _block_params(C, heads, ws, device, qkv_bias=True, dtype=torch.float32):
    g = dict(device=device, dtype=dtype)
    w = (torch.randn(3 * C, C, **g) * C ** -0.5).requires_grad_()
    b = torch.randn(3 * C, **g).requires_grad_() if qkv_bias else None
    pw = (torch.randn(C, C, **g) * C ** -0.5).requires_grad_()
    pb = torch.randn(C, **g).requires_grad_()
    table = torch.randn((2 * ws - 1) ** 2, heads, **g).requires_grad_()
    return w, b, pw, pb, table


BLOCK_CASES = [
    # B, H, W, C, heads, ws, shift, qkv_bias
    pytest.param(2, 8, 8, 32, 2, 4, 0, True, id="B2-8x8-C32-h2-ws4-shift0-qkvbias"),
    pytest.param(2, 8, 8, 32, 2, 4, 2, True, id="B2-8x8-C32-h2-ws4-shift2-qkvbias"),
    pytest.param(1, 7, 10, 32, 2, 4, 2, True, id="B1-7x10-C32-h2-ws4-shift2-qkvbias-h-w-not-multiples-of-the-window"),
    pytest.param(1, 7, 7, 16, 1, 7, 3, True, id="B1-7x7-C16-h1-ws7-shift3-qkvbias-swin-t-s-window-and-shift"),
    pytest.param(1, 9, 11, 32, 2, 7, 3, True, id="B1-9x11-C32-h2-ws7-shift3-qkvbias"),
    pytest.param(1, 9, 9, 32, 2, 7, 0, False, id="B1-9x9-C32-h2-ws7-shift0-noqkvbias-padding-no-qkv-bias"),
    pytest.param(1, 5, 6, 16, 1, 3, 1, False, id="B1-5x6-C16-h1-ws3-shift1-noqkvbias"),
    pytest.param(1, 13, 12, 32, 1, 12, 6, True, id="B1-13x12-C32-h1-ws12-shift6-qkvbias-window-12-n-144"),
    pytest.param(1, 9, 9, 128, 1, 7, 3, True, id="B1-9x9-C128-h1-ws7-shift3-qkvbias-head-dim-128"),
]


@pytest.mark.parametrize("B,H,W,C,heads,ws,shift,qkv_bias", BLOCK_CASES)
def test_block_forward_backward(device, B, H, W, C, heads, ws, shift, qkv_bias):
    x = torch.randn(B, H, W, C, device=device, requires_grad=True)
    params = _block_params(C, heads, ws, device, qkv_bias)
    out = fastnote.swin_window_attention(x, *params, ws, heads, shift_size=shift)
    ref = reference.swin_block_attention(x, *params, ws, heads, shift_size=shift)
    assert out.shape == x.shape
    assert_close(out, ref, KIND)
    leaves = (x,) + tuple(params)
    grad = torch.randn_like(ref)
    names = ("x", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "table")
    got = _grads(out, leaves, grad)
    want = _grads(ref, leaves, grad)
    for name, a, b in zip([n for n, t in zip(names, leaves) if t is not None], got, want):
        assert_close(a, b, KIND, msg=name)


ROLL_FIRST_CASES = [
    # B, H, W, C, heads, ws, shift: maps that need padding, with a shift (where the orders differ)
    pytest.param(1, 7, 10, 32, 2, 4, 2, id="B1-7x10-ws4-shift2"),
    pytest.param(1, 9, 11, 32, 2, 7, 3, id="B1-9x11-ws7-shift3"),
    pytest.param(2, 5, 6, 16, 1, 3, 1, id="B2-5x6-ws3-shift1"),
    pytest.param(1, 5, 4, 16, 1, 7, 3, id="B1-5x4-ws7-shift3-one-window-shift-kept"),
    pytest.param(1, 13, 12, 32, 1, 12, 6, id="B1-13x12-ws12-shift6-n-144"),
]


@pytest.mark.parametrize("B,H,W,C,heads,ws,shift", ROLL_FIRST_CASES)
def test_block_roll_first(device, B, H, W, C, heads, ws, shift):
    """timm's order (roll, then pad): the fused op against the reference in that order, forward
    and every gradient; and the reference differs from the pad-first order on these maps."""
    x = torch.randn(B, H, W, C, device=device, requires_grad=True)
    params = _block_params(C, heads, ws, device, True)
    out = fastnote.swin_window_attention(x, *params, ws, heads, shift_size=shift, roll_first=True)
    ref = reference.swin_block_attention(x, *params, ws, heads, shift_size=shift, roll_first=True)
    assert_close(out, ref, KIND)
    other = reference.swin_block_attention(x, *params, ws, heads, shift_size=shift)
    assert (other - ref).abs().max() > 1e-2     # the orders really differ here
    leaves = (x,) + tuple(params)
    grad = torch.randn_like(ref)
    for name, a, b in zip(("x", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "table"),
                          _grads(out, leaves, grad), _grads(ref, leaves, grad)):
        assert_close(a, b, KIND, msg=name)


@pytest.mark.no_kernel
def test_block_orders_agree_without_padding():
    x = torch.randn(2, 8, 12, 32, dtype=torch.float64)
    params = [p.double() for p in _block_params(32, 2, 4, "cpu", True)]
    a = reference.swin_block_attention(x, *params, 4, 2, shift_size=2)
    b = reference.swin_block_attention(x, *params, 4, 2, shift_size=2, roll_first=True)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_block_module_matches_window_attention_module(device):
    # ShiftedWindowAttention == pad/roll/partition + WindowAttention + reverse/roll/crop, same state_dict.
    dim, heads, ws, shift = 32, 2, 4, 2
    wa = fastnote.nn.WindowAttention(dim, ws, heads).to(device)
    swa = fastnote.nn.ShiftedWindowAttention(dim, ws, heads, shift_size=shift).to(device)
    swa.load_state_dict(TimmWindowAttention(dim, (ws, ws), heads).state_dict() | {}, strict=True)
    wa.load_state_dict(swa.state_dict(), strict=True)
    x = torch.randn(2, 8, 12, dim, device=device)
    xs = torch.roll(x, (-shift, -shift), (1, 2))
    win = reference.window_partition(xs, ws)
    mask = reference.shift_mask(8, 12, ws, shift, device=device)
    y = reference.window_reverse(wa(win, mask=mask), ws, 8, 12)
    assert_close(swa(x), torch.roll(y, (shift, shift), (1, 2)), KIND)


def test_block_reference_path_and_mask_value(device, monkeypatch):
    x = torch.randn(1, 7, 9, 16, device=device)
    params = _block_params(16, 2, 4, device)
    index = reference.relative_position_index(4, device)
    want = reference.swin_block_attention(x, *params, 4, 2, shift_size=2)
    # The reference path with an explicit index (the module's route) is the reference.
    with monkeypatch.context() as m:
        m.setenv("FASTNOTE_BACKEND", "reference")
        fastnote.backend.refresh()
        assert_close(fastnote.swin_window_attention(x, *params, 4, 2, 2, relative_position_index=index), want, KIND)
        ref_other = fastnote.swin_window_attention(x, *params, 4, 2, 2, mask_value=-1e4, scale=0.3)
    fastnote.backend.refresh()
    got_other = fastnote.swin_window_attention(x, *params, 4, 2, 2, mask_value=-1e4, scale=0.3)
    assert_close(got_other, ref_other, KIND)
    assert (got_other - want).abs().max() > 1e-3  # the options change the result


def test_block_autocast_bf16(device):
    m = fastnote.nn.ShiftedWindowAttention(32, 4, 2, shift_size=2).to(device)
    x = torch.randn(1, 7, 9, 32, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    ref = reference.swin_block_attention(x, m.qkv.weight, m.qkv.bias, m.proj.weight, m.proj.bias,
                                         m.relative_position_bias_table, 4, 2, 2)
    assert_close(y, ref, KIND, dtype=torch.bfloat16)
    params = (x, m.qkv.weight, m.qkv.bias, m.proj.weight, m.proj.bias, m.relative_position_bias_table)
    g = torch.randn_like(ref)
    for name, a, b in zip(("x", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "table"),
                          torch.autograd.grad(y, params, g.to(y.dtype)), torch.autograd.grad(ref, params, g)):
        assert_rms_close(a, b, HALF_RMS_BOUND * UNIT_ROUNDOFF[torch.bfloat16], msg=name)


@pytest.mark.no_kernel
@pytest.mark.parametrize("shape", [(0, 5, 5, 16), (1, 0, 7, 16), (2, 7, 0, 16)], ids=["batch0", "H0", "W0"])
def test_block_empty_batch(shape, device):
    # an empty batch or an empty map: empty outputs and gradients, zero parameter gradients (an
    # empty map's backward divided by its zero windows per image)
    m = fastnote.nn.ShiftedWindowAttention(16, 4, 2, shift_size=2).to(device)
    x = torch.randn(shape, device=device, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for name, p in m.named_parameters():
        assert torch.equal(p.grad, torch.zeros_like(p)), name
    R = functools.partial(torch.randn, device=device)
    x = torch.randn(shape, device=device, requires_grad=True)
    table = R(25, 2, requires_grad=True)
    y = fastnote.swin_window_attention_v2(x, R(48, 16), R(16), R(16), R(16, 16), R(16),
                                          torch.ones(2, 1, 1, device=device), table, 3, 2, shift_size=1)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(table.grad, torch.zeros_like(table))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,W,C,heads,ws,shift,roll_first", [
    (4, 56, 56, 96, 3, 7, 3, False), (4, 7, 7, 768, 24, 7, 0, False), (2, 24, 24, 128, 4, 12, 6, False),
    (2, 30, 33, 64, 2, 7, 3, False), (2, 30, 33, 64, 2, 7, 3, True)])
def test_block_half_gpu(device, dtype, B, H, W, C, heads, ws, shift, roll_first):
    x = torch.randn(B, H, W, C, device=device, requires_grad=True)
    params = _block_params(C, heads, ws, device)
    with torch.no_grad():
        params[4].mul_(0.1)
    ref = reference.swin_block_attention(x, *params, ws, heads, shift_size=shift, roll_first=roll_first)
    xh = x.detach().to(dtype).requires_grad_()
    ph = [p.detach().to(dtype).requires_grad_() for p in params]
    out = fastnote.swin_window_attention(xh, *ph, ws, heads, shift_size=shift, roll_first=roll_first)
    assert_close(out, ref, KIND)
    grad = torch.randn_like(ref)
    got = _grads(out, [xh] + ph, grad.to(dtype))
    want = _grads(ref, (x,) + tuple(params), grad)
    for name, a, b in zip(("x", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "table"), got, want):
        assert_rms_close(a, b, HALF_RMS_BOUND * UNIT_ROUNDOFF[dtype], msg=name)


# ------------------------------------------------------------------------------------------------
# timm's Swin-T with fastnote's WindowAttention swapped in (runs where timm is installed)
# ------------------------------------------------------------------------------------------------

def test_timm_swin_tiny_swap(device):
    timm = pytest.importorskip("timm")
    from timm.models.swin_transformer import WindowAttention as TimmWA

    # at 112 x 112 (stages 28, 14, 7, 4; windows 7, 7, 7, 4): the 12 swaps and the fit of the
    # state_dicts are what is checked, and 224 x 224 took 150 s under the interpreter
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=112).to(device).eval()
    x = torch.randn(1, 3, 112, 112, device=device)
    with torch.no_grad():
        want = model(x)
        swapped = 0
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, TimmWA):
                    heads = child.num_heads
                    ours = fastnote.nn.WindowAttention(
                        child.qkv.in_features, tuple(child.window_size), heads, qkv_bias=child.qkv.bias is not None,
                        head_dim=child.qkv.out_features // 3 // heads).to(device)
                    ours.load_state_dict(child.state_dict(), strict=True)
                    setattr(module, name, ours)
                    swapped += 1
        assert swapped == 12
        got = model(x)
    # 12 blocks of fp32 attention in a different summation order: a little looser than one op.
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_timm_init_hooks_after_to_empty(device):
    """timm's meta-device flow on fastnote's drop-in for timm's WindowAttention: ``to_empty``, load a
    checkpoint, ``init_non_persistent_buffers`` (what timm's ``reinit_non_persistent_buffers``
    calls): the index is not in the state_dict, so without the hook it keeps whatever memory it
    got. ``reset_parameters`` draws the table as timm's does (truncated normal, std 0.02)."""
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    if not hasattr(timm_swin.WindowAttention, "init_non_persistent_buffers"):
        pytest.skip("this timm's WindowAttention has no init_non_persistent_buffers")
    from fastnote.nn.timm_swin import TimmWindowAttention

    torch.manual_seed(0)
    theirs = timm_swin.WindowAttention(8, 2, window_size=4).to(device).eval()
    with torch.no_grad():
        theirs.relative_position_bias_table.normal_(0, 0.5)
    x = torch.randn(3, 16, 8, device=device)
    with torch.no_grad():
        want = theirs(x)
    ours = TimmWindowAttention(8, 2, window_size=4).to(device).eval()
    ours.to_empty(device=device)
    with torch.no_grad():
        ours.relative_position_index.fill_(3)
    ours.load_state_dict(theirs.state_dict())
    ours.init_non_persistent_buffers()
    assert torch.equal(ours.relative_position_index, theirs.relative_position_index)
    with torch.no_grad():
        assert_close(ours(x), want, "two_matmul")
    loaded = ours.relative_position_bias_table.detach().clone()
    ours.reset_parameters()
    table = ours.relative_position_bias_table
    assert not torch.equal(table, loaded) and 0.01 < table.std().item() < 0.03
    assert torch.equal(ours.relative_position_index, theirs.relative_position_index)


@pytest.mark.parametrize("H,W,ws,shift", [pytest.param(9, 11, 4, 2, id="9x11-ws4-shift2-padded"),
                                          pytest.param(8, 8, 4, 2, id="8x8-ws4-shift2"),
                                          pytest.param(5, 6, 7, 3, id="5x6-ws7-shift3-always-partition"),
                                          pytest.param(8, 8, 4, 0, id="8x8-ws4-shift0")])
def test_timm_block_fused_path(device, H, W, ws, shift):
    """timm's own SwinTransformerBlock against the same block patched onto the fused path
    (timm's order: roll, then pad), training mode, forward and every parameter's gradient."""
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    torch.manual_seed(0)
    block = nn.Sequential(timm_swin.SwinTransformerBlock(32, (H, W), num_heads=2, window_size=ws, shift_size=shift,
                                                         always_partition=ws > min(H, W))).to(device)
    assert tuple(block[0].shift_size) == (shift, shift)
    with torch.no_grad():
        block[0].attn.relative_position_bias_table.normal_()
    fused = copy.deepcopy(block)
    report = fastnote.patch(fused)
    assert list(report) == ["0: SwinTransformerBlock -> fastnote.nn.timm_swin.FusedSwinTransformerBlock"]
    assert type(fused[0].attn) is type(block[0].attn) and list(fused.state_dict()) == list(block.state_dict())
    x = torch.randn(2, H, W, 32, device=device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = block(xa), fused(xb)
    assert_close(yb, ya, KIND)
    g = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, [xa] + list(block.parameters()), g)
    gb = torch.autograd.grad(yb, [xb] + list(fused.parameters()), g)
    for (name, _), a, b in zip([("x", None)] + list(block.named_parameters()), gb, ga):
        assert_close(a, b, KIND, msg=name)
    fastnote.unpatch(fused)
    assert type(fused[0]) is type(block[0])


def test_timm_fused_blocks_follow_set_input_size(device):
    """timm's set_input_size (new image size and window) after patching: the fused blocks read
    the window and shift timm sets at every forward."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    eager = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, num_classes=4,
                              embed_dim=16, depths=(2, 2), num_heads=(1, 2)).to(device).eval()
    patched = copy.deepcopy(eager)
    assert len(fastnote.patch(patched)) == 4
    for model in (eager, patched):
        model.set_input_size(img_size=(48, 48), window_size=6)
    x = torch.randn(1, 3, 48, 48, device=device)
    with torch.no_grad():
        assert_close(patched(x), eager(x), KIND)


def test_timm_fused_block_pickles(tmp_path):
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    model = nn.Sequential(timm_swin.SwinTransformerBlock(16, (4, 4), num_heads=1, window_size=2, shift_size=1))
    fastnote.patch(model)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert type(loaded[0]).__name__ == "FusedSwinTransformerBlock"
    x = torch.randn(1, 4, 4, 16)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# torchvision's ShiftedWindowAttention (its own code, not a transcription)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("H,W", [pytest.param(7, 7, id="7x7-one-window"), pytest.param(4, 4, id="4x4-padded-one"),
                                 pytest.param(7, 12, id="7x12-one-window-row"), pytest.param(9, 9, id="9x9"),
                                 pytest.param(10, 10, id="10x10"), pytest.param(14, 14, id="14x14")])
@pytest.mark.parametrize("shift", [pytest.param(3, id="shift3"), pytest.param(0, id="shift0")])
def test_block_matches_torchvision_shifted_window_attention(device, H, W, shift):
    # torchvision drops the shift along an axis whose padded size the window covers (a 7x7 map at
    # window 7: the last stage of every Swin at 224); with the shift kept the two differed by 0.4.
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    dim, heads, ws = 32, 2, 7
    theirs = swin.ShiftedWindowAttention(dim, [ws, ws], [shift, shift], heads).to(device)
    with torch.no_grad():
        theirs.relative_position_bias_table.normal_(0, 1)
    ours = fastnote.nn.ShiftedWindowAttention(dim, ws, heads, shift_size=shift).to(device)
    state = theirs.state_dict()
    state["relative_position_index"] = state["relative_position_index"].view(ws * ws, ws * ws)
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, H, W, dim, device=device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = theirs(xa), ours(xb)
    assert_close(got, want, KIND)
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    assert_close(xb.grad, xa.grad, KIND, msg="x")
    for name in ("qkv.weight", "qkv.bias", "proj.weight", "relative_position_bias_table"):
        a, b = ours.get_parameter(name).grad, theirs.get_parameter(name).grad
        assert_close(a, b, KIND, msg=name)
