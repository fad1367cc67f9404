"""MobileNetV3 (torchvision's, random init) trained a few steps, with its squeeze-excitation
blocks, and the h-swish + SE pairs fused into one, swapped for fastnote's by ``fastnote.patch``
(a standalone h-swish stays torch's). Needs torchvision (no weight download).

    python examples/mobilenetv3.py --steps 5             # mobilenet_v3_small, batch 4, 64x64, 10 classes (CPU)
    python examples/mobilenetv3.py --full --steps 100    # mobilenet_v3_large, batch 256, 224x224, 1000 classes (GPU)
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

FULL = dict(arch="mobilenet_v3_large", batch=256, image_size=224, classes=1000)
SMOKE = dict(arch="mobilenet_v3_small", batch=4, image_size=64, classes=10)
# SEs after a ReLU + 2 per h-swish + SE pair (an Identity and a fused SE); stand-alone h-swish
# (11 in Small, 16 in Large) are torch's own op in fastnote too, not replaced
REPLACED = {"mobilenet_v3_small": 1 + 2 * 8, "mobilenet_v3_large": 3 + 2 * 5}


def build(use_fastnote: bool, full: bool = False, device="cpu", seed: int = 0, verbose: bool = False):
    """(model, sizes): torchvision's MobileNetV3 (Small, or Large with ``full``), eager or patched."""
    models = _common.import_torchvision_models()
    sizes = FULL if full else SMOKE
    _common.seed_all(seed)
    model = getattr(models, sizes["arch"])(num_classes=sizes["classes"]).to(device)
    if use_fastnote:
        _common.patched(model, REPLACED[sizes["arch"]], verbose)
    return model, sizes


def training(use_fastnote: bool, full: bool = False, device="cpu", seed: int = 0,
             amp: Optional[torch.dtype] = None, verbose: bool = False) -> _common.Training:
    device = torch.device(device)
    model, sizes = build(use_fastnote, full, device, seed, verbose)
    opt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9)
    return _common.classifier_training("mobilenetv3" + ("" if use_fastnote else " (eager)"), model, opt, sizes, device,
                                       seed, amp)


run = _common.runner(training)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return _common.main("MobileNetV3 (torchvision), patched by fastnote, a few training steps", run, argv)


if __name__ == "__main__":
    main()
