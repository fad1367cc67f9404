"""fastnote.patch on Hugging Face transformers' Swin and Swin V2 (family ``hf_swin``): every block
on the fused window attention, outputs and every gradient as the unpatched model's, state_dict
unchanged, unpatch restores, and what is not fused is reported with its reason."""
import copy

import pytest
import torch

import fastnote
from fastnote.nn.hf_swin import fused_layer_class
from fastnote.testing import UNIT_ROUNDOFF, assert_autocast_like_eager, assert_close, rms_relative_error

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face transformers is not installed: its Swin models are not checked here")

# window 4 (V1) / 8 (V2) at 64 x 64 (patch 4): stage one's 16 x 16 map has shifted windows; the odd
# input sizes need padding in both stages (V1: 11 x 13 and 6 x 7 maps; V2: 11 x 13 and 6 x 7)
WINDOW = {"Swin": 4, "Swinv2": 8}
LAYER = {"Swin": "SwinLayer", "Swinv2": "Swinv2Layer"}
FACTOR = 4.0                                  # as tests/test_models.py
FLOOR = 64 * UNIT_ROUNDOFF[torch.float32]


def _model(version, **config):
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{version}Config")(
        image_size=64, patch_size=4, embed_dim=24, depths=[2, 2], num_heads=[1, 2], window_size=WINDOW[version],
        drop_path_rate=0.0, **config)
    model = getattr(transformers, f"{version}Model")(cfg)
    with torch.no_grad():   # the library starts V1's position table at zero: give it values to test
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 0.5)
    return model


def _blocks(model):
    return [n for n, m in model.named_modules() if type(m).__name__ in ("SwinLayer", "Swinv2Layer")]


def _outputs_and_gradients(model, x, seed=6):
    x = x.clone().requires_grad_()
    y = model(pixel_values=x)
    outs = (y.last_hidden_state, y.pooler_output)
    gen = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=gen).to(device=o.device, dtype=o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, [x] + list(model.parameters()), cot, allow_unused=True)
    return [o.detach() for o in outs] + list(grads)


def _same_as_float64(eager, patched, x):
    """Outputs and every gradient: a whole model chains many fp32 ops, so the model-level rule of
    tests/test_models.py applies: off the float64 eager result by at most FACTOR x what the fp32
    eager model is off, plus FLOOR (RMS-relative, per tensor). One op's elementwise bound does not
    fit here: at these sizes the fp32 eager Swinv2 model itself is 2.6x over ``two_matmul``'s bound
    against float64 (layer 0's query-weight gradient, entries up to 672), the patched one 3.1x."""
    names = ["last_hidden_state", "pooler_output", "pixel_values.grad"] + [n for n, _ in eager.named_parameters()]
    exact = _outputs_and_gradients(copy.deepcopy(eager).double(), x.double())
    base = _outputs_and_gradients(eager, x)
    ours = _outputs_and_gradients(patched, x)
    for name, e, b, o in zip(names, exact, base, ours):
        if e is None:
            assert b is None and o is None, name
            continue
        assert torch.isfinite(o).all(), name
        own, theirs = rms_relative_error(o, e), rms_relative_error(b, e)
        assert own <= FACTOR * theirs + FLOOR, f"{name}: patched off float64 by {own:.3g}, eager fp32 by {theirs:.3g}"


@pytest.mark.parametrize("version", ["Swin", "Swinv2"])
@pytest.mark.parametrize("shift,hw", [(0, (8, 8)), (2, (8, 8)), (2, (11, 13))], ids=["w", "sw", "sw-padded"])
def test_block_matches_library_block(version, shift, hw):
    """One block, patched alone: its output and every gradient at one fused op's tolerance."""
    module = __import__(f"transformers.models.{version.lower()}.modeling_{version.lower()}", fromlist=["x"])
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{version}Config")(window_size=4, embed_dim=24)
    eager = getattr(module, LAYER[version])(cfg, 24, (64, 64), 2, shift_size=shift)
    with torch.no_grad():
        for name, p in eager.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 0.5)
    patched = copy.deepcopy(eager)
    assert len(fastnote.patch(torch.nn.ModuleList([patched]))) == 1
    h, w = hw
    x = torch.randn(2, h * w, 24)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = eager(xa, (h, w))[0], patched(xb, (h, w))[0]
    assert_close(yb, ya, "two_matmul")
    g = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, [xa] + list(eager.parameters()), g)
    gb = torch.autograd.grad(yb, [xb] + list(patched.parameters()), g)
    for name, a, b in zip(["x"] + [n for n, _ in eager.named_parameters()], ga, gb):
        assert_close(b, a, "two_matmul", msg=name)


