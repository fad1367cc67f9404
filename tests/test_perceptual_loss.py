"""StyleLoss, TotalVariation and PerceptualLoss modules: the perceptual loss of seed 000
(transcribed in transcriptions.py) reproduced term by term, loss and gradient, on a small random
VGG-like network (and on torchvision's vgg16(weights=None) where torchvision imports); weights,
layer choices, buffers, errors, compile."""
import pytest
import torch
from torch import nn

import fastnote
from fastnote import reference
from fastnote.testing import assert_close
from transcriptions import SeedPerceptualLoss, SeedVgg16


def _close(got, want, msg=""):
    # relative to the largest expected entry (the losses' gradients are ~1e-4 .. 1e-6)
    scale = max(want.abs().max().item(), 1e-30)
    assert_close(got / scale, want / scale, "reduction", msg=msg)


def vgg_like(widths=(8, 16, 24, 70)):
    """vgg16().features[:23]'s layer positions (so the seed's Vgg16 slices it the same way) with
    narrow random convolutions; 70 channels cross a 64-wide Gram tile."""
    layers, cin = [], 3
    for block, (width, convs) in enumerate(zip(widths, (2, 2, 3, 3))):
        if block:
            layers.append(nn.MaxPool2d(2, 2))
        for _ in range(convs):
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU(inplace=True)]
            cin = width
    assert len(layers) == 23
    return nn.Sequential(*layers)


def _setup(device, batch=2, size=16, features=None):
    torch.manual_seed(0)
    vgg = SeedVgg16(features if features is not None else vgg_like()).to(device).eval()
    style = torch.rand(1, 3, size, size, device=device)
    x = torch.rand(batch, 3, size, size, device=device)
    y_hat = torch.rand(batch, 3, size, size, device=device)
    return vgg, style, x, y_hat


def _seed_and_ours(device, content_layer=1, **kw):
    vgg, style, x, y_hat = _setup(device, **kw)
    seed = SeedPerceptualLoss(vgg, style, content_layer, batch_size=x.shape[0])
    ours = fastnote.nn.PerceptualLoss(vgg, content_layer=content_layer, style_image=style)
    return seed, ours, x, y_hat


@pytest.mark.parametrize("content_layer", [1, 3])
def test_reproduces_seed_terms_and_gradients(content_layer, device):
    seed, ours, x, y_hat = _seed_and_ours(device, content_layer)
    ya, yb = y_hat.clone().requires_grad_(), y_hat.clone().requires_grad_()
    want = seed(x, yb)
    got = ours.terms(x, ya)
    assert got._fields == ("content", "style", "pixel", "tv")
    for name, g, w in zip(got._fields, got, want):
        _close(g, w, name)
        ga, = torch.autograd.grad(g, ya, retain_graph=True)
        gb, = torch.autograd.grad(w, yb, retain_graph=True)
        _close(ga, gb, f"gradient of {name}")


def test_weighted_total(device):
    vgg, style, x, y_hat = _setup(device)
    seed = SeedPerceptualLoss(vgg, style, 1, batch_size=x.shape[0])
    weights = {"content": 1.0, "style": 1e5, "pixel": 0.5, "tv": 1e-2}
    ours = fastnote.nn.PerceptualLoss(vgg, content_layer=1, weights=weights, style_image=style)
    ya, yb = y_hat.clone().requires_grad_(), y_hat.clone().requires_grad_()
    got = ours(x, ya)
    want = sum(w * t for w, t in zip(weights.values(), seed(x, yb)))
    _close(got, want)
    _close(torch.autograd.grad(got, ya)[0], torch.autograd.grad(want, yb)[0])
    # four numbers in the order content, style, pixel, tv; the default weighs every term 1
    positional = fastnote.nn.PerceptualLoss(vgg, 1, None, list(weights.values()), style_image=style)
    _close(positional(x, y_hat), want.detach())
    _close(fastnote.nn.PerceptualLoss(vgg, style_image=style)(x, y_hat), sum(seed(x, y_hat)))


def test_style_layers_subset(device):
    vgg, style, x, y_hat = _setup(device)
    loss = fastnote.nn.PerceptualLoss(vgg, content_layer=0, style_layers=[0, 2], style_image=style)
    assert [n for n, _ in loss.named_buffers()] == ["style_gram_0", "style_gram_2"]
    feats, target = vgg(y_hat), vgg(style)
    want = sum(reference.style_loss(feats[j], reference.gram(target[j])) for j in (0, 2))
    _close(loss.terms(x, y_hat).style, want)


def test_set_style_replaces_targets(device):
    vgg, style, x, y_hat = _setup(device)
    loss = fastnote.nn.PerceptualLoss(vgg)
    with pytest.raises(RuntimeError, match="no style target"):
        loss(x, y_hat)
    loss.set_style(style)
    first = loss.terms(x, y_hat).style
    loss.set_style(torch.rand_like(style))
    assert len(list(loss.buffers())) == 4
    assert not torch.equal(first, loss.terms(x, y_hat).style)


