"""fastnote.patch's report on what it does not replace: modules that look like attention but that no
family recognises are listed under "left" with a reason (the rule is in
``fastnote.patch.attention_like``), once per module; what is not attention is not listed. Also the
package's own structure: the family registry behind ``KINDS``, the probe tolerance, and no import
of ``fastnote.testing`` from the production code."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnote
from fastnote.patch import KINDS, registry
from fastnote.patch.probe import PROBE_TOLERANCE
from fastnote.testing import tolerance
from transcriptions import TimmWindowAttention, TorchvisionSqueezeExcitation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_RECOGNISED = "attention-like module not recognised: "
SN = "torch.nn.utils.spectral_norm -> fastnote.nn.utils.spectral_norm"


# ------------------------------------------------------------------------------------------------
# Stand-ins: attention fastnote has no drop-in for, and modules that are not attention
# ------------------------------------------------------------------------------------------------

class BiasTableAttention(nn.Module):
    """Window attention with separate q/k/v and a learnt relative position table (no ``qkv``)."""

    def __init__(self, dim=8, window=2):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, 1))

    def forward(self, x):
        return x


class ContinuousBiasAttention(nn.Module):
    """Swin V2-style: the position bias comes from a small MLP (``cpb_mlp``)."""

    def __init__(self, dim=8):
        super().__init__()
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(x)


class ProjAttention(nn.Module):
    """q_proj / k_proj / v_proj and an ``nn.Softmax`` child."""

    def __init__(self, dim=8):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        a = self.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2))
        return a @ self.v_proj(x)


class FunctionalSoftmaxAttention(nn.Module):
    """query / key / value, the softmax called in forward (no ``nn.Softmax`` child)."""

    def __init__(self, dim=8):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return F.softmax(self.query(x) @ self.key(x).transpose(-1, -2), -1) @ self.value(x)


class QKVOnly(nn.Module):
    """Projects only (its parent does the attention): q / k / v, no softmax anywhere."""

    def __init__(self, dim=8):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x)


class Mlp(nn.Module):
    def __init__(self, dim=8, softmax=False):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        self.out = nn.Softmax(-1) if softmax else nn.Identity()

    def forward(self, x):
        return self.out(self.fc2(self.act(self.fc1(x))))


class Outer(nn.Module):
    """An unrecognised attention holding another attention-like module, a squeeze-excitation and
    an h-swish."""

    def __init__(self, dim=8):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.softmax = nn.Softmax(-1)
        self.inner = BiasTableAttention(dim)
        self.se = TorchvisionSqueezeExcitation(dim, 4)
        self.act = nn.Hardswish()

    def forward(self, x):
        return self.act(self.se(self.inner(x)))


def _attention_left(report):
    return [(e.path, e.reason) for e in report.left if e.kind == "attention"]


# ------------------------------------------------------------------------------------------------
# The rule
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,evidence", [
    pytest.param(BiasTableAttention, "has relative_position_bias_table", id="relative_position_bias_table"),
    pytest.param(ContinuousBiasAttention, "has cpb_mlp", id="cpb_mlp"),
    pytest.param(ProjAttention, "has q_proj, k_proj, v_proj and a softmax", id="q_proj-k_proj-v_proj-Softmax"),
    pytest.param(FunctionalSoftmaxAttention, "has query, key, value and a softmax", id="query-key-value-F.softmax"),
    pytest.param(lambda: nn.MultiheadAttention(8, 2), "torch's nn.MultiheadAttention", id="nn.MultiheadAttention"),
])
def test_unrecognised_attention_is_left_with_reason(make, evidence):
    model = nn.Sequential(nn.Linear(8, 8), make())
    original = model[1]
    report = fastnote.patch(model)
    assert list(report) == [] and model[1] is original
    assert [(e.path, e.kind) for e in report.left] == [("1", "attention")]
    reason = report.left[0].reason
    assert reason.startswith(NOT_RECOGNISED + type(original).__name__) and evidence in reason, reason
    assert f"left 1 x attention (1): {NOT_RECOGNISED}{type(original).__name__}" in str(report)


@pytest.mark.parametrize("make", [
    pytest.param(Mlp, id="mlp-fc1-fc2"),
    pytest.param(lambda: Mlp(softmax=True), id="mlp-with-softmax-head"),
    pytest.param(QKVOnly, id="q-k-v-projections-without-softmax"),
    pytest.param(lambda: nn.TransformerEncoderLayer(8, 2, 16), id="encoder-layer-holding-attention"),
])
def test_what_is_not_attention_is_not_reported(make):
    model = nn.Sequential(make(), nn.utils.spectral_norm(nn.Linear(8, 8)), nn.Hardswish())
    report = fastnote.patch(model)
    assert list(report) == [f"1.weight: {SN}"]         # the standalone h-swish is torch's: not reported either
    # the encoder layer holds an nn.MultiheadAttention: that one, not the layer, is reported
    want = [("0.self_attn", "attention")] if isinstance(model[0], nn.TransformerEncoderLayer) else []
    assert [(e.path, e.kind) for e in report.left] == want


def test_one_entry_per_module_and_recognised_things_inside_still_replaced():
    model = nn.Sequential(Outer())
    report = fastnote.patch(model)
    assert [p for p, _ in _attention_left(report)] == ["0"]            # not "0.inner" as well
    assert report.left == [e for e in report.left if e.kind == "attention"]
    assert list(report) == ["0.se: TorchvisionSqueezeExcitation -> fastnote.nn.SqueezeExcitation"]
    assert type(model[0].se) is fastnote.nn.SqueezeExcitation
    assert type(model[0].act) is nn.Hardswish                           # a standalone h-swish stays torch's
    fastnote.unpatch(model)
    assert type(model[0].se) is TorchvisionSqueezeExcitation


def test_left_by_a_converter_is_not_reported_twice():
    # Swin attention with attention dropout: the WindowAttention family leaves it with its reason;
    # it looks like attention too (its bias table), but gets one entry
    model = nn.Sequential(TimmWindowAttention(32, (4, 4), 2, attn_drop=0.1))
    report = fastnote.patch(model)
    assert [(e.path, e.kind) for e in report.left] == [("0", "WindowAttention")]
    assert "attention dropout" in report.left[0].reason


def test_include_decides_what_is_reported():
    model = nn.Sequential(ProjAttention(), TimmWindowAttention(32, (4, 4), 2))
    # no attention family patched: nothing about attention is reported
    report = fastnote.patch(model, include=["spectral_norm"])
    assert list(report) == [] and report.left == []
    # SelfAttention only: the window attention is recognised by a family left out, so it is not
    # reported as unrecognised; the other one is
    report = fastnote.patch(model, include=["SelfAttention"])
    assert list(report) == [] and [p for p, _ in _attention_left(report)] == ["0"]
    report = fastnote.patch(model)
    assert list(report) == ["1: TimmWindowAttention -> fastnote.nn.timm_swin.TimmWindowAttention"]
    assert [p for p, _ in _attention_left(report)] == ["0"]


# ------------------------------------------------------------------------------------------------
# Real models: Swin V2 (timm, torchvision) and, where installed, Hugging Face's Swin and Swin V2
# ------------------------------------------------------------------------------------------------

def _every_attention_left(model, attention_class_names):
    report = fastnote.patch(model)
    attention = [n for n, m in model.named_modules() if type(m).__name__ in attention_class_names]
    assert attention, "the model has no attention module"
    assert list(report) == []
    assert [e.path for e in report.left] == attention, str(report)
    assert all(e.reason for e in report.left)
    return report


def test_timm_swin_v2_nothing_left():
    """timm's Swin V2 blocks go on the fused path: nothing attention-like is left (their V2
    attention, read by the fused blocks, is not reported either)."""
    timm_v2 = pytest.importorskip("timm.models.swin_transformer_v2")
    torch.manual_seed(0)
    model = timm_v2.SwinTransformerV2(img_size=64, embed_dim=24, depths=(1, 1), num_heads=(1, 2), window_size=8,
                                      num_classes=4)
    report = fastnote.patch(model)
    assert report.left == [], str(report)
    assert report.counts() == {"SwinTransformerV2Block -> fastnote.nn.timm_swin.FusedSwinTransformerV2Block": 2}


def test_torchvision_swin_v2_nothing_left():
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    torch.manual_seed(0)
    model = swin.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
                                 num_classes=4, block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2)
    attention = [n for n, m in model.named_modules() if type(m).__name__ == "ShiftedWindowAttentionV2"]
    report = fastnote.patch(model)
    assert report.left == [], str(report)
    assert [e.path for e in report.replaced] == attention and len(attention) == 2
    assert report.counts() == {"ShiftedWindowAttentionV2 -> fastnote.nn.ShiftedWindowAttentionV2": 2}


def test_swin_v2_look_alike_left_with_reason():
    """V2 attention in a layout the drop-ins do not take (here timm's, its coordinate table
    removed) is left by the window-attention family with its reason, not passed over."""
    timm_v2 = pytest.importorskip("timm.models.swin_transformer_v2")
    attn = timm_v2.WindowAttention(16, (4, 4), 2)
    del attn._buffers["relative_coords_table"]
    report = fastnote.patch(nn.Sequential(attn))
    assert list(report) == []
    assert [(e.path, e.kind) for e in report.left] == [("0", "WindowAttention")]
    assert report.left[0].reason.startswith("Swin V2 attention (cosine similarity, continuous position bias) without")


@pytest.mark.parametrize("version", ["Swin", "Swinv2"])
def test_hugging_face_swin_blocks_fused_nothing_left(version):
    # the hf_swin family fuses every block (tests/test_patch_hf_swin.py); nothing attention-like is left over
    transformers = pytest.importorskip(
        "transformers", reason="Hugging Face transformers is not installed: its Swin models are not checked here")
    config = getattr(transformers, f"{version}Config")(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                        num_heads=[1, 2], window_size=4)
    model = getattr(transformers, f"{version}Model")(config)
    report = fastnote.patch(model)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == f"Fused{version}Layer"]
    assert len(blocks) == 2 and list(report) == [
        f"{p}: {version}Layer -> fastnote.nn.hf_swin.Fused{version}Layer" for p in blocks]
    assert report.left == [], str(report)


# ------------------------------------------------------------------------------------------------
# The package
# ------------------------------------------------------------------------------------------------

def test_kinds_come_from_the_registry_in_registration_order():
    assert KINDS == tuple(f.kind for f in registry.families()) == (
        "SqueezeExcitation", "hswish_se", "WindowAttention", "ShiftedWindowAttention",
        "SelfAttention", "spectral_norm", "hf_swin", "spandrel_swin")
    assert fastnote.patch.KINDS is KINDS   # as the docs spell it: fastnote.patch is the function
    # every family does something: converts modules, or acts before a module's children
    assert all(f.converters or f.before_children for f in registry.families())
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("SqueezeExcitation")


def test_probe_tolerance_is_ten_parity_tolerances():
    for dtype, tol in PROBE_TOLERANCE.items():
        assert tol == pytest.approx(10 * tolerance(dtype, "reduction")[0]), dtype


def test_importing_fastnote_imports_no_test_helpers():
    code = "import sys, fastnote, fastnote.patch; print('fastnote.testing' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
