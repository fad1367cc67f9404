"""Spectral-norm power iteration (docs/ops.md section 6): the C++ op, fastnote.power_iteration and the
three front ends, against fastnote.reference, torch's hook and parametrization versions and a
SAGAN spectral.py twin written here from its semantics."""
import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnote
from fastnote import reference
from fastnote.nn import SpectralNorm as SaganSpectralNorm
from fastnote.nn.utils import parametrizations as fn_param
from fastnote.nn.utils import remove_spectral_norm, spectral_norm
from fastnote.ops import power_iteration as pi
from fastnote.testing import assert_close, run_gloo_ranks

torch_hook = torch.nn.utils.spectral_norm
torch_param = torch.nn.utils.parametrizations.spectral_norm
OP = torch.ops.fastnote.spectral_power_iteration_.default if pi.extension_available() else None
needs_ext = pytest.mark.skipif(OP is None, reason="fastnote._C is not built")
# fp32 comparisons with torch's modules: TF32 off (on a GPU torch's conv would otherwise use cuDNN's
# TF32: on an H200, 94 of 6400 outputs of test_cuda_module_matches_torch were off by up to 9.7e-3)
pytestmark = pytest.mark.usefixtures("no_tf32")


# ------------------------------------------------------------------------------------------------
# SAGAN's spectral.py, as its code behaves (the oracle for fastnote.nn.SpectralNorm)
# ------------------------------------------------------------------------------------------------
def _l2normalize(a, eps=1e-12):
    return a / (a.norm() + eps)


class OriginalSagan(nn.Module):
    def __init__(self, module, name="weight", power_iterations=1):
        super().__init__()
        self.module, self.name, self.power_iterations = module, name, power_iterations
        if not all(hasattr(module, name + s) for s in ("_u", "_v", "_bar")):
            w = getattr(module, name)
            h = w.data.shape[0]
            u = nn.Parameter(w.data.new(h).normal_(0, 1), requires_grad=False)
            v = nn.Parameter(w.data.new(w.view(h, -1).shape[1]).normal_(0, 1), requires_grad=False)
            u.data = _l2normalize(u.data)
            v.data = _l2normalize(v.data)
            w_bar = nn.Parameter(w.data)
            del module._parameters[name]
            module.register_parameter(name + "_u", u)
            module.register_parameter(name + "_v", v)
            module.register_parameter(name + "_bar", w_bar)

    def forward(self, *args):
        u = getattr(self.module, self.name + "_u")
        v = getattr(self.module, self.name + "_v")
        w = getattr(self.module, self.name + "_bar")
        h = w.data.shape[0]
        for _ in range(self.power_iterations):
            v.data = _l2normalize(torch.mv(torch.t(w.view(h, -1).data), u.data))
            u.data = _l2normalize(torch.mv(w.view(h, -1).data, v.data))
        sigma = u.dot(w.view(h, -1).mv(v))
        setattr(self.module, self.name, w / sigma.expand_as(w))
        return self.module.forward(*args)


# ------------------------------------------------------------------------------------------------
# Modules and inputs
# ------------------------------------------------------------------------------------------------
KINDS = {
    "linear": (lambda: nn.Linear(7, 5), lambda: torch.randn(3, 7)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3), lambda: torch.randn(2, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3), lambda: torch.randn(2, 3, 6, 6)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), lambda: torch.randn(1, 2, 4, 4, 4)),
    "convtranspose2d": (lambda: nn.ConvTranspose2d(3, 4, 3), lambda: torch.randn(2, 3, 5, 5)),
    "embedding": (lambda: nn.Embedding(10, 6), lambda: torch.tensor([[1, 2, 3], [4, 5, 9]])),
}
# training, training, eval, training: iterations, then the stored u, v, then iterations again
SCHEDULE = (True, True, False, True)


def _inputs(make_x):
    x = make_x()
    if not x.is_floating_point():
        return x, x
    return x.clone().requires_grad_(), x.clone().requires_grad_()


def _close(actual, expected, msg=""):
    assert_close(actual.detach(), expected.detach(), "reduction", msg=msg)


def _grads_close(ours, ref, names):
    for n in names:
        _close(dict(ours.named_parameters())[n].grad, dict(ref.named_parameters())[n].grad, n)