def test_style_loss_module(device):
    target = torch.randn(1, 20, 6, 6, device=device)
    module = fastnote.nn.StyleLoss(target)
    assert module.target_gram.shape == (1, 20, 20) and module.target_gram.dtype == torch.float32
    assert list(module.state_dict()) == ["target_gram"]
    x = torch.randn(3, 20, 6, 6, device=device, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    got, want = module(x), reference.style_loss(xr, reference.gram(target))
    _close(got, want)
    got.backward()
    want.backward()
    _close(x.grad, xr.grad)
    # state_dict round trip; normalize honoured
    other = fastnote.nn.StyleLoss(torch.zeros(1, 20, 6, 6, device=device))
    other.load_state_dict(module.state_dict())
    _close(other(x), want)
    hw = fastnote.nn.StyleLoss(target, normalize="hw")
    _close(hw(x), reference.style_loss(x, reference.gram(target, "hw"), "hw"))
    with pytest.raises(ValueError, match="normalize must be one of"):
        fastnote.nn.StyleLoss(target, normalize="x")


def test_targets_built_under_autocast_stay_float32(device):
    """Built under autocast, the style targets are still fp32 Grams (autocast would round them to
    half: inf in fp16 with normalize="none"), and the modules work without autocast after."""
    vgg, style, x, y_hat = _setup(device)
    target = torch.randn(1, 20, 6, 6, device=device) * 30
    want = fastnote.nn.StyleLoss(target, normalize="none").target_gram
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast(device.type, dtype=dtype):
            module = fastnote.nn.StyleLoss(target, normalize="none")
            loss = fastnote.nn.PerceptualLoss(vgg, style_image=style)
        assert module.target_gram.dtype == torch.float32 and torch.equal(module.target_gram, want)
        assert all(b.dtype == torch.float32 for b in loss.buffers())
        assert torch.isfinite(module(torch.randn(2, 20, 6, 6, device=device)))
        assert torch.isfinite(loss(x, y_hat))


def test_checkpoint_restores_into_an_instance_without_style_image(device):
    """The style targets travel in the state_dict: a fresh PerceptualLoss built without
    style_image loads them (strictly) and gives the same loss, so training resumes without the
    style image."""
    vgg, style, x, y_hat = _setup(device)
    trained = fastnote.nn.PerceptualLoss(vgg, style_layers=[0, 2], style_image=style)
    fresh = fastnote.nn.PerceptualLoss(vgg)
    fresh.load_state_dict(trained.state_dict())
    assert list(fresh.state_dict()) == list(trained.state_dict())
    _close(fresh(x, y_hat), trained(x, y_hat))
    # and into one built with another style image: the checkpoint's targets win
    other = fastnote.nn.PerceptualLoss(vgg, style_image=torch.rand_like(style))
    other.load_state_dict(trained.state_dict())
    _close(other(x, y_hat), trained(x, y_hat))


def test_errors(device):
    vgg, style, x, y_hat = _setup(device)
    with pytest.raises(ValueError, match="style_layers must name at least one"):
        fastnote.nn.PerceptualLoss(vgg, style_layers=[], style_image=style)
    with pytest.raises(ValueError, match=r"x has 20 channels .*, but target_gram \[1, 8, 8\] is the Gram matrix of 8"):
        fastnote.nn.StyleLoss(torch.randn(1, 8, 4, 4, device=device))(torch.randn(2, 20, 4, 4, device=device))
    with pytest.raises(ValueError, match="content_layer must be < 4"):
        fastnote.nn.PerceptualLoss(vgg, content_layer=4, style_image=style)
    with pytest.raises(ValueError, match="style_layers must index"):
        fastnote.nn.PerceptualLoss(vgg, style_layers=[5], style_image=style)
    with pytest.raises(ValueError, match="weights keys must be among"):
        fastnote.nn.PerceptualLoss(vgg, weights={"perceptual": 1.0})
    with pytest.raises(ValueError, match="weights must have 4 entries"):
        fastnote.nn.PerceptualLoss(vgg, weights=[1.0, 2.0])
    with pytest.raises(TypeError, match="feature_extractor must be callable"):
        fastnote.nn.PerceptualLoss(3)
    with pytest.raises(TypeError, match="must return a sequence of feature maps"):
        fastnote.nn.PerceptualLoss(nn.Identity(), style_image=style)
    loss = fastnote.nn.PerceptualLoss(vgg, style_image=style)
    with pytest.raises(ValueError, match=r"y_hat must have shape \[2, 3, 16, 16\]"):
        loss(x, y_hat[:1])


def test_compile_fullgraph(device, compile_backend):
    vgg, style, x, y_hat = _setup(device)
    loss = fastnote.nn.PerceptualLoss(vgg, style_image=style)
    ya, yb = y_hat.clone().requires_grad_(), y_hat.clone().requires_grad_()
    got = torch.compile(loss, fullgraph=True, backend=compile_backend)(x, ya)
    want = loss(x, yb)
    _close(got, want)
    got.backward()
    want.backward()
    _close(ya.grad, yb.grad)


def test_torchvision_vgg16(device):
    try:
        from torchvision import models
    except Exception as exc:  # absent, or built for another torch (RuntimeError at import)
        pytest.skip(f"torchvision does not import: {type(exc).__name__}: {exc}")
    features = models.vgg16(weights=None).features
    seed, ours, x, y_hat = _seed_and_ours(device, features=features, batch=1, size=16)
    ya, yb = y_hat.clone().requires_grad_(), y_hat.clone().requires_grad_()
    for name, g, w in zip(("content", "style", "pixel", "tv"), ours.terms(x, ya), seed(x, yb)):
        _close(g, w, name)
    _close(torch.autograd.grad(sum(ours.terms(x, ya)), ya)[0], torch.autograd.grad(sum(seed(x, yb)), yb)[0])
