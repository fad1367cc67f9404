"""MobileNetV3 (torchvision's ``mobilenet_v3_small``, random init) trained a few steps, with its
h-swish, squeeze-excitation blocks, and the h-swish + SE pairs fused into one, swapped for
fastnote's by ``fastnote.patch``. Needs torchvision (no weight download).

    python examples/mobilenetv3.py --steps 5             # batch 4, 64x64, 10 classes (CPU)
    python examples/mobilenetv3.py --full --steps 100    # batch 256, 224x224, 1000 classes (GPU)
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

FULL = dict(batch=256, image_size=224, classes=1000)
SMOKE = dict(batch=4, image_size=64, classes=10)
# 11 stand-alone h-swish, 1 SE after a ReLU, 8 h-swish + SE pairs (each: an Identity and a fused SE)
REPLACED = 11 + 1 + 2 * 8


def build(use_fastnote: bool, full: bool = False, device="cpu", seed: int = 0, verbose: bool = False):
    """(model, sizes): torchvision's MobileNetV3-Small, eager or patched."""
    models = _common.import_torchvision_models()
    sizes = FULL if full else SMOKE
    _common.seed_all(seed)
    model = models.mobilenet_v3_small(num_classes=sizes["classes"]).to(device)
    if use_fastnote:
        _common.patched(model, REPLACED, verbose)
    return model, sizes


def run(use_fastnote: bool, steps: int, full: bool = False, device="cpu", seed: int = 0,
        amp: Optional[torch.dtype] = None, verbose: bool = False) -> _common.Run:
    device = torch.device(device)
    model, sizes = build(use_fastnote, full, device, seed, verbose)
    model.train()
    opt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9)
    result = _common.train_classifier("mobilenetv3" + ("" if use_fastnote else " (eager)"), model, opt, sizes, steps,
                                      device, seed, amp, verbose)
    return _common.Run(result.losses, {"mobilenet": model})


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return _common.main("MobileNetV3-Small (torchvision), patched by fastnote, a few training steps", run, argv)


if __name__ == "__main__":
    main()
