"""sagan_attention: forward and every gradient (q, k, v, x, gamma) vs reference.py, fewer keys than
queries (BigGAN), large unscaled logits, the SAGAN Self_Attn drop-in, errors, custom-op checks,
compile, AMP."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastnote
from fastnote import reference
from fastnote.testing import UNIT_ROUNDOFF, assert_close, assert_rms_close, tolerance
from transcriptions import Self_Attn

NAMES = ("q", "k", "v", "x", "gamma")


def _inputs(B, d_qk, d_v, N, N_k, device, dtype=torch.float32, scale=1.0, residual=True, gamma=0.7):
    def leaf(*shape, s=1.0):
        return (torch.randn(*shape, device=device) * s).to(dtype).requires_grad_()

    q, k, v = leaf(B, d_qk, N, s=scale), leaf(B, d_qk, N_k, s=scale), leaf(B, d_v, N_k)
    if not residual:
        return q, k, v, None, None
    # gamma stays fp32, as SAGAN's nn.Parameter does under AMP.
    return q, k, v, leaf(B, d_v, N), torch.tensor([gamma], device=device, requires_grad=True)


def _check(inputs, kind="two_matmul"):
    """fastnote vs the fp32 reference on the same (upcast) inputs: output and every gradient."""
    present = [(n, t) for n, t in zip(NAMES, inputs) if t is not None]
    dtype = inputs[0].dtype
    out = fastnote.sagan_attention(*inputs)
    # torch's promotion of gamma * attention + x: fp32 for half inputs beside a [1] fp32 gamma
    assert out.dtype == reference.sagan_output_dtype(*inputs[::3], inputs[4])
    assert out.shape == (inputs[0].shape[0], inputs[2].shape[1], inputs[0].shape[2])
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, [t for _, t in present], grad)
    leaves = [t.detach().float().requires_grad_() if t is not None else None for t in inputs]
    expected = reference.sagan_attention(*leaves)
    expected_grads = torch.autograd.grad(expected, [t for t in leaves if t is not None], grad.float())
    assert_close(out, expected, kind, dtype=dtype)     # the attention computes in q's dtype
    for (name, t), got, want in zip(present, grads, expected_grads):
        assert got.dtype == t.dtype and got.shape == t.shape, name
        # fp16/bf16: P and dS are rounded to the input dtype before their matmuls (as in flash
        # attention), so a gradient entry's error scales with the gradient's largest entries, not
        # with the entry: compare relative to max(1, max |expected|). Measured on SAGAN shapes,
        # eager torch in bf16 is 2-3x less accurate than the kernels by this metric (and off by
        # 100% with logits ~ 1e3).
        scale = max(1.0, want.abs().max().item()) if dtype != torch.float32 else 1.0
        assert_close(got.float() / scale, want / scale, kind, dtype=dtype, msg=f"gradient of {name}")


# (B, d_qk, d_v, N, N_k): N = 1, 7, 45 and tile-crossing sizes; d_v not a multiple of 16; d_v
# over one d_v tile (128); d_qk = 8 (SAGAN's C = 64) and odd; N_k below and above N.
SHAPES = [
    pytest.param(2, 8, 64, 1, 1, id="B2-dqk8-dv64-N1-Nk1"),
    pytest.param(2, 8, 12, 7, 7, id="B2-dqk8-dv12-N7-Nk7"),
    pytest.param(1, 8, 40, 45, 45, id="B1-dqk8-dv40-N45-Nk45"),
    pytest.param(2, 16, 24, 45, 12, id="B2-dqk16-dv24-N45-Nk12"),
    pytest.param(1, 8, 20, 70, 130, id="B1-dqk8-dv20-N70-Nk130"),
    pytest.param(1, 5, 200, 33, 33, id="B1-dqk5-dv200-N33-Nk33"),
    pytest.param(1, 3, 300, 20, 9, id="B1-dqk3-dv300-N20-Nk9"),
]


@pytest.mark.parametrize("B,d_qk,d_v,N,N_k", SHAPES)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
def test_forward_backward(B, d_qk, d_v, N, N_k, residual, device):
    _check(_inputs(B, d_qk, d_v, N, N_k, device, residual=residual))


@settings(max_examples=20, deadline=None, derandomize=True,  # the same 20 shapes on every CI run
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 2), d_qk=st.integers(1, 20), d_v=st.integers(1, 150), N=st.integers(1, 90),
       N_k=st.integers(1, 90), residual=st.booleans(), scale=st.sampled_from([0.5, 3.0]))
def test_random_shapes(B, d_qk, d_v, N, N_k, residual, scale, device):
    _check(_inputs(B, d_qk, d_v, N, N_k, device, scale=scale, residual=residual))


def test_n1000(device):
    # C = 64 as in SAGAN's generator, N = 1000: many query and key tiles, the last ones partial.
    _check(_inputs(1, 8, 64, 1000, 1000, device))


def test_biggan_pooled_keys(device):
    # BigGAN: keys and values max-pooled 2x2, N_k = N / 4.
    _check(_inputs(2, 8, 32, 16 * 16, 8 * 8, device))


@pytest.mark.parametrize("gamma_shape", [(), (1,)], ids=["0-dim", "[1]"])
def test_gamma_shapes_and_zero(gamma_shape, device):
    q, k, v, x, _ = _inputs(2, 8, 16, 30, 30, device)
    gamma = torch.zeros(gamma_shape, device=device, requires_grad=True)
    _check((q, k, v, x, gamma))
    # SAGAN starts with gamma = 0: out is exactly x, q/k/v get zero gradients, gamma does not.
    out = fastnote.sagan_attention(q, k, v, x, gamma)
    assert torch.equal(out, x)
    dq, dk, dv, dgamma = torch.autograd.grad(out.square().sum(), (q, k, v, gamma))
    assert not dq.any() and not dk.any() and not dv.any()
    assert dgamma.shape == gamma.shape and dgamma.abs().item() > 0


@pytest.mark.parametrize("scale", [pytest.param(12.0, id="logits2e3"), pytest.param(20.0, id="logits7e3")])
def test_large_logits_fp32(scale, device):
    # Unscaled SAGAN logits with |q||k| in the thousands: exp without the running max would
    # overflow even fp32. Such inputs are ill-conditioned, so an fp32 reference is no oracle
    # here: its own error depends on the BLAS kernel the machine picks (OPENBLAS_CORETYPE) and
    # reached 2.9e-4 relative on dk. The kernel is compared with a float64 reference instead,
    # with a bound derived from the inputs: each fp32 logit carries an error up to about
    # u * L (u = 2^-24, L = max_ij sum_c |q_ci| |k_cj|), which softmax passes on as a relative
    # error of the same size to every probability, hence to each result, whose scale is its
    # largest entry (gamma's gradient is one sum, whose scale is sum |grad * O|). Measured over
    # 18 seeds: at most 0.93 * u * L * scale for q, k, v and the output, 0.0015 for gamma; the
    # bound allows 4, on top of the table's fp32 tolerance.
    inputs = _inputs(2, 8, 16, 50, 50, device, scale=scale)
    q, k = inputs[0], inputs[1]
    assert torch.bmm(q.transpose(1, 2), k).abs().max().item() > 1e3
    L = torch.bmm(q.detach().abs().transpose(1, 2), k.detach().abs()).max().item()
    out = fastnote.sagan_attention(*inputs)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad)
    exact = [t.detach().cpu().double().requires_grad_() for t in inputs]
    want = reference.sagan_attention(*exact)
    want_grads = torch.autograd.grad(want, exact, grad.cpu().double())
    attention_out = reference.sagan_attention(*exact[:3]).detach()
    atol, rtol = tolerance(torch.float32, "two_matmul")
    u = 2.0 ** -24
    for name, got, expected in zip(("out",) + NAMES, (out,) + grads, (want,) + want_grads):
        expected = expected.detach()
        size = (grad.cpu().double() * attention_out).abs().sum() if name == "gamma" else expected.abs().max()
        bound = atol + rtol * expected.abs() + 4 * u * L * size.item()
        err = (got.detach().cpu().double() - expected).abs()
        assert (err <= bound).all(), f"{name}: max error {err.max().item():.3g}, bound {bound.max().item():.3g}"


def test_all_logits_very_negative(device):
    # Every logit below -150 (log-sum-exp too): padded key slots, whose logit would read as 0,
    # must stay masked or exp(0 - lse) overflows to inf and poisons the gradients.
    q, k, v, x, gamma = _inputs(2, 8, 16, 37, 45, device)
    with torch.no_grad():
        q.copy_(-(q.abs() + 5))
        k.copy_(k.abs() + 5)
    assert torch.bmm(q.transpose(1, 2), k).max() < -150
    _check((q, k, v, x, gamma))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d_v", [16, 200])
def test_half_precision_large_logits(dtype, d_v, device):
    # logits ~ 250: exp(logit) overflows fp16 (max 65504) from logit 11 on. d_v = 200 takes
    # several d_v tiles in both passes.
    inputs = _inputs(2, 8, d_v, 50, 50, device, dtype=dtype, scale=4.0)
    _check(inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,C,N,N_k", [
    (4, 64, 4096, 4096),      # SAGAN generator 64x64
    (4, 128, 1024, 1024),     # generator 32x32
    (4, 256, 1024, 256),      # discriminator 32x32, BigGAN-style pooled keys
    (4, 512, 256, 256),       # discriminator 16x16
    (1, 64, 16384, 16384),    # 128x128
    (2, 64, 1000, 1000),
])
def test_sagan_shapes_gpu(B, C, N, N_k, dtype, device):
    _check(_inputs(B, C // 8, C, N, N_k, device, dtype=dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_logits_1e3_gpu(dtype, device):
    inputs = _inputs(2, 8, 64, 1024, 1024, device, dtype=dtype, scale=11.0)
    assert torch.bmm(inputs[0].float().transpose(1, 2), inputs[1].float()).abs().max() > 1e3
    _check(inputs)


def test_return_attention(device):
    q, k, v, x, gamma = _inputs(2, 8, 24, 33, 17, device)
    out, attention = fastnote.sagan_attention(q, k, v, x, gamma, return_attention=True)
    want_out, want_attention = reference.sagan_attention(q, k, v, x, gamma, return_attention=True)
    assert attention.shape == (2, 33, 17) and attention.dtype == q.dtype
    assert_close(out, want_out, "two_matmul")
    assert_close(attention, want_attention, "reduction")
    plain = fastnote.sagan_attention(q, k, v, return_attention=False)
    assert isinstance(plain, torch.Tensor)
    # The returned map is differentiable too (plain torch ops).
    w = torch.randn_like(attention)
    got = torch.autograd.grad((out.square().sum() + (attention * w).sum()), (q, k, v, x, gamma))
    want = torch.autograd.grad((want_out.square().sum() + (want_attention * w).sum()), (q, k, v, x, gamma))
    for name, g, r in zip(NAMES, got, want):
        assert_close(g, r, "two_matmul", msg=name)


def test_residual_4d_x(device):
    # x may keep its [B, C, W, H] shape; the result then has it too.
    q, k, v, x, gamma = _inputs(2, 8, 16, 20, 20, device)
    x4 = x.detach().reshape(2, 16, 4, 5).requires_grad_()
    out = fastnote.sagan_attention(q, k, v, x4, gamma)
    assert out.shape == x4.shape
    assert_close(out, reference.sagan_attention(q, k, v, x4, gamma), "two_matmul")
    out.sum().backward()
    assert x4.grad.shape == x4.shape


def test_non_contiguous(device):
    B, d_qk, d_v, N, N_k = 2, 8, 20, 37, 23
    # [B, N, d] storage viewed as [B, d, N]; v every other channel; x a transposed view.
    q = torch.randn(B, N, d_qk, device=device).transpose(1, 2).requires_grad_()
    k = torch.randn(B, N_k, d_qk, device=device).transpose(1, 2).requires_grad_()
    v = torch.randn(B, 2 * d_v, N_k, device=device)[:, ::2].requires_grad_()
    x = torch.randn(N, B, d_v, device=device).permute(1, 2, 0).requires_grad_()
    assert not any(t.is_contiguous() for t in (q, k, v, x))
    _check((q, k, v, x, torch.tensor(0.5, device=device, requires_grad=True)))
    # and a non-contiguous upstream gradient (stride 0 from sum())
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    fastnote.sagan_attention(q2, k2, v2).sum().backward()
    q3, k3, v3 = (t.detach().requires_grad_() for t in (q, k, v))
    reference.sagan_attention(q3, k3, v3).sum().backward()
    for a, b in ((q2, q3), (k2, k3), (v2, v3)):
        assert_close(a.grad, b.grad, "two_matmul")


def test_empty(device):
    q, k, v, x, gamma = _inputs(0, 8, 16, 10, 10, device)
    out = fastnote.sagan_attention(q, k, v, x, gamma)
    assert out.shape == (0, 16, 10)
    out.sum().backward()
    assert q.grad.shape == q.shape and v.grad.shape == v.shape and x.grad.shape == x.shape
    assert gamma.grad.shape == gamma.shape and gamma.grad.item() == 0
    # no queries at all: empty output, zero gradients for the keys
    q, k, v, x, gamma = _inputs(2, 8, 16, 0, 10, device)
    out = fastnote.sagan_attention(q, k, v, x, gamma)
    assert out.shape == (2, 16, 0)
    out.sum().backward()
    assert not k.grad.any() and not v.grad.any()


@pytest.mark.no_kernel
def test_errors(device):
    q, k, v, x, gamma = _inputs(2, 8, 16, 10, 10, device)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        fastnote.sagan_attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"k must have shape \[2, 8, \*\]"):
        fastnote.sagan_attention(q, k[:, :4], v)
    with pytest.raises(ValueError, match=r"k must have shape \[2, 8, \*\]"):
        fastnote.sagan_attention(q, k[:1], v)
    with pytest.raises(ValueError, match=r"v must have shape \[2, \*, 10\]"):
        fastnote.sagan_attention(q, k, v[..., :5])
    with pytest.raises(ValueError, match=r"x must have shape \[2, 16, 10\]"):
        fastnote.sagan_attention(q, k, v, x[:, :3], gamma)
    with pytest.raises(ValueError, match="x must have shape"):
        fastnote.sagan_attention(q, k, v, x.detach().reshape(2, 16, 2, 5)[..., :2], gamma)
    with pytest.raises(ValueError, match="gamma must be given together with x"):
        fastnote.sagan_attention(q, k, v, x=x)
    with pytest.raises(ValueError, match="x must be given together with gamma"):
        fastnote.sagan_attention(q, k, v, gamma=gamma)
    with pytest.raises(ValueError, match="gamma must be a scalar"):
        fastnote.sagan_attention(q, k, v, x, torch.zeros(2, device=device))
    with pytest.raises(TypeError, match="gamma must be a torch.Tensor"):
        fastnote.sagan_attention(q, k, v, x, 0.5)
    with pytest.raises(TypeError, match="all tensors must have one dtype"):
        fastnote.sagan_attention(q, k.detach().half(), v)
    with pytest.raises(TypeError, match="x must have dtype"):
        fastnote.sagan_attention(q, k, v, x.detach().long(), gamma)
    with pytest.raises(TypeError, match="v must have dtype"):
        fastnote.sagan_attention(q, k, v.detach().long())
    with pytest.raises(ValueError, match="k must have at least one position"):
        fastnote.sagan_attention(q, k[..., :0], v[..., :0])
    with pytest.raises(ValueError, match="q must have at least one channel"):
        fastnote.sagan_attention(q[:, :0], k[:, :0], v)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        fastnote.nn.SelfAttention(16)(x)
    with pytest.raises(ValueError, match="in_dim must be >= 8"):
        fastnote.nn.SelfAttention(4)


@pytest.mark.gpu
def test_device_mix():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    q, k, v, x, gamma = _inputs(2, 8, 16, 10, 10, "cuda")
    with pytest.raises(ValueError, match="one device.*k on cpu"):
        fastnote.sagan_attention(q, k.detach().cpu(), v)
    with pytest.raises(ValueError, match="one device.*gamma on cpu"):
        fastnote.sagan_attention(q, k, v, x, gamma.detach().cpu())


def test_device_mix_meta():
    # Device mixes are caught before any kernel runs; meta tensors stand in for a second device.
    q, k, v, x, gamma = _inputs(2, 8, 16, 10, 10, "cpu")
    with pytest.raises(ValueError, match="one device.*v on meta"):
        fastnote.sagan_attention(q, k, v.detach().to("meta"))


def test_opcheck(device):
    for residual in (True, False):
        for dtype in (torch.float32, torch.float16):
            q, k, v, x, gamma = (t.detach() if t is not None else None
                                 for t in _inputs(2, 8, 16, 9, 5, device, dtype=dtype, residual=residual))
            torch.library.opcheck(torch.ops.fastnote.sagan_attention.default, (q, k, v, x, gamma))
            _, o, lse = torch.ops.fastnote.sagan_attention.default(q, k, v, x, gamma)
            o = o if o.dim() == 3 else torch.ops.fastnote.sagan_attention.default(q, k, v, x, gamma)[0]
            grad = torch.randn(2, 16, 9, device=device, dtype=dtype)
            torch.library.opcheck(torch.ops.fastnote.sagan_attention_backward.default,
                                  (grad, q, k, v, o, lse, gamma))


def test_compile_fullgraph(device, compile_backend):
    inputs = _inputs(2, 8, 16, 20, 12, device)

    def f(q, k, v, x, gamma):
        return fastnote.sagan_attention(q, k, v, x, gamma).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    out = compiled(*inputs)
    grads = torch.autograd.grad(out, inputs)
    ref_out = reference.sagan_attention(*inputs).square().sum()
    ref_grads = torch.autograd.grad(ref_out, inputs)
    assert_close(out, ref_out, "two_matmul")
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert_close(g, r, "two_matmul", msg=name)


def test_autocast_bf16(device):
    # Under autocast the attention runs in bf16 (q, k, v cast); x and gamma stay fp32, so the
    # result is fp32 as eager's gamma * out + x is, and x's gradient is the upstream one exactly.
    # Compared with the fp32 reference on the fp32 inputs at the bf16 tolerance.
    inputs = _inputs(2, 8, 32, 40, 40, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = fastnote.sagan_attention(*inputs)
    assert out.dtype == torch.float32
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad)
    ref_out = reference.sagan_attention(*inputs)
    ref_grads = torch.autograd.grad(ref_out, inputs, grad.float())
    assert_close(out, ref_out, "two_matmul", dtype=torch.bfloat16)
    assert torch.equal(grads[3], grad), "x's gradient is dOut, unrounded"
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert g.dtype == torch.float32, name
        assert_close(g, r, "two_matmul", dtype=torch.bfloat16, msg=name)


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["no-autocast", "bf16-autocast"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32, (1,)), (torch.bfloat16, torch.float32, (1,)),
                                    (torch.bfloat16, torch.float32, ()), (torch.float16, torch.float16, (1,)),
                                    (torch.float16, torch.float32, ()), (torch.bfloat16, torch.bfloat16, ())],
                         ids=["x32-g32", "x16-g32", "x16-g32-0dim", "xh-gh", "xh-g32-0dim", "x16-g16-0dim"])
def test_output_dtype_is_eagers(dtypes, amp, device):
    """The result's dtype is what torch gives SAGAN's own ``gamma * bmm(v, attention^T) + x``, in
    every mix of x's and gamma's dtypes and gamma's shape, with and without autocast; the values
    agree with that expression at the attention dtype's tolerance."""
    x_dtype, g_dtype, g_shape = dtypes
    q, k, v = (torch.randn(2, c, 12, device=device, dtype=x_dtype) for c in (4, 4, 16))
    x = torch.randn(2, 16, 3, 4, device=device, dtype=x_dtype)
    gamma = torch.full(g_shape, 0.6, device=device, dtype=g_dtype)
    with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        attention = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)
        eager = gamma * torch.bmm(v, attention.transpose(1, 2)).view(x.shape) + x
        out = fastnote.sagan_attention(q, k, v, x=x, gamma=gamma)
    assert out.dtype == eager.dtype
    assert out.shape == eager.shape
    attention_dtype = amp or x_dtype
    assert_close(out, eager.float(), "two_matmul", dtype=attention_dtype)


