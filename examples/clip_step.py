"""CLIP-style contrastive training: an image encoder and a text encoder map a batch of
(image, caption) pairs to unit vectors, trained with the symmetric contrastive loss and a learnt
temperature.

The eager variant builds the [n, n] logits and takes the two cross entropies; the fastnote variant
calls ``fastnote.clip_loss``, which streams over the logits without storing them (its memory is
O(n), which is what lets n reach tens of thousands on one device).

    python examples/clip_step.py --steps 5             # tiny: n = 32, 32x32 images (CPU)
    python examples/clip_step.py --full --steps 100    # n = 16384, 64x64 images (GPU)
"""
from __future__ import annotations

import math
import os
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import fastnote  # noqa: E402

FULL = dict(batch=16384, image_size=64, width=64, embed=512, vocab=8192, tokens=32)
SMOKE = dict(batch=32, image_size=32, width=8, embed=32, vocab=128, tokens=8)


class ImageEncoder(nn.Module):
    def __init__(self, width: int, embed: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, embed))

    def forward(self, x):
        return self.net(x)


class TextEncoder(nn.Module):
    """Token embeddings + one transformer layer, mean-pooled."""

    def __init__(self, vocab: int, embed: int, tokens: int):
        super().__init__()
        self.token = nn.Embedding(vocab, embed)
        self.position = nn.Parameter(torch.randn(tokens, embed) * 0.01)
        self.layer = nn.TransformerEncoderLayer(embed, nhead=4, dim_feedforward=2 * embed, dropout=0.0,
                                                batch_first=True)
        self.proj = nn.Linear(embed, embed)

    def forward(self, ids):
        return self.proj(self.layer(self.token(ids) + self.position).mean(1))


class CLIP(nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.visual = ImageEncoder(sizes["width"], sizes["embed"])
        self.text = TextEncoder(sizes["vocab"], sizes["embed"], sizes["tokens"])
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images, ids):
        return (F.normalize(self.visual(images), dim=-1), F.normalize(self.text(ids), dim=-1),
                self.logit_scale.exp())


def eager_clip_loss(image, text, logit_scale):
    logits = logit_scale * image @ text.t()
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def build(use_fastnote: bool, full: bool = False, device="cpu", seed: int = 0):
    """(model, loss(image, text, logit_scale), sizes)."""
    sizes = FULL if full else SMOKE
    _common.seed_all(seed)
    model = CLIP(sizes).to(device)
    return model, (fastnote.clip_loss if use_fastnote else eager_clip_loss), sizes


def training(use_fastnote: bool, full: bool = False, device="cpu", seed: int = 0,
             amp: Optional[torch.dtype] = None, verbose: bool = False) -> _common.Training:
    device = torch.device(device)
    model, criterion, sizes = build(use_fastnote, full, device, seed)
    return _common.image_text_training("clip_step" + ("" if use_fastnote else " (eager)"), "clip", model, criterion,
                                       sizes, device, seed, amp)


run = _common.runner(training)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return _common.main("CLIP-style contrastive training with clip_loss, a few steps", run, argv)


if __name__ == "__main__":
    main()
