"""fastnote.patch / unpatch on small models built from the published code of each family (SE,
h-swish + SE, Swin and timm window attention, torchvision's ShiftedWindowAttention, SAGAN
attention, the three spectral norms): what is replaced or left and why, that outputs, gradients
and training state stay the same. Real timm / torchvision
models: tests/test_models.py."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import fastnote
from fastnote.testing import assert_close, rms_relative_error
from test_spectral_norm import OriginalSagan
from transcriptions import SwinWindowAttention, TimmWindowAttention
from transcriptions import BigGANAttention, Self_Attn, TorchvisionSqueezeExcitation



class SqueezeExcitation(TorchvisionSqueezeExcitation):
    """Same name as torchvision's class."""


class SELayer(nn.Module):
    """A user's SE with timm's names under another class name: recognised by structure."""

    def __init__(self, c, r):
        super().__init__()
        self.conv_reduce, self.act1 = nn.Conv2d(c, r, 1), nn.ReLU(inplace=True)
        self.conv_expand, self.gate = nn.Conv2d(r, c, 1), nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True)))))


class OwnSigmoid(nn.Module):
    """A library's own sigmoid class (as timm's ``Sigmoid``, which RegNetY's SE gates with), in place."""

    def __init__(self, inplace=True):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return x.sigmoid_() if self.inplace else x.sigmoid()


class OwnTanh(OwnSigmoid):
    def forward(self, x):
        return torch.tanh(x)


class NotSE(SELayer):
    """SE-shaped, but its forward adds instead of gating: must be left."""

    def forward(self, x):
        return x + self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))


SN = "torch.nn.utils.spectral_norm -> fastnote.nn.utils.spectral_norm"


def _block():
    # an SE (a module swap) and torch's spectral norm (a hook swap) are replaced; the standalone
    # h-swish / h-sigmoid are torch's own ops in fastnote too: left as they are, not reported
    return nn.Sequential(
        nn.Conv2d(8, 16, 1), nn.Hardswish(),
        nn.Sequential(SqueezeExcitation(16, 8, scale_activation=nn.Hardsigmoid)),
        nn.utils.spectral_norm(nn.Conv2d(16, 8, 1)), nn.Hardsigmoid(), nn.ReLU(),
    )


def _same_forward_backward(eager, patched, x, kind="reduction", outputs=lambda y: y):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = outputs(eager(xa)), outputs(patched(xb))
    assert_close(yb, ya, kind)
    g = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, [xa] + list(eager.parameters()), g, allow_unused=True)
    gb = torch.autograd.grad(yb, [xb] + list(patched.parameters()), g, allow_unused=True)
    for a, b in zip(gb, ga):
        if a is None or b is None:
            assert a is None and b is None
        else:
            assert_close(a, b, kind)


def _twins(make, device):
    eager = make().to(device)
    patched = copy.deepcopy(eager)
    return eager, patched


# ------------------------------------------------------------------------------------------------
# Report, include, expect
# ------------------------------------------------------------------------------------------------

def test_patch_replaces_and_preserves_numbers(device):
    eager, patched = _twins(_block, device)
    keys = list(eager.state_dict())
    activations = patched[1], patched[4]
    report = fastnote.patch(patched)
    assert report == [
        "2.0: SqueezeExcitation -> fastnote.nn.SqueezeExcitation",
        f"3.weight: {SN}",
    ]
    assert len(report) == 2 and report[1].startswith("3.weight:") and report.left == []
    # standalone h-swish / h-sigmoid: the very same torch modules, neither replaced nor left
    assert (patched[1], patched[4]) == activations
    assert type(patched[1]) is nn.Hardswish and type(patched[4]) is nn.Hardsigmoid
    _same_forward_backward(eager, patched, torch.randn(2, 8, 5, 5, device=device))
    assert list(patched.state_dict()) == keys
    assert fastnote.patch(patched) == []  # idempotent


def test_report_prints_replaced_and_left():
    model = nn.Sequential(nn.Hardswish(), nn.utils.spectral_norm(nn.Conv2d(16, 16, 1)),
                          nn.utils.spectral_norm(nn.Conv2d(16, 16, 1)), nn.Hardsigmoid(),
                          SqueezeExcitation(16, 4, activation=nn.GELU))
    report = fastnote.patch(model)
    text = str(report)
    assert text.splitlines()[0] == "fastnote.patch: 2 replaced, 1 left"
    assert f"2 x {SN}  (1.weight, 2.weight)" in text
    assert "left 1 x SqueezeExcitation (4): unsupported activation or gate" in text
    assert [(e.path, e.kind) for e in report.left] == [("4", "SqueezeExcitation")]
    assert report.counts() == {SN: 2}
    assert repr(report) == "PatchReport(replaced=2, left=1)"
    # the standalone h-swish and h-sigmoid are neither replaced nor left
    assert [e.path for e in report.replaced + report.left] == ["1.weight", "2.weight", "4"]
    assert "x Hardswish" not in text and "Hardsigmoid" not in text
    assert type(model[0]) is nn.Hardswish and type(model[3]) is nn.Hardsigmoid


def test_patch_expect_and_include_errors():
    def sn_conv():
        return nn.utils.spectral_norm(nn.Conv2d(4, 4, 1))

    model = nn.Sequential(sn_conv())
    hook = model[0]._forward_pre_hooks.copy()
    with pytest.raises(RuntimeError, match=r"expected to replace 3 modules, found 1 \(the model is left unpatched\)"):
        fastnote.patch(model, expect=3)
    assert model[0]._forward_pre_hooks == hook and fastnote.unpatch(model) == []   # left as it was
    assert len(fastnote.patch(nn.Sequential(sn_conv()), expect=1)) == 1
    # standalone h-swish / h-sigmoid are not replaced: they do not count
    with pytest.raises(RuntimeError, match="expected to replace 1 modules, found 0"):
        fastnote.patch(nn.Sequential(nn.Hardswish(), nn.Hardsigmoid()), expect=1)
    with pytest.raises(ValueError, match=r"include must name families among \[.*'SqueezeExcitation'.*got \['Conv2d'\]"):
        fastnote.patch(nn.Sequential(), include=["Conv2d"])
    # ... and are no family any more
    for gone in ("Hardswish", "Hardsigmoid"):
        with pytest.raises(ValueError, match=rf"include must name families among \[.*got \['{gone}'\]"):
            fastnote.patch(nn.Sequential(nn.Hardswish()), include=[gone])
    with pytest.raises(TypeError, match="include must be a list of family names"):
        fastnote.patch(nn.Sequential(), include="SqueezeExcitation")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got int"):
        fastnote.patch(3)
    with pytest.raises(TypeError, match="expect must be an int or None, got str"):
        fastnote.patch(nn.Sequential(), expect="1")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastnote.unpatch(None)


def test_include_limits_the_families(device):
    model = nn.Sequential(SqueezeExcitation(16, 4, scale_activation=nn.Hardsigmoid),
                          nn.utils.spectral_norm(nn.Conv2d(16, 16, 1))).to(device)
    ref = copy.deepcopy(model)
    report = fastnote.patch(model, include=["SqueezeExcitation"])
    assert report == ["0: SqueezeExcitation -> fastnote.nn.SqueezeExcitation"] and report.left == []
    x = torch.randn(2, 16, 3, 3, device=device)
    assert_close(model[0](x), ref[0](x), "reduction")
    # the spectral norm was left to its own family: still torch's, replaced when that one is included
    report = fastnote.patch(model, include=["spectral_norm"])
    assert report == [f"1.weight: {SN}"]