# Compiles the kernels for sm_90 ahead of time (no GPU needed): catches code that the interpreter
# runs but the compiler rejects. A fresh process, because the interpreter replaces @triton.jit.
def test_reference_backend_switch(device, monkeypatch):
    inputs = _inputs(2, 8, 16, 20, 12, device)
    got = fastnote.sagan_attention(*inputs)
    monkeypatch.setenv("FASTNOTE_BACKEND", "reference")
    fastnote.backend.refresh()
    assert_close(got, fastnote.sagan_attention(*inputs), "two_matmul")


@pytest.mark.parametrize("return_attention", [False, True])
@pytest.mark.parametrize("C,W,H", [(64, 8, 8), (32, 5, 7)])
def test_module_drop_in(C, W, H, return_attention, device):
    eager = Self_Attn(C, "relu").to(device)
    with torch.no_grad():
        eager.gamma.fill_(0.7)
        for conv in (eager.query_conv, eager.key_conv):  # larger energies: a peaked softmax
            conv.weight.mul_(3)
    ours = fastnote.nn.SelfAttention(C, "relu", return_attention=return_attention).to(device)
    assert set(ours.state_dict()) == set(eager.state_dict())
    ours.load_state_dict(eager.state_dict(), strict=True)
    x = torch.randn(2, C, W, H, device=device, requires_grad=True)
    (y_ours, a_ours), (y_eager, a_eager) = ours(x), eager(x)
    assert y_ours.shape == x.shape
    assert_close(y_ours, y_eager, "two_matmul")
    if return_attention:
        assert_close(a_ours, a_eager, "reduction")
    else:
        assert a_ours is None
    g = torch.randn_like(y_ours)
    got = torch.autograd.grad(y_ours, [x] + list(ours.parameters()), g)
    want = torch.autograd.grad(y_eager, [x] + list(eager.parameters()), g)
    for (name, _), a, b in zip([("x", None)] + list(ours.named_parameters()), got, want):
        assert_close(a, b, "two_matmul", msg=name)


