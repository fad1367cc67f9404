"""fastnote.patch on pytorch-pretrained-biggan (BigGAN-deep as converted from TF): its ``SelfAttn``
goes on the SAGAN kernel with pooled keys and values (``fastnote.nn.PretrainedBigGANSelfAttn``) and
its spectral-norm convs keep working (their hooks replaced by the spectral-norm family). The
module alone and a small generator built from a tiny ``BigGANConfig`` (random init): forward and
every gradient against the unpatched copy in training and eval mode, spectral-norm vectors after
a training step, state_dict keys, unpatch.

The package imports boto3, requests and scipy for downloading weights and sampling noise; its
model.py needs only torch and numpy. Where the package is installed without those (scripts/setup.sh
installs it without its dependencies), ``model.py`` is loaded under a private package name with a
stand-in for its download helper, so the classes tested are the library's own code."""
import copy
import importlib
import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

import fastnote
from fastnote.testing import assert_autocast_like_eager, assert_close

KIND = "two_matmul"
ATTN = "SelfAttn -> fastnote.nn.PretrainedBigGANSelfAttn"
_PRIVATE = "_fastnote_tests_pretrained_biggan"


def _library():
    """pytorch_pretrained_biggan's ``model`` module (skip when the package is not installed)."""
    try:
        from pytorch_pretrained_biggan import model

        return model
    except ImportError:
        pass
    spec = importlib.util.find_spec("pytorch_pretrained_biggan")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pytorch-pretrained-biggan is not installed (scripts/setup.sh installs it): not checked here")
    if _PRIVATE + ".model" not in sys.modules:
        package = types.ModuleType(_PRIVATE)
        package.__path__ = list(spec.submodule_search_locations)
        downloads = types.ModuleType(_PRIVATE + ".file_utils")

        def cached_path(*args, **kwargs):
            raise OSError("no downloads in the tests")

        downloads.cached_path = cached_path
        sys.modules[_PRIVATE], sys.modules[_PRIVATE + ".file_utils"] = package, downloads
    return importlib.import_module(_PRIVATE + ".model")


