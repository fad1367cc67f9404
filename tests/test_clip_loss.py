"""clip_loss: loss and the gradients of both embeddings and logit_scale vs reference.py, odd shapes,
large logit scales, the one-sided local op, 2 gloo processes against one, the ClipLoss module,
errors, custom-op checks, compile, AMP."""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastnote
from fastnote import reference
from fastnote.testing import assert_close, run_gloo_ranks


def _inputs(n, d, device, dtype=torch.float32, scale=14.3, norm=1.0):
    img = (F.normalize(torch.randn(n, d, device=device), dim=1) * norm).to(dtype).requires_grad_()
    txt = (F.normalize(img.detach().float() + torch.randn(n, d, device=device), dim=1) * norm).to(dtype)
    return img, txt.requires_grad_(), torch.tensor(scale, device=device, requires_grad=True)


def _check(img, txt, scale, oracle=torch.float32):
    dtype = img.dtype
    loss = fastnote.clip_loss(img, txt, scale)
    assert loss.dtype == torch.float32 and loss.shape == ()
    leaves = [t.detach().to(oracle).requires_grad_() for t in (img, txt, scale)]
    want = reference.clip_loss(*leaves, exponentiated=True)
    assert_close(loss, want, "reduction", dtype=dtype)
    got = torch.autograd.grad(loss, (img, txt, scale))
    expected = torch.autograd.grad(want, leaves)
    for name, t, g, e in zip(("image_emb", "text_emb", "logit_scale"), (img, txt, scale), got, expected):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        s = max(1.0, e.abs().max().item()) if dtype != torch.float32 else 1.0
        assert_close(g.float() / s, e / s, "reduction", dtype=dtype, msg=f"gradient of {name}")
    return loss


SHAPES = [
    pytest.param(1, 16, id="n1-d16"),
    pytest.param(5, 8, id="n5-d8"),
    pytest.param(37, 70, id="n37-d70"),
    pytest.param(70, 16, id="n70-d16"),
    pytest.param(65, 3, id="n65-d3"),
    pytest.param(20, 1000, id="n20-d1000"),
]


@pytest.mark.parametrize("n,d", SHAPES)
def test_forward_backward(n, d, device):
    _check(*_inputs(n, d, device))


@pytest.mark.parametrize("scale", [1.0, 100.0], ids=["scale1", "scale100"])
def test_logit_scales(scale, device):
    # open_clip clamps the scale at 100: logits up to 100 (and the initial 1 / 0.07 elsewhere).
    _check(*_inputs(40, 32, device, scale=scale))


def test_large_logits_fp32(device):
    # Logits ~ 1e3 (norms 3, scale 100): compared with the float64 reference (docs/design.md section 3.4).
    _check(*_inputs(33, 24, device, scale=100.0, norm=3.0), oracle=torch.float64)


@pytest.mark.parametrize("offset", [0, 5])
def test_dominant_positive_never_negative(offset, device):
    # Logits ~ 9e4 (norms 30, scale 100) with each row's positive far above the rest: every
    # row's cross-entropy is 0 to fp32 precision. A positive logit summed apart from the score
    # tile that the max saw (another summation order) came out up to 0.016 above the max here,
    # and the loss negative (-0.069 in fp16 on a GPU).
    from fastnote.triton_kernels import clip_loss as kernels

    n, d = 70, 256
    x = F.normalize(torch.randn(n, d, device=device), dim=1) * 30
    y = torch.cat([torch.randn(offset, d, device=device),
                   F.normalize(x + 0.01 * torch.randn(n, d, device=device), dim=1) * 30])
    stats = torch.empty(2, n, device=device)
    ce = torch.empty(n, device=device)
    kernels.row_lse(x=x, y=y, scale=torch.tensor([100.0], device=device), offset=offset, stats=stats, ce=ce)
    want = F.cross_entropy(100.0 * x.double() @ y.double().t(), torch.arange(n, device=device) + offset,
                           reduction="none")
    assert ce.min().item() >= -1e-6
    assert_close(ce, want, "reduction")
    if offset == 0:
        _check(*(t.detach().requires_grad_() for t in (x, y[offset:], torch.tensor(100.0, device=device))),
               oracle=torch.float64)