def test_module_compile(device, compile_backend):
    m = fastnote.nn.SelfAttention(32).to(device)
    with torch.no_grad():
        m.gamma.fill_(0.5)
    x = torch.randn(2, 32, 4, 4, device=device, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend=compile_backend)
    out, attention = compiled(x)
    assert attention is None
    q, k, v = (conv(x).flatten(2) for conv in (m.query_conv, m.key_conv, m.value_conv))
    want = reference.sagan_attention(q, k, v, x, m.gamma)
    assert_close(out, want, "two_matmul")
    leaves = (x, m.gamma, m.query_conv.weight, m.value_conv.weight)
    for name, a, b in zip(("x", "gamma", "query_conv.weight", "value_conv.weight"),
                          torch.autograd.grad(out.square().sum(), leaves),
                          torch.autograd.grad(want.square().sum(), leaves)):
        assert_close(a, b, "two_matmul", msg=name)


# ------------------------------------------------------------------------------------------------
# Launch limits and large tensors
# ------------------------------------------------------------------------------------------------

def test_batch_folds_into_grid_axis_0(device, launches):
    # Grid axes 1 and 2 are limited to 65,535 programs: the batch must not be on them.
    grids = {}
    for B in (1, 3):
        launches.clear()
        q, k, v, x, gamma = _inputs(B, 8, 200, 20, 12, device)
        fastnote.sagan_attention(q, k, v, x, gamma).sum().backward()
        grids[B] = [(name, tuple(grid)) for module, name, grid in launches if module.endswith("sagan_attention")]
    assert len(grids[1]) == len(grids[3]) >= 4
    for (name, one), (_, three) in zip(grids[1], grids[3]):
        assert three[0] == 3 * one[0] and three[1:] == one[1:], (name, one, three)


