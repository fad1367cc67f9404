"""hard_swish / hard_sigmoid are torch's ops (fastnote/ops/hardswish.py says why): the public
functions and the fastnote.nn names give torch's results and gradients bit for bit, on every
dtype, keep torch's behaviour under autocast and torch.compile (no graph break), and reject bad
input with fastnote's messages."""
import pytest
import torch
import torch.nn.functional as F

import fastnote

OPS = [(fastnote.hard_swish, F.hardswish), (fastnote.hard_sigmoid, F.hardsigmoid)]
IDS = ["hard_swish", "hard_sigmoid"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.no_kernel
@pytest.mark.parametrize("op,torch_fn", OPS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_bit_for_bit(op, torch_fn, dtype, device):
    # the kinks at -3 and 3, their neighbours, a MobileNetV3-sized random map and a transposed one
    kinks = torch.tensor([-3.0, 3.0, -3.0001, -2.9999, 2.9999, 3.0001, 0.0, -1e4, 1e4], device=device)
    for x in (kinks, torch.randn(2, 72, 28, 28, device=device) * 4, torch.randn(6, 8, device=device).t() * 4):
        xa = x.to(dtype).requires_grad_()
        xb = x.to(dtype).requires_grad_()
        ya, yb = op(xa), torch_fn(xb)
        g = torch.randn_like(ya)
        (ga,), (gb,) = torch.autograd.grad(ya, xa, g), torch.autograd.grad(yb, xb, g)
        assert ya.dtype == dtype and ya.stride() == yb.stride()
        assert torch.equal(ya, yb) and torch.equal(ga, gb)


@pytest.mark.no_kernel
def test_modules_are_torchs():
    assert fastnote.nn.Hardswish is torch.nn.Hardswish and fastnote.nn.Hardsigmoid is torch.nn.Hardsigmoid
    x = torch.randn(4, 9) * 5
    y = fastnote.nn.Hardswish(inplace=True)(x.clone())
    assert torch.equal(y, F.hardswish(x))


@pytest.mark.no_kernel
def test_errors():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fastnote.hard_swish([1.0, 2.0])
    with pytest.raises(TypeError, match="x must have dtype"):
        fastnote.hard_swish(torch.arange(4))
    with pytest.raises(TypeError, match="x must have dtype"):
        fastnote.hard_sigmoid(torch.arange(4))


@pytest.mark.no_kernel
def test_compile_fullgraph(device):
    def f(x):
        return fastnote.hard_sigmoid(fastnote.hard_swish(x) * 2).sum()

    x = torch.randn(5, 33, device=device, requires_grad=True)
    out = torch.compile(f, fullgraph=True, backend="eager")(x)
    (dx,) = torch.autograd.grad(out, x)
    xr = x.detach().clone().requires_grad_()
    ref = F.hardsigmoid(F.hardswish(xr) * 2).sum()
    (dxr,) = torch.autograd.grad(ref, xr)
    assert torch.equal(out, ref) and torch.equal(dx, dxr)


@pytest.mark.no_kernel
def test_autocast_bf16(device):
    x = torch.randn(4, 16, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = fastnote.hard_swish(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.hardswish(x.to(torch.bfloat16)))
