"""SigLIP-style contrastive training: an image encoder and a text encoder map a batch of
(image, caption) pairs to unit vectors, trained with the pairwise sigmoid loss and a learnt
temperature and bias (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

The eager variant builds the [n, n] logits and an [n, n] label matrix (+1 on the diagonal, -1
elsewhere) and sums -logsigmoid(labels * logits), as open_clip's SigLipLoss does; the fastnote
variant calls ``fastnote.siglip_loss``, which streams over the logits without storing them (its
memory is O(n)).

    python examples/siglip_step.py --steps 5             # tiny: n = 32, 32x32 images (CPU)
    python examples/siglip_step.py --full --steps 100    # n = 16384, 64x64 images (GPU)
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
from clip_step import FULL, SMOKE, ImageEncoder, TextEncoder  # noqa: E402  (the same two towers)

import fastnote  # noqa: E402


class SigLIP(nn.Module):
    """The two towers of clip_step with SigLIP's scalars: t' = log 10 and b = -10 at the start
    (the paper's initialisation: the many negatives dominate the loss otherwise)."""

    def __init__(self, sizes):
        super().__init__()
        self.visual = ImageEncoder(sizes["width"], sizes["embed"])
        self.text = TextEncoder(sizes["vocab"], sizes["embed"], sizes["tokens"])
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    def forward(self, images, ids):
        return (F.normalize(self.visual(images), dim=-1), F.normalize(self.text(ids), dim=-1),
                self.logit_scale.exp(), self.logit_bias)


def eager_siglip_loss(image, text, logit_scale, logit_bias):
    logits = logit_scale * image @ text.t() + logit_bias
    n = image.shape[0]
    labels = 2 * torch.eye(n, device=image.device, dtype=image.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


def build(use_fastnote: bool, full: bool = False, device="cpu", seed: int = 0):
    """(model, loss(image, text, logit_scale, logit_bias), sizes)."""
    sizes = FULL if full else SMOKE
    _common.seed_all(seed)
    model = SigLIP(sizes).to(device)
    return model, (fastnote.siglip_loss if use_fastnote else eager_siglip_loss), sizes


def training(use_fastnote: bool, full: bool = False, device="cpu", seed: int = 0,
             amp: Optional[torch.dtype] = None, verbose: bool = False) -> _common.Training:
    device = torch.device(device)
    model, criterion, sizes = build(use_fastnote, full, device, seed)
    return _common.image_text_training("siglip_step" + ("" if use_fastnote else " (eager)"), "siglip", model, criterion,
                                       sizes, device, seed, amp)


run = _common.runner(training)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return _common.main("SigLIP-style contrastive training with siglip_loss, a few steps", run, argv)


if __name__ == "__main__":
    main()
