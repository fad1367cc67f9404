"""gram and style_loss: forward and every gradient (x, target_gram) vs reference.py on VGG-16 layer
shapes scaled down for the interpreter and odd ones, the split-K path and its determinism, strides
(channels-last read in place), fp16 sums past 65504, target shapes, normalize modes, errors,
custom-op checks, compile, AMP; fp16/bf16 at the real VGG-16 shapes on a GPU."""
import pytest
import torch

import fastnote
from fastnote import reference
from fastnote.ops import gram as gram_ops
from fastnote.testing import assert_close, tolerance
from fastnote.triton_kernels import gram as kernels

from fastnote.ops.gram import NORMALIZE


def _close(got, want, dtype=torch.float32, msg=""):
    """Compared relative to the largest expected entry: the chw-normalised Gram and the style
    loss's gradients are ~1e-3 .. 1e-7, where the table's absolute tolerance would accept
    anything; for large entries (normalize="none") this is the table's relative tolerance."""
    scale = max(want.abs().max().item(), 1e-30) if want.numel() else 1.0
    assert_close(got.float() / scale, want.float() / scale, "reduction", dtype=dtype, msg=msg)


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _check_gram(x, normalize="chw"):
    x = _leaf(x)
    g = fastnote.gram(x, normalize)
    B, C = x.shape[:2]
    assert g.shape == (B, C, C) and g.dtype == x.dtype
    up = torch.randn(g.shape, device=x.device).to(x.dtype)
    dx, = torch.autograd.grad(g, x, up)
    xr = _leaf(x.float())
    want = reference.gram(xr, normalize)
    want_dx, = torch.autograd.grad(want, xr, up.float())
    _close(g, want, x.dtype, "gram")
    assert dx.shape == x.shape and dx.dtype == x.dtype
    _close(dx, want_dx, x.dtype, "gradient of x")


def _loss_scale(want_dx, dtype):
    """1.7, times a power of two for fp16 as a GradScaler would settle on: the style loss's
    gradient of x is ~1e-11 at VGG sizes (4 / (C H W)^2 times sums of O(C) terms), under fp16's
    smallest subnormal (6e-8), so unscaled it is zero in fp16 whatever computes it."""
    if dtype != torch.float16:
        return 1.0
    top = want_dx.abs().max().item()
    return 2.0 ** round(-torch.log2(torch.tensor(top)).item()) if top > 0 else 1.0


def _check_style(x, target, normalize="chw"):
    x, target = _leaf(x), _leaf(target)
    loss = fastnote.style_loss(x, target, normalize)
    assert loss.shape == () and loss.dtype == torch.float32
    xr, tr = _leaf(x.float()), _leaf(target.float())
    want = reference.style_loss(xr, tr, normalize)
    want_dx, want_dt = torch.autograd.grad(want * 1.7, (xr, tr))
    scale = _loss_scale(want_dx, x.dtype)
    want_dx, want_dt = want_dx * scale, want_dt * scale
    dx, dt = torch.autograd.grad(loss * (1.7 * scale), (x, target))
    _close(loss, want, x.dtype, "loss")
    assert dx.shape == x.shape and dx.dtype == x.dtype and dt.shape == target.shape and dt.dtype == target.dtype
    _close(dx, want_dx, x.dtype, "gradient of x")
    _close(dt, want_dt, x.dtype, "gradient of target_gram")


def _features(shape, device, dtype=torch.float32):
    # relu'd like VGG activations
    return torch.randn(shape, device=device).relu().to(dtype)


