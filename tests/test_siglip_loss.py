"""siglip_loss: the loss and the gradients of both embeddings, logit_scale and logit_bias against
reference.py and open_clip's SigLipLoss, odd shapes, the diagonal offset and the negative-only
chunks, the ring of ranks (simulated for 2 to 5 ranks, and 2 gloo processes for every dist_impl
against one process), the module, errors, custom-op checks, compile, determinism, GPU dtypes."""
import os
import queue
import threading

import pytest
import torch
import torch.nn.functional as F

import fastnote
from fastnote import reference
from fastnote.testing import assert_close, run_gloo_ranks

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _inputs(n, d, device, dtype=torch.float32, scale=10.0, bias=-10.0, norm=1.0, shape=()):
    img = (F.normalize(torch.randn(n, d, device=device), dim=1) * norm).to(dtype).requires_grad_()
    txt = (F.normalize(img.detach().float() + torch.randn(n, d, device=device), dim=1) * norm).to(dtype)
    s = torch.full(shape, scale, device=device, requires_grad=True)
    b = torch.full(shape, bias, device=device, requires_grad=True)
    return img, txt.requires_grad_(), s, b


NAMES = ("image_emb", "text_emb", "logit_scale", "logit_bias")


def _check(img, txt, scale, bias, oracle=torch.float32):
    dtype = img.dtype
    loss = fastnote.siglip_loss(img, txt, scale, bias)
    assert loss.dtype == torch.float32 and loss.shape == ()
    leaves = [t.detach().to(oracle).requires_grad_() for t in (img, txt, scale, bias)]
    want = reference.siglip_loss(*leaves)
    assert_close(loss, want, "reduction", dtype=dtype)
    got = torch.autograd.grad(loss, (img, txt, scale, bias))
    expected = torch.autograd.grad(want, leaves)
    for name, t, g, e in zip(NAMES, (img, txt, scale, bias), got, expected):
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
]


@pytest.mark.parametrize("n,d", SHAPES)
def test_forward_backward(n, d, device):
    _check(*_inputs(n, d, device))


@pytest.mark.parametrize("scale,bias", [(1.0, 0.0), (10.0, -10.0), (100.0, -5.0), (3.0, 4.0)],
                         ids=["s1-b0", "s10-b-10", "s100-b-5", "s3-b4"])
def test_scales_and_biases(scale, bias, device):
    # SigLIP's initial (10, -10); open_clip clamps the scale at 100; a positive bias flips the signs
    _check(*_inputs(33, 24, device, scale=scale, bias=bias))


def test_large_logits_fp32(device):
    # logits ~ +-900 (norms 3, scale 100): every term is linear or ~0, compared in float64
    _check(*_inputs(40, 16, device, scale=100.0, bias=-5.0, norm=3.0), oracle=torch.float64)


def _open_clip():
    return pytest.importorskip("open_clip.loss")


@pytest.mark.parametrize("n,d,shape", [pytest.param(1, 8, (), id="n1-d8"),
                                       pytest.param(37, 16, (1,), id="n37-d16-shape1"),
                                       pytest.param(20, 768, (), id="n20-d768")])
def test_matches_open_clip(n, d, shape, device):
    oc = _open_clip()
    img, txt, scale, bias = _inputs(n, d, device, scale=10.0, bias=-10.0, shape=shape)
    loss = fastnote.nn.SigLipLoss()(img, txt, scale, bias)
    want = oc.SigLipLoss()(img, txt, scale, bias)
    assert loss.shape == want.shape == ()
    assert_close(loss, want, "reduction")
    got = torch.autograd.grad(loss, (img, txt, scale, bias))
    expected = torch.autograd.grad(want, (img, txt, scale, bias))
    for name, g, e in zip(NAMES, got, expected):
        assert g.shape == e.shape, name
        assert_close(g, e, "reduction", msg=f"gradient of {name}")
    out = fastnote.nn.SigLipLoss()(img, txt, scale, bias, output_dict=True)
    assert set(out) == set(oc.SigLipLoss()(img, txt, scale, bias, output_dict=True)) == {"contrastive_loss"}