@pytest.mark.no_kernel
def test_patch_keeps_objects_mode_and_random_state(device):
    for se_training in (False, True):    # the replaced SE keeps its own mode, either way
        model = _block().to(device).train()
        model[2].train(se_training)
        params = {n: p for n, p in model.named_parameters()}
        rng = torch.random.get_rng_state()
        assert len(fastnote.patch(model)) == 2
        assert torch.equal(rng, torch.random.get_rng_state()), "patch drew from the global generator"
        for n, p in model.named_parameters():
            assert p is params[n], n          # the same Parameter objects: optimisers keep working
            assert p.device.type == device.type
        assert type(model[2][0]) is fastnote.nn.SqueezeExcitation
        assert model.training and model[2][0].training == se_training and model[3].training


# ------------------------------------------------------------------------------------------------
# Squeeze-excitation by structure, h-swish + SE fusion
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,new", [
    pytest.param(lambda: SqueezeExcitation(24, 8, scale_activation=nn.Hardsigmoid), "fastnote.nn.SqueezeExcitation",
                 id="torchvision-names"),
    pytest.param(lambda: SELayer(24, 8), "fastnote.nn.SqueezeExcite", id="timm-names-user-class"),
    # the gate's class is none of torch's, but computes the sigmoid: recognised by what it computes
    pytest.param(lambda: SqueezeExcitation(24, 8, scale_activation=OwnSigmoid), "fastnote.nn.SqueezeExcitation",
                 id="own-sigmoid-class"),
])
def test_se_recognised_by_structure(make, new, device):
    eager, patched = _twins(lambda: nn.Sequential(nn.ReLU(), make()), device)
    keys = list(eager.state_dict())
    report = fastnote.patch(patched)
    assert list(report) == [f"1: {type(eager[1]).__name__} -> {new}"]
    assert list(patched.state_dict()) == keys
    _same_forward_backward(eager, patched, torch.randn(2, 24, 5, 3, device=device))


@pytest.mark.no_kernel
@pytest.mark.parametrize("module,reason", [
    pytest.param(SqueezeExcitation(16, 4, activation=nn.GELU), "unsupported activation or gate", id="gelu"),
    pytest.param(SqueezeExcitation(16, 4, scale_activation=OwnTanh), "unsupported activation or gate", id="own-tanh"),
    pytest.param(NotSE(16, 4), "its forward is not x * gate", id="additive-forward"),
])
def test_se_candidates_left_with_reason(module, reason, device):
    model = nn.Sequential(nn.ReLU(), module).to(device)
    report = fastnote.patch(model)
    assert type(model[1]) is type(module) and not [r for r in report if r.startswith("1:")]
    assert len(report.left) == 1 and reason in report.left[0].reason


def test_hswish_feeding_se_is_fused(device):
    def make():
        return nn.Sequential(
            nn.Sequential(nn.Conv2d(8, 24, 3, padding=1, groups=8), nn.BatchNorm2d(24), nn.Hardswish()),
            SqueezeExcitation(24, 8, scale_activation=nn.Hardsigmoid),
            nn.Hardswish(), SELayer(24, 8), nn.Conv2d(24, 8, 1), nn.Hardswish())

    eager, patched = _twins(make, device)
    keys = list(eager.state_dict())
    report = fastnote.patch(patched)
    assert list(report) == [
        "0.2: Hardswish -> torch.nn.Identity",
        "1: SqueezeExcitation -> fastnote.nn.HardswishSqueezeExcitation",
        "2: Hardswish -> torch.nn.Identity",
        "3: SELayer -> fastnote.nn.SqueezeExcite",
    ]
    assert report.left == []
    assert type(patched[0][2]) is nn.Identity and type(patched[2]) is nn.Identity
    assert patched[3].hardswish_input
    assert type(patched[5]) is nn.Hardswish     # the last h-swish feeds no SE: torch's, unreported
    assert list(patched.state_dict()) == keys
    for mode in (False, True):
        eager.train(mode)
        patched.train(mode)
        _same_forward_backward(eager, patched, torch.randn(2, 8, 5, 6, device=device))
    fastnote.unpatch(patched)
    assert [type(m) for m in patched.modules()] == [type(m) for m in eager.modules()]


@pytest.mark.no_kernel
def test_hswish_se_outside_a_sequential_is_left_with_reason():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.act, self.aa, self.se = nn.Hardswish(), nn.Identity(), SELayer(16, 4)

        def forward(self, x):
            return self.se(self.aa(self.act(x)))

    model = Block()
    act = model.act
    report = fastnote.patch(model)
    assert list(report) == ["se: SELayer -> fastnote.nn.SqueezeExcite"]    # the SE alone
    assert not model.se.hardswish_input
    assert model.act is act and type(act) is nn.Hardswish                   # the h-swish stays torch's
    assert [(e.path, e.kind) for e in report.left] == [("se", "hswish_se")]
    assert "not in a Sequential" in report.left[0].reason
    assert report.left[0].reason.endswith("so only the SE is replaced (the h-swish stays torch's)")


# ------------------------------------------------------------------------------------------------
# Window attention: the original Swin code, timm, torchvision
# ------------------------------------------------------------------------------------------------

class _SwinHolder(nn.Module):
    def __init__(self, cls, **kw):
        super().__init__()
        self.attn = cls(32, (4, 4), 2, **kw)
        self.mask = None  # a plain attribute, not state
        with torch.no_grad():
            self.attn.relative_position_bias_table.normal_()

    def forward(self, x):
        return self.attn(x, mask=self.mask)


@pytest.mark.parametrize("cls,new", [
    pytest.param(SwinWindowAttention, "fastnote.nn.WindowAttention", id="swin-original"),
    pytest.param(TimmWindowAttention, "fastnote.nn.timm_swin.TimmWindowAttention", id="timm-layout"),
])
def test_window_attention_core(cls, new, device):
    eager, patched = _twins(lambda: _SwinHolder(cls), device)
    keys = list(eager.state_dict())
    assert ("attn.relative_position_index" in keys) == cls.persistent_index
    report = fastnote.patch(patched)
    assert list(report) == [f"attn: {cls.__name__} -> {new}"]
    assert "core op" in report.replaced[0].note
    assert list(patched.state_dict()) == keys
    _same_forward_backward(eager, patched, torch.randn(4, 16, 32, device=device), "two_matmul")
    eager.mask = patched.mask = torch.where(torch.rand(2, 16, 16) < 0.3, -100.0, 0.0).to(device)
    _same_forward_backward(eager, patched, torch.randn(4, 16, 32, device=device), "two_matmul")


def test_timm_window_attention_module(device):
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    eager, patched = _twins(lambda: nn.Sequential(timm_swin.WindowAttention(32, 2, window_size=(4, 4))), device)
    report = fastnote.patch(patched)
    assert list(report) == ["0: WindowAttention -> fastnote.nn.timm_swin.TimmWindowAttention"]
    assert list(patched.state_dict()) == list(eager.state_dict())
    _same_forward_backward(eager, patched, torch.randn(3, 16, 32, device=device), "two_matmul")


@pytest.mark.no_kernel
def test_window_attention_dropout_left_with_reason():
    model = _SwinHolder(SwinWindowAttention, attn_drop=0.1)
    report = fastnote.patch(model)
    assert list(report) == []
    assert report.left[0].path == "attn" and "attention dropout p=0.1" in report.left[0].reason


@pytest.mark.parametrize("H,W,shift", [pytest.param(9, 10, 3, id="9x10-shift3"),
                                       pytest.param(7, 7, 3, id="7x7-one-window-shift-dropped")])
