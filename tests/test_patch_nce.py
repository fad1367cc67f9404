"""patch_nce_loss: loss and the gradients of feat_q (and feat_k with detach_k=False) vs reference.py
in both grouping modes, the masked diagonal at T = 0.07 and 10, reductions, a shape fuzz, the CUT
PatchNCELoss / PatchSampleF drop-ins, logits, errors, custom-op checks, compile, AMP."""
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastnote
from fastnote import reference
from fastnote.testing import assert_close
from transcriptions import CUTPatchNCELoss, cut_patch_sample


def _feats(B, P, d, device, dtype=torch.float32, scale=1.0, noise=0.5):
    q = F.normalize(torch.randn(B * P, d, device=device), dim=1)
    k = F.normalize(q + noise * torch.randn(B * P, d, device=device), dim=1)
    return (q * scale).to(dtype).requires_grad_(), (k * scale).to(dtype).requires_grad_()


def _check(q, k, B, all_neg, nce_T=0.07, detach_k=True, reduction="none", oracle=torch.float32):
    """fastnote vs the reference on the same (upcast) values: loss and gradients. ``oracle``
    float64 for ill-conditioned inputs, where the fp32 reference is itself off (docs/design.md section 3.4)."""
    dtype = q.dtype
    loss = fastnote.patch_nce_loss(q, k, B, nce_T, all_neg, reduction=reduction, detach_k=detach_k)
    assert loss.dtype == torch.float32
    qr, kr = (t.detach().to(oracle).requires_grad_() for t in (q, k))
    want = reference.patch_nce_loss(qr, kr, nce_T=nce_T, batch_size=B, include_all_negatives_from_minibatch=all_neg,
                                    detach_k=detach_k)
    want = {"none": want, "mean": want.mean(), "sum": want.sum()}[reduction]
    assert loss.shape == want.shape
    assert_close(loss, want, "reduction", dtype=dtype)
    grad = torch.randn_like(loss)
    inputs = [q] if detach_k else [q, k]
    got = torch.autograd.grad(loss, inputs, grad)
    expected = torch.autograd.grad(want, [qr] if detach_k else [qr, kr], grad.to(oracle))
    for name, t, g, e in zip(("feat_q", "feat_k"), inputs, got, expected):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        # fp16/bf16: P is rounded to the input dtype before its matmul, so an entry's error scales
        # with the gradient's largest entries: compare relative to max(1, max |expected|).
        s = max(1.0, e.abs().max().item()) if dtype != torch.float32 else 1.0
        assert_close(g.float() / s, e / s, "reduction", dtype=dtype, msg=f"gradient of {name}")
    if detach_k:
        assert k.grad is None
    return loss


# (B, P, d, all negatives): P = 1; M across the 32/64 tiles and not a multiple of them; d = 1000
# (channel chunks), odd d below the 16-wide dot; whole-minibatch groups of B*P rows.
SHAPES = [
    pytest.param(1, 1, 16, False, id="B1-P1-d16"),
    pytest.param(2, 5, 8, False, id="B2-P5-d8"),
    pytest.param(2, 37, 40, True, id="B2-P37-d40-all"),
    pytest.param(3, 20, 100, False, id="B3-P20-d100"),
    pytest.param(1, 70, 17, True, id="B1-P70-d17-all"),
    pytest.param(4, 3, 33, True, id="B4-P3-d33-all"),
    pytest.param(1, 20, 1000, False, id="B1-P20-d1000"),
]


@pytest.mark.parametrize("B,P,d,all_neg", SHAPES)
@pytest.mark.parametrize("detach_k", [True, False], ids=["detach_k", "grad_k"])
def test_forward_backward(B, P, d, all_neg, detach_k, device):
    _check(*_feats(B, P, d, device), B, all_neg, detach_k=detach_k)