@settings(max_examples=15, deadline=None, derandomize=True,  # the same 15 cases on every CI run
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 80), d=st.integers(1, 70), scale=st.sampled_from([1.0, 14.3, 50.0]))
def test_random_shapes(n, d, scale, device):
    _check(*_inputs(n, d, device, scale=scale))


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_row_loss_op(rank, device):
    # open_clip's local_loss half: this rank's rows against every column, labels offset.
    n_local, world, d = 7, 3, 20
    a = torch.randn(n_local, d, device=device, requires_grad=True)
    b = torch.randn(world * n_local, d, device=device, requires_grad=True)
    s = torch.tensor(5.0, device=device, requires_grad=True)
    offset = rank * n_local
    loss = torch.ops.fastnote.clip_row_loss(a, b, s, offset)[0]
    want = F.cross_entropy(s * a @ b.t(), torch.arange(n_local, device=device) + offset)
    assert_close(loss, want, "reduction")
    for g, e in zip(torch.autograd.grad(loss, (a, b, s)), torch.autograd.grad(want, (a, b, s))):
        assert_close(g, e, "reduction")


def test_float_scale_and_module(device):
    img, txt, scale = _inputs(9, 12, device)
    want = reference.clip_loss(img, txt, scale.detach(), exponentiated=True)
    assert_close(fastnote.clip_loss(img, txt, 14.3), want, "reduction")
    module = fastnote.nn.ClipLoss()
    assert_close(module(img, txt, scale), want, "reduction")
    out = module(img, txt, scale, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    # the reference's log-temperature convention: exp(t) is the same multiplier
    assert_close(reference.clip_loss(img, txt, scale.detach().log()), want, "reduction")


def test_module_takes_open_clips_arguments(device):
    # open_clip_train builds ClipLoss(local_loss=..., gather_with_grad=..., cache_labels=True,
    # rank=..., world_size=..., use_horovod=...) and calls it with logit_bias positionally (None
    # for CLIP); with one process the local loss is the global one, as open_clip's.
    img, txt, scale = _inputs(9, 12, device)
    want = reference.clip_loss(img, txt, scale, exponentiated=True)
    for module in (fastnote.nn.ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=0,
                                        world_size=1, use_horovod=False),
                   fastnote.nn.ClipLoss(True, False, True, 0, 1, False)):
        assert_close(module(img, txt, scale, None), want, "reduction")
        out = module(img, txt, scale, None, True)
        assert set(out) == {"contrastive_loss"}
        assert_close(out["contrastive_loss"], want, "reduction")
    # a logit bias shifts every logit alike: the cross-entropy does not see it, its gradient is zero
    bias = torch.tensor(-3.0, device=device, requires_grad=True)
    loss = fastnote.nn.ClipLoss()(img, txt, scale, bias)
    assert isinstance(loss, torch.Tensor) and loss.shape == ()
    assert_close(loss, want, "reduction")
    g_img, g_bias = torch.autograd.grad(loss, (img, bias))
    assert g_bias.item() == 0.0
    assert_close(g_img, torch.autograd.grad(want, img)[0], "reduction")
    with pytest.raises(ValueError, match="use_horovod=True is not supported"):
        fastnote.nn.ClipLoss(use_horovod=True)
    with pytest.raises(RuntimeError, match=r"ClipLoss\(world_size=2\) needs torch.distributed"):
        fastnote.nn.ClipLoss(rank=0, world_size=2)(img, txt, scale)
    with pytest.raises(ValueError, match="logit_bias must be a scalar tensor"):
        fastnote.nn.ClipLoss()(img, txt, scale, torch.zeros(2, device=device))


def test_non_contiguous_and_one_element_scale(device):
    n, d = 21, 18
    img = torch.randn(d, n, device=device).t().requires_grad_()
    txt = torch.randn(n, 2 * d, device=device)[:, ::2].requires_grad_()
    scale = torch.tensor([7.0], device=device, requires_grad=True)
    assert not img.is_contiguous() and not txt.is_contiguous()
    _check(img, txt, scale)


def test_float64_scale(device):
    """An fp64 scale (a model kept in double, or a Python float under a float64 default dtype)
    gives the fp32 scale's loss, and its gradient comes back in fp64."""
    img, txt, scale = _inputs(13, 8, device)
    scale64 = scale.detach().double().requires_grad_()
    loss, loss64 = fastnote.clip_loss(img, txt, scale), fastnote.clip_loss(img, txt, scale64)
    assert loss64.dtype == torch.float32 and torch.equal(loss, loss64)
    got = torch.autograd.grad(loss64, (img, txt, scale64))
    want = torch.autograd.grad(loss, (img, txt, scale))
    assert [g.dtype for g in got] == [torch.float32, torch.float32, torch.float64]
    for g, e in zip(got, want):
        assert torch.equal(g, e.to(g.dtype))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        floats = fastnote.clip_loss(img, txt, 14.3)
    finally:
        torch.set_default_dtype(default)
    assert floats.dtype == torch.float32 and torch.equal(floats, loss)