# VGG-16 relu1_2..relu4_3 channel counts at interpreter-sized maps, and odd shapes: C = 1, 3, 65
# (65 crosses a 64-wide tile), 130 (three tiles: a triangular grid of 6), H*W = 1, 7, 4097.
SHAPES = [
    pytest.param((2, 64, 16, 16), id="B2-C64-HW16x16"),
    pytest.param((1, 128, 8, 8), id="B1-C128-HW8x8"),
    pytest.param((1, 256, 4, 4), id="B1-C256-HW4x4"),
    pytest.param((3, 1, 5, 5), id="B3-C1-HW5x5"),
    pytest.param((2, 3, 7), id="B2-C3-N7"),
    pytest.param((2, 65, 1, 1), id="B2-C65-HW1"),
    pytest.param((1, 65, 3, 3), id="B1-C65-HW3x3"),
    pytest.param((2, 130, 2, 3), id="B2-C130-HW2x3"),
    pytest.param((1, 3, 4097), id="B1-C3-N4097"),
    pytest.param((2, 5, 1, 4097), id="B2-C5-HW1x4097"),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_gram(shape, device):
    _check_gram(_features(shape, device))


@pytest.mark.parametrize("shape", SHAPES)
def test_style_loss(shape, device):
    C = shape[1]
    target = reference.gram(_features((1, *shape[1:]), device))[0] + 0.01 * torch.randn(C, C, device=device)
    _check_style(_features(shape, device), target)


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("shape", [pytest.param((2, 65, 3, 3), id="B2-C65-HW3x3"),
                                   pytest.param((1, 3, 4097), id="B1-C3-N4097")])
def test_normalize_modes(shape, normalize, device):
    x = torch.randn(shape, device=device)
    _check_gram(x, normalize)
    C = shape[1]
    _check_style(x, torch.randn(C, C, device=device), normalize)


@pytest.mark.parametrize("target_shape", ["C,C", "1,C,C", "B,C,C"])
def test_target_shapes(target_shape, device):
    B, C = 3, 70
    x = torch.randn(B, C, 3, 4, device=device)
    shape = {"C,C": (C, C), "1,C,C": (1, C, C), "B,C,C": (B, C, C)}[target_shape]
    # not symmetric: the mirrored tiles must read the target's own entries
    _check_style(x, torch.randn(shape, device=device))


def test_target_strided_and_fp32_with_half_x(device):
    x = torch.randn(2, 20, 3, 3, device=device)
    t = torch.randn(20, 40, device=device)[:, ::2]                 # strided
    _check_style(x, t)
    _check_style(x, torch.randn(20, 20, device=device).t())       # transposed view
    _check_style(x.half(), torch.randn(1, 20, 20, device=device))  # fp32 target for fp16 x


def test_style_loss_matches_seed_with_repeated_style_image(device):
    # The perceptual-loss code repeats the style image batch_size times; a [1, C, C] target gives
    # the same loss and gradient.
    B, C = 3, 16
    style = torch.randn(1, C, 6, 6, device=device)
    x = _leaf(torch.randn(B, C, 6, 6, device=device))
    seed = ((reference.gram(x) - reference.gram(style.repeat(B, 1, 1, 1))) ** 2).sum() / (C * 36)
    ours = fastnote.style_loss(x, fastnote.gram(style))
    _close(ours, seed)
    _close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(seed, x)[0])


@pytest.mark.parametrize("split", [1, 2, 5])
@pytest.mark.parametrize("C", [3, 70])
def test_split_k(split, C, device):
    # The K-split chosen from the shape, forced either way: the same result within rounding, and
    # every split bitwise reproducible (a fixed-order reduction, no atomics).
    x = torch.randn(2, C, 700, device=device)
    want = reference.gram(x)
    runs = []
    for _ in range(2):
        out = torch.empty(2, C, C, device=device)
        plan = kernels.forward_plan(x, style=False, split=split)
        part = None if plan.part_shape is None else torch.empty(plan.part_shape, device=device)
        kernels.forward(f=x, inv_norm=1.0 / (C * 700), plan=plan, out=out, part=part)
        runs.append(out)
    _close(runs[0], want)
    assert torch.equal(runs[0], runs[1])
    target = torch.randn(C, C, device=device)
    diff = torch.empty(2, C, C, device=device)
    plan = kernels.forward_plan(x, style=True, split=split)
    part = None if plan.part_shape is None else torch.empty(plan.part_shape, device=device)
    losses = torch.empty(plan.loss_programs, device=device)
    kernels.forward(f=x, inv_norm=1.0 / (C * 700), plan=plan, target=target[None], diff=diff, part=part,
                    losses=losses)
    _close(losses.sum(), reference.style_loss(x, target))
    _close(diff, want - target)


def test_split_rule():
    cpu = torch.device("cpu")
    # VGG-16 relu1_2 at 256x256, batch 4: one tile per image, K = 65536 -> many splits;
    # relu4_3 (K 1024) with 10 tiles per image -> a few; a tiny K -> none.
    assert kernels._split(65536, 4, 128, cpu) == 99
    assert kernels._split(1024, 40, 64, cpu) == 4
    assert kernels._split(7, 1, 128, cpu) == 1


def test_deterministic_default_path(device):
    x = torch.randn(2, 3, 4097, device=device)   # split-K chosen automatically
    assert torch.equal(fastnote.gram(x), fastnote.gram(x))
    t = torch.randn(3, 3, device=device)
    assert torch.equal(fastnote.style_loss(x, t), fastnote.style_loss(x, t))


