"""tv_loss: forward and gradient vs reference.py (and the seed's formula), ties (the gradient of |0|
is 0, as torch's abs gives), tile-crossing and degenerate shapes, strides, errors, custom-op checks,
compile, AMP; fp16/bf16 at a 256x256 batch on a GPU."""
import pytest
import torch

import fastnote
from fastnote import reference
from fastnote.testing import assert_close


def _check(y, upstream=1.3):
    y = y.detach().clone().requires_grad_()
    loss = fastnote.tv_loss(y)
    assert loss.shape == () and loss.dtype == torch.float32
    dy, = torch.autograd.grad(loss * upstream, y)
    yr = y.detach().float().requires_grad_()
    want = reference.tv_loss(yr)
    want_dy, = torch.autograd.grad(want * upstream, yr)
    assert_close(loss, want, "reduction", dtype=y.dtype)
    assert dy.shape == y.shape and dy.dtype == y.dtype
    # Every gradient entry is upstream/(C*H*W) times an integer in [-4, 4]: compared in those units.
    unit = upstream / y[0].numel()
    assert_close(dy.float() / unit, want_dy / unit, "elementwise", dtype=y.dtype)
    return dy


SHAPES = [
    pytest.param((2, 3, 20, 70), id="B2-C3-20x70"),        # W crosses the 64-wide tile
    pytest.param((1, 3, 33, 17), id="B1-C3-33x17"),        # H crosses the 16-high tile
    pytest.param((3, 1, 1, 9), id="B3-C1-1x9"),            # one row: no vertical terms
    pytest.param((1, 2, 9, 1), id="B1-C2-9x1"),            # one column
    pytest.param((1, 1, 1, 1), id="B1-C1-1x1"),            # no terms at all
    pytest.param((2, 64, 5, 6), id="B2-C64-5x6"),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_tv(shape, device):
    _check(torch.randn(shape, device=device))


def test_matches_seed_formula(device):
    y = torch.randn(2, 3, 16, 16, device=device)
    b, c, h, w = y.shape
    seed = (torch.sum(torch.abs(y[:, :, :, 1:] - y[:, :, :, :-1]))
            + torch.sum(torch.abs(y[:, :, 1:, :] - y[:, :, :-1, :]))) / float(c * h * w)
    assert_close(fastnote.tv_loss(y), seed, "reduction")


def test_ties_have_zero_gradient(device):
    # Equal neighbours everywhere (|0|: gradient 0), and a plateau with steps: integer values, so
    # many differences are exactly 0, as in a quantised or constant-padded image.
    dy = _check(torch.ones(1, 2, 6, 7, device=device))
    assert not dy.any()
    _check(torch.randint(0, 3, (2, 3, 12, 70), device=device).float())


def test_strides(device):
    y = torch.randn(2, 6, 12, 20, device=device)
    cl = y.contiguous(memory_format=torch.channels_last)
    dy = _check(cl)
    assert dy.is_contiguous(memory_format=torch.channels_last)
    _check(y[:, ::2, :, 3:])
    _check(y.transpose(2, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half(dtype, device):
    _check(torch.randn(2, 3, 20, 30, device=device).to(dtype))


@pytest.mark.no_kernel
def test_empty_batch(device):
    y = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    loss = fastnote.tv_loss(y)
    assert loss.item() == 0
    loss.backward()
    assert y.grad.shape == y.shape


def test_autocast(device):
    # Not an autocast op (elementwise and a sum): the input keeps its dtype, the loss is fp32.
    y = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = fastnote.tv_loss(y)
    assert_close(loss, reference.tv_loss(y), "reduction")
    loss.backward()
    assert y.grad.dtype == torch.float32


def test_compile_fullgraph(device, compile_backend):
    y = torch.randn(2, 3, 9, 11, device=device)
    ya, yb = y.clone().requires_grad_(), y.clone().requires_grad_()
    got = torch.compile(lambda t: fastnote.tv_loss(t) * 2, fullgraph=True, backend=compile_backend)(ya)
    want = fastnote.tv_loss(yb) * 2
    assert_close(got, want, "reduction")
    got.backward()
    want.backward()
    assert_close(ya.grad, yb.grad, "elementwise")


def test_opcheck(device):
    y = torch.randn(2, 3, 5, 7, device=device, requires_grad=True)
    yc = y.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    for t in (y, yc):
        torch.library.opcheck(torch.ops.fastnote.tv_loss.default, (t,))
        torch.library.opcheck(torch.ops.fastnote.tv_loss_backward.default,
                              (torch.tensor(0.5, device=device), t.detach()))


def test_module(device):
    y = torch.randn(2, 3, 8, 8, device=device)
    assert_close(fastnote.nn.TotalVariation()(y), reference.tv_loss(y), "reduction")


@pytest.mark.no_kernel
def test_errors(device):
    y = torch.randn(2, 3, 4, 4, device=device)
    with pytest.raises(ValueError, match="y must have 4 dimensions"):
        fastnote.tv_loss(y[0])
    with pytest.raises(TypeError, match="y must have dtype"):
        fastnote.tv_loss(y.long())
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        fastnote.tv_loss(1.0)
    with pytest.raises(ValueError, match="y must have C, H and W >= 1"):
        fastnote.tv_loss(y[:, :, :0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_image_batch_gpu(dtype, device):
    y = torch.rand(16, 3, 256, 256, device=device).to(dtype)
    _check(y)
    _check(y.contiguous(memory_format=torch.channels_last))