def test_torchvision_shifted_window_attention(device, H, W, shift):
    swin = pytest.importorskip("torchvision.models.swin_transformer")

    def make():
        m = nn.Sequential(swin.ShiftedWindowAttention(32, [7, 7], [shift, shift], 2))
        with torch.no_grad():
            m[0].relative_position_bias_table.normal_()
        return m

    eager, patched = _twins(make, device)
    report = fastnote.patch(patched)
    assert list(report) == ["0: ShiftedWindowAttention -> "
                            "fastnote.nn.torchvision_swin.TorchvisionShiftedWindowAttention"]
    sd = patched.state_dict()
    assert list(sd) == list(eager.state_dict()) and sd["0.relative_position_index"].shape == (49 * 49,)
    _same_forward_backward(eager, patched, torch.randn(1, H, W, 32, device=device), "two_matmul")


@pytest.mark.no_kernel
def test_torchvision_attention_dropout_and_unequal_shift_left():
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    model = nn.Sequential(swin.ShiftedWindowAttention(32, [7, 7], [3, 3], 2, attention_dropout=0.1),
                          swin.ShiftedWindowAttention(32, [7, 7], [3, 0], 2))
    report = fastnote.patch(model)
    assert list(report) == []
    assert [e.path for e in report.left] == ["0", "1"]
    assert "attention dropout" in report.left[0].reason and "unequal shifts" in report.left[1].reason


# ------------------------------------------------------------------------------------------------
# SAGAN attention
# ------------------------------------------------------------------------------------------------

def test_sagan_self_attn_keeps_return_convention(device):
    def make():
        m = nn.Sequential(Self_Attn(32, "relu"))
        with torch.no_grad():
            m[0].gamma.fill_(0.8)
        return m

    eager, patched = _twins(make, device)
    report = fastnote.patch(patched)
    assert list(report) == ["0: Self_Attn -> fastnote.nn.SelfAttention"]
    assert list(patched.state_dict()) == list(eager.state_dict())
    x = torch.randn(2, 32, 5, 4, device=device)
    out, attn = patched(x)
    ref_out, ref_attn = eager(x)
    assert_close(attn, ref_attn, "two_matmul")
    _same_forward_backward(eager, patched, x, "two_matmul", outputs=lambda y: y[0])


def test_gradient_penalty_through_a_patched_discriminator(device):
    """R1 (the squared norm of D's input gradient, differentiated again): through the patched
    attention it raises, as the README says (the kernels have no double backward); patching only
    the spectral norms keeps the penalty and its gradients equal to eager's."""
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(3, 16, 3, padding=1)), nn.LeakyReLU(0.2),
                          Self_Attn(16, "relu"), nn.utils.spectral_norm(nn.Conv2d(16, 1, 4)))
        with torch.no_grad():
            m[2].gamma.fill_(0.5)
        return m

    def penalty(model, x):
        x = x.clone().requires_grad_()
        y = model[3](model[2](model[1](model[0](x)))[0])
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        r1 = g.pow(2).sum()
        # allow_unused: the last conv's bias does not reach the input gradient
        return r1, torch.autograd.grad(r1, [p for p in model.parameters() if p.requires_grad], allow_unused=True)

    x = torch.randn(2, 3, 4, 4, device=device)
    eager, patched = _twins(make, device)
    fastnote.patch(patched, expect=3)
    patched.eval(), eager.eval()     # the power iteration's u and v stay put between the runs
    with pytest.raises(RuntimeError, match="autograd formula"):
        penalty(patched, x)
    eager, patched = _twins(make, device)
    eager.eval(), patched.eval()
    assert len(fastnote.patch(patched, include=["spectral_norm"])) == 2
    # second derivatives of a random discriminator reach 1e8: each fp32 result is judged against
    # the eager model run in float64, no further from it than 4x eager fp32 (as tests/test_models.py)
    truth = copy.deepcopy(eager).double()
    results = [penalty(m, x.to(dtype)) for m, dtype in ((eager, torch.float32), (patched, torch.float32),
                                                        (truth, torch.float64))]
    (want, want_grads), (got, got_grads), (exact, exact_grads) = results
    assert [g is None for g in got_grads] == [g is None for g in want_grads] == [g is None for g in exact_grads]
    floor = 64 * 2.0 ** -24
    assert rms_relative_error(got, exact) <= 4 * rms_relative_error(want, exact) + floor
    for i, (a, b, e) in enumerate(zip(got_grads, want_grads, exact_grads)):
        if e is not None:
            err, eager_err = rms_relative_error(a, e), rms_relative_error(b, e)
            assert err <= 4 * eager_err + floor, f"parameter {i}: {err:.3g} against eager's {eager_err:.3g}"


@pytest.mark.autocast
def test_sagan_self_attn_under_autocast_like_eager(device):
    """Under bf16 autocast with an fp32 input (a residual stream kept in fp32), SAGAN's block
    returns fp32 (``gamma * out + x`` with its fp32 [1] gamma); the patched block must too, and
    be no further from a float64 run than eager is, in its output and in x's gradient. (A result
    rounded to bf16 was measured 8x further than eager's in the output and 3.6x in x's gradient.)"""
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(Self_Attn(32, "relu"))
        with torch.no_grad():
            m[0].gamma.fill_(0.3)
        return m

    eager, patched = _twins(make, device)
    fastnote.patch(patched, expect=1)
    truth = copy.deepcopy(eager).double()
    x = torch.randn(2, 32, 6, 5, device=device)
    g = torch.randn(2, 32, 6, 5, device=device)

    def run(model, dtype, amp):
        xx = x.to(dtype).clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            y = model(xx)[0]
        y.backward(g.to(y.dtype))
        return y.detach(), xx.grad

    y64, dx64 = run(truth, torch.float64, False)
    ye, dxe = run(eager, torch.float32, True)
    yf, dxf = run(patched, torch.float32, True)
    assert yf.dtype == ye.dtype == torch.float32 and dxf.dtype == torch.float32
    for name, fast, slow, want in (("output", yf, ye, y64), ("x's gradient", dxf, dxe, dx64)):
        own, eager_error = rms_relative_error(fast, want), rms_relative_error(slow, want)
        assert own <= 2 * eager_error, f"{name}: fastnote off float64 by {own:.3g}, eager by {eager_error:.3g}"


@pytest.mark.no_kernel
def test_sagan_shaped_but_other_widths_or_return_left():
    class WideQK(Self_Attn):
        def __init__(self, c):
            super().__init__(c)
            self.query_conv, self.key_conv = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c, c // 2, 1)

    class OutOnly(Self_Attn):
        def forward(self, x):
            return super().forward(x)[0]

    report = fastnote.patch(nn.Sequential(WideQK(32), OutOnly(32)))
    assert list(report) == []
    assert "C // 8" in report.left[0].reason and "does not return (out, attention)" in report.left[1].reason