def test_large_activations_fp32(device):
    # Un-normalised sums of ~1e9, normalised ones ~1e5: fp32 keeps them, compared with the reference.
    _check_gram(torch.rand(2, 3, 4097, device=device) * 500)
    _check_gram(torch.rand(2, 3, 4097, device=device) * 500, "none")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_sums_past_fp16_range(dtype, device):
    # |F|^2 summed over 4097 positions reaches ~3e8, past fp16's 65504: a naive fp16 bmm gives inf,
    # the kernels accumulate in fp32 and normalise (G ~ 3e4) before rounding.
    x = (torch.rand(2, 3, 4097, device=device) * 300).to(dtype)
    if dtype == torch.float16:
        assert torch.bmm(x, x.transpose(1, 2)).isinf().any()
    g = fastnote.gram(x)
    assert g.isfinite().all()
    _check_gram(x)
    _check_style(x, reference.gram(x.float())[0] * 0.9)
    # several tiles in half precision (the style loss's 64-wide grid, gram's 128-wide one)
    x = (torch.rand(1, 130, 3, 5, device=device) * 4).to(dtype)
    _check_gram(x)
    _check_style(x, torch.randn(130, 130, device=device))


def test_channels_last_read_in_place(device):
    x = _features((2, 24, 5, 6), device).contiguous(memory_format=torch.channels_last)
    f, plan = gram_ops._plan(x, False)
    assert f is x and plan.f_strides == (5 * 6 * 24, 1, 24)   # read in place: no copy, not even a view
    assert gram_ops._flat(x)[0] is x
    _check_gram(x)
    _check_style(x, torch.randn(24, 24, device=device))
    x = _leaf(x)
    fastnote.gram(x).sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_non_contiguous(device):
    base = torch.randn(3, 40, 6, 10, device=device)
    _check_gram(base[:, ::2])                       # channel slice: strided C, merged H*W
    _check_gram(base[..., ::2])                     # every other column: H and W still merge
    assert gram_ops._plan(base[..., ::2], False)[1].f_strides == (2400, 60, 2)
    _check_gram(base[..., :5])                      # H and W do not merge: copied once
    f, plan = gram_ops._plan(base[..., :5], True)
    assert f.shape == (3, 40, 30) and f.is_contiguous() and plan.f_strides == (1200, 30, 1)
    f, plan = gram_ops._plan(base[:, :, :1, ::2], False)   # H = 1: W's stride is K's
    assert f.dim() == 4 and plan.f_strides == (2400, 60, 2)
    f, plan = gram_ops._plan(base[:, :, ::3, :1], False)   # W = 1: H's stride is K's
    assert f.dim() == 4 and plan.f_strides == (2400, 60, 30)
    _check_gram(base[:, :, :1, ::2])
    _check_gram(base[:, :, ::3, :1])
    _check_gram(base.transpose(2, 3))
    _check_style(base[1:, 5:30], torch.randn(25, 25, device=device))
    # an expanded upstream gradient (stride 0 from sum()) into the backward kernel
    x = _leaf(base[:2, :7])
    fastnote.gram(x).sum().backward()
    xr = _leaf(base[:2, :7])
    reference.gram(xr).sum().backward()
    _close(x.grad, xr.grad)


def test_only_target_requires_grad(device):
    x = torch.randn(2, 9, 4, 4, device=device)
    t = torch.randn(9, 9, device=device, requires_grad=True)
    fastnote.style_loss(x, t).backward()
    t2 = t.detach().requires_grad_()
    reference.style_loss(x, t2).backward()
    _close(t.grad, t2.grad)
    with torch.no_grad():   # no gradient wanted: D is not written
        _close(fastnote.style_loss(x, t), reference.style_loss(x, t))


@pytest.mark.no_kernel
def test_empty_batch(device):
    x = torch.randn(0, 8, 4, 4, device=device, requires_grad=True)
    g = fastnote.gram(x)
    assert g.shape == (0, 8, 8)
    g.sum().backward()
    assert x.grad.shape == x.shape
    t = torch.randn(8, 8, device=device, requires_grad=True)
    x.grad = None
    loss = fastnote.style_loss(x, t)
    assert loss.shape == () and loss.item() == 0
    loss.backward()
    assert not x.grad.any() and not t.grad.any()


