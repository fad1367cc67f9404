"""fastnote.patch: what it replaces, that outputs and gradients stay the same, and its report."""
import pytest
import torch
from torch import nn

import fastnote
from fastnote.testing import assert_close
from transcriptions import TorchvisionSqueezeExcitation


class SqueezeExcitation(TorchvisionSqueezeExcitation):
    """Same name as torchvision's class, as the patcher matches it."""


def _block():
    return nn.Sequential(
        nn.Conv2d(8, 16, 1), nn.Hardswish(),
        nn.Sequential(SqueezeExcitation(16, 8, scale_activation=nn.Hardsigmoid)),
        nn.Conv2d(16, 8, 1), nn.Hardsigmoid(), nn.ReLU(),
    )


def test_patch_replaces_and_preserves_numbers(device):
    eager = _block().to(device)
    patched = _block().to(device)
    patched.load_state_dict(eager.state_dict())
    report = fastnote.patch(patched)
    assert report == [
        "1: Hardswish -> fastnote.nn.Hardswish",
        "2.0: SqueezeExcitation -> fastnote.nn.SqueezeExcitation",
        "4: Hardsigmoid -> fastnote.nn.Hardsigmoid",
    ]
    x = torch.randn(2, 8, 5, 5, device=device, requires_grad=True)
    y_e, y_p = eager(x), patched(x)
    assert_close(y_p, y_e, "reduction")
    ge = torch.autograd.grad(y_e.sum(), [x] + list(eager.parameters()))
    gp = torch.autograd.grad(y_p.sum(), [x] + list(patched.parameters()))
    for a, b in zip(gp, ge):
        assert_close(a, b, "reduction")
    assert set(patched.state_dict()) == set(eager.state_dict())
    assert fastnote.patch(patched) == []  # idempotent


def test_patch_matches_torchvision_se_by_name():
    model = nn.Sequential(SqueezeExcitation(16, 4, scale_activation=nn.Hardsigmoid), nn.Hardswish())
    ref = SqueezeExcitation(16, 4, scale_activation=nn.Hardsigmoid)
    ref.load_state_dict(model[0].state_dict())
    report = fastnote.patch(model, include=["SqueezeExcitation"])
    assert report == ["0: SqueezeExcitation -> fastnote.nn.SqueezeExcitation"]
    assert isinstance(model[1], nn.Hardswish)
    x = torch.randn(2, 16, 3, 3)
    assert_close(model[0](x), ref(x), "reduction")


def test_patch_leaves_unsupported_activation():
    model = nn.Sequential(SqueezeExcitation(16, 4, activation=nn.GELU))
    assert fastnote.patch(model) == []
    assert type(model[0]) is SqueezeExcitation


def test_patch_expect_and_include_errors():
    with pytest.raises(RuntimeError, match="expected to replace 3 modules, replaced 1"):
        fastnote.patch(nn.Sequential(nn.Hardswish()), expect=3)
    with pytest.raises(ValueError, match="include must name classes"):
        fastnote.patch(nn.Sequential(), include=["Conv2d"])


@pytest.mark.parametrize("name", ["mobilenet_v3_small"])
def test_torchvision_mobilenet(name, device):
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    eager = getattr(models, name)().to(device).eval()
    patched = getattr(models, name)().to(device).eval()
    patched.load_state_dict(eager.state_dict())
    report = fastnote.patch(patched)
    assert any("SqueezeExcitation" in r for r in report) and any("Hardswish" in r for r in report)
    x = torch.randn(1, 3, 64, 64, device=device)
    with torch.no_grad():
        assert_close(patched(x), eager(x), "reduction")