@pytest.mark.parametrize("which_conv", ["spectral-norm conv", "nn.Conv2d"])
def test_biggan_attention(which_conv, device):
    """BigGAN's non-local block (pooled keys and values, the o conv after the attention), with
    BigGAN's own spectral-norm conv, whose power iteration keeps running inside the patched block."""
    def make():
        torch.manual_seed(0)
        kwargs = {} if which_conv == "spectral-norm conv" else {"which_conv": nn.Conv2d}
        m = nn.Sequential(BigGANAttention(32, **kwargs))
        with torch.no_grad():
            m[0].gamma.fill_(0.8)
        return m

    eager, patched = _twins(make, device)
    report = fastnote.patch(patched)
    assert list(report) == ["0: BigGANAttention -> fastnote.nn.BigGANAttention"]
    assert list(patched.state_dict()) == list(eager.state_dict())
    assert patched[0].theta is not eager[0].theta and type(patched[0].theta) is type(eager[0].theta)
    x = torch.randn(2, 32, 8, 6, device=device)
    _same_forward_backward(eager, patched, x, "two_matmul")   # training mode: u0/sv0 updated in both
    for key, value in eager.state_dict().items():
        assert_close(patched.state_dict()[key], value, "two_matmul", msg=key)
    eager.eval(), patched.eval()
    _same_forward_backward(eager, patched, x, "two_matmul")
    fastnote.unpatch(patched)
    assert type(patched[0]) is BigGANAttention