@pytest.mark.parametrize("nce_T", [0.07, 10.0], ids=["T0.07", "T10"])
@pytest.mark.parametrize("all_neg", [False, True], ids=["per-image", "all"])
def test_masked_diagonal_counts(nce_T, all_neg, device):
    # The masked diagonal adds exp(-10 / T) to the denominator: 1e-62 at T = 0.07 (nothing in
    # fp32), exp(-1) at T = 10, where dropping it would change the loss visibly.
    B, P, d = 2, 9, 16
    q, k = _feats(B, P, d, device)
    loss = _check(q, k, B, all_neg, nce_T=nce_T, detach_k=False)
    logits = reference.patch_nce_logits(q.detach(), k.detach(), nce_T=nce_T, batch_size=B,
                                        include_all_negatives_from_minibatch=all_neg)
    M = logits.shape[1] - 1
    own = torch.arange(B * P, device=device) % M + 1          # the masked column of each row
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[torch.arange(B * P), own] = False
    without = torch.logsumexp(logits.masked_fill(~keep, float("-inf")), 1) - logits[:, 0]
    gap = (loss.detach() - without).abs().max().item()
    if nce_T == 10.0:
        assert gap > 1e-2
    else:
        assert gap < 1e-6


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_reductions(reduction, device):
    q, k = _feats(2, 24, 32, device)
    loss = _check(q, k, 2, False, reduction=reduction, detach_k=False)
    assert loss.dim() == (1 if reduction == "none" else 0)


@settings(max_examples=15, deadline=None, derandomize=True,  # the same 15 cases on every CI run
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 3), P=st.integers(1, 40), d=st.integers(1, 70), all_neg=st.booleans(),
       nce_T=st.sampled_from([0.07, 0.5, 10.0]), detach_k=st.booleans(), scale=st.sampled_from([1.0, 3.0]))
def test_random_shapes(B, P, d, all_neg, nce_T, detach_k, scale, device):
    _check(*_feats(B, P, d, device, scale=scale), B, all_neg, nce_T=nce_T, detach_k=detach_k)


def test_large_logits_fp32(device):
    # Feature norms 8: logits up to 64 / 0.07 ~ 900 (exp without the running max overflows fp32),
    # where one ulp of a logit is 6e-5 and the gradients reach 1/T |q| ~ 100: compared with the
    # float64 reference, which the fp32 one misses by about as much as the kernel (1e-4).
    q, k = _feats(2, 30, 24, device, scale=8.0, noise=2.0)
    assert (q @ k.t()).abs().max() / 0.07 > 300
    _check(q, k, 2, True, detach_k=False, oracle=torch.float64)


@pytest.mark.parametrize("all_neg", [False, True], ids=["per-image", "all"])
def test_drop_in_for_cut(all_neg, device):
    B, P, d = 2, 19, 24
    q, k = _feats(B, P, d, device)
    opt = types.SimpleNamespace(nce_T=0.07, batch_size=B, nce_includes_all_negatives_from_minibatch=all_neg)
    theirs = CUTPatchNCELoss(opt)
    for ours in (fastnote.nn.PatchNCELoss(opt), fastnote.nn.PatchNCELoss(0.07, B, all_neg)):
        got, want = ours(q, k), theirs(q, k)
        assert got.shape == want.shape == (B * P,)
        assert_close(got, want, "reduction")
        # CUT sums layer means: the gradient reaching feat_q through .mean()
        g_ours, = torch.autograd.grad(got.mean(), q)
        g_theirs, = torch.autograd.grad(want.mean(), q)
        assert_close(g_ours, g_theirs, "reduction")
    assert k.grad is None
    # options are read at every forward, as CUT does
    module = fastnote.nn.PatchNCELoss(opt)
    opt.nce_T = 0.2
    assert_close(module(q, k), theirs(q, k), "reduction")


def test_cut_pipeline_patch_sample(device):
    # CUT's calculate_NCE_loss for one layer: sample the keys, reuse their ids for the queries.
    feat_k = torch.randn(2, 16, 9, 11, device=device)
    feat_q = torch.randn(2, 16, 9, 11, device=device, requires_grad=True)
    torch.manual_seed(3)
    k_ours, ids = fastnote.patch_sample(feat_k, 40)
    torch.manual_seed(3)
    k_cut, ids_cut = cut_patch_sample(feat_k, 40)
    assert torch.equal(ids, ids_cut)
    assert_close(k_ours, k_cut, "elementwise")
    q_ours, _ = fastnote.patch_sample(feat_q, 40, ids)
    q_cut, _ = cut_patch_sample(feat_q, 40, ids)
    assert_close(q_ours, q_cut, "elementwise")
    opt = types.SimpleNamespace(nce_T=0.07, batch_size=2, nce_includes_all_negatives_from_minibatch=False)
    ours = fastnote.nn.PatchNCELoss(opt)(q_ours, k_ours).mean()
    theirs = CUTPatchNCELoss(opt)(q_cut, k_cut).mean()
    assert_close(ours, theirs, "reduction")
    g_ours, = torch.autograd.grad(ours, feat_q)
    g_theirs, = torch.autograd.grad(theirs, feat_q)
    assert_close(g_ours, g_theirs, "reduction")