def test_sizes_beyond_int32_tiles_are_refused():
    from fastnote.triton_kernels import sagan_attention as kernels

    q = torch.empty(1, 8, 2**24, device="meta")
    with pytest.raises(ValueError, match="positions per image"):
        kernels.check_sizes(q, torch.empty(1, 64, 16, device="meta"))


@pytest.mark.gpu
def test_batch_beyond_65535_gpu(device):
    _check(_inputs(70000, 8, 16, 9, 7, device))


@pytest.mark.gpu
def test_more_than_2_31_elements_gpu(device):
    # One image with d_v * N > 2^31 (out, x, O and dv's upstream all pass it); 16 keys keep the
    # attention itself cheap. bf16 keeps the tensors at 4.3 GB each.
    B, d_qk, d_v, N, N_k = 1, 8, 512, 2**22 + 3, 16
    assert d_v * N > 2**31
    q, k, v, x, gamma = _inputs(B, d_qk, d_v, N, N_k, device, dtype=torch.bfloat16)
    out = fastnote.sagan_attention(q, k, v, x, gamma)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, x, gamma), grad)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v, x, gamma)]
    want = reference.sagan_attention(*leaves)
    want_grads = torch.autograd.grad(want, leaves, grad.float())
    assert_close(out[..., -4096:], want[..., -4096:], "two_matmul", dtype=torch.bfloat16, msg="last positions")
    for name, a, b in zip(NAMES, got, want_grads):
        assert_rms_close(a, b, 8 * UNIT_ROUNDOFF[torch.bfloat16], msg=name)