@pytest.mark.no_kernel
def test_biggan_shaped_but_other_widths_or_forward_left():
    class WideTheta(BigGANAttention):
        def __init__(self, c):
            super().__init__(c, which_conv=nn.Conv2d)
            self.theta, self.phi = nn.Conv2d(c, c // 4, 1, bias=False), nn.Conv2d(c, c // 4, 1, bias=False)

    class Unpooled(BigGANAttention):
        def forward(self, x, y=None):
            b, c, h, w = x.shape
            beta = torch.softmax(torch.bmm(self.theta(x).flatten(2).transpose(1, 2), self.phi(x).flatten(2)), -1)
            return self.gamma * self.o(torch.bmm(self.g(x).flatten(2), beta.transpose(1, 2)).view(b, c // 2, h, w)) + x

    report = fastnote.patch(nn.Sequential(WideTheta(32), Unpooled(32, which_conv=nn.Conv2d)))
    assert list(report) == []
    assert "C // 8" in report.left[0].reason and "pooled" in report.left[1].reason


# ------------------------------------------------------------------------------------------------
# Spectral norm: training continues exactly
# ------------------------------------------------------------------------------------------------

SN_FRONTS = {
    "hook": (lambda m: torch.nn.utils.spectral_norm(m), "0.weight: torch.nn.utils.spectral_norm -> "
             "fastnote.nn.utils.spectral_norm", ("0.weight_u", "0.weight_v")),
    "parametrization": (lambda m: torch.nn.utils.parametrizations.spectral_norm(m),
                        "0.parametrizations.weight.0: torch.nn.utils.parametrizations.spectral_norm -> "
                        "fastnote.nn.utils.parametrizations.spectral_norm",
                        ("0.parametrizations.weight.0._u", "0.parametrizations.weight.0._v")),
    "sagan": (lambda m: OriginalSagan(m), "0: OriginalSagan -> fastnote.nn.SpectralNorm",
              ("0.module.weight_u", "0.module.weight_v")),
}


@pytest.mark.no_kernel
@pytest.mark.parametrize("front", list(SN_FRONTS))
def test_spectral_norm_training_continues_exactly(front, device):
    wrap, line, uv = SN_FRONTS[front]
    torch.manual_seed(0)
    eager = nn.Sequential(wrap(nn.Conv2d(3, 8, 3)), nn.LeakyReLU(0.1)).to(device)
    x = torch.randn(2, 3, 6, 6, device=device)
    with torch.no_grad():
        eager(x)  # an iteration before patching (no graph kept, so the model deep-copies)
    patched = copy.deepcopy(eager)
    keys = list(eager.state_dict())
    report = fastnote.patch(patched)
    assert list(report) == [line]
    assert list(patched.state_dict()) == keys
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_p = torch.optim.SGD(patched.parameters(), lr=0.1)
    for step in range(3):
        for model, opt in ((eager, opt_e), (patched, opt_p)):
            model.train(step != 1)            # eval in between: no iteration for torch's, one for SAGAN's
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        se, sp = eager.state_dict(), patched.state_dict()
        for k in keys:
            assert_close(sp[k], se[k], "reduction", msg=f"step {step}: {k}")
    for k in uv:
        assert_close(patched.state_dict()[k], eager.state_dict()[k], "reduction", msg=k)
    # unpatch: torch's (or SAGAN's) code runs again, from the state reached
    fastnote.unpatch(patched)
    assert [type(m) for m in patched.modules()] == [type(m) for m in eager.modules()]
    for model in (eager, patched):
        model.train()
    assert_close(patched(x), eager(x), "reduction")


def _train_alike(eager, patched, x, steps=3):
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_p = torch.optim.SGD(patched.parameters(), lr=0.1)
    for step in range(steps):
        for model, opt in ((eager, opt_e), (patched, opt_p)):
            model.train(step != 1)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        se, sp = eager.state_dict(), patched.state_dict()
        assert list(sp) == list(se)
        for k in se:
            assert_close(sp[k], se[k], "reduction", msg=f"step {step}: {k}")


@pytest.mark.no_kernel
def test_spectral_norm_settings_torch_accepts():
    """eps = 0 and spectral norm after weight_norm (the parametrization list then holds original0
    and original1) are replaced and train as torch's; a negative eps is left with the reason."""
    P = torch.nn.utils.parametrizations
    torch.manual_seed(0)
    eager = nn.Sequential(nn.utils.spectral_norm(nn.Linear(6, 5), eps=0.0), nn.Tanh(),
                          P.spectral_norm(P.weight_norm(nn.Linear(5, 4)), eps=0.0), nn.Tanh(),
                          nn.utils.spectral_norm(nn.Linear(4, 2), eps=-1.0))
    patched = copy.deepcopy(eager)
    u_before = patched[2].parametrizations.weight[1]._u
    report = fastnote.patch(patched)
    assert list(report) == [
        "0.weight: torch.nn.utils.spectral_norm -> fastnote.nn.utils.spectral_norm",
        "2.parametrizations.weight.1: torch.nn.utils.parametrizations.spectral_norm -> "
        "fastnote.nn.utils.parametrizations.spectral_norm"]
    assert [(e.path, e.kind) for e in report.left] == [("4.weight", "spectral_norm")]
    assert "eps=-1.0" in report.left[0].reason
    assert patched[2].parametrizations.weight[1]._u is u_before, "the same u tensor, nothing drawn"
    _train_alike(eager, patched, torch.randn(3, 6))


# ------------------------------------------------------------------------------------------------
# unpatch, checkpoints, compile
# ------------------------------------------------------------------------------------------------

def test_unpatch_keeps_what_was_learned(device):
    eager, patched = _twins(_block, device)
    originals = [type(m) for m in patched.modules()]
    fastnote.patch(patched)
    opt = torch.optim.SGD(patched.parameters(), lr=0.5)
    x = torch.randn(2, 8, 4, 4, device=device)
    patched(x).sum().backward()
    opt.step()
    learned = {k: v.clone() for k, v in patched.state_dict().items()}
    restored = fastnote.unpatch(patched)
    assert restored == ["2.0: fastnote.nn.SqueezeExcitation -> SqueezeExcitation",
                        "3.weight: fastnote.nn.utils.spectral_norm -> torch.nn.utils.spectral_norm"]
    assert [type(m) for m in patched.modules()] == originals
    for k, v in patched.state_dict().items():
        assert torch.equal(v, learned[k]), k
    assert fastnote.unpatch(patched) == []


@pytest.mark.no_kernel
def test_unpatch_adopts_buffers_replaced_since_patching():
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    model = nn.Sequential(swin.ShiftedWindowAttention(32, [4, 4], [2, 2], 2))
    original = model[0]
    fastnote.patch(model)
    model.double()                           # replaces the index buffer (and casts the parameters)
    index = model[0].relative_position_index
    fastnote.unpatch(model)
    assert model[0] is original
    assert model[0].relative_position_index is index and model[0].qkv.weight.dtype == torch.float64


def _timm_swin_blocks(model):
    return [m for m in model.modules() if type(m).__name__ in ("SwinTransformerBlock", "FusedSwinTransformerBlock")]


def test_timm_swin_set_input_size_on_a_replaced_core(device, launches):
    """A 64 x 32 image leaves one block (shifts (2, 0)) with its attention core replaced; timm's
    set_input_size then calls the core's set_window_size, which resizes the bias table with timm's
    own interpolation: the model matches timm's at the new size."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    eager, patched = _twins(lambda: timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=(64, 32), window_size=4, num_classes=4,
        embed_dim=16, depths=(2, 2), num_heads=(1, 2)).eval(), device)
    report = fastnote.patch(patched)
    assert [e.path for e in report.replaced][-1] == "layers.1.blocks.1.attn"
    core = patched.layers[1].blocks[1].attn
    assert type(core).__name__ == "TimmWindowAttention"
    for model in (eager, patched):
        model.set_input_size(img_size=(48, 48), window_size=6)
    twin = eager.layers[1].blocks[1].attn
    assert core.window_size == twin.window_size == (6, 6)
    assert core.relative_position_bias_table.shape == twin.relative_position_bias_table.shape == (121, 2)
    torch.testing.assert_close(core.relative_position_bias_table, twin.relative_position_bias_table, rtol=0, atol=0)
    assert torch.equal(core.relative_position_index, twin.relative_position_index)
    x = torch.randn(1, 3, 48, 48, device=device)
    launches.clear()
    with torch.no_grad():
        assert_close(patched(x), eager(x), "reduction")
    assert launches


@pytest.mark.parametrize("window_size", [pytest.param(4, id="shifts-0-2"),
                                         pytest.param(None, id="window-4x6", marks=pytest.mark.no_kernel)])
def test_timm_swin_set_input_size_to_unequal_geometry(window_size, device, launches):
    """Blocks fused at square windows and equal shifts, then set_input_size to 32 x 48: stage 2's
    4 x 6 map gives shifts (0, 2) with window 4, or a 4 x 6 window when the window follows the map.
    Those blocks run timm's own _attn (the fused kernels take one window side and one shift), the
    square ones stay fused, and the model matches timm's at the new size, forward and every gradient."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    eager, patched = _twins(lambda: timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4, num_classes=3,
        embed_dim=16, depths=(2, 2), num_heads=(1, 2), drop_path_rate=0.0), device)
    assert fastnote.patch(patched).counts() == {
        "SwinTransformerBlock -> fastnote.nn.timm_swin.FusedSwinTransformerBlock": 4}
    for model in (eager, patched):
        model.set_input_size(img_size=(32, 48), window_size=window_size)
    blocks = _timm_swin_blocks(patched)
    square = [b.window_size[0] == b.window_size[1] and b.shift_size[0] == b.shift_size[1] for b in blocks]
    assert not all(square) and (any(square) == (window_size == 4))
    x = torch.randn(2, 3, 32, 48, device=device)
    launches.clear()
    out = patched(x)
    assert {name for _, name, _ in launches} == ({"_fwd_kernel"} if any(square) else set())
    want = eager(x)
    assert_close(out, want, "reduction")
    grad = torch.randn_like(want)
    got = torch.autograd.grad(out, list(patched.parameters()), grad)
    expected = torch.autograd.grad(want, list(eager.parameters()), grad)
    for (name, _), g, e in zip(patched.named_parameters(), got, expected):
        assert_close(g, e, "reduction", msg=name)


@pytest.mark.no_kernel
@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"], ids=["v1", "v2"])
def test_timm_swin_in_float64(name, device, launches):
    """A patched model cast with .double() (for gradcheck or a float64 check) runs: float64 takes
    fastnote.reference, and the model matches timm's own in float64, forward and every gradient."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    eager, patched = _twins(lambda: timm.create_model(
        name, pretrained=False, img_size=32, window_size=4, num_classes=3, embed_dim=16, depths=(2, 2),
        num_heads=(1, 2), drop_path_rate=0.0), device)
    assert len(fastnote.patch(patched).replaced) == 4
    eager.double()
    patched.double()
    x = torch.randn(2, 3, 32, 32, device=device, dtype=torch.float64)
    launches.clear()
    out, want = patched(x), eager(x)
    assert launches == [] and out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(want)
    got = torch.autograd.grad(out, list(patched.parameters()), grad)
    expected = torch.autograd.grad(want, list(eager.parameters()), grad)
    for (param, _), g, e in zip(patched.named_parameters(), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=param)


def test_timm_swin_unpatch_after_set_input_size(device, tmp_path):
    """A timm Swin block is patched in place (its class switched, no copy), so timm's
    set_input_size after patching changes the very block unpatch gives back: the restored model is
    timm's own after the same set_input_size, plain attributes (resolution, window, shift) included."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    eager, patched = _twins(lambda: timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, num_classes=4, embed_dim=16, depths=(2, 2),
        num_heads=(1, 2)).eval(), device)
    blocks = _timm_swin_blocks(patched)
    timm_block = type(blocks[0])
    assert len(blocks) == 4 and timm_block.__module__.startswith("timm.")
    keys = list(patched.state_dict())
    report = fastnote.patch(patched)
    assert report.counts() == {"SwinTransformerBlock -> fastnote.nn.timm_swin.FusedSwinTransformerBlock": 4}
    fused = _timm_swin_blocks(patched)
    assert all(a is b for a, b in zip(fused, blocks)) and len(fused) == len(blocks)
    assert all(type(b).__name__ == "FusedSwinTransformerBlock" and isinstance(b, timm_block) for b in blocks)
    assert list(patched.state_dict()) == keys
    for model in (eager, patched):
        model.set_input_size(img_size=(48, 48), window_size=6)
    x = torch.randn(1, 3, 48, 48, device=device)
    with torch.no_grad():
        want = eager(x)
        assert_close(patched(x), want, "reduction")
    # a patched model saves and loads whole (the fused class resolves by name), and unpatches there too
    torch.save(patched, tmp_path / "patched.pt")
    loaded = torch.load(tmp_path / "patched.pt", weights_only=False)
    assert [type(b) for b in _timm_swin_blocks(loaded)] == [type(b) for b in blocks]
    fastnote.unpatch(loaded)
    assert all(type(b) is timm_block for b in _timm_swin_blocks(loaded))

    restored = fastnote.unpatch(patched)
    assert restored == [f"{p}: fastnote.nn.timm_swin.FusedSwinTransformerBlock -> SwinTransformerBlock"
                        for p in ("layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0", "layers.1.blocks.1")]
    after = _timm_swin_blocks(patched)
    assert len(after) == len(blocks) and all(a is b for a, b in zip(after, blocks))
    assert all(type(b) is timm_block for b in blocks)
    twins = _timm_swin_blocks(eager)
    for i, (b, t) in enumerate(zip(blocks, twins)):
        for attr in ("input_resolution", "window_size", "shift_size"):
            assert getattr(b, attr) == getattr(t, attr), (i, attr)
        plain = lambda m: {k: v for k, v in vars(m).items() if not k.startswith("_")}  # noqa: E731
        assert plain(b) == plain(t), i
        assert (b.attn_mask is None) == (t.attn_mask is None), i
        if t.attn_mask is not None:
            assert torch.equal(b.attn_mask, t.attn_mask), i
    assert list(patched.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(patched(x), want, rtol=0, atol=0)   # timm's own code on the same weights
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
    assert fastnote.unpatch(patched) == []


def test_patched_model_compiles_fullgraph(device, compile_backend):
    model = nn.Sequential(nn.Sequential(nn.Conv2d(8, 16, 1), nn.Hardswish()),
                          SqueezeExcitation(16, 8, scale_activation=nn.Hardsigmoid), nn.Hardsigmoid()).to(device)
    eager = copy.deepcopy(model)
    report = fastnote.patch(model)
    assert report.counts() == {"Hardswish -> torch.nn.Identity": 1,
                               "SqueezeExcitation -> fastnote.nn.HardswishSqueezeExcitation": 1}
    assert type(model[2]) is nn.Hardsigmoid     # standalone: torch's own op, which inductor fuses
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    x = torch.randn(2, 8, 5, 5, device=device)
    assert_close(compiled(x), eager(x), "reduction")


# ------------------------------------------------------------------------------------------------
# Hooks, failures part way, the meta device
# ------------------------------------------------------------------------------------------------

def _se_model():
    # a ReLU before the SE: no h-swish to fuse, so the SE alone is replaced
    return nn.Sequential(nn.Conv2d(4, 16, 1), nn.ReLU(), SqueezeExcitation(16, 8, scale_activation=nn.Hardsigmoid))


@pytest.mark.no_kernel
@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("how", ["prune", "weight_norm", "user_hook"])
def test_se_whose_convs_hold_hooks_is_left(how, device):
    """The fused SE reads fc1/fc2's weights and calls neither: an SE whose conv holds a hook
    (a pruning mask or weight_norm recomputing the weight, a user's hook) is left, with the
    reason, and trains exactly as the eager model over two steps. Nothing runs it while patching."""
    eager, patched = _twins(_se_model, device)
    calls = []
    for model in (eager, patched):
        fc1 = model[2].fc1
        if how == "prune":
            prune.l1_unstructured(fc1, "weight", amount=0.5)
        elif how == "weight_norm":
            torch.nn.utils.weight_norm(fc1)
        else:
            fc1.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    report = fastnote.patch(patched)
    assert not report.replaced and calls == []
    (left,) = report.left
    assert left.path == "2" and "'fc1' holds a forward or backward hook" in left.reason
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (eager, patched)]
    x = torch.randn(2, 4, 5, 5, device=device)
    for _ in range(2):
        losses = [m(x).square().mean() for m in (eager, patched)]
        for loss, opt in zip(losses, opts):
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert torch.equal(losses[0], losses[1])
    for a, b in zip(eager.parameters(), patched.parameters()):
        assert torch.equal(a, b)


