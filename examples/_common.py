"""What the examples share: the command line, seeding, the progress line, and (from
``fastnote.compat``) importing timm and torchvision beside a CPU-only torch.

Every example has ``build(use_fastnote, ...)`` (the eager model, or the same model with fastnote's
modules and ops: same seed, same initial weights), ``training(use_fastnote, ...)`` (a ``Training``:
the models, their optimisers, the data and one training step), ``run(use_fastnote, steps, ...)``
(that step in a loop, returning a ``Run``) and ``main(argv=None)`` (command line, returns the
per-step losses). ``benchmarks/models.py`` times the same ``Training.step``.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from fastnote.compat import import_timm, import_torchvision_models  # noqa: F401 (the examples call _common.import_timm)


@dataclasses.dataclass
class Run:
    """What a training run leaves: the losses of every step (name -> list of floats) and the
    trained modules (name -> module), whose ``.grad`` hold the last step's gradients."""
    losses: Dict[str, List[float]]
    modules: Dict[str, nn.Module]


@dataclasses.dataclass
class Phase:
    """One backward pass of a training step: ``loss(batch)`` (run under the autocast), whose
    gradients ``optimizer`` then applies."""
    name: str
    loss: Callable[[Any], torch.Tensor]
    optimizer: torch.optim.Optimizer


@dataclasses.dataclass
class Training:
    """What an example trains and how: the modules, the next batch of data (already on the device),
    and the phases of a step (a GAN has two: the discriminator's, then the generator's).

    ``step(batch)`` runs each phase: its loss under bf16/fp16 autocast when ``amp`` is set, every
    optimiser's gradients cleared, the backward, its optimiser's step; it returns the losses
    (detached tensors, not synchronised). ``compile()`` wraps each phase's loss (forward and,
    through AOTAutograd, its backward) in ``torch.compile``; the optimiser steps stay eager."""
    name: str
    modules: Dict[str, nn.Module]
    next_batch: Callable[[], Any]
    phases: List[Phase]
    device: torch.device
    amp: Optional[torch.dtype] = None

    def step(self, batch) -> Dict[str, torch.Tensor]:
        losses = {}
        for phase in self.phases:
            with torch.autocast(self.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
                loss = phase.loss(batch)
            self.zero_grad()
            loss.backward()
            phase.optimizer.step()
            losses[phase.name] = loss.detach()
        return losses

    def zero_grad(self) -> None:
        for phase in self.phases:
            phase.optimizer.zero_grad()

    def compile(self, fullgraph: bool = False, **options) -> "Training":
        for phase in self.phases:
            phase.loss = torch.compile(phase.loss, fullgraph=fullgraph, **options)
        return self


def train(training: Training, steps: int, verbose: bool = False) -> Run:
    """``steps`` training steps, a progress line after each."""
    progress = Progress(training.name, steps, verbose)
    for i in range(steps):
        progress.step(i, **training.step(training.next_batch()))
    return Run(progress.losses, training.modules)


def runner(training: Callable[..., Training]) -> Callable[..., Run]:
    """An example's ``run(use_fastnote, steps, full=False, device="cpu", seed=0, amp=None,
    verbose=False, **options)``: its ``training(...)`` (options passed on), trained ``steps`` steps."""
    def run(use_fastnote: bool, steps: int, full: bool = False, device="cpu", seed: int = 0,
            amp: Optional[torch.dtype] = None, verbose: bool = False, **options) -> Run:
        return train(training(use_fastnote, full, device, seed, amp, verbose, **options), steps, verbose)

    return run


def parse_args(description: str, argv: Optional[Sequence[str]], steps: int = 3) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help="training steps (default %(default)s)")
    parser.add_argument("--device", default=None,
                        help="cuda or cpu (default: cuda when there is a GPU, else cpu)")
    parser.add_argument("--full", action="store_true",
                        help="the real model and batch sizes (meant for a GPU); default: tiny smoke sizes")
    parser.add_argument("--eager", action="store_true", help="run the plain-PyTorch model, without fastnote")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def data_generator(seed: int) -> torch.Generator:
    """A CPU generator for the example's data, apart from torch's global one (so the model's
    random draws and the data's do not depend on each other)."""
    return torch.Generator().manual_seed(seed + 1)


class Progress:
    """Prints one line per step: ``<name> step i/n  loss=...  (t s)``."""

    def __init__(self, name: str, steps: int, verbose: bool = True):
        self.name, self.steps, self.verbose = name, steps, verbose
        self.start = time.perf_counter()
        self.losses: Dict[str, List[float]] = {}

    def step(self, i: int, **losses: torch.Tensor) -> None:
        for k, v in losses.items():
            self.losses.setdefault(k, []).append(float(v.detach()) if torch.is_tensor(v) else float(v))
        if self.verbose:
            shown = "  ".join(f"{k}={vals[-1]:.5f}" for k, vals in self.losses.items())
            print(f"{self.name} step {i + 1}/{self.steps}  {shown}  ({time.perf_counter() - self.start:.1f} s)",
                  flush=True)


def classifier_training(name: str, model, opt, sizes: dict, device, seed: int,
                        amp: Optional[torch.dtype]) -> Training:
    """The classifier examples' training: random images and labels from the data generator, cross
    entropy, one optimiser step per batch."""
    gen = data_generator(seed)
    b, s = sizes["batch"], sizes["image_size"]
    model.train()

    def next_batch():
        images = torch.randn(b, 3, s, s, generator=gen).to(device)
        labels = torch.randint(0, sizes["classes"], (b,), generator=gen).to(device)
        return images, labels

    def loss(batch):
        images, labels = batch
        return torch.nn.functional.cross_entropy(model(images), labels)

    return Training(name, {"model": model}, next_batch, [Phase("loss", loss, opt)], torch.device(device), amp)


def image_text_training(name: str, key: str, model, criterion, sizes: dict, device, seed: int,
                        amp: Optional[torch.dtype]) -> Training:
    """The contrastive examples' training: random images and token ids from the data generator,
    ``criterion(*model(images, ids))``, one AdamW step per batch; ``key`` names the model and its
    loss phase (``<key>_loss``)."""
    opt = torch.optim.AdamW(model.parameters(), 5e-4, weight_decay=0.1)
    gen = data_generator(seed)
    n, s = sizes["batch"], sizes["image_size"]

    def next_batch():
        images = torch.rand(n, 3, s, s, generator=gen).to(device)
        ids = torch.randint(0, sizes["vocab"], (n, sizes["tokens"]), generator=gen).to(device)
        return images, ids

    def loss(batch):
        return criterion(*model(*batch))

    return Training(name, {key: model}, next_batch, [Phase(f"{key}_loss", loss, opt)], device, amp)


def main(description: str, run, argv: Optional[Sequence[str]]) -> dict:
    """Every example's command line: parse it, run the fastnote (or, with --eager, the eager)
    variant with a progress line per step, and return the per-step losses."""
    args = parse_args(description, argv)
    return run(not args.eager, args.steps, args.full, args.device, args.seed, verbose=True).losses


def patched(model, expect: int, verbose: bool):
    """``fastnote.patch(model, expect=...)``, its report printed when ``verbose``."""
    import fastnote

    report = fastnote.patch(model, expect=expect)
    if verbose:
        print(report)
    return model
