"""fastnote.patch on spandrel's SwinIR and Swin2SR (family ``spandrel_swin``): every block on the
fused window attention, output and every gradient as the unpatched model's in training and eval,
state_dict unchanged, unpatch restores, what is not fused left with its reason."""
import copy

import pytest
import torch

import fastnote
from fastnote.testing import assert_autocast_like_eager, assert_close

pytest.importorskip("spandrel", reason="spandrel is not installed: its SwinIR / Swin2SR are not checked here")
from spandrel.architectures.Swin2SR import Swin2SR  # noqa: E402
from spandrel.architectures.SwinIR import SwinIR  # noqa: E402

ARCH = {"SwinIR": SwinIR, "Swin2SR": Swin2SR}


def _model(name, **kwargs):
    torch.manual_seed(0)
    args = dict(upscale=2, img_size=16, window_size=4, embed_dim=24, depths=[2], num_heads=[2], in_chans=3,
                upsampler="pixelshuffledirect", drop_path_rate=0.0)
    args.update(kwargs)
    return ARCH[name](**args)


def _blocks(model):
    return [n for n, m in model.named_modules() if type(m).__name__ == "SwinTransformerBlock"]


def _same_forward_backward(eager, patched, x):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = eager(xa), patched(xb)
    assert_close(yb, ya, "two_matmul")
    g = torch.randn_like(ya)
    names = ["x"] + [n for n, _ in eager.named_parameters()]
    ga = torch.autograd.grad(ya, [xa] + list(eager.parameters()), g, allow_unused=True)
    gb = torch.autograd.grad(yb, [xb] + list(patched.parameters()), g, allow_unused=True)
    for name, a, b in zip(names, ga, gb):
        if a is None or b is None:
            assert a is None and b is None, name
        else:
            assert_close(b, a, "two_matmul", msg=name)


@pytest.mark.parametrize("name", ["SwinIR", "Swin2SR"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_model_matches_unpatched(name, train):
    eager = _model(name).train(train)
    patched = copy.deepcopy(eager)
    state = patched.state_dict()
    blocks = _blocks(eager)
    report = fastnote.patch(patched)
    assert len(blocks) == 2
    assert list(report) == [f"{p}: SwinTransformerBlock -> fastnote.nn.spandrel_swin.Fused{name}Block"
                            for p in blocks]
    assert report.left == [], str(report)
    after = patched.state_dict()
    assert list(after) == list(state) and all(after[k] is state[k] or torch.equal(after[k], state[k]) for k in state)
    # 10 x 13 is padded by the model to 12 x 16 (its blocks build the shift mask for that size);
    # 16 x 16 is the blocks' own resolution (their attn_mask buffer)
    for h, w in ((10, 13), (16, 16)) if not train else ((10, 13),):
        _same_forward_backward(eager, patched, torch.randn(1, 3, h, w))


def _outputs_and_gradients(model, x):
    x = x.clone().requires_grad_()
    y = model(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(device=y.device, dtype=y.dtype)
    return [y.detach()] + list(torch.autograd.grad(y, [x] + list(model.parameters()), g, allow_unused=True))


@pytest.mark.parametrize("name", ["SwinIR", "Swin2SR"])
@pytest.mark.autocast
def test_model_under_autocast(name, autocast_dtype, device, launches):
    """The patched model in training under autocast, on a padded input: output and every gradient
    as close to the fp32 model as the library's own model under the same autocast."""
    eager = _model(name).to(device).train()
    patched = copy.deepcopy(eager)
    assert len(fastnote.patch(patched)) == 2
    names = ["output", "x"] + [n for n, _ in eager.named_parameters()]
    x = torch.randn(1, 3, 10, 13, device=device)
    launches.clear()
    assert_autocast_like_eager(eager, patched, lambda m: _outputs_and_gradients(m, x), autocast_dtype, names)
    assert any(k.endswith("window_attention") for k, _, _ in launches), launches


@pytest.mark.parametrize("name", ["SwinIR", "Swin2SR"])
def test_unpatch_restores(name):
    model = _model(name)
    params = dict(model.named_parameters())
    classes = {n: type(m) for n, m in model.named_modules()}
    assert len(fastnote.patch(model)) == 2
    assert dict(model.named_parameters()) == params
    assert len(fastnote.unpatch(model)) == 2
    assert {n: type(m) for n, m in model.named_modules()} == classes


@pytest.mark.parametrize("name", ["SwinIR", "Swin2SR"])
def test_attention_dropout_left_with_reason(name):
    model = _model(name, attn_drop_rate=0.1)
    report = fastnote.patch(model, include=["spandrel_swin"])
    assert list(report) == []
    assert [(e.path, e.kind) for e in report.left] == [(p, "spandrel_swin") for p in _blocks(model)]
    assert all("attention dropout p=0.1" in e.reason for e in report.left)


def test_without_the_family_swinir_attention_goes_to_the_core_op():
    model = _model("SwinIR")
    report = fastnote.patch(model, include=["WindowAttention"])
    assert list(report) == [f"{p}.attn: WindowAttention -> fastnote.nn.WindowAttention" for p in _blocks(model)]


class _Scaled(torch.nn.Linear):
    """A Linear subclass with a forward of its own (as LoRA adapters and quantised layers have)."""

    def forward(self, x):
        return 0.5 * super().forward(x)


@pytest.mark.parametrize("name", ["SwinIR", "Swin2SR"])
@pytest.mark.parametrize("path", ["attn.qkv", "attn.proj", "attn"])
def test_block_whose_attention_has_its_own_forward_is_left(name, path):
    """The fused block reads attn's parameters and calls neither attn nor its Linears: a block where
    one of them has a forward of its own is left with the reason, the others fused, and the
    model computes what it did."""
    eager = _model(name).eval()
    block = eager.get_submodule(_blocks(eager)[1])
    module = block.get_submodule(path)
    if path == "attn":
        library = type(module).forward
        module.__class__ = type("MyAttention", (type(module),), {"forward": lambda s, *a, **k: 2 * library(s, *a, **k)})
    else:
        module.__class__ = _Scaled
    patched = copy.deepcopy(eager)
    report = fastnote.patch(patched, include=["spandrel_swin"])
    assert len(report.replaced) == len(_blocks(eager)) - 1
    (left,) = report.left
    assert left.path == _blocks(eager)[1] and f"'{path}' " in left.reason, left.reason
    assert "has a forward of its own" in left.reason
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert_close(patched(x), eager(x), "two_matmul")