def test_se_whose_conv_weight_is_parametrized_is_replaced(device):
    """A parametrization (here weight_norm's) is no hook: the weight the fused SE reads is
    computed on each access, so the SE is replaced and trains as the eager model does."""
    eager, patched = _twins(_se_model, device)
    for model in (eager, patched):
        torch.nn.utils.parametrizations.weight_norm(model[2].fc1)
    assert len(fastnote.patch(patched)) == 1
    _same_forward_backward(eager, patched, torch.randn(2, 4, 5, 5, device=device))


def test_hooks_of_a_replaced_module_go_to_its_replacement(device):
    """A forward hook and a forward pre-hook on the SE run on its replacement with what they saw
    before, and the user's handles still remove them."""
    eager, patched = _twins(_se_model, device)
    seen = {"eager": [], "patched": []}
    handles = []
    for key, model in (("eager", eager), ("patched", patched)):
        handles.append(model[2].register_forward_hook(lambda m, i, o, key=key: seen[key].append(o.detach())))
        handles.append(model[2].register_forward_pre_hook(lambda m, i, key=key: seen[key].append(i[0].detach())))
    assert fastnote.patch(patched).counts() == {
        "SqueezeExcitation -> fastnote.nn.SqueezeExcitation": 1}
    x = torch.randn(2, 4, 5, 5, device=device)
    assert_close(patched(x), eager(x), "reduction")
    assert len(seen["patched"]) == len(seen["eager"]) == 2
    for a, b in zip(seen["patched"], seen["eager"]):
        assert_close(a, b, "reduction")
    for h in handles:
        h.remove()
    patched(x)
    assert len(seen["patched"]) == 2


def test_hswish_se_pair_with_a_hook_is_not_fused(device):
    """A hook on the h-swish (or on the SE) would see other tensors once the pair is fused: the
    pair is left (the SE alone replaced) and the hook sees what it saw."""
    def make():
        return nn.Sequential(nn.Conv2d(4, 16, 1), nn.Sequential(nn.Conv2d(16, 16, 1), nn.Hardswish()),
                             SqueezeExcitation(16, 8, scale_activation=nn.Hardsigmoid))

    eager, patched = _twins(make, device)
    seen = []
    for model in (eager, patched):
        model[1][1].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    report = fastnote.patch(patched)
    assert type(patched[1][1]) is nn.Hardswish
    assert report.counts() == {"SqueezeExcitation -> fastnote.nn.SqueezeExcitation": 1}
    assert [(e.path, e.kind) for e in report.left] == [("2", "hswish_se")]
    assert "1.1 holds a forward or backward hook" in report.left[0].reason
    x = torch.randn(2, 4, 5, 5, device=device)
    assert_close(patched(x), eager(x), "reduction")
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])


def _timm_block():
    timm = pytest.importorskip("fastnote.compat").import_timm()
    torch.manual_seed(0)
    block = timm.create_model("mobilenetv3_large_100").blocks[4][0]   # conv_pw, bn1, conv_dw, bn2 (h-swish), se
    assert type(block.bn2.act) is nn.Hardswish
    return nn.Sequential(block)


def test_timm_block_fuses_its_norms_hswish_into_the_se(device):
    """timm's InvertedResidual: bn2's h-swish (timm's BatchNormAct2d) feeds the SE, so it becomes an
    Identity and the SE the fused one; forward and gradients as the eager block's."""
    eager, patched = _twins(_timm_block, device)
    report = fastnote.patch(patched)
    assert list(report) == ["0.bn2.act: Hardswish -> torch.nn.Identity",
                            "0.se: SqueezeExcite -> fastnote.nn.SqueezeExcite"]
    assert patched[0].se.hardswish_input and not report.left
    _same_forward_backward(eager, patched, torch.randn(2, 80, 6, 5, device=device))


@pytest.mark.no_kernel
def test_timm_block_with_a_hook_or_another_order_is_not_fused(device, monkeypatch):
    """A hook on the norm (it would see the pre-activation) keeps the pair apart; so does a block
    whose forward no longer feeds the norm's h-swish straight to the SE (found by the probe). The
    SE alone is replaced, with one report line for the pair."""
    model = _timm_block().to(device)
    model[0].bn2.register_forward_hook(lambda *a: None)
    report = fastnote.patch(model)
    assert list(report) == ["0.se: SqueezeExcite -> fastnote.nn.SqueezeExcite"]
    assert [(e.path, e.kind) for e in report.left] == [("0.se", "hswish_se")]
    assert "0.bn2 holds a forward or backward hook" in report.left[0].reason

    cls = type(model[0])

    def se_before_bn2(self, x):
        shortcut = x
        x = self.conv_dw(self.bn1(self.conv_pw(x)))
        x = self.bn2(self.se(x))
        x = self.bn3(self.conv_pwl(x))
        return x + shortcut if self.has_skip else x

    monkeypatch.setattr(cls, "forward", se_before_bn2)
    model = _timm_block().to(device)
    report = fastnote.patch(model)
    assert list(report) == ["0.se: SqueezeExcite -> fastnote.nn.SqueezeExcite"]
    assert [(e.path, e.kind) for e in report.left] == [("0.se", "hswish_se")]
    assert "does not feed bn2's h-swish straight into the SE" in report.left[0].reason


