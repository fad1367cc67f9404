"""peft's LoRA adapters and fastnote.patch, in either order.

Every fused Swin path reads the weights of qkv / proj (Hugging Face: the four projections) and calls
neither them nor the attention module. peft's ``inject_adapter_in_model`` (what ``get_peft_model``
does) puts its own ``lora.Linear`` in their place, whose ``weight`` is still the frozen base
weight: a fused path that went on reading it would compute without the adapter and give the
adapter's parameters no gradient. So:

- adapters added before patching: the module is left, with a reason that names peft's class, and
  the model computes what it did;
- adapters added after patching: a fused block (timm's, Hugging Face's, spandrel's) runs the
  library's own path, bitwise what the unpatched model with the same adapters computes, gradients
  of the adapters included; fastnote's own fused modules (torchvision's layout) raise;
- the same for a hook put on a projection after patching.
"""
import copy

import pytest
import torch
from torch import nn

import fastnote

peft = pytest.importorskip("peft", reason="peft is not installed: LoRA adapters are not checked here")


def _lora(model, targets, seed=1):
    """``model`` with LoRA adapters of rank 2 on ``targets``, B initialised at random (peft's default
    starts B at zero, where an adapter adds nothing yet and its loss would go unseen)."""
    torch.manual_seed(seed)
    return peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                        init_lora_weights=False), model)


def _timm(version):
    """Two of timm's blocks, W-MSA then SW-MSA."""
    if version == 1:
        block = pytest.importorskip("timm.models.swin_transformer").SwinTransformerBlock
    else:
        block = pytest.importorskip("timm.models.swin_transformer_v2").SwinTransformerV2Block
    return nn.Sequential(*(block(16, (8, 8), 2, window_size=4, shift_size=s) for s in (0, 2))), (1, 8, 8, 16)


def _hf(version):
    transformers = pytest.importorskip("transformers")
    cfg = getattr(transformers, f"{version}Config")(image_size=32, patch_size=4, embed_dim=16, depths=[2],
                                                    num_heads=[2], window_size=4, drop_path_rate=0.0)
    model = getattr(transformers, f"{version}Model")(cfg)
    with torch.no_grad():   # V1 starts its position table at zero: give it values
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 0.5)
    return model, (1, 3, 32, 32)


def _spandrel(name):
    arch = pytest.importorskip(f"spandrel.architectures.{name}")
    return getattr(arch, name)(upscale=2, img_size=16, window_size=4, embed_dim=16, depths=[2], num_heads=[2],
                               in_chans=3, upsampler="pixelshuffledirect", drop_path_rate=0.0), (1, 3, 16, 16)


# (id, make -> (model, input shape), LoRA targets, the fused class the blocks are switched to)
FUSED_BLOCKS = [
    ("timm", lambda: _timm(1), ["qkv", "proj"], "FusedSwinTransformerBlock"),
    ("timm-v2", lambda: _timm(2), ["qkv", "proj"], "FusedSwinTransformerV2Block"),
    ("hf-swin", lambda: _hf("Swin"), ["q_proj", "v_proj", "o_proj"], "FusedSwinLayer"),
    ("hf-swinv2", lambda: _hf("Swinv2"), ["query", "value", "dense"], "FusedSwinv2Layer"),
    ("swinir", lambda: _spandrel("SwinIR"), ["qkv", "proj"], "FusedSwinIRBlock"),
    ("swin2sr", lambda: _spandrel("Swin2SR"), ["qkv", "proj"], "FusedSwin2SRBlock"),
]


def _out(model, x):
    y = model(x) if not hasattr(model, "config") else model(pixel_values=x).last_hidden_state
    return y


def _adapter_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


def _made(make, train, device):
    torch.manual_seed(0)
    model, shape = make()
    return model.to(device).train(train), shape


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", FUSED_BLOCKS, ids=[c[0] for c in FUSED_BLOCKS])
def test_adapters_added_after_patching_are_not_dropped(case, train, device):
    """Patch, then add adapters: the fused blocks take the library's path, and the model computes
    what the unpatched model with the same adapters does, bitwise, the adapters' gradients
    included."""
    _, make, targets, fused = case
    eager, shape = _made(make, train, device)
    patched = copy.deepcopy(eager)
    report = fastnote.patch(patched)
    assert report.replaced and all(type(m).__name__ != fused for m in eager.modules())
    assert sum(type(m).__name__ == fused for m in patched.modules()) >= 2, str(report)
    x = torch.randn(shape, device=device)
    torch.testing.assert_close(_out(patched, x), _out(eager, x))   # the fused path runs (a kernel launch)
    before = _out(eager, x).detach()
    _lora(eager, targets)
    _lora(patched, targets, seed=2)
    patched.load_state_dict(eager.state_dict())
    assert sum("lora_" in n for n, _ in eager.named_parameters()) >= 2 * len(targets)
    ours, theirs = _out(patched, x), _out(eager, x)
    assert (theirs - before).abs().max() > 1e-3   # the premise: the adapters change the output
    assert torch.equal(ours, theirs)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    # timm's V2 attention and Swin2SR's compute qkv with F.linear on qkv.weight themselves: an
    # adapter on qkv gets no gradient there, unpatched as patched
    got, want = _adapter_grads(patched), _adapter_grads(eager)
    assert got.keys() == want.keys() and any(g is not None for g in want.values())
    for name in want:
        assert (got[name] is None) == (want[name] is None), name
        assert want[name] is None or torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("case", FUSED_BLOCKS, ids=[c[0] for c in FUSED_BLOCKS])
