"""Spectral norm: one training-mode forward of a spectral-normed nn.Linear (power iteration,
sigma, W / sigma, the layer itself at batch 1), torch's implementations vs fastnote's.

Real CPU measurements (``cpu_real``): the per-call cost of spectral norm on a CPU is Python and
op-dispatch overhead for the small weights and memory traffic (plus allocating W / sigma) for the
large ones, both of which fastnote's C++ kernel and front ends attack. Weights: the SAGAN
discriminator's (64x48, 128x1024, 256x2048, 512x4096, 1x8192) and a BigGAN-size 1536x13824, fp32.

Providers: torch's hook (``torch.nn.utils.spectral_norm``) and parametrization
(``torch.nn.utils.parametrizations.spectral_norm``), and fastnote's drop-ins for each.

Bytes model (the minimum traffic of one call, h*w weight elements of ``itemsize`` bytes): the
iteration reads W twice (W^T u, then W v), W / sigma reads W and writes the result:
4 * h * w * itemsize (the batch-1 layer adds one more read of W / sigma, left out).

    python benchmarks/spectral_norm.py [--smoke] [--out DIR] [--repeats N]
"""
import copy

import torch
from torch import nn

import fastnote  # noqa: F401  (fastnote.nn.utils)
import harness
from fastnote.nn.utils import parametrizations as fastnote_parametrizations
from fastnote.nn.utils import spectral_norm as fastnote_spectral_norm
from harness import Benchmark, Case, Provider

WEIGHTS = [(64, 48), (128, 1024), (256, 2048), (512, 4096), (1, 8192), (1536, 13824)]
SMOKE_WEIGHTS = [(8, 16), (3, 40)]


def _cases(weights):
    return [Case("elements", h * w, {"dtype": "fp32", "shape": [h, w]}) for h, w in weights]


def make_inputs(case, device):
    h, w = case.config["shape"]
    torch.manual_seed(0)
    linear = nn.Linear(w, h).to(device=device, dtype=case.dtype)
    x = torch.randn(1, w, device=device, dtype=case.dtype)
    return {"linear": linear, "x": x}


def _provider(apply):
    def setup(inputs, case):
        module = apply(copy.deepcopy(inputs["linear"])).train()
        x = inputs["x"]
        return lambda: module(x)

    return setup


def bytes_moved(case, mode):
    h, w = case.config["shape"]
    return 4 * h * w * case.itemsize if mode == "fwd" else None


BENCHMARKS = [Benchmark(
    op="spectral_norm",
    make_inputs=make_inputs,
    providers=[
        Provider("torch hook", _provider(torch.nn.utils.spectral_norm)),
        Provider("fastnote hook", _provider(fastnote_spectral_norm)),
        Provider("torch parametrization", _provider(torch.nn.utils.parametrizations.spectral_norm)),
        Provider("fastnote parametrization", _provider(fastnote_parametrizations.spectral_norm)),
    ],
    cases=_cases(WEIGHTS),
    smoke_cases=_cases(SMOKE_WEIGHTS),
    modes=("fwd",),
    bytes_moved=bytes_moved,
    device="cpu",
    cpu_real=True,
    cpu_warmup=10,
    cpu_repeats=300,
)]

if __name__ == "__main__":
    harness.main(BENCHMARKS)