def test_sequential_with_its_own_forward_is_not_fused(device):
    """A Sequential subclass with its own forward may use its children in another order: its
    h-swish is not fused into the SE after it (only the SE is replaced, where it stands)."""
    class ActSE(nn.Sequential):
        def forward(self, x):
            a = self[0](x)
            return a + self[1](a)

    def make():
        return nn.Sequential(nn.Conv2d(3, 16, 1), ActSE(nn.Hardswish(), SqueezeExcitation(16, 8, scale_activation=nn.Hardsigmoid)))

    eager, patched = _twins(make, device)
    report = fastnote.patch(patched)
    assert report.counts() == {"SqueezeExcitation -> fastnote.nn.SqueezeExcitation": 1}
    assert type(patched[1][0]) is nn.Hardswish
    _same_forward_backward(eager, patched, torch.randn(2, 3, 4, 4, device=device))


@pytest.mark.no_kernel
def test_an_se_replaced_earlier_is_reported_when_its_hswish_could_fuse(device):
    model = nn.Sequential(nn.Conv2d(4, 16, 1), nn.Hardswish(), SqueezeExcitation(16, 8, scale_activation=nn.Hardsigmoid))
    assert len(fastnote.patch(model, include=["SqueezeExcitation"])) == 1
    report = fastnote.patch(model)
    assert not report.replaced
    assert [(e.path, e.kind) for e in report.left] == [("2", "hswish_se")]
    assert "unpatch and patch again" in report.left[0].reason


@pytest.mark.no_kernel
def test_window_attention_with_an_attention_map_hook_is_left(device):
    """A hook on the attention's softmax (how attention maps are read out) would stop running on
    the core op: the module is left with the reason, and the hook still sees the maps."""
    eager, patched = _twins(lambda: nn.Sequential(SwinWindowAttention(16, (4, 4), 2)), device)
    maps = []
    for model in (eager, patched):
        model[0].softmax.register_forward_hook(lambda m, i, o: maps.append(o.detach()))
    report = fastnote.patch(patched)
    assert not report.replaced and [e.path for e in report.left] == ["0"]
    assert "'softmax' holds a forward or backward hook" in report.left[0].reason
    x = torch.randn(3, 16, 16, device=device)
    assert torch.equal(patched(x), eager(x)) and len(maps) == 2 and torch.equal(maps[0], maps[1])


@pytest.mark.no_kernel
def test_sagan_attention_with_a_softmax_hook_is_left(device):
    """SAGAN's Self_Attn with a hook on its softmax (how its map is read out): left with the
    reason, and the hook sees what it saw; nothing of it runs while patching."""
    eager, patched = _twins(lambda: nn.Sequential(Self_Attn(16, "relu")), device)
    maps = []
    for model in (eager, patched):
        model[0].gamma.data.fill_(0.5)
        model[0].softmax.register_forward_hook(lambda m, i, o: maps.append(o.detach()))
    report = fastnote.patch(patched)
    assert not report.replaced and maps == []
    assert [(e.path, e.kind) for e in report.left] == [("0", "SelfAttention")]
    assert "'softmax' holds a forward or backward hook" in report.left[0].reason
    x = torch.randn(2, 16, 4, 3, device=device)
    assert torch.equal(patched(x)[0], eager(x)[0]) and len(maps) == 2 and torch.equal(maps[0], maps[1])


def test_sagan_attention_probe_runs_no_hooks(device):
    """A hook on a conv the replacement still calls stays (the module is replaced): the probe that
    recognises the module runs on a copy without hooks, so the hook first runs in the user's
    forward, with the user's tensor."""
    eager, patched = _twins(lambda: nn.Sequential(Self_Attn(16, "relu")), device)
    seen = {"eager": [], "patched": []}
    for key, model in (("eager", eager), ("patched", patched)):
        model[0].gamma.data.fill_(0.5)
        model[0].query_conv.register_forward_hook(lambda m, i, o, key=key: seen[key].append(o.detach()))
    report = fastnote.patch(patched)
    assert list(report) == ["0: Self_Attn -> fastnote.nn.SelfAttention"] and seen["patched"] == []
    x = torch.randn(2, 16, 4, 3, device=device)
    assert_close(patched(x)[0], eager(x)[0], "reduction")
    assert len(seen["patched"]) == len(seen["eager"]) == 1
    assert_close(seen["patched"][0], seen["eager"][0], "reduction")


@pytest.mark.no_kernel
def test_sagan_attention_with_its_own_buffer_is_left(device):
    """A subclass's own buffer would be dropped by the replacement (and with it the state_dict key
    a checkpoint holds): left with the reason."""
    class CountingSelfAttn(Self_Attn):
        def __init__(self, c):
            super().__init__(c)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            self.calls += 1
            return super().forward(x)

    model = nn.Sequential(CountingSelfAttn(16)).to(device)
    report = fastnote.patch(model)
    assert not report.replaced
    assert "other parameters or buffers (calls)" in report.left[0].reason
    assert "0.calls" in model.state_dict()


@pytest.mark.no_kernel
def test_replacements_keep_the_submodules_of_the_original(device):
    """The drop-ins hold the original's parameter-free submodules under its names (code reading
    ``se.scale_activation`` or ``attn.softmax`` keeps working); the state_dict is unchanged."""
    timm = pytest.importorskip("fastnote.compat").import_timm()
    from timm.layers.squeeze_excite import SEModule

    model = nn.Sequential(Self_Attn(16), SqueezeExcitation(16, 8, scale_activation=nn.Hardsigmoid),
                          SELayer(16, 8), SEModule(16, rd_channels=8)).to(device)
    names = [[n for n, _ in m.named_children()] for m in model]
    children = [list(m.children()) for m in model]
    keys = list(model.state_dict())
    assert len(fastnote.patch(model)) == 4
    assert [type(m).__module__.split(".")[0] for m in model] == ["fastnote"] * 4
    assert [[n for n, _ in m.named_children()] for m in model] == names
    assert all(a is b for before, m in zip(children, model) for a, b in zip(before, m.children()))
    assert list(model.state_dict()) == keys
    assert isinstance(model[1].scale_activation, nn.Hardsigmoid) and isinstance(model[0].softmax, nn.Softmax)
    # built directly, the drop-ins have their library's submodules too
    assert [n for n, _ in fastnote.nn.SqueezeExcitation(16, 8).named_children()] == [
        "avgpool", "fc1", "fc2", "activation", "scale_activation"]
    assert [n for n, _ in fastnote.nn.SqueezeExcite(16, 8).named_children()] == [
        "conv_reduce", "act1", "conv_expand", "gate"]
    assert [n for n, _ in fastnote.nn.SelfAttention(16).named_children()] == [
        "query_conv", "key_conv", "value_conv", "softmax"]