@pytest.mark.parametrize("version", ["Swin", "Swinv2"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_model_matches_unpatched(version, train):
    eager = _model(version).train(train)
    patched = copy.deepcopy(eager)
    keys = {k: v.shape for k, v in patched.state_dict().items()}
    blocks = _blocks(eager)
    report = fastnote.patch(patched)
    assert len(blocks) == 4
    fused = f"fastnote.nn.hf_swin.Fused{LAYER[version]}"
    assert list(report) == [f"{p}: {LAYER[version]} -> {fused}" for p in blocks]
    assert report.left == [], str(report)
    assert {k: v.shape for k, v in patched.state_dict().items()} == keys
    assert all(patched.get_submodule(p).training == train for p in blocks)
    _same_as_float64(eager, patched, torch.randn(1, 3, 44, 52))


@pytest.mark.parametrize("version", ["Swin", "Swinv2"])
@pytest.mark.autocast
def test_model_under_autocast(version, autocast_dtype, device, launches):
    """The patched model in training under autocast: outputs and every gradient as close to the
    fp32 model as the library's own model under the same autocast (within 4x its error)."""
    eager = _model(version).to(device).train()
    patched = copy.deepcopy(eager)
    assert len(fastnote.patch(patched)) == 4
    names = ["last_hidden_state", "pooler_output", "pixel_values.grad"] + [n for n, _ in eager.named_parameters()]
    x = torch.randn(1, 3, 44, 52, device=device)
    launches.clear()
    assert_autocast_like_eager(eager, patched, lambda m: _outputs_and_gradients(m, x), autocast_dtype, names)
    assert any(k.endswith("window_attention") for k, _, _ in launches), launches


@pytest.mark.parametrize("version", ["Swin", "Swinv2"])
def test_unpatch_restores_and_parameters_are_the_same_objects(version):
    model = _model(version)
    params = dict(model.named_parameters())
    classes = {n: type(m) for n, m in model.named_modules()}
    fastnote.patch(model)
    assert dict(model.named_parameters()) == params   # same objects: an optimiser built before keeps working
    assert all(type(model.get_submodule(p)).__module__ == "fastnote.nn.hf_swin" for p in _blocks_of(model))
    undone = fastnote.unpatch(model)
    assert len(undone) == 4
    assert {n: type(m) for n, m in model.named_modules()} == classes
    # with hf_swin not included, its attention is not reported as left either
    report = fastnote.patch(model, include=["SqueezeExcitation"])
    assert list(report) == [] and report.left == []


def _blocks_of(model):
    return [n for n, m in model.named_modules() if type(m).__name__.startswith("Fused")]


@pytest.mark.parametrize("version", ["Swin", "Swinv2"])
def test_attention_weights_requested_runs_the_library_forward(version):
    # the fused op returns no attention weights: such a call runs the library's block forward
    config = {"attn_implementation": "eager"} if version == "Swin" else {}
    eager = _model(version, **config).eval()
    patched = copy.deepcopy(eager)
    assert len(fastnote.patch(patched)) == 4
    x = torch.randn(1, 3, 44, 52)
    with torch.no_grad():
        ya, yb = eager(x, output_attentions=True), patched(x, output_attentions=True)
    assert len(ya.attentions) == len(yb.attentions) > 0
    for a, b in zip(ya.attentions, yb.attentions):
        assert torch.equal(a, b)
    assert torch.equal(ya.last_hidden_state, yb.last_hidden_state)


@pytest.mark.parametrize("version", ["Swin", "Swinv2"])
def test_attention_dropout_left_with_reason(version):
    model = _model(version, attention_probs_dropout_prob=0.1)
    report = fastnote.patch(model)
    assert list(report) == []
    attention = "attention" if version == "Swin" else "attention.self"
    assert [(e.path, e.kind) for e in report.left] == [(f"{p}.{attention}", "hf_swin") for p in _blocks(model)]
    assert all("attention dropout p=0.1" in e.reason for e in report.left)


def test_overridden_forward_left_with_reason():
    from transformers.models.swin.modeling_swin import SwinLayer

    class MyLayer(SwinLayer):
        def forward(self, hidden_states, input_dimensions, always_partition=False, **kwargs):
            return super().forward(hidden_states, input_dimensions, always_partition, **kwargs)

    model = _model("Swin")
    for stage in model.encoder.layers:
        for block in stage.blocks:
            block.__class__ = MyLayer
    report = fastnote.patch(model)
    assert list(report) == []
    assert len(report.left) == 4 and all(e.kind == "hf_swin" and "not its forward" in e.reason for e in report.left)


def _tempered_attention(module, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):
    """An attention function a user registers with transformers: eager's, at half the scaling."""
    from transformers.models.swin.modeling_swin import eager_attention_forward

    return eager_attention_forward(module, q, k, v, mask, scaling=scaling * 0.5, dropout=dropout, **kwargs)


def test_registered_attention_backend_is_not_fused():
    # V1's attention calls the function config._attn_implementation names; one a user registered
    # may compute anything: such a block is left at patch time, and a block patched under eager
    # runs the library's forward once the model is switched to it
    transformers.AttentionInterface.register("fastnote_test_tempered", _tempered_attention)
    x = torch.randn(1, 3, 44, 52)
    eager = _model("Swin").eval()
    patched = copy.deepcopy(eager)
    assert len(fastnote.patch(patched)) == 4
    for model in (eager, patched):
        model.set_attn_implementation("fastnote_test_tempered")
        assert model.encoder.layers[0].blocks[0].attention.config._attn_implementation == "fastnote_test_tempered"
    with torch.no_grad():
        want, got = eager(x).last_hidden_state, patched(x).last_hidden_state
    assert torch.equal(got, want)
    report = fastnote.patch(copy.deepcopy(eager))
    assert list(report) == [] and len(report.left) == 4
    assert all(e.kind == "hf_swin" and "'fastnote_test_tempered'" in e.reason for e in report.left)


def test_other_library_signature_left_with_reason(monkeypatch):
    # transformers 4.x's Swinv2Layer.forward (hidden_states, input_dimensions, head_mask=None,
    # output_attentions=False), called positionally by its stage: the fused forward, written for
    # 5.x's, would take head_mask for output_attentions
    from transformers.models.swinv2 import modeling_swinv2

    library = modeling_swinv2.Swinv2Layer.forward

    def forward(self, hidden_states, input_dimensions, head_mask=None, output_attentions=False):
        return library(self, hidden_states, input_dimensions, output_attentions)

    forward.__module__, forward.__qualname__ = library.__module__, library.__qualname__
    monkeypatch.setattr(modeling_swinv2.Swinv2Layer, "forward", forward)
    report = fastnote.patch(_model("Swinv2"))
    assert list(report) == [] and len(report.left) == 4
    assert all("head_mask" in e.reason and "transformers version" in e.reason for e in report.left)


def test_v2_mask_added_twice_is_measured():
    # the library's V2 attention adds the shift mask twice: the probe finds it, the fused op is given -200
    from fastnote.patch.hf_swin import _v2_mask_count

    model = _model("Swinv2")
    sa = model.encoder.layers[0].blocks[1].attention.self
    assert _v2_mask_count(sa, 8) == 2.0
    cls = fused_layer_class(type(model.encoder.layers[0].blocks[1]), 2)
    assert cls._fastnote_mask_value == -200.0


def test_v2_half_model_is_probed_in_float32(device, launches):
    """A model cast to fp16 (model.half()): the probe's zero key would give NaN through
    F.normalize in fp16 (its eps is 0 there), so it runs on an fp32 copy; every layer is fused as
    in fp32, with the same mask count, the module probed is left as it was, and the patched
    half model is as close to the fp32 one as the library's half model (within 4x its error)."""
    from fastnote.patch.hf_swin import _v2_mask_count

    model = _model("Swinv2").to(device).half()
    sa = model.encoder.layers[0].blocks[1].attention.self
    before = {k: v.clone() for k, v in sa.state_dict().items()}
    assert _v2_mask_count(sa, 8) == 2.0
    assert sa.query.weight.dtype == torch.float16
    assert all(torch.equal(v, before[k]) for k, v in sa.state_dict().items())
    exact = _model("Swinv2").to(device).eval()
    eager = copy.deepcopy(exact).half()
    report = fastnote.patch(model.eval())
    assert len(report.replaced) == len(_blocks(exact)) and not report.left
    x = torch.randn(1, 3, 64, 64, device=device)
    launches.clear()
    with torch.no_grad():
        truth = exact(pixel_values=x).last_hidden_state
        theirs = eager(pixel_values=x.half()).last_hidden_state
        ours = model(pixel_values=x.half()).last_hidden_state
    assert any(k.endswith("window_attention") for k, _, _ in launches), launches
    assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
    assert rms_relative_error(ours, truth) <= FACTOR * rms_relative_error(theirs, truth)


@pytest.mark.parametrize("version", ["Swin", "Swinv2"])
def test_layer_whose_attention_is_hooked_is_left(version, launches):
    """The fused layer never calls its attention: a layer whose attention (or a module in it)
    holds a hook is left, with the reason, the others fused; the hook sees what it saw, and the
    probe did not run it while patching."""
    eager, patched = _model(version).eval(), _model(version).eval()
    seen = {"eager": [], "patched": []}
    hooked = "q_proj" if version == "Swin" else "self"   # V1's attention holds its projections itself
    for key, model in (("eager", eager), ("patched", patched)):
        module = getattr(model.encoder.layers[0].blocks[1].attention, hooked)
        module.register_forward_hook(lambda m, i, o, key=key: seen[key].append((o[0] if isinstance(o, tuple) else o).detach()))
    report = fastnote.patch(patched)
    assert seen["patched"] == []
    assert len(report.replaced) == len(_blocks(eager)) - 1
    (left,) = report.left
    assert left.path == "encoder.layers.0.blocks.1.attention" + ("" if version == "Swin" else ".self")
    assert f"'{hooked}' holds a forward or backward hook" in left.reason
    x = torch.randn(1, 3, 64, 64)
    launches.clear()
    with torch.no_grad():
        assert_close(patched(pixel_values=x).last_hidden_state, eager(pixel_values=x).last_hidden_state, "reduction")
    assert launches
    assert len(seen["patched"]) == len(seen["eager"]) == 1
    assert_close(seen["patched"][0], seen["eager"][0], "reduction")


class _DoubledLinear(torch.nn.Linear):
    """A Linear subclass with its own forward (as quantised or adapter layers have): its weight
    alone is not what it computes."""

    def forward(self, x):
        return 2 * super().forward(x)


def _tempered_v1_attention(self, hidden_states, attention_mask=None, **kwargs):
    out, weights = type(self).__mro__[1].forward(self, hidden_states, attention_mask, **kwargs)
    return 0.5 * out, weights


@pytest.mark.parametrize("version,path,kind", [
    ("Swin", "attention.q_proj", "linear"), ("Swin", "attention.o_proj", "linear"),
    ("Swin", "attention", "forward"), ("Swin", "attention.relative_position_bias", "forward"),
    ("Swinv2", "attention.self.key", "linear"), ("Swinv2", "attention.output.dense", "linear"),
    ("Swinv2", "attention", "forward"), ("Swinv2", "attention.output", "forward")])
def test_module_the_fused_layer_bypasses_with_its_own_forward_is_left(version, path, kind):
    """The fused layer reads these modules' parameters and calls none of them: one whose class
    brings its own forward (a Linear subclass, an attention subclass) is left with the reason,
    and the patched model computes what the unpatched one does."""
    eager = _model(version).eval()
    block = eager.encoder.layers[0].blocks[1]
    module = block.get_submodule(path)
    if kind == "linear":
        module.__class__ = _DoubledLinear
    else:
        library = type(module).forward
        if path == "attention" and version == "Swin":
            sub = type("MyAttention", (type(module),), {"forward": _tempered_v1_attention})
        else:
            sub = type("Mine", (type(module),), {"forward": lambda self, *a, **k: library(self, *a, **k)})
        module.__class__ = sub
    patched = copy.deepcopy(eager)
    report = fastnote.patch(patched)
    assert len(report.replaced) == len(_blocks(eager)) - 1
    (left,) = report.left
    assert left.path == "encoder.layers.0.blocks.1.attention" + ("" if version == "Swin" else ".self")
    assert f"'{path}' " in left.reason and "has a forward of its own" in left.reason, left.reason
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(patched(pixel_values=x).last_hidden_state, eager(pixel_values=x).last_hidden_state, "reduction")
