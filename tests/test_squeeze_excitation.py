"""squeeze_excitation and the fused hswish_se: forward and every gradient vs reference.py, the
torchvision-style module drop-in, errors, custom-op checks, compile, AMP."""
import pytest
import torch
from torch import nn

import fastnote
from fastnote import reference
from fastnote.ops.squeeze_excitation import ACTIVATIONS, GATES
from fastnote.testing import assert_close
from transcriptions import TorchvisionSqueezeExcitation


def _make_divisible(v, divisor=8):
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _inputs(B, C, H, W, Cr, device, dtype=torch.float32, conv_shaped=False):
    x = (torch.randn(B, C, H, W, device=device) * 3).to(dtype).requires_grad_()
    shape1 = (Cr, C, 1, 1) if conv_shaped else (Cr, C)
    shape2 = (C, Cr, 1, 1) if conv_shaped else (C, Cr)
    w1 = (torch.randn(shape1, device=device) / C**0.5).requires_grad_()
    b1 = torch.randn(Cr, device=device).requires_grad_()
    w2 = (torch.randn(shape2, device=device) / Cr**0.5).requires_grad_()
    b2 = torch.randn(C, device=device).requires_grad_()
    return x, w1, b1, w2, b2


def _check(fn, ref, params, activation, gate, kind_out="reduction"):
    x, w1, b1, w2, b2 = params
    out = fn(x, w1, b1, w2, b2, activation=activation, gate=gate)
    assert out.dtype == x.dtype and out.shape == x.shape
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, grad)
    leaves = [p.detach().float().requires_grad_() for p in params]
    expected = ref(leaves[0], leaves[1].flatten(1), leaves[2], leaves[3].flatten(1), leaves[4],
                   activation=activation, gate=gate)
    expected_grads = torch.autograd.grad(expected, leaves, grad.float())
    assert_close(out, expected, kind_out)
    for name, got, want in zip(["x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"], grads, expected_grads):
        assert got.dtype == params[["x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"].index(name)].dtype
        assert_close(got, want, "reduction", dtype=x.dtype, msg=f"gradient of {name}")


FUSED = [(fastnote.squeeze_excitation, reference.squeeze_excitation),
         (fastnote.hswish_se, reference.hswish_se)]
FUSED_IDS = ["squeeze_excitation", "hswish_se"]