@pytest.mark.no_kernel  # patch_sample is plain torch (one gather)
def test_patch_sample_options(device):
    feat = torch.randn(3, 5, 4, 4, device=device)
    # more patches than positions: all of them, as CUT's min(num_patches, H*W)
    x, ids = fastnote.patch_sample(feat, 100)
    assert ids.shape == (16,) and sorted(ids.tolist()) == list(range(16))
    raw, _ = fastnote.patch_sample(feat, 3, ids[:3], normalize=False)
    want = feat.permute(0, 2, 3, 1).flatten(1, 2)[:, ids[:3], :].flatten(0, 1)
    assert torch.equal(raw, want)
    assert_close(x.norm(dim=1), torch.ones(48, device=device), "elementwise")
    with pytest.raises(ValueError, match="feat must have 4 dimensions"):
        fastnote.patch_sample(feat[0], 3)
    with pytest.raises(ValueError, match="num_patches must be >= 1"):
        fastnote.patch_sample(feat, 0)
    with pytest.raises(TypeError, match="patch_ids must have dtype"):
        fastnote.patch_sample(feat, 3, ids.float())


@pytest.mark.no_kernel  # the logits are the plain-torch reference path by design
def test_logits(device):
    B, P, d = 2, 7, 12
    q, k = _feats(B, P, d, device)
    for all_neg in (False, True):
        got = fastnote.patch_nce_logits(q, k, B, 0.07, all_neg)
        want = reference.patch_nce_logits(q, k, nce_T=0.07, batch_size=B, include_all_negatives_from_minibatch=all_neg)
        assert got.shape == (B * P, (B * P if all_neg else P) + 1)
        assert_close(got, want, "reduction")
    # detach_k=False: the logits carry a gradient to feat_k
    fastnote.patch_nce_logits(q, k, B, detach_k=False).sum().backward()
    assert k.grad is not None


def test_non_contiguous(device):
    B, P, d = 2, 13, 20
    q = torch.randn(d, B * P, device=device).t().requires_grad_()          # transposed storage
    k = torch.randn(B * P, 2 * d, device=device)[:, ::2].requires_grad_()  # every other column
    assert not q.is_contiguous() and not k.is_contiguous()
    _check(q, k, B, False, detach_k=False)


@pytest.mark.no_kernel
def test_empty(device):
    q, k = _feats(2, 0, 8, device)
    loss = fastnote.patch_nce_loss(q, k, 2)
    assert loss.shape == (0,)
    loss.sum().backward()
    assert q.grad.shape == q.shape