def test_autocast(device):
    x = torch.randn(2, 20, 5, 5, device=device, requires_grad=True)
    t = torch.randn(20, 20, device=device)
    dtype = torch.bfloat16
    with torch.autocast(device.type, dtype=dtype):
        g = fastnote.gram(x)
        loss = fastnote.style_loss(x, t)
    assert g.dtype == dtype and loss.dtype == torch.float32
    _close(g, reference.gram(x.detach().to(dtype).float()), dtype)
    _close(loss, reference.style_loss(x.detach().to(dtype).float(), t), dtype)
    loss.backward()
    assert x.grad.dtype == torch.float32 and x.grad.isfinite().all()


def test_compile_fullgraph(device, compile_backend):
    def fn(x, t):
        return fastnote.style_loss(x, t) + fastnote.gram(x, "hw").square().sum()

    x = torch.randn(2, 20, 5, 5, device=device)
    t = torch.randn(1, 20, 20, device=device)
    xa, ta, xb, tb = _leaf(x), _leaf(t), _leaf(x), _leaf(t)
    got = torch.compile(fn, fullgraph=True, backend=compile_backend)(xa, ta)
    want = fn(xb, tb)
    _close(got, want)
    got.backward()
    want.backward()
    _close(xa.grad, xb.grad)
    _close(ta.grad, tb.grad)