def test_no_bias_matches_open_clip(device):
    # open_clip's get_logits adds no bias when logit_bias is None
    oc = _open_clip()
    img, txt, scale, _ = _inputs(17, 12, device, scale=10.0)
    loss = fastnote.nn.SigLipLoss()(img, txt, scale, None)
    want = oc.SigLipLoss()(img, txt, scale, None)
    assert_close(loss, want, "reduction")
    assert torch.equal(loss, fastnote.siglip_loss(img, txt, scale, 0.0))
    for name, g, e in zip(NAMES, torch.autograd.grad(loss, (img, txt, scale)),
                          torch.autograd.grad(want, (img, txt, scale))):
        assert_close(g, e, "reduction", msg=f"gradient of {name}")


def test_float64_scale_and_bias(device):
    """fp64 scale and bias (a model kept in double, or Python floats under a float64 default
    dtype) give the fp32 operands' loss, and their gradients come back in fp64."""
    img, txt, scale, bias = _inputs(13, 8, device, scale=10.0, bias=-10.0)
    scale64, bias64 = (t.detach().double().requires_grad_() for t in (scale, bias))
    loss, loss64 = fastnote.siglip_loss(img, txt, scale, bias), fastnote.siglip_loss(img, txt, scale64, bias64)
    assert loss64.dtype == torch.float32 and torch.equal(loss, loss64)
    got = torch.autograd.grad(loss64, (img, txt, scale64, bias64))
    for name, g, e in zip(NAMES, got, torch.autograd.grad(loss, (img, txt, scale, bias))):
        assert g.dtype == (torch.float64 if name in ("logit_scale", "logit_bias") else torch.float32), name
        assert torch.equal(g, e.to(g.dtype)), name
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        floats = fastnote.siglip_loss(img, txt, 10.0, -10.0)
    finally:
        torch.set_default_dtype(default)
    assert floats.dtype == torch.float32 and torch.equal(floats, loss)


@pytest.mark.parametrize("offset,has_diag", [(3, True), (-2, True), (0, False)])
def test_offset_and_negative_only(offset, has_diag, device):
    # the kernels' own arguments: the positives at column i + offset, or none (another rank's chunk)
    n, d = 19, 12
    img, txt, scale, bias = _inputs(n, d, device, scale=5.0, bias=-2.0)
    loss = torch.ops.fastnote.siglip_loss(img, txt, scale, bias, offset, has_diag)
    logits = scale * img @ txt.t() + bias
    rows = torch.arange(n, device=device)
    labels = -torch.ones(n, n, device=device)
    if has_diag:
        cols = rows + offset
        ok = (cols >= 0) & (cols < n)
        labels[rows[ok], cols[ok]] = 1.0
    want = -F.logsigmoid(labels * logits).sum() / n
    assert_close(loss, want, "reduction")
    for name, g, e in zip(NAMES, torch.autograd.grad(loss, (img, txt, scale, bias)),
                          torch.autograd.grad(want, (img, txt, scale, bias))):
        assert_close(g, e, "reduction", msg=f"gradient of {name}")


def test_tiny_terms_keep_their_digits(device):
    # bias -20: every negative term is log1p(e) with e ~ 2e-9, below fp32's 1 + e resolution;
    # log2(1 + e) alone would return 0 for all of them
    n, d = 24, 8
    img, txt, scale, bias = _inputs(n, d, device, scale=1.0, bias=-20.0)
    loss = torch.ops.fastnote.siglip_loss(img, txt, scale, bias, 0, False)
    logits = (scale * img @ txt.t() + bias).detach().double()
    want = F.softplus(logits).sum() / n
    assert want.item() > 0
    assert abs(loss.item() - want.item()) <= 1e-5 * want.item()


def test_float_scale_bias_and_non_contiguous(device):
    n, d = 21, 18
    img = torch.randn(d, n, device=device).t().requires_grad_()
    txt = torch.randn(n, 2 * d, device=device)[:, ::2].requires_grad_()
    assert not img.is_contiguous() and not txt.is_contiguous()
    _check(img, txt, torch.tensor([7.0], device=device, requires_grad=True),
           torch.tensor([-3.0], device=device, requires_grad=True))
    want = reference.siglip_loss(img, txt, torch.tensor(7.0), torch.tensor(-3.0))
    assert_close(fastnote.siglip_loss(img, txt, 7.0, -3.0), want, "reduction")


def test_determinism(device):
    img, txt, scale, bias = _inputs(70, 40, device)
    runs = []
    for _ in range(2):
        loss = fastnote.siglip_loss(img, txt, scale, bias)
        runs.append([loss.detach()] + list(torch.autograd.grad(loss, (img, txt, scale, bias))))
    for name, a, b in zip(("loss",) + NAMES, *runs):
        assert torch.equal(a, b), name