def _kernel_grids(launches, name):
    return [grid for module, kernel, grid in launches if module.endswith("sagan_attention") and kernel == name]


# (tiles, dtype) -> (keys a dk/dv program owns, queries a dq program owns): _blocks' table
OWNED = {("wide", torch.bfloat16): (128, 128), ("square", torch.bfloat16): (64, 64),
         ("wide", torch.float32): (64, 64), ("square", torch.float32): (32, 64)}


@pytest.mark.parametrize("tiles", ["wide", "square"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_tiles(tiles, dtype, device, launches, monkeypatch):
    # Both backward tile sets (the default and the one benchmarks/sagan_attention.py times beside
    # it) give the reference's gradients where the tiles are crossed: 300 queries, 150 keys, and
    # in fp32 d_v over several d_v tiles. The grids show which tiles ran.
    from fastnote.triton_kernels import sagan_attention as kernels

    monkeypatch.setattr(kernels, "BACKWARD_TILES", tiles)
    B, N, N_k = 2, 300, 150
    launches.clear()
    _check(_inputs(B, 8, 64 if dtype == torch.bfloat16 else 72, N, N_k, device, dtype=dtype))
    keys, queries = OWNED[(tiles, dtype)]
    assert [g[0] for g in _kernel_grids(launches, "_dkdv_kernel")][:1] == [B * -(-N_k // keys)]
    assert [g[0] for g in _kernel_grids(launches, "_dq_kernel")] == [B * -(-N // queries)]