@pytest.mark.no_kernel
def test_empty(device):
    img, txt, scale = _inputs(0, 8, device)
    loss = fastnote.clip_loss(img, txt, scale)
    want = reference.clip_loss(img, txt, scale, exponentiated=True)
    assert loss.shape == () and torch.isnan(loss) and torch.isnan(want)


@pytest.mark.no_kernel
def test_errors(device):
    img, txt, scale = _inputs(6, 8, device)
    with pytest.raises(ValueError, match="image_emb must have 2 dimensions"):
        fastnote.clip_loss(img[None], txt, scale)
    with pytest.raises(ValueError, match=r"text_emb must have shape \[6, 8\]"):
        fastnote.clip_loss(img, txt[:5], scale)
    with pytest.raises(ValueError, match=r"text_emb must have shape \[6, 8\]"):
        fastnote.clip_loss(img, txt[:, :4], scale)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        fastnote.clip_loss(img, txt, torch.ones(2, device=device))
    with pytest.raises(TypeError, match="all tensors must have one dtype"):
        fastnote.clip_loss(img, txt.detach().half(), scale)
    with pytest.raises(TypeError, match="image_emb must have dtype"):
        fastnote.clip_loss(img.detach().long(), txt.detach().long(), scale)
    with pytest.raises(ValueError, match="one device.*text_emb on meta"):
        fastnote.clip_loss(img, txt.detach().to("meta"), scale)
    with pytest.raises(ValueError, match="logit_scale must be a finite number"):
        fastnote.clip_loss(img, txt, float("nan"))
    with pytest.raises(ValueError, match="local_loss=True needs a process group"):
        fastnote.clip_loss(img, txt, scale, local_loss=True)
    with pytest.raises(ValueError, match="image_emb must have at least one channel"):
        fastnote.clip_loss(img[:, :0], txt[:, :0], scale)


def test_opcheck(device):
    for dtype in (torch.float32, torch.float16):
        img, txt, scale = (t.detach() for t in _inputs(9, 20, device, dtype=dtype))
        torch.library.opcheck(torch.ops.fastnote.clip_loss.default, (img, txt, scale))
        _, lse_r, lse_c = torch.ops.fastnote.clip_loss.default(img, txt, scale)
        grad = torch.tensor(1.5, device=device)
        torch.library.opcheck(torch.ops.fastnote.clip_loss_backward.default, (grad, img, txt, scale, lse_r, lse_c))
        both = torch.cat([txt, txt])
        torch.library.opcheck(torch.ops.fastnote.clip_row_loss.default, (img, both, scale, 9))
        _, lse = torch.ops.fastnote.clip_row_loss.default(img, both, scale, 9)
        torch.library.opcheck(torch.ops.fastnote.clip_row_loss_backward.default, (grad, img, both, scale, lse, 9))


def test_compile_fullgraph(device, compile_backend):
    img, txt, scale = _inputs(24, 16, device)

    def f(img, txt, t):
        return fastnote.clip_loss(img, txt, t.exp())

    t = scale.detach().log().requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    out = compiled(img, txt, t)
    got = torch.autograd.grad(out, (img, txt, t))
    want_out = reference.clip_loss(img, txt, t)
    want = torch.autograd.grad(want_out, (img, txt, t))
    assert_close(out, want_out, "reduction")
    for g, w in zip(got, want):
        assert_close(g, w, "reduction")