@pytest.mark.no_kernel
def test_empty(device):
    img, txt, scale, bias = _inputs(0, 8, device)
    loss = fastnote.siglip_loss(img, txt, scale, bias)
    want = reference.siglip_loss(img, txt, scale, bias)
    assert loss.shape == () and torch.isnan(loss) and torch.isnan(want)


@pytest.mark.no_kernel
def test_errors(device):
    img, txt, scale, bias = _inputs(6, 8, device)
    with pytest.raises(ValueError, match="image_emb must have 2 dimensions"):
        fastnote.siglip_loss(img[None], txt, scale, bias)
    with pytest.raises(ValueError, match=r"text_emb must have shape \[6, 8\]"):
        fastnote.siglip_loss(img, txt[:5], scale, bias)
    with pytest.raises(ValueError, match=r"text_emb must have shape \[6, 8\]"):
        fastnote.siglip_loss(img, txt[:, :4], scale, bias)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        fastnote.siglip_loss(img, txt, torch.ones(2, device=device), bias)
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        fastnote.siglip_loss(img, txt, scale, torch.ones(1, 2, device=device))
    with pytest.raises(TypeError, match="all tensors must have one dtype"):
        fastnote.siglip_loss(img, txt.detach().half(), scale, bias)
    with pytest.raises(TypeError, match="image_emb must have dtype"):
        fastnote.siglip_loss(img.detach().long(), txt.detach().long(), scale, bias)
    with pytest.raises(TypeError, match="logit_bias must have dtype"):
        fastnote.siglip_loss(img, txt, scale, torch.tensor(1, device=device))
    with pytest.raises(ValueError, match="one device.*text_emb on meta"):
        fastnote.siglip_loss(img, txt.detach().to("meta"), scale, bias)
    with pytest.raises(ValueError, match="one device.*logit_bias on meta"):
        fastnote.siglip_loss(img, txt, scale, bias.detach().to("meta"))
    with pytest.raises(ValueError, match="logit_bias must be a finite number"):
        fastnote.siglip_loss(img, txt, scale, float("nan"))
    with pytest.raises(ValueError, match="image_emb must have at least one channel"):
        fastnote.siglip_loss(img[:, :0], txt[:, :0], scale, bias)
    with pytest.raises(ValueError, match="dist_impl must be one of"):
        fastnote.siglip_loss(img, txt, scale, bias, dist_impl="ring")
    with pytest.raises(ValueError, match="dist_impl must be one of"):
        fastnote.nn.SigLipLoss(dist_impl="ring")
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialised"):
        fastnote.nn.SigLipLoss(rank=0, world_size=2)(img, txt, scale, bias)


def test_opcheck(device):
    for dtype in (torch.float32, torch.float16):
        img, txt, scale, bias = (t.detach() for t in _inputs(9, 20, device, dtype=dtype))
        for offset, has_diag in ((0, True), (0, False), (2, True)):
            torch.library.opcheck(torch.ops.fastnote.siglip_loss.default, (img, txt, scale, bias, offset, has_diag))
        grad = torch.tensor(1.5, device=device)
        torch.library.opcheck(torch.ops.fastnote.siglip_loss_backward.default,
                              (grad, img, txt, scale, bias, 0, True))


def test_compile_fullgraph(device, compile_backend):
    img, txt, scale, bias = _inputs(24, 16, device)

    def f(img, txt, t, b):
        return fastnote.siglip_loss(img, txt, t.exp(), b)

    t = scale.detach().log().requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    out = compiled(img, txt, t, bias)
    got = torch.autograd.grad(out, (img, txt, t, bias))
    want_out = reference.siglip_loss(img, txt, t.exp(), bias)
    want = torch.autograd.grad(want_out, (img, txt, t, bias))
    assert_close(out, want_out, "reduction")
    for g, w in zip(got, want):
        assert_close(g, w, "reduction")