def _randomise(model):
    """gamma off its 0 init (where the block returns x whatever the attention computes); the
    unconditional batch norm's weight and bias, which the library allocates uninitialised
    (``torch.Tensor(n)``: its models expect loaded weights), set to values (left as they were,
    whatever memory held, now and then NaN: the eager model's output too)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module).__name__ == "BigGANBatchNorm" and not module.conditional:
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.7)


def _twins(make, device, warm_up):
    """The model and its copy, after a few training forwards of ``warm_up(model)``: torch's
    spectral norm starts from random u and v with no power iteration, so a fresh model's sigma can
    be far below the weight's norm (weights W / sigma blown up, the attention logits with them, a
    softmax saturated to where rounding decides). Training forwards run the power iteration."""
    torch.manual_seed(0)
    eager = make().to(device)
    _randomise(eager)
    eager.train()
    with torch.no_grad():
        for _ in range(3):
            warm_up(eager)
    return eager, copy.deepcopy(eager)


def _grads(model, out, inputs, seed=3):
    g = torch.randn(out.shape, generator=torch.Generator(out.device).manual_seed(seed), device=out.device)
    g = g.to(out.dtype)
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(out, list(inputs) + [p for _, p in model.named_parameters()], g)
    return dict(zip([f"input{i}" for i in range(len(inputs))] + names, grads))


def _compare(eager, patched, run, training, launches):
    """One forward and backward of each model (``run(model) -> (out, inputs)``), compared; then the
    state (spectral-norm u and v: a training forward updates them) compared."""
    for m in (eager, patched):
        m.train(training)
    want, inputs = run(eager)
    want_g = _grads(eager, want, inputs)
    launches.clear()
    got, inputs = run(patched)
    got_g = _grads(patched, got, inputs)
    assert any(k.endswith("sagan_attention") for k in {m for m, _, _ in launches}), launches
    assert_close(got, want, KIND, msg="output")
    assert list(got_g) == list(want_g)
    for name in want_g:
        assert_close(got_g[name], want_g[name], KIND, msg=name)
    got_s, want_s = patched.state_dict(), eager.state_dict()
    assert list(got_s) == list(want_s)
    for k in want_s:
        assert_close(got_s[k], want_s[k], KIND, msg=k)


def _check_unpatch(patched, keys, types_before, hooks_before):
    restored = fastnote.unpatch(patched)
    assert restored
    assert [type(m) for m in patched.modules()] == types_before
    assert _hook_types(patched) == hooks_before
    assert list(patched.state_dict()) == keys
    assert fastnote.unpatch(patched) == []


def _hook_types(model):
    return [type(h).__name__ for m in model.modules() for h in m._forward_pre_hooks.values()]


# ------------------------------------------------------------------------------------------------
# SelfAttn alone
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_self_attn_on_the_sagan_kernel(device, launches, training):
    lib = _library()
    eager, patched = _twins(lambda: nn.Sequential(lib.SelfAttn(64)), device,
                            lambda m: m(torch.randn(2, 64, 8, 8, device=device)))
    keys, types_before, hooks_before = list(eager.state_dict()), [type(m) for m in patched.modules()], \
        _hook_types(patched)
    convs = [patched[0].snconv1x1_theta, patched[0].snconv1x1_phi, patched[0].snconv1x1_g,
             patched[0].snconv1x1_o_conv]
    report = fastnote.patch(patched)
    assert report.counts()[ATTN] == 1 and not report.left, str(report)
    assert sum(n for k, n in report.counts().items() if k != ATTN) == 4   # the four convs' spectral norms
    attn = patched[0]
    assert type(attn) is fastnote.nn.PretrainedBigGANSelfAttn
    assert [attn.snconv1x1_theta, attn.snconv1x1_phi, attn.snconv1x1_g, attn.snconv1x1_o_conv] == convs
    assert list(patched.state_dict()) == keys
    x = torch.randn(2, 64, 8, 8, device=device)

    def run(model):
        xx = x.clone().requires_grad_()
        return model(xx), [xx]

    _compare(eager, patched, run, training, launches)
    _check_unpatch(patched, keys, types_before, hooks_before)


def test_self_attn_drop_in_loads_the_library_state_dict(device):
    lib = _library()
    torch.manual_seed(0)
    theirs = lib.SelfAttn(32).to(device).eval()
    _randomise(theirs)
    ours = fastnote.nn.PretrainedBigGANSelfAttn(32).to(device).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(1, 32, 4, 6, device=device)
    with torch.no_grad():
        assert_close(ours(x), theirs(x), KIND)
    with pytest.raises(ValueError, match="even height and width"):
        ours(torch.randn(1, 32, 3, 4, device=device))


def test_self_attn_look_alike_left_with_reason():
    lib = _library()
    m = lib.SelfAttn(16)
    m.maxpool = nn.MaxPool2d(4, stride=4)
    report = fastnote.patch(nn.Sequential(m), include=["SelfAttention"])
    assert list(report) == []
    assert [(e.path, e.kind) for e in report.left] == [("0", "SelfAttention")]
    assert "not a 2x2 max pool" in report.left[0].reason


def test_self_attn_with_a_softmax_hook_is_left():
    """The kernel does the softmax, so a hook on it would stop running: left with the reason, and
    no hook of the module runs while patching (a user's on a conv, which the replacement calls,
    neither: the probe's copy holds none)."""
    lib = _library()
    m = lib.SelfAttn(16)
    calls = []
    m.softmax.register_forward_hook(lambda *a: calls.append("softmax"))
    m.snconv1x1_theta.register_forward_hook(lambda *a: calls.append("theta"))
    report = fastnote.patch(nn.Sequential(m), include=["SelfAttention"])
    assert list(report) == [] and calls == []
    assert [(e.path, e.kind) for e in report.left] == [("0", "SelfAttention")]
    assert "'softmax' holds a forward or backward hook" in report.left[0].reason
    m = lib.SelfAttn(16)
    m.snconv1x1_theta.register_forward_hook(lambda *a: calls.append("theta"))
    assert list(fastnote.patch(nn.Sequential(m), include=["SelfAttention"])) == [f"0: {ATTN}"]
    assert calls == []


# ------------------------------------------------------------------------------------------------
# A small generator
# ------------------------------------------------------------------------------------------------

def _generator():
    lib = _library()
    config_module = importlib.import_module(lib.__name__.rpartition(".")[0] + ".config")
    # 128 channels at 4x4 halving to 8 at 16x16; the attention at 8x8 on 32 channels
    config = config_module.BigGANConfig(output_dim=16, z_dim=16, class_embed_dim=16, channel_width=8, num_classes=10,
                                        layers=[(False, 16, 8), (True, 8, 4), (True, 4, 2), (False, 2, 1)],
                                        attention_layer_position=2, eps=1e-4, n_stats=51)
    return lib.BigGAN(config)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_small_generator(device, launches, training):
    label = torch.nn.functional.one_hot(torch.tensor([1, 7], device=device), 10).float()
    eager, patched = _twins(_generator, device, lambda m: m(torch.randn(2, 16, device=device), label, 0.4))
    keys, types_before, hooks_before = list(eager.state_dict()), [type(m) for m in patched.modules()], \
        _hook_types(patched)
    report = fastnote.patch(patched)
    assert report.counts()[ATTN] == 1 and not report.left, str(report)
    assert [e.path for e in report.replaced if e.new.endswith("PretrainedBigGANSelfAttn")] == ["generator.layers.2"]
    assert list(patched.state_dict()) == keys
    z = torch.randn(2, 16, device=device)

    def run(model):
        zz = z.clone().requires_grad_()
        return model(zz, label, 0.4), [zz]

    _compare(eager, patched, run, training, launches)
    _check_unpatch(patched, keys, types_before, hooks_before)


@pytest.mark.autocast
def test_small_generator_under_autocast(device, launches, autocast_dtype):
    """The patched generator (eval: batch norm on its stored statistics) under autocast: image and
    every gradient as close to the fp32 generator as the library's own under the same autocast."""
    label = torch.nn.functional.one_hot(torch.tensor([1, 7], device=device), 10).float()
    eager, patched = _twins(_generator, device, lambda m: m(torch.randn(2, 16, device=device), label, 0.4))
    fastnote.patch(patched)
    for m in (eager, patched):
        m.eval()
    z = torch.randn(2, 16, generator=torch.Generator().manual_seed(11)).to(device)

    def run(model):
        zz = z.clone().requires_grad_()
        out = model(zz, label, 0.4)
        return [out.detach()] + list(_grads(model, out, [zz]).values())

    names = ["image", "z"] + [n for n, _ in eager.named_parameters()]
    launches.clear()
    assert_autocast_like_eager(eager, patched, run, autocast_dtype, names)
    assert any(k.endswith("sagan_attention") for k, _, _ in launches), launches
