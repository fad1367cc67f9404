"""Fast style transfer (Johnson et al.): a small image-to-image network trained with the perceptual
loss (content + style + pixel + total variation) of a frozen VGG-like feature extractor.

The extractor is a randomly initialised VGG-shaped stack (conv-relu blocks with max pooling,
features at relu1_2, relu2_2, relu3_3, relu4_3), so nothing is downloaded; with real VGG-16
weights the code is the same. The eager variant computes Gram matrices, style loss and total
variation in plain PyTorch; the fastnote variant is ``fastnote.nn.PerceptualLoss`` on the same
extractor (fused Gram / style-loss and total-variation kernels).

    python examples/style_transfer.py --steps 5            # tiny: batch 2, 32x32, widths /8 (CPU)
    python examples/style_transfer.py --full --steps 100   # batch 4, 256x256, VGG-16 widths (GPU)
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import fastnote  # noqa: E402

FULL = dict(batch=4, image_size=256, width=64)
SMOKE = dict(batch=2, image_size=32, width=8)
WEIGHTS = {"content": 1.0, "style": 1e3, "pixel": 1.0, "tv": 1e-2}
CONTENT_LAYER = 1   # relu2_2


class VGGFeatures(nn.Module):
    """VGG-16's first four blocks (2, 2, 3, 3 convs of widths w, 2w, 4w, 8w); returns the last
    relu of each block. Frozen."""

    def __init__(self, width: int):
        super().__init__()
        blocks, cin = [], 3
        for i, (n, cout) in enumerate(zip((2, 2, 3, 3), (width, 2 * width, 4 * width, 8 * width))):
            layers = [nn.MaxPool2d(2)] if i else []
            for _ in range(n):
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
                cin = cout
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats


class TransformNet(nn.Module):
    """A small residual image-to-image network (the trained model)."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 9, padding=4), nn.InstanceNorm2d(width, affine=True), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * width, affine=True), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.InstanceNorm2d(2 * width, affine=True), nn.ReLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, width, 3, padding=1),
            nn.InstanceNorm2d(width, affine=True), nn.ReLU(),
            nn.Conv2d(width, 3, 9, padding=4))

    def forward(self, x):
        return x + self.net(x)


def _gram(f):
    b, c, h, w = f.shape
    f = f.reshape(b, c, h * w)
    return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


class EagerPerceptualLoss(nn.Module):
    """The perceptual loss in plain PyTorch, the same terms as ``fastnote.nn.PerceptualLoss``."""

    def __init__(self, extractor, style_image):
        super().__init__()
        self.extractor = extractor
        with torch.no_grad():
            self.style_grams = [_gram(f) for f in extractor(style_image)]

    def forward(self, x, y_hat):
        content_feats, out_feats = self.extractor(x), self.extractor(y_hat)
        content = F.mse_loss(out_feats[CONTENT_LAYER], content_feats[CONTENT_LAYER])
        style = sum(((_gram(f) - g) ** 2).sum() / f[0].numel() for f, g in zip(out_feats, self.style_grams))
        pixel = F.mse_loss(y_hat, x)
        c, h, w = y_hat.shape[1:]
        tv = ((y_hat[..., :, 1:] - y_hat[..., :, :-1]).abs().sum()
              + (y_hat[..., 1:, :] - y_hat[..., :-1, :]).abs().sum()) / (c * h * w)
        return (WEIGHTS["content"] * content + WEIGHTS["style"] * style + WEIGHTS["pixel"] * pixel
                + WEIGHTS["tv"] * tv)


def build(use_fastnote: bool, full: bool = False, device="cpu", seed: int = 0):
    """(transform net, perceptual loss, sizes); the style image is drawn from ``seed`` too."""
    sizes = FULL if full else SMOKE
    _common.seed_all(seed)
    extractor = VGGFeatures(sizes["width"]).to(device)
    model = TransformNet(sizes["width"]).to(device)
    s = sizes["image_size"]
    style_image = torch.rand(1, 3, s, s, generator=_common.data_generator(seed + 100)).to(device)
    if use_fastnote:
        loss = fastnote.nn.PerceptualLoss(extractor, content_layer=CONTENT_LAYER, weights=WEIGHTS,
                                          style_image=style_image)
    else:
        loss = EagerPerceptualLoss(extractor, style_image)
    return model, loss, sizes


def training(use_fastnote: bool, full: bool = False, device="cpu", seed: int = 0,
             amp: Optional[torch.dtype] = None, verbose: bool = False) -> _common.Training:
    device = torch.device(device)
    model, criterion, sizes = build(use_fastnote, full, device, seed)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = _common.data_generator(seed)
    b, s = sizes["batch"], sizes["image_size"]

    def next_batch():
        return torch.rand(b, 3, s, s, generator=gen).to(device)

    def loss(x):
        return criterion(x, model(x))

    return _common.Training("style_transfer" + ("" if use_fastnote else " (eager)"), {"transform": model},
                            next_batch, [_common.Phase("perceptual_loss", loss, opt)], device, amp)


run = _common.runner(training)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return _common.main("Style transfer with the perceptual loss, a few training steps", run, argv)


if __name__ == "__main__":
    main()
