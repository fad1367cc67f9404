"""Whole models: the time and peak memory of one training step (forward, backward, optimiser step)
of each example in examples/, eager, with fastnote, and each of the two under ``torch.compile``.

The step is the example's own ``Training.step`` (examples/_common.py): the same models, losses,
optimisers and autocast as ``python examples/<name>.py --full``; the batch is drawn once, outside
the timed region. ``torch.compile`` wraps each phase's loss (the forward and, through AOTAutograd,
its backward); the optimiser step stays eager in every provider. The models are random-init.

What is measured, per case and provider (the only mode is ``step``):
- time: ``triton.testing.do_bench`` over about a second of steps (``gpu_rep_ms``), after one
  untimed step (compilation, autotuning, the optimiser's state);
- peak memory: the most allocated during one step beyond what was allocated before it, with the
  gradients freed first (so: activations saved for backward, the gradients and the optimiser's
  temporaries; not the parameters or the optimiser's state, which every provider holds alike).

No bytes or FLOPs model: a whole step is convolutions, GEMMs, norms and the optimiser, and a
roofline for it says little; the per-op benchmarks (benchmarks/<op>.py) carry those.

Targets: fastnote >= 1.3x eager on every model, ahead of ``torch.compile(eager)`` on SAGAN and
Swin-T, with lower peak memory everywhere.

    python benchmarks/models.py                 # every case, all four providers (GPU)
    python benchmarks/models.py --quick         # SAGAN and Swin-T (timm) only
    python benchmarks/models.py --no-compile    # eager and fastnote only
"""
from __future__ import annotations

import importlib.util

import torch

import harness
from fastnote.testing import load_example
from harness import Benchmark, Case, Provider

AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# model label -> (example module, keyword arguments of its training(), the package it needs)
MODELS = {
    "SAGAN 64x64": ("sagan", {}, None),
    "Swin-T 224 (timm)": ("swin_classifier", {"source": "timm"}, "timm"),
    "Swin-T 224 (torchvision)": ("swin_classifier", {"source": "torchvision"}, "torchvision"),
    "MobileNetV3-L 224": ("mobilenetv3", {}, "torchvision"),
    "CUT PatchNCE 256": ("cut_patchnce", {}, None),
    "CLIP n=16384": ("clip_step", {}, None),
    "style transfer 256": ("style_transfer", {}, None),
}


def _available(model: str) -> bool:
    needs = MODELS[model][2]
    if needs is not None and importlib.util.find_spec(needs) is None:
        print(f"models: {model} skipped ({needs} is not installed)")
        return False
    return True


def _case(model: str, dtype: str, full: bool) -> Case:
    example, kwargs, _ = MODELS[model]
    module = load_example(example)
    sizes = module.FULL if full else module.SMOKE
    label = model if full else " ".join([example, kwargs.get("source", ""), "smoke"]).replace("  ", " ")
    return Case("batch", sizes["batch"], {"model": label, "dtype": dtype,
                                          "example": example, "full": full, **kwargs})


def make_inputs(case: Case, device: torch.device):
    return {"device": device}   # each provider builds its own model (same seed: the same initial weights)


def _provider(use_fastnote: bool, compiled: bool):
    def setup(inputs, case):
        cfg = dict(case.config)
        module = load_example(cfg.pop("example"))
        kwargs = {k: v for k, v in cfg.items() if k not in ("model", "dtype", "full", "note")}
        training = module.training(use_fastnote, full=cfg["full"], device=inputs["device"], amp=AMP[cfg["dtype"]],
                                   **kwargs)
        if compiled:
            torch._dynamo.reset()
            training.compile()
        batch = training.next_batch()

        def step():
            losses = training.step(batch)
            training.zero_grad()   # every step (and the memory probe) starts without gradients
            return losses

        return {harness.STEP: step}

    return setup


FULL_CASES = [_case(m, d, True) for m, d in [
    ("SAGAN 64x64", "fp32"), ("SAGAN 64x64", "bf16"), ("Swin-T 224 (timm)", "bf16"),
    ("Swin-T 224 (torchvision)", "bf16"), ("MobileNetV3-L 224", "bf16"), ("CUT PatchNCE 256", "fp32"),
    ("CLIP n=16384", "bf16"), ("style transfer 256", "fp32")] if _available(m)]
QUICK = [c for c in FULL_CASES if (c.config["model"], c.config["dtype"]) in
         {("SAGAN 64x64", "fp32"), ("Swin-T 224 (timm)", "bf16")}]
SMOKE_CASES = [_case(m, "fp32", False) for m in MODELS if _available(m)]

BENCHMARKS = [Benchmark(
    op="models",
    make_inputs=make_inputs,
    providers=[Provider("eager", _provider(False, False)),
               Provider("fastnote", _provider(True, False)),
               Provider("torch.compile", _provider(False, True), compile=True),
               Provider("torch.compile(fastnote)", _provider(True, True), compile=True)],
    cases=FULL_CASES,
    smoke_cases=SMOKE_CASES,
    quick_cases=QUICK,
    modes=(harness.STEP,),
    gpu_rep_ms=1000,
    plot_by=(),
    plot_kind="bars",
)]

if __name__ == "__main__":
    harness.main(BENCHMARKS)
