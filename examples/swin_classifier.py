"""A Swin-T image classifier (timm's ``swin_tiny_patch4_window7_224``, or with ``source="torchvision"``
torchvision's ``swin_t``; random init) trained a few steps, with its window attention swapped for
fastnote's fused path by ``fastnote.patch``: shift, pad, partition and their reverse done inside
the attention kernel, in each library's own order (timm rolls, then pads; torchvision pads, then
rolls).

At a reduced ``img_size`` timm shrinks the windows of the stages whose feature map is smaller
than 7x7 as well; the patched model follows it. torchvision keeps the 7x7 window, pads the map up
to it and drops the shift where one window covers the map; fastnote does the same. Needs timm or
torchvision (no weight download).

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


def _torchvision_swin_t(sizes):
    models = _common.import_torchvision_models()
    if not sizes["widths"]:
        return models.swin_t(num_classes=sizes["classes"])
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=sizes["widths"]["embed_dim"], depths=[2, 2, 6, 2],
                           num_heads=list(sizes["widths"]["num_heads"]), window_size=[7, 7],
                           stochastic_depth_prob=0.2, num_classes=sizes["classes"])


def build(use_fastnote: bool, full: bool = False, device="cpu", seed: int = 0, verbose: bool = False,
          source: str = "timm"):
    """(model, sizes): Swin-T from timm or torchvision, eager or patched (12 blocks: timm's
    ``SwinTransformerBlock`` or torchvision's ``ShiftedWindowAttention``)."""
    if source not in ("timm", "torchvision"):
        raise ValueError(f"source must be 'timm' or 'torchvision', got {source!r}")
    sizes = FULL if full else SMOKE
    if source == "timm":
        timm = _common.import_timm()
        _common.seed_all(seed)
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=sizes["image_size"],
                                  num_classes=sizes["classes"], **sizes["widths"])
    else:
        _common.seed_all(seed)
        model = _torchvision_swin_t(sizes)
    model = model.to(device)
    if use_fastnote:
        _common.patched(model, 12, verbose)
    return model, sizes


def training(use_fastnote: bool, full: bool = False, device="cpu", seed: int = 0,
             amp: Optional[torch.dtype] = None, verbose: bool = False, source: str = "timm") -> _common.Training:
    device = torch.device(device)
    model, sizes = build(use_fastnote, full, device, seed, verbose, source)
    opt = torch.optim.AdamW(model.parameters(), 1e-4, weight_decay=0.05)
    name = "swin_classifier" + ("" if source == "timm" else f" ({source})") + ("" if use_fastnote else " (eager)")
    return _common.classifier_training(name, model, opt, sizes, device, seed, amp)


run = _common.runner(training)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return _common.main("Swin-T classifier (timm), patched by fastnote, a few training steps", run, argv)


if __name__ == "__main__":
    main()