def test_autocast_bf16(device):
    img, txt, scale, bias = _inputs(30, 32, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = fastnote.siglip_loss(img, txt, scale, bias)
    leaves = [img.detach().bfloat16().float().requires_grad_(), txt.detach().bfloat16().float().requires_grad_(),
              scale.detach().requires_grad_(), bias.detach().requires_grad_()]
    want = reference.siglip_loss(*leaves)
    assert_close(loss, want, "reduction", dtype=torch.bfloat16)
    for g, e in zip(torch.autograd.grad(loss, (img, txt, scale, bias)), torch.autograd.grad(want, leaves)):
        assert g.dtype == torch.float32
        assert_close(g, e, "reduction", dtype=torch.bfloat16)


def test_reference_backend_switch(device, monkeypatch):
    inputs = _inputs(10, 8, device)
    got = fastnote.siglip_loss(*inputs)
    monkeypatch.setenv("FASTNOTE_BACKEND", "reference")
    fastnote.backend.refresh()
    assert_close(got, fastnote.siglip_loss(*inputs), "reduction")


# ------------------------------------------------------------------------------------------------
# The ring of ranks, simulated in threads: 2 to 5 ranks, both neighbour-exchange schemes, with the
# real autograd function and a mailbox in place of torch.distributed's point-to-point ops
# ------------------------------------------------------------------------------------------------

class _Mailbox:
    def __init__(self, world):
        self.boxes = {(a, b): queue.Queue() for a in range(world) for b in range(world)}
        self.local = threading.local()

    def exchange(self, sends, recvs, group):
        me = self.local.rank
        for t, peer in sends:
            self.boxes[(me, peer)].put(t.detach().clone())
        return [self.boxes[(peer, me)].get(timeout=60) for _, peer in recvs]


@pytest.mark.no_kernel
@pytest.mark.parametrize("world", [2, 3, 4, 5])
@pytest.mark.parametrize("bidir", [True, False], ids=["bidir", "shift"])
def test_ring_schedule(world, bidir, monkeypatch):
    import torch.distributed as dist
    from fastnote.ops import siglip_loss as op

    rounds = op._streams(world, bidir)
    seen = {r: [] for r in range(world)}
    for r in range(world):
        k = {"L": 0, "R": 0}
        for moving in rounds:
            for d in moving:
                k[d] += 1
                seen[r].append(op._home(d, k[d], r, world))
    assert all(sorted(seen[r]) == sorted(set(range(world)) - {r}) for r in range(world)), seen

    box = _Mailbox(world)
    monkeypatch.setattr(op, "_exchange", box.exchange)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: box.local.rank)
    n, d = 3, 5
    gen = torch.Generator().manual_seed(world)
    img_all = F.normalize(torch.randn(world * n, d, generator=gen, dtype=torch.float64), dim=1)
    txt_all = F.normalize(torch.randn(world * n, d, generator=gen, dtype=torch.float64), dim=1)
    scale, bias = torch.tensor(4.0, dtype=torch.float64), torch.tensor(-1.5, dtype=torch.float64)
    results, errors = {}, []

    def rank_main(r):
        try:
            box.local.rank = r
            leaves = [img_all[r * n:(r + 1) * n].clone().requires_grad_(),
                      txt_all[r * n:(r + 1) * n].clone().requires_grad_(),
                      scale.clone().requires_grad_(), bias.clone().requires_grad_()]
            # rank 1 gets upstream gradient 2: each rank's shares travel with its own
            g = 2.0 if r == 1 else 1.0
            loss = op._RingSigLip.apply(*leaves, None, bidir, False)
            results[r] = (loss.detach(), torch.autograd.grad(loss * g, leaves))
        except Exception as e:  # reported below
            errors.append(f"rank {r}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    # open_clip's per-rank losses: the local rows against every rank's chunk, the diagonal local
    leaves = [t.clone().requires_grad_() for t in (img_all, txt_all, scale, bias)]
    logits = leaves[2] * leaves[0] @ leaves[1].t() + leaves[3]
    labels = 2 * torch.eye(world * n, dtype=torch.float64) - 1
    terms = -F.logsigmoid(labels * logits)
    per_rank = [terms[r * n:(r + 1) * n].sum() / n for r in range(world)]
    total = sum(per_rank[r] * (2.0 if r == 1 else 1.0) for r in range(world))
    e_img, e_txt, e_scale, e_bias = torch.autograd.grad(total, leaves)
    for r in range(world):
        loss, (g_img, g_txt, g_scale, g_bias) = results[r]
        torch.testing.assert_close(loss, per_rank[r].detach())
        torch.testing.assert_close(g_img, e_img[r * n:(r + 1) * n])
        torch.testing.assert_close(g_txt, e_txt[r * n:(r + 1) * n])
    torch.testing.assert_close(sum(results[r][1][2] for r in range(world)), e_scale)
    torch.testing.assert_close(sum(results[r][1][3] for r in range(world)), e_bias)


# ------------------------------------------------------------------------------------------------
# Two processes over gloo against one process on the concatenated batch and against open_clip
# ------------------------------------------------------------------------------------------------

def _open_clip_in_worker():
    """open_clip's SigLipLoss in a spawned worker, or None. open_clip imports torchvision, which
    beside a CPU torch needs the two op schemas that tests/conftest.py defines in the parent."""
    import importlib.util

    from fastnote.compat import torchvision_op_schemas

    if importlib.util.find_spec("open_clip") is None:
        return None
    torchvision_op_schemas()
    from open_clip.loss import SigLipLoss
    return SigLipLoss


def _ddp_body(rank, world_size):
    import torch.distributed as dist

    OpenClipSigLip = _open_clip_in_worker()
    n_local, d = 5, 12
    gen = torch.Generator().manual_seed(0)
    img_all = F.normalize(torch.randn(world_size * n_local, d, generator=gen), dim=1)
    txt_all = F.normalize(img_all + torch.randn(world_size * n_local, d, generator=gen), dim=1)
    rows = slice(rank * n_local, (rank + 1) * n_local)
    ri, rt, rs, rb = (t.clone().requires_grad_() for t in (img_all, txt_all, torch.tensor(5.0),
                                                            torch.tensor(-2.0)))
    full = reference.siglip_loss(ri, rt, rs, rb)
    e_img, e_txt, e_scale, e_bias = torch.autograd.grad(full, (ri, rt, rs, rb))
    from fastnote import backend

    for backend_name, impls in (("auto", DIST_IMPLS), ("reference", ("bidir", "gather"))):
        os.environ["FASTNOTE_BACKEND"] = backend_name
        backend.refresh()
        for impl in impls:
            what = f"rank {rank} {impl} ({backend_name})"
            leaves = [img_all[rows].clone().requires_grad_(), txt_all[rows].clone().requires_grad_(),
                      torch.tensor(5.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)]
            loss = fastnote.nn.SigLipLoss(rank=rank, world_size=world_size, dist_impl=impl)(*leaves)
            grads = torch.autograd.grad(loss, leaves)
            if OpenClipSigLip is not None:
                oc = [t.detach().clone().requires_grad_() for t in leaves]
                want = OpenClipSigLip(rank=rank, world_size=world_size, dist_impl=impl)(*oc)
                assert_close(loss, want, "reduction", msg=f"{what}: loss vs open_clip")
                for name, g, e in zip(NAMES, grads, torch.autograd.grad(want, oc)):
                    assert_close(g, e, "reduction", msg=f"{what}: d {name} vs open_clip")
            # one process on the whole batch: the mean of the ranks' losses and scalar gradients;
            # each rank's rows get world_size times the single-process gradient
            g_img, g_txt, g_scale, g_bias = grads
            summed = torch.stack([loss.detach(), g_scale, g_bias])
            dist.all_reduce(summed)
            assert_close(summed[0] / world_size, full, "reduction", msg=f"{what}: mean loss")
            assert_close(summed[1] / world_size, e_scale, "reduction", msg=f"{what}: mean d logit_scale")
            assert_close(summed[2] / world_size, e_bias, "reduction", msg=f"{what}: mean d logit_bias")
            assert_close(g_img / world_size, e_img[rows], "reduction", msg=f"{what}: d image")
            assert_close(g_txt / world_size, e_txt[rows], "reduction", msg=f"{what}: d text")
    # text features laid out column-major (dense, not contiguous): the chunks received in exchange
    # for them are packed buffers of their own
    os.environ["FASTNOTE_BACKEND"] = "auto"
    backend.refresh()
    for impl in ("bidir", "shift"):
        leaves = [img_all[rows].clone().requires_grad_(), txt_all[rows].t().contiguous().t().requires_grad_(),
                  torch.tensor(5.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)]
        assert not leaves[1].is_contiguous()
        loss = fastnote.nn.SigLipLoss(rank=rank, world_size=world_size, dist_impl=impl)(*leaves)
        g_img, g_txt = torch.autograd.grad(loss, leaves[:2])
        summed = loss.detach().clone()
        dist.all_reduce(summed)
        assert_close(summed / world_size, full, "reduction", msg=f"rank {rank} {impl} column-major text: mean loss")
        assert_close(g_img / world_size, e_img[rows], "reduction", msg=f"rank {rank} {impl} column-major: d image")
        assert_close(g_txt / world_size, e_txt[rows], "reduction", msg=f"rank {rank} {impl} column-major: d text")
    img, txt = img_all[rows], txt_all[rows]
    for kwargs, message in (({"rank": rank, "world_size": 3}, "world_size=3, but its process group has 2"),
                            ({"rank": 1 - rank, "world_size": 2}, f"this process is rank {rank}")):
        try:
            fastnote.nn.SigLipLoss(**kwargs)(img, txt, torch.tensor(5.0), torch.tensor(-2.0))
        except ValueError as e:
            assert message in str(e), str(e)
        else:
            raise AssertionError(f"no error for {kwargs}")


def test_two_processes_match_one(tmp_path, interpreted_children):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    with interpreted_children():   # the workers run the kernels on CPU tensors
        reports = run_gloo_ranks(_ddp_body, 2, tmp_path / "siglip_store", "fastnote.triton_kernels.siglip_loss")
    assert reports == ["rank 0: ok", "rank 1: ok"], reports


# ------------------------------------------------------------------------------------------------
# GPU: half precision at SigLIP's sizes, and the time against open_clip's eager loss
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,d", [pytest.param(1024, 768, id="n1024-d768"), pytest.param(8192, 768, id="n8192-d768"),
                                 pytest.param(4097, 64, id="n4097-d64"), pytest.param(1000, 1152, id="n1000-d1152")])
