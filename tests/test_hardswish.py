"""hard_swish / hard_sigmoid: forward and gradient parity with torch (the reference calls
F.hardswish / F.hardsigmoid), the kinks at x = -3 and 3, errors, custom-op checks, compile."""
import pytest
import torch
import torch.nn.functional as F

import fastnote
from fastnote import reference
from fastnote.testing import assert_close

OPS = [
    (fastnote.hard_swish, reference.hard_swish, F.hardswish),
    (fastnote.hard_sigmoid, reference.hard_sigmoid, F.hardsigmoid),
]
IDS = ["hard_swish", "hard_sigmoid"]
# MobileNetV3-Large activations (batch cut down for the interpreter) and awkward sizes: one
# element, a prime, one past a kernel block (4096), a non-power-of-two 4-D tensor.
SHAPES = [(2, 72, 28, 28), (2, 960, 7, 7), (1,), (13,), (4097,), (3, 5, 7, 11)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("op,ref,_", OPS, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity(op, ref, _, shape, dtype, device):
    x = (torch.randn(shape, device=device) * 4).to(dtype).requires_grad_()
    y = op(x)
    assert y.dtype == dtype and y.shape == x.shape
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    xr = x.detach().float().requires_grad_()
    yr = ref(xr)
    (dxr,) = torch.autograd.grad(yr, xr, g.float())
    assert_close(y, yr, "elementwise")
    assert_close(dx, dxr, "elementwise")


@pytest.mark.parametrize("op,_,torch_fn", OPS, ids=IDS)
def test_kinks_match_installed_torch(op, _, torch_fn, device):
    # torch 2.13: d hardswish = 0 at -3 and 1 at 3; d hardsigmoid = 0 at both. Compare with what
    # the installed torch says rather than hard-coding it.
    x = torch.tensor([-3.0, 3.0, -3.0001, -2.9999, 2.9999, 3.0001, 0.0, -1e4, 1e4], device=device)
    xa = x.clone().requires_grad_()
    op(xa).sum().backward()
    xb = x.clone().requires_grad_()
    torch_fn(xb).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=0, rtol=0)
    torch.testing.assert_close(op(x), torch_fn(x), atol=1e-6, rtol=0)


def test_non_contiguous_and_empty(device):
    x = torch.randn(6, 8, device=device).t()
    assert not x.is_contiguous()
    torch.testing.assert_close(fastnote.hard_swish(x), F.hardswish(x), atol=1e-6, rtol=1e-5)
    e = torch.randn(0, 3, device=device, requires_grad=True)
    y = fastnote.hard_swish(e)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert e.grad.shape == (0, 3)


def test_errors():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fastnote.hard_swish([1.0, 2.0])
    with pytest.raises(TypeError, match="x must have dtype"):
        fastnote.hard_swish(torch.arange(4))


@pytest.mark.parametrize("kind", IDS)
def test_opcheck(kind, device):
    x = torch.randn(3, 70, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastnote.hard_activation.default, (x, kind))
    g = torch.randn(3, 70, device=device)
    torch.library.opcheck(torch.ops.fastnote.hard_activation_backward.default, (g, x.detach(), kind))


def test_compile_fullgraph(device, compile_backend):
    def f(x):
        return fastnote.hard_sigmoid(fastnote.hard_swish(x) * 2).sum()

    x = torch.randn(5, 33, device=device, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    out = compiled(x)
    (dx,) = torch.autograd.grad(out, x)
    xr = x.detach().clone().requires_grad_()
    ref = F.hardsigmoid(F.hardswish(xr) * 2).sum()
    (dxr,) = torch.autograd.grad(ref, xr)
    assert_close(out, ref, "reduction")
    assert_close(dx, dxr, "elementwise")


def test_modules_match_torch(device):
    x = torch.randn(4, 9, device=device) * 5
    torch.testing.assert_close(fastnote.nn.Hardswish()(x), torch.nn.Hardswish()(x), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fastnote.nn.Hardsigmoid()(x), torch.nn.Hardsigmoid()(x), atol=1e-6, rtol=1e-5)


def test_autocast_bf16(device):
    x = torch.randn(4, 16, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = fastnote.hard_swish(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert_close(y, F.hardswish(x.to(torch.bfloat16).float()), "elementwise")