def _zero_grads(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None


def _run_schedule(ours, ref, make_x, weight_of, buffers_of, grad_names):
    """Same forward/backward sequence on both modules; compares weight, output, u, v and grads."""
    for training in SCHEDULE:
        ours.train(training)
        ref.train(training)
        # a fresh u each step (the same in both), so an iteration visibly moves it
        u_before = F.normalize(torch.randn_like(buffers_of(ours)[0]), dim=0)
        with torch.no_grad():
            buffers_of(ours)[0].copy_(u_before)
            buffers_of(ref)[0].copy_(u_before)
        x_ours, x_ref = _inputs(make_x)
        y_ours, y_ref = ours(x_ours), ref(x_ref)
        _close(y_ours, y_ref, f"output, training={training}")
        _close(weight_of(ours), weight_of(ref), "weight")
        for a, b in zip(buffers_of(ours), buffers_of(ref)):
            _close(a, b, "u/v")
        return_changed = not torch.equal(buffers_of(ours)[0], u_before)
        g = torch.randn_like(y_ref)
        y_ours.backward(g)
        y_ref.backward(g)
        _grads_close(ours, ref, grad_names)
        if x_ours.requires_grad:
            _close(x_ours.grad, x_ref.grad, "input grad")
        _zero_grads(ours, ref)
        yield training, return_changed


# ------------------------------------------------------------------------------------------------
# The op and fastnote.power_iteration
# ------------------------------------------------------------------------------------------------
SHAPES = [(1, 33), (5, 1), (64, 48), (37, 129), (128, 1024)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{h}x{w}" for h, w in SHAPES])
@pytest.mark.parametrize("rule", ["max", "add"])
@pytest.mark.parametrize("n", [0, 1, 3])
def test_power_iteration_matches_reference(shape, rule, n):
    W = torch.randn(shape)
    u = F.normalize(torch.randn(shape[0]), dim=0)
    v = F.normalize(torch.randn(shape[1]), dim=0)
    u0, v0 = u.clone(), v.clone()
    sigma, u_new, v_new = fastnote.power_iteration(W, u, v, n, rule=rule)
    s_ref, u_ref, v_ref = reference.power_iteration(W, u, v, n, rule=rule)
    _close(sigma, s_ref, "sigma")
    _close(u_new, u_ref, "u")
    _close(v_new, v_ref, "v")
    assert torch.equal(u, u0) and torch.equal(v, v0), "inputs must not be modified"
    assert sigma.dim() == 0 and sigma.dtype == W.dtype


def test_power_iteration_converges_to_top_singular_value():
    W = torch.randn(40, 30, dtype=torch.float64)
    sigma, u, v = fastnote.power_iteration(W, torch.randn(40, dtype=torch.float64),
                                           torch.randn(30, dtype=torch.float64), 500)
    top = torch.linalg.svdvals(W)[0]
    torch.testing.assert_close(sigma, top, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.mv(W, v), sigma * u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_power_iteration_dtypes(dtype):
    W = torch.randn(37, 129)
    u, v = F.normalize(torch.randn(37), dim=0), F.normalize(torch.randn(129), dim=0)
    s_ref, u_ref, v_ref = reference.power_iteration(W, u, v, 2)
    sigma, u_new, v_new = fastnote.power_iteration(W.to(dtype), u.to(dtype), v.to(dtype), 2)
    assert sigma.dtype == u_new.dtype == v_new.dtype == dtype
    assert_close(sigma, s_ref, "reduction")
    assert_close(u_new, u_ref, "reduction")
    assert_close(v_new, v_ref, "reduction")


@pytest.mark.parametrize("u_first", [False, True])
def test_op_orders_match_torch_ops(u_first):
    W = torch.randn(20, 31)
    u, v = torch.randn(20), torch.randn(31)
    ref_u, ref_v = u.clone(), v.clone()
    sigma_ref, _, _ = pi._iterate_torch_(W, ref_u, ref_v, 4, 1e-12, False, u_first)
    sigma, u_c, v_c = pi.iterate_(W, u, v, 4, 1e-12, False, u_first)
    _close(u, ref_u)
    _close(v, ref_v)
    _close(sigma, sigma_ref)
    assert torch.equal(u_c, u) and u_c.data_ptr() != u.data_ptr()


@needs_ext
def test_op_bumps_versions_and_has_no_grad():
    W = torch.randn(6, 4, requires_grad=True)
    u, v = torch.randn(6), torch.randn(4)
    before = (u._version, v._version)
    sigma, u_c, v_c = OP(W, u, v, 1, 1e-12, False, False)
    assert u._version > before[0] and v._version > before[1]
    assert sigma.grad_fn is None and not sigma.requires_grad


@needs_ext
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    W = torch.randn(9, 13, requires_grad=requires_grad)
    args = (W, torch.randn(9), torch.randn(13), 2, 1e-12, True, False)
    result = torch.library.opcheck(OP, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_power_iteration_sigma_gradient_is_u_v():
    W = torch.randn(8, 5, requires_grad=True)
    sigma, u, v = fastnote.power_iteration(W, torch.randn(8), torch.randn(5), 3)
    sigma.backward()
    _close(W.grad, torch.outer(u, v))


def test_power_iteration_gradcheck():
    u, v = torch.randn(6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)

    def f(W):  # n = 0: sigma = u . (W v) exactly, u and v fixed, so finite differences apply
        return fastnote.power_iteration(W, u, v, 0)[0]

    W = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (W,))
    assert torch.autograd.gradgradcheck(f, (W,))


BAD_CALLS = [
    (dict(n_power_iterations=-1), ValueError, "n_power_iterations"),
    (dict(n_power_iterations=1.0), TypeError, "n_power_iterations"),
    (dict(n_power_iterations=True), TypeError, "n_power_iterations"),
    (dict(eps=-1e-3), ValueError, "eps"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(eps="1e-12"), TypeError, "eps"),
    (dict(rule="sum"), ValueError, "rule"),
    (dict(weight_mat=torch.randn(4, 3, 2)), ValueError, "weight_mat"),
    (dict(weight_mat=torch.randint(0, 3, (4, 3))), TypeError, "weight_mat"),
    (dict(weight_mat=[[1.0]]), TypeError, "weight_mat"),
    (dict(u=torch.randn(5)), ValueError, "u"),
    (dict(v=torch.randn(4)), ValueError, "v"),
    (dict(u=torch.randn(4, 1)), ValueError, "u"),
    (dict(u=torch.randn(4, dtype=torch.float64)), TypeError, "u"),
]


@pytest.mark.parametrize("bad,exc,name", BAD_CALLS, ids=[f"{n}-{i}" for i, (_, _, n) in enumerate(BAD_CALLS)])
def test_power_iteration_errors(bad, exc, name):
    kwargs = dict(weight_mat=torch.randn(4, 3), u=torch.randn(4), v=torch.randn(3))
    kwargs.update(bad)
    with pytest.raises(exc, match=name):
        fastnote.power_iteration(**kwargs)


@pytest.mark.parametrize("apply", [spectral_norm, fn_param.spectral_norm])
def test_front_end_errors(apply):
    with pytest.raises(ValueError, match="n_power_iterations"):
        apply(nn.Linear(3, 4), n_power_iterations=0)
    with pytest.raises(TypeError, match="n_power_iterations"):
        apply(nn.Linear(3, 4), n_power_iterations=1.5)
    with pytest.raises(ValueError, match="eps"):
        apply(nn.Linear(3, 4), eps=-1e-3)
    with pytest.raises(ValueError, match="bias2|no parameter"):
        apply(nn.Linear(3, 4), name="bias2")
    with pytest.raises(TypeError, match="module"):
        apply("not a module")


def test_sagan_wrapper_errors():
    with pytest.raises(ValueError, match="power_iterations"):
        SaganSpectralNorm(nn.Linear(3, 4), power_iterations=-1)
    with pytest.raises(TypeError, match="power_iterations"):
        SaganSpectralNorm(nn.Linear(3, 4), power_iterations=0.5)
    with pytest.raises(ValueError, match="no parameter"):
        SaganSpectralNorm(nn.Linear(3, 4), name="nope")


# ------------------------------------------------------------------------------------------------
# Front ends vs the implementations they replace
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_hook_matches_torch(kind):
    make, make_x = KINDS[kind]
    base = make()
    torch.manual_seed(3)
    ref = torch_hook(copy.deepcopy(base))
    torch.manual_seed(3)
    ours = spectral_norm(copy.deepcopy(base))
    assert torch.equal(ours.weight_u, ref.weight_u) and torch.equal(ours.weight_v, ref.weight_v), "same draws"
    with torch.no_grad():  # as the brief says: copy u, v from torch's module
        ours.weight_u.copy_(ref.weight_u)
        ours.weight_v.copy_(ref.weight_v)
    grads = [n for n, _ in ref.named_parameters()]
    steps = list(_run_schedule(ours, ref, make_x, lambda m: m.weight,
                               lambda m: (m.weight_u, m.weight_v), grads))
    assert [changed for _, changed in steps] == [True, True, False, True], "iterate in training only"


@pytest.mark.parametrize("kind", KINDS)
def test_parametrization_matches_torch(kind):
    make, make_x = KINDS[kind]
    base = make()
    torch.manual_seed(4)
    ref = torch_param(copy.deepcopy(base))
    torch.manual_seed(4)
    ours = fn_param.spectral_norm(copy.deepcopy(base))
    sn_ref, sn_ours = ref.parametrizations.weight[0], ours.parametrizations.weight[0]
    # same draws and the same 15 warm-up iterations
    _close(sn_ours._u, sn_ref._u, "warm-up u")
    _close(sn_ours._v, sn_ref._v, "warm-up v")
    with torch.no_grad():
        sn_ours._u.copy_(sn_ref._u)
        sn_ours._v.copy_(sn_ref._v)
    grads = [n for n, _ in ref.named_parameters()]

    def bufs(m):
        return m.parametrizations.weight[0]._u, m.parametrizations.weight[0]._v

    steps = list(_run_schedule(ours, ref, make_x, lambda m: m.weight, bufs, grads))
    assert [changed for _, changed in steps] == [True, True, False, True]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("power_iterations", [1, 3])
def test_sagan_wrapper_matches_sagan(kind, power_iterations):
    make, make_x = KINDS[kind]
    base = make()
    torch.manual_seed(5)
    ref = OriginalSagan(copy.deepcopy(base), power_iterations=power_iterations)
    torch.manual_seed(5)
    ours = SaganSpectralNorm(copy.deepcopy(base), power_iterations=power_iterations)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    for n in ("weight_u", "weight_v"):
        assert not getattr(ours.module, n).requires_grad
        assert torch.equal(getattr(ours.module, n), getattr(ref.module, n)), "same draws"
    grads = [n for n, p in ref.named_parameters() if p.requires_grad]
    steps = list(_run_schedule(ours, ref, make_x, lambda m: m.module.weight,
                               lambda m: (m.module.weight_u, m.module.weight_v), grads))
    assert all(changed for _, changed in steps), "SAGAN iterates in eval too"


def test_parametrization_one_dimensional_weight():
    m = nn.Linear(3, 4)
    ours = fn_param.spectral_norm(copy.deepcopy(m), name="bias")
    ref = torch_param(copy.deepcopy(m), name="bias")
    _close(ours.bias, ref.bias)
    _close(ours.bias, F.normalize(m.bias, dim=0))


def test_dim_argument_and_n_power_iterations():
    base = nn.Conv2d(3, 6, 3)
    torch.manual_seed(0)
    ref = torch_hook(copy.deepcopy(base), n_power_iterations=4, dim=1, eps=1e-6)
    torch.manual_seed(0)
    ours = spectral_norm(copy.deepcopy(base), n_power_iterations=4, dim=1, eps=1e-6)
    assert ours.weight_u.shape == (3,)
    x = torch.randn(1, 3, 5, 5)
    _close(ours(x), ref(x))
    _close(ours.weight_u, ref.weight_u)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def _trained(m, make_x, steps=2):
    m.train()
    for _ in range(steps):
        m(make_x())
    return m


def test_hook_checkpoints_load_both_ways():
    make, make_x = KINDS["conv2d"]
    ref = _trained(torch_hook(make()), make_x)
    ours = spectral_norm(make())
    sd = ref.state_dict()
    assert sd._metadata[""]["spectral_norm"] == {"weight.version": 1}
    ours.load_state_dict(sd, strict=True)
    ours_sd = ours.state_dict()
    assert ours_sd._metadata[""]["spectral_norm"] == {"weight.version": 1}
    assert sorted(ours_sd) == sorted(sd)
    back = torch_hook(make())
    back.load_state_dict(ours_sd, strict=True)
    ref.eval(), ours.eval(), back.eval()
    x = make_x()
    _close(ours(x), ref(x))
    _close(back(x), ref(x))


def test_hook_loads_version_0_checkpoint():
    # a checkpoint from before torch's spectral_norm version 1: weight stored, no weight_v
    make, make_x = KINDS["linear"]
    src = _trained(torch_hook(make()), make_x)
    sd = src.state_dict()
    old = {k: v for k, v in sd.items() if k != "weight_v"}
    old["weight"] = src.weight.detach().clone()
    old = type(sd)(old)
    old._metadata = copy.deepcopy(sd._metadata)
    del old._metadata[""]["spectral_norm"]
    ref, ours = torch_hook(make()), spectral_norm(make())
    ref.load_state_dict(copy.deepcopy(old), strict=True)
    ours.load_state_dict(copy.deepcopy(old), strict=True)
    _close(ours.weight_v, ref.weight_v)
    ours.eval(), ref.eval()
    x = make_x()
    _close(ours(x), ref(x))


def test_parametrization_checkpoints_load_both_ways():
    make, make_x = KINDS["convtranspose2d"]
    ref = _trained(torch_param(make()), make_x)
    ours = fn_param.spectral_norm(make())
    sd = ref.state_dict()
    assert "parametrizations.weight.original" in sd and "parametrizations.weight.0._u" in sd
    ours.load_state_dict(sd, strict=True)
    back = torch_param(make())
    back.load_state_dict(ours.state_dict(), strict=True)
    ref.eval(), ours.eval(), back.eval()
    x = make_x()
    _close(ours(x), ref(x))
    _close(back(x), ref(x))


def test_sagan_checkpoints_load_both_ways():
    make, make_x = KINDS["conv2d"]
    ref = _trained(OriginalSagan(make()), make_x)
    sd = ref.state_dict()
    assert {"module.weight_u", "module.weight_v", "module.weight_bar", "module.bias"} == set(sd)
    ours = SaganSpectralNorm(make())
    ours.load_state_dict(sd, strict=True)
    back = OriginalSagan(make())
    back.load_state_dict(ours.state_dict(), strict=True)
    x = make_x()
    y_ref = ref(x)  # SAGAN iterates on every call: one call each, from the same state
    _close(ours(x), y_ref)
    _close(back(x), y_ref)


def test_remove_spectral_norm():
    make, make_x = KINDS["conv2d"]
    m = _trained(spectral_norm(make()), make_x)
    m.eval()
    expected = m.weight.detach().clone()
    x = make_x()
    y = m(x)
    remove_spectral_norm(m)
    assert isinstance(m.weight, nn.Parameter)
    assert not hasattr(m, "weight_u") and not hasattr(m, "weight_orig")
    _close(m.weight, expected)
    _close(m(x), y)
    assert "weight_orig" not in m.state_dict()
    with pytest.raises(ValueError, match="spectral_norm"):
        remove_spectral_norm(m)
    # torch's remover recognises our hook, ours recognises torch's
    torch.nn.utils.remove_spectral_norm(spectral_norm(make()))
    remove_spectral_norm(torch_hook(make()))
    with pytest.raises(RuntimeError, match="two spectral_norm"):
        spectral_norm(torch_hook(make()))


# ------------------------------------------------------------------------------------------------
# Autograd: double backward, D(real) - D(fake)
# ------------------------------------------------------------------------------------------------
def test_hook_gradcheck_float64():
    m = spectral_norm(nn.Linear(5, 4).double())
    m.eval()  # no iteration: the function of (x, weight_orig) is fixed

    def f(x, w):
        return torch.func.functional_call(m, {"weight_orig": w}, (x,))

    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = m.weight_orig.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))


@pytest.mark.parametrize("front", ["hook", "parametrization"])
def test_gradient_penalty_matches_torch(front):
    apply_ours, apply_ref = (spectral_norm, torch_hook) if front == "hook" else (fn_param.spectral_norm, torch_param)
    base = nn.Sequential(nn.Conv2d(2, 4, 3), nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(4 * 4 * 4, 1))

    def build(apply):
        d = copy.deepcopy(base)
        torch.manual_seed(7)
        apply(d[0])
        apply(d[3])
        return d

    ours, ref = build(apply_ours), build(apply_ref)
    x = torch.randn(3, 2, 6, 6)
    results = []
    for d in (ours, ref):
        xi = x.clone().requires_grad_()
        out = d(xi)
        (g,) = torch.autograd.grad(out.sum(), xi, create_graph=True)
        penalty = ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()
        loss = out.mean() + 10 * penalty
        loss.backward()
        results.append([p.grad.clone() for p in d.parameters()])
    assert any(r.abs().max() > 0 for r in results[0])
    for a, b in zip(*results):
        _close(a, b, "gradient-penalty grad")


def _discriminator(apply, seed, large=False):
    torch.manual_seed(seed)
    width = 512 if large else 16  # 512 x 512 fp32 = 1 MiB: the pooled W / sigma buffer path
    d = nn.Sequential(nn.Linear(width, width), nn.LeakyReLU(0.2), nn.Linear(width, 1))
    torch.manual_seed(seed + 1)
    if apply is SaganSpectralNorm:
        return nn.Sequential(apply(d[0]), d[1], apply(d[2]))
    apply(d[0])
    apply(d[2])
    return d


@pytest.mark.parametrize("front", ["hook", "parametrization"])
@pytest.mark.parametrize("large", [False, True])
def test_d_real_minus_d_fake_matches_torch(front, large):
    apply_ours, apply_ref = (spectral_norm, torch_hook) if front == "hook" else (fn_param.spectral_norm, torch_param)
    ours, ref = _discriminator(apply_ours, 0, large), _discriminator(apply_ref, 0, large)
    width = 512 if large else 16
    for _ in range(2):
        real, fake = torch.randn(4, width), torch.randn(4, width)
        for d in (ours, ref):
            loss = d(real).mean() - d(fake).mean()
            loss.backward()
        for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
            _close(a.grad, b.grad, n)
        _zero_grads(ours, ref)


def _sagan_weight(w_bar, u, v, iterations):
    """SAGAN's step as a function: new u, v (constants) and W / sigma."""
    mat = w_bar.reshape(w_bar.shape[0], -1)
    with torch.no_grad():
        for _ in range(iterations):
            v = _l2normalize(torch.mv(mat.t(), u))
            u = _l2normalize(torch.mv(mat, v))
    return w_bar / torch.dot(u, torch.mv(mat, v)), u, v


def test_sagan_d_real_minus_d_fake_uses_each_forwards_u_v():
    layer = SaganSpectralNorm(nn.Linear(6, 3), power_iterations=2)
    w_bar = layer.module.weight_bar.detach().clone().requires_grad_()
    u, v = layer.module.weight_u.detach().clone(), layer.module.weight_v.detach().clone()
    real, fake = torch.randn(5, 6), torch.randn(5, 6)
    (layer(real).mean() - layer(fake).mean()).backward()
    w1, u, v = _sagan_weight(w_bar, u, v, 2)
    w2, u, v = _sagan_weight(w_bar, u, v, 2)
    bias = layer.module.bias.detach()
    (F.linear(real, w1, bias).mean() - F.linear(fake, w2, bias).mean()).backward()
    _close(layer.module.weight_bar.grad, w_bar.grad)
    _close(layer.module.weight_u, u)


# ------------------------------------------------------------------------------------------------
# What torch and SAGAN accept, the front ends accept: eps = 0, complex weights (hook), torch.func
# transforms, spectral norm after another parametrization, SAGAN's u and v made trainable
# ------------------------------------------------------------------------------------------------
def _hook_buffers(m):
    return m.weight_u, m.weight_v


def _param_buffers(m):
    return m.parametrizations.weight[0]._u, m.parametrizations.weight[0]._v


@pytest.mark.parametrize("front", ["hook", "parametrization"])
def test_eps_zero_matches_torch(front):
    torch_fn, ours_fn, bufs = ((torch_hook, spectral_norm, _hook_buffers) if front == "hook"
                               else (torch_param, fn_param.spectral_norm, _param_buffers))
    base = nn.Linear(7, 5)
    torch.manual_seed(3)
    ref = torch_fn(copy.deepcopy(base), eps=0.0)
    torch.manual_seed(3)
    ours = ours_fn(copy.deepcopy(base), eps=0.0)
    with torch.no_grad():
        for a, b in zip(bufs(ours), bufs(ref)):
            a.copy_(b)
    grads = [n for n, _ in ref.named_parameters()]
    steps = list(_run_schedule(ours, ref, lambda: torch.randn(3, 7), lambda m: m.weight, bufs, grads))
    assert [changed for _, changed in steps] == [True, True, False, True]


def test_power_iteration_eps_zero():
    W, u, v = torch.randn(6, 4), torch.randn(6), torch.randn(4)
    sigma, u1, v1 = fastnote.power_iteration(W, u, v, 3, eps=0.0)
    u_ref, v_ref = u.clone(), v.clone()
    for _ in range(3):
        v_ref = F.normalize(W.t() @ u_ref, dim=0, eps=0.0)
        u_ref = F.normalize(W @ v_ref, dim=0, eps=0.0)
    _close(u1, u_ref)
    _close(v1, v_ref)
    _close(sigma, u_ref @ (W @ v_ref))
    # a zero matrix: 0 / 0, NaN, as F.normalize(eps=0) gives
    assert torch.isnan(fastnote.power_iteration(torch.zeros(6, 4), u, v, 1, eps=0.0)[1]).all()


def test_hook_complex_weight_matches_torch():
    # torch's hook iterates with W^T and an unconjugated dot on complex weights (its
    # parametrization with W^H): the hook gives torch's hook's numbers
    base = nn.Linear(5, 4, dtype=torch.cfloat)
    torch.manual_seed(0)
    ref = torch_hook(copy.deepcopy(base))
    torch.manual_seed(0)
    ours = spectral_norm(copy.deepcopy(base))
    x = torch.randn(3, 5, dtype=torch.cfloat)
    for training in SCHEDULE:
        ours.train(training)
        ref.train(training)
        y_ours, y_ref = ours(x), ref(x)
        torch.testing.assert_close(y_ours, y_ref)
        torch.testing.assert_close(ours.weight_u, ref.weight_u)
        y_ours.abs().sum().backward()
        y_ref.abs().sum().backward()
        torch.testing.assert_close(ours.weight_orig.grad, ref.weight_orig.grad)
        _zero_grads(ours, ref)


@pytest.mark.parametrize("front", ["hook", "parametrization"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_func_grad_matches_torch(front, training):
    from torch.func import functional_call, grad

    torch_fn, ours_fn = (torch_hook, spectral_norm) if front == "hook" else (torch_param, fn_param.spectral_norm)
    x = torch.randn(3, 6)
    results = []
    for fn in (torch_fn, ours_fn):
        torch.manual_seed(0)
        m = fn(nn.Linear(6, 4)).train(training)
        params = {k: p.detach().clone() for k, p in m.named_parameters()}
        g = grad(lambda p: functional_call(m, p, (x,)).square().sum())(params)
        results.append((g, [b.clone() for b in m.buffers()]))
    (g_ref, b_ref), (g_ours, b_ours) = results
    assert sorted(g_ours) == sorted(g_ref)
    for k in g_ref:
        _close(g_ours[k], g_ref[k], k)
    for a, b in zip(b_ours, b_ref):
        _close(a, b, "u/v")


def test_power_iteration_under_torch_func():
    from torch.func import grad

    W, u, v = torch.randn(5, 3), F.normalize(torch.randn(5), dim=0), F.normalize(torch.randn(3), dim=0)
    g = grad(lambda w: fastnote.power_iteration(w, u, v, 2)[0])(W)
    _, u2, v2 = fastnote.power_iteration(W, u, v, 2)
    _close(g, torch.outer(u2, v2))  # d sigma / dW = u v^T


def _after_weight_norm(wrap):
    torch.manual_seed(0)
    return nn.Sequential(wrap(nn.utils.parametrizations.weight_norm(nn.Linear(6, 5))), nn.Tanh(),
                         wrap(nn.Linear(5, 2)))


def test_after_weight_norm_matches_torch():
    """Spectral norm registered after weight_norm: the list holds original0/original1, not original."""
    ref = _after_weight_norm(torch_param)
    ours = _after_weight_norm(fn_param.spectral_norm)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 6)
    for training in SCHEDULE:
        for m in (ours, ref):
            m.train(training)
        y_ours, y_ref = ours(x), ref(x)
        _close(y_ours, y_ref, f"training={training}")
        y_ours.square().sum().backward()
        y_ref.square().sum().backward()
        _grads_close(ours, ref, [n for n, _ in ref.named_parameters()])
        _zero_grads(ours, ref)


def test_sagan_trainable_u_v_match_sagan():
    """A loop that sets requires_grad on every parameter (pix2pix's set_requires_grad) gives SAGAN's
    u and v gradients, and its optimiser moves them: the wrapper follows."""
    def model(cls):
        torch.manual_seed(0)
        m = nn.Sequential(cls(nn.Linear(6, 4)), nn.LeakyReLU(0.2), cls(nn.Linear(4, 1)))
        for p in m.parameters():
            p.requires_grad_(True)
        return m

    ref, ours = model(OriginalSagan), model(SaganSpectralNorm)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-2)
    for step in range(3):
        x = torch.randn(8, 6)
        for m, opt in ((ref, opt_ref), (ours, opt_ours)):
            opt.zero_grad()
            m(x).mean().backward()
        assert ours[0].module.weight_u.grad is not None and ours[0].module.weight_v.grad is not None
        _grads_close(ours, ref, [n for n, _ in ref.named_parameters()])
        opt_ref.step()
        opt_ours.step()
        for k, t in ref.state_dict().items():
            _close(ours.state_dict()[k], t, f"step {step}: {k}")


def test_pool_reuses_only_free_buffers():
    m = spectral_norm(nn.Linear(512, 512))
    x = torch.randn(2, 512)
    with torch.no_grad():
        m(x)
        first = m.weight.data_ptr()
        m(x)
        assert m.weight.data_ptr() == first, "free buffer is reused"
        held = m.weight
        held_values = held.clone()
        m(x)
        assert m.weight.data_ptr() != held.data_ptr(), "a buffer someone holds is not overwritten"
        assert torch.equal(held, held_values)
    y = m(x.requires_grad_())  # the graph saves the weight: the next forward must not overwrite it
    saved_ptr, saved_values = m.weight.data_ptr(), m.weight.detach().clone()
    m(x)
    assert m.weight.data_ptr() != saved_ptr
    y.sum().backward()  # would raise (version counter) had the saved weight been overwritten
    assert torch.isfinite(m.weight_orig.grad).all()
    del y
    with torch.no_grad():
        m(x)
    assert not torch.equal(m.weight, saved_values)


# ------------------------------------------------------------------------------------------------
# Fallbacks, compile, DDP
# ------------------------------------------------------------------------------------------------
def test_fallback_without_extension_warns_and_matches(monkeypatch):
    base = nn.Linear(9, 7)
    torch.manual_seed(0)
    ref = torch_hook(copy.deepcopy(base))
    torch.manual_seed(0)
    ours = spectral_norm(copy.deepcopy(base))
    monkeypatch.setattr(pi, "_OP", None)
    monkeypatch.setattr(pi, "_warned", set())
    x = torch.randn(2, 9)
    with pytest.warns(RuntimeWarning, match="fastnote._C is not built"):
        y = ours(x)
    y_ref = ref(x)
    _close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    _close(ours.weight_orig.grad, ref.weight_orig.grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        ours(x)


# Linear, Conv2d and ConvTranspose2d weights: dim=1 is the one that moves an axis
LAYOUTS = [((7, 9), 0), ((6, 4, 3, 3), 0), ((4, 6, 3, 3), 1)]


def _spectral_weight_and_grads(w0, u0, v0, dim, u_first, grad_out):
    """pi.spectral_weight's W / sigma, updated u and v, dL/dW and a second derivative."""
    w = w0.clone().requires_grad_()
    u, v = u0.clone(), v0.clone()
    out = pi.spectral_weight(w, u, v, dim, 2, 1e-12, False, u_first)
    out.backward(grad_out)
    w2 = w0.clone().requires_grad_()
    out2 = pi.spectral_weight(w2, u0.clone(), v0.clone(), dim, 2, 1e-12, False, u_first)
    (g,) = torch.autograd.grad(out2, w2, grad_out, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), w2)
    return out, u, v, w.grad, gg, type(out.grad_fn).__name__


@needs_ext
@pytest.mark.parametrize("python_path", ["op", "torch ops"])
@pytest.mark.parametrize("u_first", [False, True])
@pytest.mark.parametrize("shape,dim", LAYOUTS, ids=[f"{len(s)}d-dim{d}" for s, d in LAYOUTS])
def test_fast_path_matches_python_path(shape, dim, u_first, python_path, monkeypatch):
    # _C.spectral_weight lays the weight out and back with its own C++ as_matrix / from_matrix;
    # the Python path (the op or torch ops, then _DivideBySigma) with pi.as_matrix / _from_matrix.
    w0 = torch.randn(shape)
    h = shape[dim]
    u0 = F.normalize(torch.randn(h), dim=0)
    v0 = F.normalize(torch.randn(w0.numel() // h), dim=0)
    grad_out = torch.randn(shape)
    fast = _spectral_weight_and_grads(w0, u0, v0, dim, u_first, grad_out)
    monkeypatch.setattr(pi, "_PLAIN_TYPES", ())  # what a tensor subclass gets
    if python_path == "torch ops":
        monkeypatch.setenv("FASTNOTE_BACKEND", "reference")  # the path without the extension
        fastnote.backend.refresh()
    slow = _spectral_weight_and_grads(w0, u0, v0, dim, u_first, grad_out)
    assert fast[-1] != "_DivideBySigmaBackward" and slow[-1] == "_DivideBySigmaBackward"
    for name, a, b in zip(("W / sigma", "u", "v", "dL/dW", "second derivative"), fast, slow):
        assert a.shape == b.shape, name
        _close(a, b, name)


def test_import_without_extension_falls_back():
    import subprocess
    import sys

    code = (
        "import sys, warnings, torch\n"
        "sys.modules['fastnote._C'] = None  # as if the extension was never built\n"
        "import fastnote\n"
        "from fastnote.ops import power_iteration as pi\n"
        "assert not pi.extension_available()\n"
        "W, u, v = torch.randn(5, 3), torch.randn(5), torch.randn(3)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    got = fastnote.power_iteration(W, u, v, 2)\n"
        "assert any('fastnote._C is not built' in str(w.message) for w in caught), caught\n"
        "ref = fastnote.reference.power_iteration(W, u, v, 2)\n"
        "assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, ref))\n"
        "m = fastnote.nn.utils.spectral_norm(torch.nn.Linear(3, 4))\n"
        "m(torch.randn(2, 3)).sum().backward()\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_reference_backend_switch(monkeypatch):
    W = torch.randn(11, 6)
    u, v = torch.randn(11), torch.randn(6)
    expected = fastnote.power_iteration(W, u, v, 2)
    monkeypatch.setenv("FASTNOTE_BACKEND", "reference")
    fastnote.backend.refresh()
    assert not pi._use_kernel(W)
    got = fastnote.power_iteration(W, u, v, 2)
    for a, b in zip(got, expected):
        _close(a, b)


@pytest.mark.parametrize("front", ["hook", "parametrization", "sagan"])
def test_torch_compile(front, compile_backend):
    apply = {"hook": spectral_norm, "parametrization": fn_param.spectral_norm, "sagan": SaganSpectralNorm}[front]
    eager = _discriminator(apply, 1)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=compile_backend, fullgraph=True)
    for _ in range(2):
        x = torch.randn(3, 16)
        y_eager, y_comp = eager(x), compiled(x)
        _close(y_comp, y_eager, "compiled output")
        y_eager.sum().backward()
        y_comp.sum().backward()
        for (n, a), (_, b) in zip(compiled_model.named_parameters(), eager.named_parameters()):
            if b.grad is not None:
                _close(a.grad, b.grad, n)
        # the in-place updates of u and v reach the real buffers
        for (n, a), (_, b) in zip(compiled_model.named_buffers(), eager.named_buffers()):
            _close(a, b, n)
        for (n, a), (_, b) in zip(compiled_model.named_parameters(), eager.named_parameters()):
            if not b.requires_grad:
                _close(a, b, n)
        _zero_grads(eager, compiled_model)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_power_iteration_compiles(dynamic, compile_backend):
    # dynamic=True makes the default eps a symbolic float, which the finiteness check must trace
    torch._dynamo.reset()

    @torch.compile(backend=compile_backend, fullgraph=True, dynamic=dynamic)
    def f(W, u, v):
        return fastnote.power_iteration(W, u, v, 2)

    for rows, cols in ((7, 5), (9, 4)):
        W = torch.randn(rows, cols, requires_grad=True)
        u, v = torch.randn(rows), torch.randn(cols)
        got = f(W, u, v)
        expected = reference.power_iteration(W, u, v, 2)
        for a, b in zip(got, expected):
            _close(a, b)
        got[0].backward()
        _close(W.grad, torch.outer(expected[1], expected[2]))


def _ddp_body(rank, world_size, broadcast_buffers):
    from torch.nn.parallel import DistributedDataParallel as DDP

    models = []
    for apply in (spectral_norm, torch_hook):
        d = _discriminator(apply, 11)
        with torch.no_grad():  # ranks start from different u so broadcast_buffers matters
            d[0].weight_u.copy_(F.normalize(torch.randn(16, generator=torch.Generator().manual_seed(rank)), dim=0))
        models.append(DDP(d, broadcast_buffers=broadcast_buffers))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    for step in range(3):
        g = torch.Generator().manual_seed(100 * step + rank)
        real, fake = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
        for m, opt in zip(models, opts):
            opt.zero_grad()
            (m(real).mean() - m(fake).mean()).backward()
            opt.step()
    ours, ref = (m.module for m in models)
    for (n, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4, msg=lambda s: f"rank {rank} {n}: {s}")


@pytest.mark.parametrize("broadcast_buffers", [True, False])
def test_ddp_matches_torch(broadcast_buffers, tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    reports = run_gloo_ranks(functools.partial(_ddp_body, broadcast_buffers=broadcast_buffers), 2,
                             tmp_path / "ddp_store")
    assert reports == ["rank 0: ok", "rank 1: ok"], reports


# ------------------------------------------------------------------------------------------------
# GPU: the CUDA kernel against the CPU kernel
# ------------------------------------------------------------------------------------------------
GPU_SHAPES = [(1, 8192), (64, 48), (128, 1024), (512, 4096), (1536, 13824), (3000, 7)]


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[f"{h}x{w}" for h, w in GPU_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,u_first,add_rule",
                         [(0, False, False), (1, False, False), (3, True, False), (2, False, True)])
def test_cuda_kernel_matches_cpu(shape, dtype, n, u_first, add_rule):
    W = torch.randn(shape, dtype=dtype)
    u = F.normalize(torch.randn(shape[0]), dim=0).to(dtype)
    v = F.normalize(torch.randn(shape[1]), dim=0).to(dtype)
    u_gpu, v_gpu = u.cuda(), v.cuda()
    sigma, _, _ = OP(W.cuda(), u_gpu, v_gpu, n, 1e-12, add_rule, u_first)
    W32, u32, v32 = W.float(), u.float(), v.float()
    sigma_cpu, _, _ = OP(W32, u32, v32, n, 1e-12, add_rule, u_first)
    assert_close(sigma.cpu(), sigma_cpu, "reduction", dtype=dtype)
    assert_close(u_gpu.cpu(), u32, "reduction", dtype=dtype)
    assert_close(v_gpu.cpu(), v32, "reduction", dtype=dtype)


@pytest.mark.gpu
@needs_ext
def test_cuda_module_matches_torch():
    base = nn.Conv2d(64, 128, 4).cuda()
    torch.manual_seed(0)
    ref = torch_hook(copy.deepcopy(base))
    torch.manual_seed(0)
    ours = spectral_norm(copy.deepcopy(base))
    list(_run_schedule(ours, ref, lambda: torch.randn(2, 64, 8, 8, device="cuda"), lambda m: m.weight,
                       lambda m: (m.weight_u, m.weight_v), [n for n, _ in ref.named_parameters()]))


@pytest.mark.gpu
def test_extension_built_with_cuda():
    # setup.py falls back to a C++-only build when the CUDA part fails to compile; on a GPU machine
    # that would leave the CUDA kernel untested behind the torch-ops fallback, so say it here.
    from fastnote import _C

    assert _C.with_cuda, ("fastnote._C was built without CUDA (see the pip install log): the CUDA power "
                          "iteration is not what runs on CUDA tensors")