def test_opcheck(device):
    x = torch.randn(2, 20, 3, 5, device=device, requires_grad=True)
    xc = torch.randn(2, 20, 3, 5, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    t = torch.randn(1, 20, 20, device=device, requires_grad=True)
    for inp in (x, xc):
        torch.library.opcheck(torch.ops.fastnote.gram.default, (inp, "chw"))
        torch.library.opcheck(torch.ops.fastnote.gram_backward.default,
                              (torch.randn(2, 20, 20, device=device), inp.detach(), "hw"))
        torch.library.opcheck(torch.ops.fastnote.style_loss.default, (inp, t, "chw", True))
        diff = torch.randn(2, 20, 20, device=device)
        torch.library.opcheck(torch.ops.fastnote.style_loss_backward.default,
                              (torch.tensor(1.5, device=device), inp.detach(), diff, "none"))
    torch.library.opcheck(torch.ops.fastnote.style_loss.default, (x.detach(), t.detach()[0], "hw", False))


@pytest.mark.no_kernel
def test_errors(device):
    x = torch.randn(2, 8, 4, 4, device=device)
    t = torch.randn(8, 8, device=device)
    with pytest.raises(ValueError, match="x must have 3 or 4 dimensions"):
        fastnote.gram(x[0, 0])
    with pytest.raises(ValueError, match="normalize must be one of"):
        fastnote.gram(x, "chw2")
    with pytest.raises(TypeError, match="x must have dtype"):
        fastnote.gram(x.long())
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fastnote.gram([[1.0]])
    with pytest.raises(ValueError, match="at least one channel"):
        fastnote.gram(x[:, :0])
    with pytest.raises(ValueError, match="at least one position"):
        fastnote.gram(x[..., :0])
    with pytest.raises(ValueError, match=r"target_gram must have shape \[8, 8\]"):
        fastnote.style_loss(x, torch.randn(8, 9, device=device))
    with pytest.raises(ValueError, match=r"target_gram must have shape \[8, 8\], \[1, 8, 8\] or \[2, 8, 8\]"):
        fastnote.style_loss(x, torch.randn(3, 8, 8, device=device))
    with pytest.raises(ValueError, match=r"x has 8 channels \(shape \[2, 8, .*\]\), but target_gram \[1, 7, 7\] is the "
                                         r"Gram matrix of 7"):
        fastnote.style_loss(x, torch.randn(1, 7, 7, device=device))
    with pytest.raises(ValueError, match="target_gram must have 2 or 3 dimensions"):
        fastnote.style_loss(x, torch.randn(8, device=device))
    with pytest.raises(TypeError, match=r"target_gram must have x's dtype \(float16\) or float32, got bfloat16"):
        fastnote.style_loss(x.half(), t.bfloat16())
    with pytest.raises(TypeError, match=r"target_gram must have dtype float32 \(x's\), got float16"):
        fastnote.style_loss(x, t.half())
    with pytest.raises(ValueError, match="normalize must be one of"):
        fastnote.style_loss(x, t, normalize="c")
    if device.type == "cuda":
        with pytest.raises(ValueError, match="all tensors must be on one device"):
            fastnote.style_loss(x, t.cpu())
    else:
        with pytest.raises(ValueError, match="all tensors must be on one device"):
            fastnote.style_loss(x, t.to("meta"))


# Real VGG-16 layers at a 256x256 input, batch 4 (relu1_2 .. relu4_3).
VGG_SHAPES = [pytest.param((4, 64, 256, 256), id="relu1_2-B4-C64-HW256x256"),
              pytest.param((4, 128, 128, 128), id="relu2_2-B4-C128-HW128x128"),
              pytest.param((4, 256, 64, 64), id="relu3_3-B4-C256-HW64x64"),
              pytest.param((4, 512, 32, 32), id="relu4_3-B4-C512-HW32x32")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", VGG_SHAPES)
def test_vgg_shapes_gpu(shape, dtype, device):
    x = _features(shape, device) * 4     # raw sums over H*W past fp16's range at relu1_2
    _check_gram(x.to(dtype))
    C = shape[1]
    target = reference.gram(_features((1, *shape[1:]), device) * 4)
    if dtype == torch.float32:
        _check_style_fp64(x, target)
        _check_style_fp64(x.contiguous(memory_format=torch.channels_last), target[0])
    else:
        _check_style(x.to(dtype), target)
        _check_style(x.to(dtype).contiguous(memory_format=torch.channels_last), target[0])


def _check_style_fp64(x, target):
    """fp32 at real sizes, against a float64 oracle. Here the fp32 reference carries summation
    error of its own: the target's gradient is -2 sum_b (G_b - T) / (C K), whose diagonal entries
    are differences of sums of ~0.1 that cancel to ~1e-2, so G's ~1e-6 relative rounding over
    K = 65536 terms shows at ~1e-4 of the largest entry (on an H200, fastnote against cuBLAS's
    fp32 Gram: 2.4e-4 in one entry of 4096). fastnote's error against float64 must stay within
    the table's fp32 tolerance or within twice the fp32 reference's own error."""
    def grads(x, t, fn):
        x, t = _leaf(x), _leaf(t)
        loss = fn(x, t)
        return (loss.detach(),) + torch.autograd.grad(loss * 1.7, (x, t))

    got = grads(x, target, fastnote.style_loss)
    fp32 = grads(x, target, reference.style_loss)
    exact = grads(x.double(), target.double(), reference.style_loss)
    atol, rtol = tolerance(torch.float32, "reduction")
    for name, g, r, e in zip(("loss", "gradient of x", "gradient of target_gram"), got, fp32, exact):
        top = e.abs().max().item()
        err = ((g.double() - e).abs().max() / top).item()
        ref_err = ((r.double() - e).abs().max() / top).item()
        assert err <= max(atol, 2 * ref_err), \
            f"{name}: fastnote {err:.2e}, fp32 reference {ref_err:.2e} (relative to the largest entry)"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_overflow_gpu(dtype, device):
    x = (torch.rand(4, 64, 256 * 256, device=device) * 8).to(dtype)
    if dtype == torch.float16:
        assert torch.bmm(x, x.transpose(1, 2)).isinf().any()
    _check_gram(x)
    _check_style(x, torch.zeros(64, 64, device=device))


@pytest.mark.gpu
def test_tf32_setting_gpu(device):
    # IEEE fp32 unless the user allowed TF32, through either of torch's APIs.
    x = torch.randn(2, 256, 64 * 64, device=device)
    exact = reference.gram(x.double())
    old = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        ieee = (fastnote.gram(x).double() - exact).abs().max().item()
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        tf32 = (fastnote.gram(x).double() - exact).abs().max().item()
    finally:
        torch.backends.cuda.matmul.fp32_precision = old
    # TF32 keeps 10 mantissa bits (error ~1e-3 relative), IEEE fp32 23 (~1e-6 here).
    assert ieee * 10 < tf32, (ieee, tf32)
    _close(fastnote.gram(x), exact.float())


def test_fp16_gradient_underflow_and_loss_scaling(device):
    # The style loss's gradient of x at VGG-like sizes lies under fp16's smallest subnormal: in
    # fp16 it is zero, as any fp16 result would be, and a loss scale (torch.amp.GradScaler)
    # brings it back. The kernels apply the loss's upstream gradient to the fp32 accumulator,
    # so the scaled gradient comes out at fp16's precision.
    x = (_features((2, 64, 16, 32), device) * 4).half()
    target = reference.gram(_features((1, 64, 16, 32), device) * 4)
    xr = _leaf(x.float())
    want_dx, = torch.autograd.grad(reference.style_loss(xr, target), xr)
    assert want_dx.abs().max().item() < 2.0 ** -25        # rounds to 0 in fp16
    x = _leaf(x)
    dx, = torch.autograd.grad(fastnote.style_loss(x, target), x)
    assert torch.equal(dx, want_dx.half())
    _check_style(x.detach(), target)                       # scaled as a GradScaler would
