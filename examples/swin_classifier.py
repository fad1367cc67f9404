"""A Swin-T image classifier (timm's ``swin_tiny_patch4_window7_224``, random init) trained a few
steps, with its window attention swapped for fastnote's by ``fastnote.patch``.

At a reduced ``img_size`` timm shrinks the windows of the stages whose feature map is smaller
than 7x7 as well; the patched model follows it. Needs timm (no weight download).

    python examples/swin_classifier.py --steps 5             # batch 2, 64x64, width 32, 10 classes (CPU)
    python examples/swin_classifier.py --full --steps 100    # batch 128, 224x224, 1000 classes (GPU)
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

FULL = dict(batch=128, image_size=224, classes=1000, widths={})
# Swin-T's depths (2, 2, 6, 2) and windows, at a third of its width (heads of 32 channels as in
# Swin-T, 1/2/4/8 of them): a step takes seconds on a CPU under the Triton interpreter.
SMOKE = dict(batch=2, image_size=64, classes=10, widths=dict(embed_dim=32, num_heads=(1, 2, 4, 8)))


def build(use_fastnote: bool, full: bool = False, device="cpu", seed: int = 0, verbose: bool = False):
    """(model, sizes): timm's Swin-T, eager or patched (12 window-attention modules)."""
    timm = _common.import_timm()
    sizes = FULL if full else SMOKE
    _common.seed_all(seed)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=sizes["image_size"],
                              num_classes=sizes["classes"], **sizes["widths"]).to(device)
    if use_fastnote:
        _common.patched(model, 12, verbose)
    return model, sizes


def run(use_fastnote: bool, steps: int, full: bool = False, device="cpu", seed: int = 0,
        amp: Optional[torch.dtype] = None, verbose: bool = False) -> _common.Run:
    device = torch.device(device)
    model, sizes = build(use_fastnote, full, device, seed, verbose)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), 1e-4, weight_decay=0.05)
    name = "swin_classifier" + ("" if use_fastnote else " (eager)")
    result = _common.train_classifier(name, model, opt, sizes, steps, device, seed, amp, verbose)
    return _common.Run(result.losses, {"swin": model})


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return _common.main("Swin-T classifier (timm), patched by fastnote, a few training steps", run, argv)


if __name__ == "__main__":
    main()