def test_autocast_bf16(device):
    img, txt, scale = _inputs(30, 32, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = fastnote.clip_loss(img, txt, scale)
    leaves = [img.detach().bfloat16().float().requires_grad_(), txt.detach().bfloat16().float().requires_grad_(),
              scale.detach().requires_grad_()]
    want = reference.clip_loss(*leaves, exponentiated=True)
    assert_close(loss, want, "reduction", dtype=torch.bfloat16)
    got = torch.autograd.grad(loss, (img, txt, scale))
    for g, e in zip(got, torch.autograd.grad(want, leaves)):
        assert g.dtype == torch.float32
        assert_close(g, e, "reduction", dtype=torch.bfloat16)


def test_reference_backend_switch(device, monkeypatch):
    inputs = _inputs(10, 8, device)
    got = fastnote.clip_loss(*inputs)
    monkeypatch.setenv("FASTNOTE_BACKEND", "reference")
    fastnote.backend.refresh()
    assert_close(got, fastnote.clip_loss(*inputs), "reduction")


# ------------------------------------------------------------------------------------------------
# Two processes over gloo against one process on the concatenated batch
# ------------------------------------------------------------------------------------------------

def _open_clip_in_worker():
    """open_clip's ClipLoss in a spawned worker, or None (as in test_siglip_loss.py: open_clip
    imports torchvision, which beside a CPU torch needs the op schemas tests/conftest.py defines)."""
    import importlib.util

    from fastnote.compat import torchvision_op_schemas

    if importlib.util.find_spec("open_clip") is None:
        return None
    torchvision_op_schemas()
    from open_clip.loss import ClipLoss
    return ClipLoss


def _ddp_body(rank, world_size):
    import torch.distributed as dist

    OpenClipLoss = _open_clip_in_worker()
    n_local, d = 6, 12
    gen = torch.Generator().manual_seed(0)
    img_all = F.normalize(torch.randn(world_size * n_local, d, generator=gen), dim=1)
    txt_all = F.normalize(torch.randn(world_size * n_local, d, generator=gen), dim=1)
    rows = slice(rank * n_local, (rank + 1) * n_local)
    # one process, the whole batch
    ri, rt, rs = (t.clone().requires_grad_() for t in (img_all, txt_all, torch.tensor(10.0)))
    full = reference.clip_loss(ri, rt, rs, exponentiated=True)
    e_img, e_txt, e_scale = torch.autograd.grad(full, (ri, rt, rs))
    for local_loss in (False, True):
        for with_grad in (True, False):
            what = f"rank {rank} local_loss={local_loss} gather_with_grad={with_grad}"
            leaves = [img_all[rows].clone().requires_grad_(), txt_all[rows].clone().requires_grad_(),
                      torch.tensor(10.0, requires_grad=True)]
            loss = fastnote.nn.ClipLoss(local_loss, with_grad, True, rank, world_size)(*leaves)
            g_img, g_txt, g_scale = torch.autograd.grad(loss, leaves)
            if OpenClipLoss is not None:
                oc = [t.detach().clone().requires_grad_() for t in leaves]
                want = OpenClipLoss(local_loss, with_grad, True, rank, world_size)(*oc)
                assert_close(loss, want, "reduction", msg=f"{what}: loss vs open_clip")
                for name, g, e in zip(("image", "text", "logit_scale"), (g_img, g_txt, g_scale),
                                      torch.autograd.grad(want, oc)):
                    assert_close(g, e, "reduction", msg=f"{what}: d {name} vs open_clip")
            if local_loss:
                s = rs.detach()
                labels = torch.arange(n_local) + rank * n_local
                mine = (F.cross_entropy(s * img_all[rows] @ txt_all.t(), labels)
                        + F.cross_entropy(s * txt_all[rows] @ img_all.t(), labels)) / 2
                assert_close(loss, mine, "reduction", msg=f"{what}: this rank's local loss")
                mean = loss.detach().clone()
                dist.all_reduce(mean)
                assert_close(mean / world_size, full, "reduction", msg=f"{what}: mean of the local losses")
                dist.all_reduce(g_scale)
                assert_close(g_scale / world_size, e_scale, "reduction", msg=f"{what}: mean d logit_scale")
            else:
                assert_close(loss, full, "reduction", msg=f"{what}: loss")
                assert_close(g_scale, e_scale, "reduction", msg=f"{what}: d logit_scale")
            if with_grad:
                # every rank's contribution summed into its own rows (DDP's average undoes the factor)
                assert_close(g_img / world_size, e_img[rows], "reduction", msg=f"{what}: d image")
                assert_close(g_txt / world_size, e_txt[rows], "reduction", msg=f"{what}: d text")
            elif not local_loss:
                # the other ranks' features are constants: the single-process gradient of these rows
                assert_close(g_img, e_img[rows], "reduction", msg=f"{what}: d image")
                assert_close(g_txt, e_txt[rows], "reduction", msg=f"{what}: d text")
            else:
                # this rank's rows of the logits only: the local loss's gradient with the other
                # ranks' features held constant
                a, b = img_all[rows].clone().requires_grad_(), txt_all[rows].clone().requires_grad_()
                others_t, others_i = txt_all.clone(), img_all.clone()
                mine = (F.cross_entropy(10.0 * a @ others_t.t(), labels)
                        + F.cross_entropy(10.0 * b @ others_i.t(), labels)) / 2
                w_img, w_txt = torch.autograd.grad(mine, (a, b))
                assert_close(g_img, w_img, "reduction", msg=f"{what}: d image")
                assert_close(g_txt, w_txt, "reduction", msg=f"{what}: d text")
    # float64 runs the reference in float64, the local loss too
    a, b = img_all[rows].double().requires_grad_(), txt_all[rows].double().requires_grad_()
    loss = fastnote.nn.ClipLoss(True, True, rank=rank, world_size=world_size)(a, b, torch.tensor(10.0).double())
    assert loss.dtype == torch.float64, loss.dtype
    labels = torch.arange(n_local) + rank * n_local
    mine = (F.cross_entropy(10.0 * img_all[rows].double() @ txt_all.double().t(), labels)
            + F.cross_entropy(10.0 * txt_all[rows].double() @ img_all.double().t(), labels)) / 2
    torch.testing.assert_close(loss, mine, rtol=1e-12, atol=1e-12)
    for kwargs, message in (({"rank": rank, "world_size": 3}, "world_size=3, but its process group has 2"),
                            ({"rank": 1 - rank, "world_size": 2}, f"this process is rank {rank}")):
        try:
            fastnote.nn.ClipLoss(**kwargs)(img_all[rows], txt_all[rows], torch.tensor(10.0))
        except ValueError as e:
            assert message in str(e), str(e)
        else:
            raise AssertionError(f"no error for {kwargs}")


def test_two_processes_match_one(tmp_path, interpreted_children):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    with interpreted_children():   # the workers run the kernels on CPU tensors
        reports = run_gloo_ranks(_ddp_body, 2, tmp_path / "clip_store", "fastnote.triton_kernels.clip_loss")
    assert reports == ["rank 0: ok", "rank 1: ok"], reports


# ------------------------------------------------------------------------------------------------
# GPU: half precision at CLIP's sizes
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,d", [pytest.param(1024, 512, id="n1024-d512"), pytest.param(8192, 512, id="n8192-d512"),
                                 pytest.param(1000, 768, id="n1000-d768"), pytest.param(4097, 64, id="n4097-d64")])