def test_errors(device):
    q, k = _feats(2, 5, 8, device)
    with pytest.raises(ValueError, match="feat_q must have 2 dimensions"):
        fastnote.patch_nce_loss(q[None], k, 2)
    with pytest.raises(ValueError, match=r"feat_k must have shape \[10, 8\]"):
        fastnote.patch_nce_loss(q, k[:, :4], 2)
    with pytest.raises(ValueError, match=r"feat_k must have shape \[10, 8\]"):
        fastnote.patch_nce_loss(q, k[:9], 2)
    with pytest.raises(ValueError, match="batch_size must divide the rows of feat_q.*batch_size 3 for 10 rows"):
        fastnote.patch_nce_loss(q, k, 3)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        fastnote.patch_nce_loss(q, k, 0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        fastnote.patch_nce_loss(q, k, 2.0)
    for bad in (0.0, -0.07, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="nce_T must be a finite number > 0"):
            fastnote.patch_nce_loss(q, k, 2, bad)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastnote.patch_nce_loss(q, k, 2, reduction="batchmean")
    with pytest.raises(TypeError, match="all tensors must have one dtype"):
        fastnote.patch_nce_loss(q, k.detach().half(), 2)
    with pytest.raises(TypeError, match="feat_q must have dtype"):
        fastnote.patch_nce_loss(q.detach().long(), k.detach().long(), 2)
    with pytest.raises(ValueError, match="one device.*feat_k on meta"):
        fastnote.patch_nce_loss(q, k.detach().to("meta"), 2)
    with pytest.raises(ValueError, match="feat_q must have at least one channel"):
        fastnote.patch_nce_loss(q[:, :0], k[:, :0], 2)
    with pytest.raises(TypeError, match="include_all_negatives_from_minibatch must be a bool"):
        fastnote.patch_nce_loss(q, k, 2, 0.07, "yes")
    with pytest.raises(TypeError, match="options namespace.*without batch_size"):
        fastnote.nn.PatchNCELoss(types.SimpleNamespace(nce_T=0.07))
    # whole-minibatch negatives never group by batch_size, so it need not divide (as in CUT)
    assert fastnote.patch_nce_loss(q, k, 3, 0.07, True).shape == (10,)


def test_opcheck(device):
    for dtype in (torch.float32, torch.float16):
        q, k = (t.detach() for t in _feats(2, 9, 20, device, dtype=dtype))
        for groups in (1, 2):
            torch.library.opcheck(torch.ops.fastnote.patch_nce_loss.default, (q, k, groups, 0.07))
            loss, stats = torch.ops.fastnote.patch_nce_loss.default(q, k, groups, 0.07)
            grad = torch.randn(18, device=device)
            for with_dk in (False, True):
                torch.library.opcheck(torch.ops.fastnote.patch_nce_loss_backward.default,
                                      (grad, q, k, loss, stats, groups, 0.07, with_dk))


def test_compile_fullgraph(device, compile_backend):
    q, k = _feats(2, 16, 24, device)

    def f(q, k):
        return fastnote.patch_nce_loss(q, k, 2, 0.07, reduction="mean", detach_k=False)

    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    out = compiled(q, k)
    got = torch.autograd.grad(out, (q, k))
    want_out = reference.patch_nce_loss(q, k, 0.07, 2, detach_k=False).mean()
    want = torch.autograd.grad(want_out, (q, k))
    assert_close(out, want_out, "reduction")
    for g, w in zip(got, want):
        assert_close(g, w, "reduction")
    module = torch.compile(fastnote.nn.PatchNCELoss(batch_size=2), fullgraph=True, backend=compile_backend)
    assert_close(module(q, k), reference.patch_nce_loss(q, k, 0.07, 2), "reduction")


def test_autocast_bf16(device):
    # Under autocast the features run in bf16; compared with the fp32 reference on the same
    # bf16-rounded values at the bf16 tolerance. The gradient comes back in fp32 (the leaves').
    q, k = _feats(2, 20, 32, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = fastnote.patch_nce_loss(q, k, 2)
    assert loss.dtype == torch.float32
    qb, kb = (t.detach().bfloat16().float().requires_grad_() for t in (q, k))
    want = reference.patch_nce_loss(qb, kb, 0.07, 2)
    assert_close(loss, want, "reduction", dtype=torch.bfloat16)
    g = torch.randn_like(loss)
    got, = torch.autograd.grad(loss, q, g)
    expected, = torch.autograd.grad(want, qb, g)
    assert got.dtype == torch.float32
    s = max(1.0, expected.abs().max().item())
    assert_close(got / s, expected / s, "reduction", dtype=torch.bfloat16)


def test_reference_backend_switch(device, monkeypatch):
    q, k = _feats(2, 6, 8, device)
    got = fastnote.patch_nce_loss(q, k, 2, detach_k=False)
    monkeypatch.setenv("FASTNOTE_BACKEND", "reference")
    fastnote.backend.refresh()
    assert_close(got, fastnote.patch_nce_loss(q, k, 2, detach_k=False), "reduction")


# ------------------------------------------------------------------------------------------------
# GPU: half precision at CUT's shapes and beyond
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,P,d,all_neg", [
    pytest.param(1, 256, 256, False, id="CUT-B1-P256-d256"),
    pytest.param(1, 256, 256, True, id="CUT-B1-P256-d256-all"),
    pytest.param(4, 256, 256, False, id="B4-P256-d256"),
    pytest.param(16, 256, 256, True, id="all-4096-d256"),
    pytest.param(2, 4096, 64, False, id="B2-P4096-d64"),
    pytest.param(3, 100, 1000, False, id="B3-P100-d1000"),
])
@pytest.mark.parametrize("detach_k", [True, False], ids=["detach_k", "grad_k"])
@pytest.mark.parametrize("nce_T", [0.07, 10.0], ids=["T0.07", "T10"])
def test_shapes_gpu(B, P, d, all_neg, dtype, detach_k, nce_T, device):
    # T = 10 as well: at 0.07 the masked diagonal's exp(-10 / T) is 1e-62, so a wrong mask value
    # would change nothing; at 10 it weighs as much as any negative.
    _check(*_feats(B, P, d, device, dtype=dtype), B, all_neg, nce_T=nce_T, detach_k=detach_k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_overflowing_logits(dtype, device):
    # Norms 80 and keys close to their queries (noise 0.02 per channel: cos ~ 0.95): q.k ~ 6100,
    # / 0.07 -> 8.7e4 > fp16's 65504. A naive fp16 CUT (bmm and the /T in fp16) produces inf
    # logits and a NaN loss; fp32 scores and the online max do not. (With noise 0.1, cos ~ 0.5 and
    # the largest logit stayed under 65504 on a GPU and on the CPU alike.)
    B, P, d = 1, 256, 256
    q, k = _feats(B, P, d, device, dtype=dtype, scale=80.0, noise=0.02)
    if dtype == torch.float16:
        opt = types.SimpleNamespace(nce_T=0.07, batch_size=B, nce_includes_all_negatives_from_minibatch=False)
        naive = CUTPatchNCELoss(opt)(q.detach(), k.detach())
        assert not torch.isfinite(naive).all()
    loss = _check(q, k, B, False, detach_k=False)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("slices", ["wide", "narrow"])
def test_gradient_slices(slices, device, launches, monkeypatch):
    # Both gradient-slice settings of the backward (contrastive_tiles.GRADIENT_SLICES) give the
    # reference's dq and dk at d = 300 in fp32: 3 slices of 128 (the last partial), or 10 of 32.
    from fastnote.triton_kernels import contrastive_tiles

    monkeypatch.setattr(contrastive_tiles, "GRADIENT_SLICES", slices)
    launches.clear()
    _check(*_feats(2, 40, 300, device), 2, True, detach_k=False)
    grids = [grid for module, kernel, grid in launches
             if module.endswith("patch_nce") and kernel in ("_dq_kernel", "_dk_kernel")]
    assert len(grids) == 2 and all(g[1] == (3 if slices == "wide" else 10) for g in grids), grids


def _nce_launches(launches, kernel):
    return [grid for module, name, grid in launches if module.endswith("patch_nce") and name == kernel]


@pytest.mark.parametrize("all_neg", [False, True], ids=["per-image", "all"])
@pytest.mark.parametrize("detach_k", [True, False], ids=["detach_k", "grad_k"])
def test_layers_stacked_in_one_launch(all_neg, detach_k, device, launches):
    # CUT's calculate_NCE_loss over 5 NCE layers of one shape (its MLP head's): one forward launch
    # and one backward launch per kernel for all of them, each layer's loss bitwise the one its own
    # patch_nce_loss gives, and so are the gradients of CUT's total (every upstream gradient the
    # same, so the backward's scaling matches); CUT's own criterion gives the same total.
    B, P, d, L = 2, 19, 24, 5
    feats = [_feats(B, P, d, device) for _ in range(L)]
    qs, ks = [q for q, _ in feats], [k for _, k in feats]
    launches.clear()
    losses = fastnote.patch_nce_loss_layers(qs, ks, B, 0.07, all_neg, detach_k=detach_k)
    total = sum(loss.mean() for loss in losses) / L
    inputs = qs if detach_k else qs + ks
    grads = torch.autograd.grad(total, inputs)
    assert len(_nce_launches(launches, "_forward_kernel")) == 1
    assert len(_nce_launches(launches, "_dq_kernel")) == 1
    assert len(_nce_launches(launches, "_dk_kernel")) == (0 if detach_k else 1)
    singles = [fastnote.patch_nce_loss(q, k, B, 0.07, all_neg, detach_k=detach_k) for q, k in feats]
    assert len(losses) == L and all(torch.equal(a, b) for a, b in zip(losses, singles))
    single_total = sum(loss.mean() for loss in singles) / L
    for g, e in zip(grads, torch.autograd.grad(single_total, inputs)):
        assert torch.equal(g, e)
    opt = types.SimpleNamespace(nce_T=0.07, batch_size=B, nce_includes_all_negatives_from_minibatch=all_neg)
    crit = CUTPatchNCELoss(opt)
    theirs = sum(crit(q, k).mean() for q, k in feats) / L
    assert_close(total, theirs, "reduction")
    if detach_k:
        assert all(k.grad is None for k in ks)


def test_layers_with_other_upstream_gradients(device):
    # Different upstream gradients per layer: the stacked backward scales them by one largest
    # magnitude, so each layer's gradient agrees with its own call to fp32 rounding.
    feats = [_feats(2, 12, 16, device) for _ in range(3)]
    qs, ks = [q for q, _ in feats], [k for _, k in feats]
    losses = fastnote.patch_nce_loss_layers(qs, ks, 2)
    ups = [torch.randn_like(loss) * 10.0 ** i for i, loss in enumerate(losses)]
    got = torch.autograd.grad(losses, qs, ups)
    singles = [fastnote.patch_nce_loss(q, k, 2) for q, k in feats]
    want = torch.autograd.grad(singles, qs, ups)
    for g, e in zip(got, want):
        assert_close(g, e, "reduction")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_layers_reductions(reduction, device):
    feats = [_feats(1, 20, 8, device) for _ in range(4)]
    got = fastnote.patch_nce_loss_layers([q for q, _ in feats], [k for _, k in feats], 1, reduction=reduction)
    want = [fastnote.patch_nce_loss(q, k, 1, reduction=reduction) for q, k in feats]
    assert [t.shape for t in got] == [torch.Size([])] * 4
    for g, e in zip(got, want):
        assert_close(g, e, "reduction")


def test_layers_that_do_not_stack(device, launches):
    # CUT without its MLP head samples each layer at its own width: one call per layer.
    feats = [_feats(2, 10, d, device) for d in (3, 16, 16)]
    launches.clear()
    losses = fastnote.patch_nce_loss_layers([q for q, _ in feats], [k for _, k in feats], 2)
    assert len(_nce_launches(launches, "_forward_kernel")) == 3
    for loss, (q, k) in zip(losses, feats):
        assert torch.equal(loss, fastnote.patch_nce_loss(q, k, 2))


@pytest.mark.no_kernel
def test_layers_errors(device):
    q, k = _feats(2, 5, 8, device)
    with pytest.raises(TypeError, match="sequences of tensors"):
        fastnote.patch_nce_loss_layers(q, k, 2)
    with pytest.raises(ValueError, match="same number of layers"):
        fastnote.patch_nce_loss_layers([q, q], [k], 2)
    with pytest.raises(ValueError, match="same number of layers"):
        fastnote.patch_nce_loss_layers([], [], 2)
    with pytest.raises(ValueError, match="batch_size must divide"):
        fastnote.patch_nce_loss_layers([q, q], [k, k], 3)
    with pytest.raises(ValueError, match="reduction"):
        fastnote.patch_nce_loss_layers([q, q], [k, k], 2, reduction="max")


def test_layers_compile_fullgraph_and_autocast(device, compile_backend):
    # CUT's loop over its layers, compiled whole, and under bf16 autocast (the stacked features
    # are cast once, as each layer's would be).
    feats = [_feats(1, 16, 24, device) for _ in range(3)]
    qs, ks = [q for q, _ in feats], [k for _, k in feats]

    def total(qs, ks):
        return sum(fastnote.patch_nce_loss_layers(qs, ks, 1, reduction="mean")) / 3

    compiled = torch.compile(total, fullgraph=True, backend=compile_backend)
    out = compiled(qs, ks)
    want = sum(reference.patch_nce_loss(q, k, 0.07, 1).mean() for q, k in feats) / 3
    assert_close(out, want, "reduction")
    for g, e in zip(torch.autograd.grad(out, qs), torch.autograd.grad(want, qs)):
        assert_close(g, e, "reduction")
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = fastnote.patch_nce_loss_layers(qs, ks, 1)
        each = [fastnote.patch_nce_loss(q, k, 1) for q, k in feats]
    assert all(torch.equal(a, b) for a, b in zip(got, each))