def test_hook_added_after_patching_runs(case, device):
    """Patch, then hook one of the projections the fused path reads: the library's path runs, and
    so the hook (here one that changes the projection's output) does."""
    _, make, targets, fused = case
    eager, shape = _made(make, False, device)
    patched = copy.deepcopy(eager)
    fastnote.patch(patched)
    x = torch.randn(shape, device=device)
    torch.testing.assert_close(_out(patched, x), _out(eager, x))
    calls = []
    for model in (eager, patched):
        for name, m in model.named_modules():
            if name.endswith("." + targets[-1]):
                m.register_forward_hook(lambda mod, args, out: calls.append(1) or 1.5 * out)
    with torch.no_grad():
        theirs = _out(eager, x)
        n = len(calls)
        ours = _out(patched, x)
    assert len(calls) == 2 * n > 0
    assert torch.equal(ours, theirs)


def test_merged_adapters_take_the_fused_path_again(device, launches):
    """Patch, add adapters, train with them (the library's path), then merge them into the weights
    (peft's ``merge_and_unload``): qkv and proj are plain Linear layers again, and the fused path
    runs, with what the adapted model computed."""
    eager, shape = _made(FUSED_BLOCKS[0][1], False, device)
    patched = copy.deepcopy(eager)
    fastnote.patch(patched)
    model = peft.get_peft_model(patched, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["qkv", "proj"],
                                                         init_lora_weights=False))
    x = torch.randn(shape, device=device)
    with torch.no_grad():
        adapted = model(x)
        launches.clear()
        merged = model.merge_and_unload()
        assert all(type(block.attn.qkv) is nn.Linear for block in merged)
        ours = merged(x)
    assert any("window_attention" in str(launch[0]) for launch in launches), launches
    assert (adapted - _out(eager, x)).abs().max() > 1e-3
    torch.testing.assert_close(ours, adapted)


def _torchvision(version):
    tv = pytest.importorskip("torchvision.models.swin_transformer")
    cls = tv.ShiftedWindowAttention if version == 1 else tv.ShiftedWindowAttentionV2
    return nn.Sequential(cls(16, [4, 4], [2, 2], 2))


@pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
def test_fastnote_fused_module_refuses_adapters_added_after_patching(version, device):
    """fastnote's own fused modules (torchvision's layout, which reads qkv's and proj's weights
    itself) have no library path to fall back on: adapters added after patching raise, naming the
    module and peft's class, rather than be dropped."""
    torch.manual_seed(0)
    patched = _torchvision(version).to(device)
    report = fastnote.patch(patched)
    assert report.replaced
    x = torch.randn(1, 8, 8, 16, device=device)
    patched(x)
    _lora(patched, ["qkv"])
    with pytest.raises(ValueError, match=r"'qkv' is a peft\.tuners\.lora\.layer\.Linear.*silently dropped"):
        patched(x)