def test_shapes_gpu(n, d, dtype, device):
    _check(*_inputs(n, d, device, dtype=dtype, scale=100.0))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_overflowing_logits_gpu(dtype, device):
    # Norms 30 and scale 100: logits ~ 9e4 > fp16's 65504; a naive fp16 matmul overflows, the fp32
    # scores with an online max do not.
    img, txt, scale = _inputs(512, 256, device, dtype=dtype, scale=100.0, norm=30.0)
    if dtype == torch.float16:
        assert not torch.isfinite(scale.half() * img.detach() @ txt.detach().t()).all()
    _check(img, txt, scale, oracle=torch.float64)


@pytest.mark.parametrize("slices", ["wide", "narrow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gradient_slices(slices, dtype, device, launches, monkeypatch):
    # Both gradient-slice settings of the backward (contrastive_tiles.GRADIENT_SLICES: the default
    # and the one benchmarks/contrastive.py times beside it) give the reference's gradients at
    # d = 600, several slices with the last one partial; the grids show which slices ran.
    from fastnote.triton_kernels import contrastive_tiles

    monkeypatch.setattr(contrastive_tiles, "GRADIENT_SLICES", slices)
    n, d = 70, 600
    launches.clear()
    _check(*_inputs(n, d, device, dtype=dtype))
    slice_width = {("wide", torch.float32): 128, ("wide", torch.bfloat16): 256,
                   ("narrow", torch.float32): 32, ("narrow", torch.bfloat16): 64}[(slices, dtype)]
    grids = [grid for module, kernel, grid in launches
             if module.endswith("clip_loss") and kernel == "_backward_kernel"]
    assert len(grids) == 2 and all(g[1] == -(-d // slice_width) for g in grids), grids