def test_shapes_gpu(n, d, dtype, device):
    _check(*_inputs(n, d, device, dtype=dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_large_logits_gpu(dtype, device):
    # norms 30 and scale 100: logits ~ 9e4, beyond fp16's range; the kernels' scores are fp32
    _check(*_inputs(512, 256, device, dtype=dtype, scale=100.0, bias=-10.0, norm=30.0), oracle=torch.float64)


@pytest.mark.gpu
def test_time_against_open_clip_gpu(device):
    # Loose sanity bounds, not targets: the forward (one streaming pass) no slower than open_clip's,
    # which writes and re-reads the [n, n] logits; forward + backward (the scores recomputed per
    # channel slice) within 4x of it. The benchmark (benchmarks/contrastive.py) has the numbers.
    oc = _open_clip()
    from triton.testing import do_bench

    img, txt, scale, bias = _inputs(16384, 768, device, dtype=torch.bfloat16)
    ref = oc.SigLipLoss()

    def both(fn):
        def run():
            torch.autograd.grad(fn(img, txt, scale, bias), (img, txt, scale, bias))
        return run

    with torch.no_grad():
        fwd_ours = do_bench(lambda: fastnote.siglip_loss(img, txt, scale, bias))
        fwd_theirs = do_bench(lambda: ref(img, txt, scale, bias))
    both_ours = do_bench(both(fastnote.siglip_loss))
    both_theirs = do_bench(both(ref))
    print(f"siglip n=16384 d=768 bf16: fwd {fwd_ours:.3f} ms vs open_clip {fwd_theirs:.3f} ms; "
          f"fwd+bwd {both_ours:.3f} ms vs {both_theirs:.3f} ms")
    assert fwd_ours <= fwd_theirs
    assert both_ours <= 4 * both_theirs


@pytest.mark.parametrize("slices", ["wide", "narrow"])
def test_gradient_slices(slices, device, launches, monkeypatch):
    # Both gradient-slice settings of the backward (contrastive_tiles.GRADIENT_SLICES) give the
    # reference's gradients at SigLIP's d = 768 in bf16: 3 slices of 256, or 12 of 64.
    from fastnote.triton_kernels import contrastive_tiles

    monkeypatch.setattr(contrastive_tiles, "GRADIENT_SLICES", slices)
    launches.clear()
    _check(*_inputs(40, 768, device, dtype=torch.bfloat16))
    grids = [grid for module, kernel, grid in launches
             if module.endswith("siglip_loss") and kernel == "_backward_kernel"]
    assert len(grids) == 2 and all(g[1] == (3 if slices == "wide" else 12) for g in grids), grids