# (id, make -> model, input shape, LoRA target, the paths reported): the core converters (timm's
# WindowAttention V1 / V2, torchvision's V1 / V2), timm's blocks (block and attention both),
# Hugging Face's layers (at their attention) and spandrel's blocks (at their attention)
BEFORE = [
    ("timm-core", lambda: nn.Sequential(pytest.importorskip("timm.models.swin_transformer").WindowAttention(
        16, 2, window_size=(4, 4))), (3, 16, 16), "qkv", ["0"]),
    ("timm-v2-core", lambda: nn.Sequential(pytest.importorskip("timm.models.swin_transformer_v2").WindowAttention(
        16, (4, 4), 2)), (3, 16, 16), "qkv", ["0"]),
    ("torchvision", lambda: _torchvision(1), (1, 8, 8, 16), "qkv", ["0"]),
    ("torchvision-v2", lambda: _torchvision(2), (1, 8, 8, 16), "qkv", ["0"]),
    ("timm-block", lambda: _timm(1)[0], (1, 8, 8, 16), "qkv", ["0", "0.attn", "1", "1.attn"]),
    ("timm-v2-block", lambda: _timm(2)[0], (1, 8, 8, 16), "proj", ["0", "0.attn", "1", "1.attn"]),
    ("hf-swin", lambda: _hf("Swin")[0], (1, 3, 32, 32), "q_proj",
     [f"encoder.layers.0.blocks.{i}.attention" for i in (0, 1)]),
    ("hf-swinv2", lambda: _hf("Swinv2")[0], (1, 3, 32, 32), "dense",
     [f"encoder.layers.0.blocks.{i}.attention.self" for i in (0, 1)]),
    ("swinir", lambda: _spandrel("SwinIR")[0], (1, 3, 16, 16), "qkv",
     [f"layers.0.residual_group.blocks.{i}.attn" for i in (0, 1)]),
    ("swin2sr", lambda: _spandrel("Swin2SR")[0], (1, 3, 16, 16), "proj",
     [f"layers.0.residual_group.blocks.{i}.attn" for i in (0, 1)]),
]


@pytest.mark.no_kernel
@pytest.mark.parametrize("case", BEFORE, ids=[c[0] for c in BEFORE])
def test_adapters_added_before_patching_are_reported(case):
    """Add adapters, then patch: each module whose fused path would read the adapted Linear's
    weight is left, with a reason naming peft's class, and the model computes what it did."""
    _, make, shape, target, paths = case
    torch.manual_seed(0)
    eager = _lora(make().eval(), [target])
    patched = copy.deepcopy(eager)
    report = fastnote.patch(patched)
    assert not report.replaced, str(report)
    reasons = {e.path: e.reason for e in report.left}
    assert sorted(reasons) == paths, str(report)
    for reason in reasons.values():
        assert f"{target}' (Linear from peft.tuners.lora.layer) has a forward of its own" in reason, reason
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(_out(patched, x), _out(eager, x))


# squeeze-excitation: fastnote's SE modules read the two convs' weights and call neither
def _se(layout):
    if layout == "torchvision":
        se = pytest.importorskip("torchvision.ops").SqueezeExcitation(16, 8, scale_activation=nn.Hardsigmoid)
        return nn.Sequential(nn.Conv2d(4, 16, 1), nn.ReLU(), se), "fc1"
    se = pytest.importorskip("timm.models._efficientnet_blocks").SqueezeExcite(16, rd_channels=8)   # MobileNetV3's
    return nn.Sequential(nn.Conv2d(4, 16, 1), nn.ReLU(), se), "conv_reduce"


@pytest.mark.parametrize("layout", ["torchvision", "timm"])
@pytest.mark.parametrize("how", ["lora", "hook"])
def test_se_refuses_a_conv_changed_after_patching(layout, how, device):
    """Patch, then put an adapter on (or hook) the SE's first conv: fastnote's SE raises, naming
    it, rather than compute without it."""
    torch.manual_seed(0)
    patched, conv = _se(layout)
    patched.to(device)
    report = fastnote.patch(patched)
    assert len(report.replaced) == 1 and isinstance(patched[2], (fastnote.nn.SqueezeExcitation,
                                                                 fastnote.nn.SqueezeExcite)), str(report)
    x = torch.randn(2, 4, 5, 5, device=device)
    patched(x)
    if how == "lora":
        _lora(patched, [conv])
        match = rf"'{conv}' is a peft\.tuners\.lora\.layer\.Conv2d.*silently dropped"
    else:
        getattr(patched[2], conv).register_forward_hook(lambda m, i, o: 2 * o)
        match = rf"'{conv}' holds a forward or backward hook.*silently dropped"
    with pytest.raises(ValueError, match=match):
        patched(x)


@pytest.mark.no_kernel
@pytest.mark.parametrize("layout", ["torchvision", "timm"])
def test_se_with_an_adapter_before_patching_is_reported(layout):
    """Add an adapter to the SE's first conv, then patch: the SE is left, with a reason naming
    peft's class, and the model computes what it did."""
    torch.manual_seed(0)
    model, conv = _se(layout)
    eager = _lora(model, [conv])
    patched = copy.deepcopy(eager)
    report = fastnote.patch(patched)
    assert not report.replaced
    (left,) = report.left
    assert left.path == "2" and f"'{conv}' (Conv2d from peft.tuners.lora.layer) has a forward of its own" in \
        left.reason, left.reason
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert torch.equal(patched(x), eager(x))