@pytest.mark.parametrize("fn,ref", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("C,H", [(72, 28), (120, 28), (480, 14), (672, 7), (960, 7)])
def test_mobilenetv3_layers(fn, ref, C, H, device):
    # The SE layers of MobileNetV3-Large (batch cut to 2 for the interpreter).
    params = _inputs(2, C, H, H, _make_divisible(C // 4), device, conv_shaped=True)
    _check(fn, ref, params, "relu", "hard_sigmoid")


@pytest.mark.parametrize("fn,ref", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gate", GATES)
def test_activations_and_gates(fn, ref, activation, gate, device):
    _check(fn, ref, _inputs(3, 24, 5, 5, 8, device), activation, gate)


@pytest.mark.parametrize("fn,ref", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("B,C,H,W,Cr", [(1, 1, 1, 1, 1), (2, 3, 17, 19, 2), (1, 5, 1, 300, 7), (3, 37, 2, 3, 5),
                                        (2, 3, 40, 41, 2)])
def test_awkward_shapes(fn, ref, B, C, H, W, Cr, device):
    _check(fn, ref, _inputs(B, C, H, W, Cr, device), "relu", "hard_sigmoid")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(dtype, device):
    # fp32 weights with half activations, as under AMP; the MLP runs in fp32.
    x, w1, b1, w2, b2 = _inputs(2, 40, 9, 9, 16, device)
    x = x.detach().to(dtype).requires_grad_()
    _check(fastnote.hswish_se, reference.hswish_se, (x, w1, b1, w2, b2), "relu", "hard_sigmoid")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_full_batch_gpu(dtype, device):
    params = _inputs(128, 672, 14, 14, 168, device, conv_shaped=True)
    x = params[0].detach().to(dtype).requires_grad_()
    _check(fastnote.hswish_se, reference.hswish_se, (x,) + params[1:], "relu", "hard_sigmoid")


def test_non_contiguous_and_empty(device):
    x, w1, b1, w2, b2 = _inputs(2, 8, 6, 5, 4, device)
    xt = x.detach().transpose(2, 3)
    assert not xt.is_contiguous()
    got = fastnote.hswish_se(xt, w1, b1, w2, b2)
    assert_close(got, reference.hswish_se(xt, w1, b1, w2, b2), "reduction")
    e = torch.randn(0, 8, 6, 5, device=device, requires_grad=True)
    out = fastnote.squeeze_excitation(e, w1, b1, w2, b2)
    assert out.shape == e.shape
    out.sum().backward()
    assert e.grad.shape == e.shape


@pytest.mark.parametrize("fn,ref", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("B,C,H,W,Cr", [(2, 24, 7, 5, 8), (3, 130, 9, 9, 32), (2, 16, 1, 1, 4), (2, 1, 4, 4, 1)])
def test_channels_last(fn, ref, B, C, H, W, Cr, device):
    """A channels_last input (a model converted with .to(memory_format=torch.channels_last)) runs
    the kernels in its own layout: the reference's values and gradients, and the output and the
    input gradient stay channels_last (as torchvision's SE, made of elementwise ops, keeps them),
    with the upstream gradient in either layout. 130 channels: three channel tiles, the last partial;
    1x1 maps and one channel: contiguous both ways, the NCHW path."""
    x, w1, b1, w2, b2 = _inputs(B, C, H, W, Cr, device)
    x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    _check(fn, ref, (x, w1, b1, w2, b2), "silu", "hard_sigmoid")
    out = fn(x, w1, b1, w2, b2)
    assert out.is_contiguous(memory_format=torch.channels_last)
    eager = TorchvisionSqueezeExcitation(C, Cr, scale_activation=nn.Hardsigmoid).to(device)
    assert eager(x).stride() == out.stride() or x.is_contiguous()
    for grad in (torch.randn_like(out), torch.randn(B, C, H, W, device=device)):   # channels_last, NCHW
        (dx,) = torch.autograd.grad(out, x, grad, retain_graph=True)
        assert dx.is_contiguous(memory_format=torch.channels_last)
        want = torch.autograd.grad(ref(x, w1, b1, w2, b2), x, grad)[0]
        assert_close(dx, want, "reduction")


@pytest.mark.parametrize("fn", [fastnote.squeeze_excitation, fastnote.hswish_se], ids=["se", "hswish_se"])
def test_strided_weights_and_biases(fn, device):
    """Weights and biases that are views (every other element of a larger buffer, an expanded
    scalar, a transposed matrix) give what their contiguous copies give, forward and backward:
    the kernels read them as packed memory, so the op must copy them first."""
    x, w1, b1, w2, b2 = _inputs(2, 8, 3, 3, 4, device)
    views = (x,
             torch.randn(8, 4, device=device).t().requires_grad_(),         # [4, 8] transposed
             torch.randn(8, device=device)[::2].requires_grad_(),           # stride 2
             torch.randn(8, 6, device=device)[:, 1:5].requires_grad_(),     # row stride 6
             torch.randn(1, device=device).expand(8).requires_grad_())       # stride 0
    assert not any(v.is_contiguous() for v in views[1:])
    copies = tuple(v.detach().contiguous().requires_grad_() for v in views)
    grad = torch.randn(2, 8, 3, 3, device=device)
    got = fn(*views, activation="relu", gate="sigmoid")
    want = fn(*copies, activation="relu", gate="sigmoid")
    assert torch.equal(got, want)
    for g, w in zip(torch.autograd.grad(got, views, grad), torch.autograd.grad(want, copies, grad)):
        assert torch.equal(g, w)


def test_no_bias(device):
    x, w1, _, w2, _ = _inputs(2, 8, 4, 4, 4, device)
    got = fastnote.squeeze_excitation(x, w1, None, w2, None)
    want = reference.squeeze_excitation(x, w1, torch.zeros(4, device=device), w2, torch.zeros(8, device=device))
    assert_close(got, want, "reduction")


@pytest.mark.no_kernel
def test_errors(device):
    x, w1, b1, w2, b2 = _inputs(2, 8, 4, 4, 4, device)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        fastnote.squeeze_excitation(x[0], w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"x has 8 channels \(shape \[2, 8, 4, 4\]\), but fc1_weight \[4, 7\] takes 7"):
        fastnote.squeeze_excitation(x, w1[:, :7], b1, w2, b2)
    with pytest.raises(ValueError, match=r"x has 16 channels .*, but fc1_weight \[4, 8\] takes 8"):
        fastnote.squeeze_excitation(torch.cat([x, x], 1), w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"fc1_weight must have shape \[4, 8, 1, 1\], got \[4, 8, 2, 1\]"):
        fastnote.squeeze_excitation(x, w1[:, :, None, None].expand(4, 8, 2, 1), b1, w2, b2)
    with pytest.raises(ValueError, match=r"fc2_bias must have shape \[8\]"):
        fastnote.squeeze_excitation(x, w1, b1, w2, b2[:3])
    with pytest.raises(ValueError, match="gate must be one of"):
        fastnote.squeeze_excitation(x, w1, b1, w2, b2, gate="tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        fastnote.hswish_se(x, w1, b1, w2, b2, activation="gelu")
    with pytest.raises(TypeError, match="x must have dtype"):
        fastnote.squeeze_excitation(x.detach().long(), w1, b1, w2, b2)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(layout, device):
    x, w1, b1, w2, b2 = _inputs(2, 8, 3, 5, 4, device)
    if layout == "channels_last":   # the fake outputs must have the kernels' layout
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    for hswish in (False, True):
        torch.library.opcheck(torch.ops.fastnote.squeeze_excitation.default,
                              (x, w1, b1, w2, b2, "relu", "hard_sigmoid", hswish))
        s = x.detach().float().mean((2, 3))
        g = torch.sigmoid(torch.nn.functional.linear(torch.nn.functional.silu(
            torch.nn.functional.linear(s, w1.detach(), b1.detach())), w2.detach(), b2.detach()))
        torch.library.opcheck(torch.ops.fastnote.squeeze_excitation_backward.default,
                              (torch.randn_like(x), x.detach(), s, g, w1.detach(), b1.detach(), w2.detach(),
                               b2.detach(), "silu", "sigmoid", hswish))


def test_compile_fullgraph(device, compile_backend):
    x, w1, b1, w2, b2 = _inputs(2, 16, 4, 4, 8, device)

    def f(x, w1, b1, w2, b2):
        return fastnote.hswish_se(x, w1, b1, w2, b2).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    out = compiled(x, w1, b1, w2, b2)
    grads = torch.autograd.grad(out, (x, w1, b1, w2, b2))
    ref_out = reference.hswish_se(x, w1, b1, w2, b2).square().sum()
    ref_grads = torch.autograd.grad(ref_out, (x, w1, b1, w2, b2))
    assert_close(out, ref_out, "reduction")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, "reduction")


def test_autocast(device):
    se = fastnote.nn.SqueezeExcitation(16, 8).to(device)
    x = torch.randn(2, 16, 5, 5, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = se(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    want = reference.squeeze_excitation(x.to(torch.bfloat16).float(), se.fc1.weight.flatten(1), se.fc1.bias,
                                        se.fc2.weight.flatten(1), se.fc2.bias)
    assert_close(y, want, "reduction")


def _eager_se_classes():
    classes = [TorchvisionSqueezeExcitation]
    try:
        from torchvision.ops import SqueezeExcitation

        classes.append(SqueezeExcitation)
    except Exception:
        pass
    return classes


@pytest.mark.parametrize("eager_cls", _eager_se_classes(), ids=lambda c: c.__module__)
@pytest.mark.parametrize("scale_activation", [nn.Hardsigmoid, nn.Sigmoid], ids=["hardsigmoid", "sigmoid"])
def test_module_drop_in(eager_cls, scale_activation, device):
    eager = eager_cls(72, 24, scale_activation=scale_activation).to(device)
    ours = fastnote.nn.SqueezeExcitation(72, 24, scale_activation=scale_activation).to(device)
    assert set(ours.state_dict()) == set(eager.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    ours.load_state_dict(eager.state_dict(), strict=True)
    x = torch.randn(2, 72, 6, 6, device=device, requires_grad=True)
    y_ours, y_eager = ours(x), eager(x)
    assert_close(y_ours, y_eager, "reduction")
    g = torch.randn_like(y_ours)
    got = torch.autograd.grad(y_ours, [x] + list(ours.parameters()), g)
    want = torch.autograd.grad(y_eager, [x] + list(eager.parameters()), g)
    for a, b in zip(got, want):
        assert_close(a, b, "reduction")


def test_module_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        fastnote.nn.SqueezeExcitation(8, 4, activation=nn.GELU)


@pytest.mark.no_kernel
def test_wide_squeeze_takes_reference_path(device):
    # Squeeze widths past MAX_SQUEEZE are not held on chip: the op falls back to the reference.
    from fastnote.ops.squeeze_excitation import MAX_SQUEEZE

    _check(fastnote.hswish_se, reference.hswish_se, _inputs(1, 4, 2, 2, MAX_SQUEEZE + 1, device), "relu", "sigmoid")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_weights(dtype, device):
    # A model converted with .half()/.bfloat16(): weights and activations in the same half dtype.
    x, w1, b1, w2, b2 = (p.detach().to(dtype).requires_grad_() for p in _inputs(2, 24, 6, 6, 8, device))
    _check(fastnote.squeeze_excitation, reference.squeeze_excitation, (x, w1, b1, w2, b2), "silu", "sigmoid")