@pytest.mark.no_kernel
def test_se_with_a_norm_layer_is_reported_left():
    """RexNet's SE (timm's SEModule with a BatchNorm between the convs) is not fastnote's SE: the
    report says it stayed eager, and why."""
    timm = pytest.importorskip("fastnote.compat").import_timm()
    from timm.layers.squeeze_excite import SEModule

    model = nn.Sequential(SEModule(16, rd_channels=8, norm_layer=nn.BatchNorm2d), nn.Sequential(nn.Conv2d(3, 4, 1),
                          nn.Linear(4, 4)))
    report = fastnote.patch(model)
    assert not report.replaced
    assert [(e.path, e.kind) for e in report.left] == [("0", "SqueezeExcitation")]
    assert "timm's conv_reduce" not in report.left[0].reason and "torchvision's fc1, fc2" in report.left[0].reason
    assert "bn (BatchNorm2d)" in report.left[0].reason


def test_timm_block_whose_attention_is_hooked_is_not_fused(device):
    """The fused timm block reads attn's parameters and never calls attn: a hook on attn (or in
    it) leaves the block; attn itself is then replaced by the core op, its hook going with it."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    eager, patched = _twins(lambda: timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4, num_classes=3,
        embed_dim=16, depths=(2,), num_heads=(1,), drop_path_rate=0.0), device)
    seen = []
    for model in (eager, patched):
        model.layers[0].blocks[1].attn.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    report = fastnote.patch(patched)
    assert report.counts() == {"SwinTransformerBlock -> fastnote.nn.timm_swin.FusedSwinTransformerBlock": 1,
                               "WindowAttention -> fastnote.nn.timm_swin.TimmWindowAttention": 1}
    assert [e.path for e in report.left] == ["layers.0.blocks.1"] and "'attn' holds" in report.left[0].reason
    x = torch.randn(1, 3, 32, 32, device=device)
    assert_close(patched(x), eager(x), "reduction")
    assert len(seen) == 2
    assert_close(seen[1], seen[0], "reduction")


@pytest.mark.no_kernel
def test_patch_is_all_or_nothing(device, monkeypatch):
    """An error part way (here, raised by the SE probe after the spectral-norm hook was swapped)
    undoes what was done before it is raised; unpatch then has nothing to undo."""
    from fastnote.patch import squeeze_excitation as se_family

    model = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(4, 16, 1)), nn.ReLU(),
                          SqueezeExcitation(16, 8, scale_activation=nn.Hardsigmoid)).to(device)
    hooks = dict(model[0]._forward_pre_hooks)

    def fail(*args):
        raise RuntimeError("probe failed")

    monkeypatch.setattr(se_family, "_probe_input", fail)
    with pytest.raises(RuntimeError, match="probe failed"):
        fastnote.patch(model)
    assert dict(model[0]._forward_pre_hooks) == hooks and type(model[2]) is SqueezeExcitation
    assert fastnote.unpatch(model) == []


@pytest.mark.no_kernel
def test_sagan_attention_that_cannot_be_copied_is_left(device):
    """A Self_Attn keeping the attention map of its last training forward (a non-leaf tensor,
    which deepcopy refuses) is left with the reason instead of failing the whole patch."""
    class KeepsMap(Self_Attn):
        def forward(self, x):
            out, attention = super().forward(x)
            self.last_attention = attention
            return out, attention

    model = nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(16, 16, 1)), KeepsMap(16)).to(device)
    model(torch.randn(1, 16, 4, 4, device=device, requires_grad=True))
    report = fastnote.patch(model)
    assert report.counts() == {SN: 1}
    assert [e.path for e in report.left] == ["1"] and "could not be copied to probe" in report.left[0].reason


def test_meta_model_is_left_with_the_reason():
    """Parameters on the meta device have no values for the probes: those modules are left with
    the reason (patch after to_empty and loading), no error."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(4, 16, 1), nn.ReLU(), SqueezeExcitation(16, 8, scale_activation=nn.Hardsigmoid),
                              Self_Attn(16))
    report = fastnote.patch(model)
    assert not report.replaced
    assert [e.path for e in report.left] == ["2", "3"]
    assert all("meta device" in e.reason for e in report.left)


class _LoRALinear(nn.Linear):
    """loralib's ``lora.Linear`` in miniature: an nn.Linear subclass whose forward adds a low-rank
    update to what its ``weight`` computes (quantised Linear layers override forward too)."""

    def __init__(self, linear: nn.Linear, rank: int = 2):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.load_state_dict(linear.state_dict())
        self.lora_A = nn.Parameter(torch.randn(rank, linear.in_features))
        self.lora_B = nn.Parameter(torch.randn(linear.out_features, rank))

    def forward(self, x):
        return super().forward(x) + x @ self.lora_A.t() @ self.lora_B.t()


def _swin_candidates():
    """(id, make, where the Linear sits, the path that must be reported) for each window-attention
    family whose fused path reads qkv / proj by weight."""
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    timm_v2 = pytest.importorskip("timm.models.swin_transformer_v2")
    tv = pytest.importorskip("torchvision.models.swin_transformer")
    return [
        ("swin-original", lambda: nn.Sequential(SwinWindowAttention(16, (4, 4), 2)), "0", "0", (3, 16, 16)),
        ("timm-core", lambda: nn.Sequential(timm_swin.WindowAttention(16, 2, window_size=(4, 4))), "0", "0",
         (3, 16, 16)),
        ("timm-v2-core", lambda: nn.Sequential(timm_v2.WindowAttention(16, (4, 4), 2)), "0", "0", (3, 16, 16)),
        ("torchvision", lambda: nn.Sequential(tv.ShiftedWindowAttention(16, [4, 4], [2, 2], 2)), "0", "0",
         (1, 8, 8, 16)),
        ("torchvision-v2", lambda: nn.Sequential(tv.ShiftedWindowAttentionV2(16, [4, 4], [2, 2], 2)), "0", "0",
         (1, 8, 8, 16)),
        ("timm-block", lambda: nn.Sequential(timm_swin.SwinTransformerBlock(16, (8, 8), 2, window_size=4,
                                                                            shift_size=2)), "0.attn", "0",
         (1, 8, 8, 16)),
        ("timm-v2-block", lambda: nn.Sequential(timm_v2.SwinTransformerV2Block(16, (8, 8), 2, window_size=4,
                                                                               shift_size=2)), "0.attn", "0",
         (1, 8, 8, 16)),
    ]


@pytest.mark.no_kernel
@pytest.mark.parametrize("case", range(7), ids=["swin-original", "timm-core", "timm-v2-core", "torchvision",
                                                "torchvision-v2", "timm-block", "timm-v2-block"])
@pytest.mark.parametrize("linear", ["qkv", "proj"])
def test_window_attention_whose_linear_has_its_own_forward_is_left(case, linear, device):
    """The fused window attention reads qkv's and proj's weights and calls neither: a Linear
    subclass with a forward of its own (a LoRA adapter, a quantised layer) would be dropped
    silently. Left with the reason, in the core converters and in timm's block converters, and
    the model computes what it did."""
    name, make, attn_path, block_path, shape = _swin_candidates()[case]
    torch.manual_seed(0)
    eager = make().to(device)
    attn = eager.get_submodule(attn_path)
    setattr(attn, linear, _LoRALinear(getattr(attn, linear)).to(device))
    patched = copy.deepcopy(eager)
    report = fastnote.patch(patched)
    assert list(report) == [], name
    reasons = {e.path: e.reason for e in report.left}
    assert f"'{linear}' (_LoRALinear from {__name__}) has a forward of its own" in reasons[attn_path], reasons
    if block_path != attn_path:
        assert f"'attn.{linear}' (_LoRALinear from {__name__}) has a forward of its own" in reasons[block_path], reasons
    x = torch.randn(shape, device=device)
    assert torch.equal(patched(x), eager(x))
