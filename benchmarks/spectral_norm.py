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

The second benchmark, ``sagan_discriminator``, is the GPU target: a whole SAGAN 64x64
discriminator (five spectral-normed 4x4 convs, two self-attention layers in plain eager torch) in
training mode, ``D(real).mean() - D(fake).mean()`` and its backward, batch 16 and 64, fp32, with
each provider's spectral norm on the convs. There the iteration's matrix-vector products are tiny
and the cost is kernel launches: on a GPU the script also counts the kernels one spectral-normed
conv launches per forward + backward (``spectral_norm_launches.csv``). Without a GPU it runs in
smoke mode.

    python benchmarks/spectral_norm.py [--smoke] [--out DIR] [--repeats N]
"""
import copy
import os

import torch
from torch import nn

import harness
from fastnote import reference
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


# ------------------------------------------------------------------------------------------------
# A whole SAGAN discriminator, forward + backward (the GPU target: launch overhead of the many small
# matrix-vector products dominates spectral norm there)
# ------------------------------------------------------------------------------------------------
class _Attention(nn.Module):
    """SAGAN's self-attention with plain torch maths (``fastnote.reference``), the same in every
    provider, so the timings differ by spectral norm alone."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.query_conv = nn.Conv2d(c, c // 8, 1)
        self.key_conv = nn.Conv2d(c, c // 8, 1)
        self.value_conv = nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.full((1,), 0.1))

    def forward(self, x):
        return reference.sagan_attention(self.query_conv(x).flatten(2), self.key_conv(x).flatten(2),
                                         self.value_conv(x).flatten(2), x, self.gamma)


def discriminator(conv_dim: int = 64) -> nn.Module:
    """SAGAN's 64x64 discriminator: l1..l4 (4x4 stride-2 convs, LeakyReLU 0.1), attention after
    l3 and l4, and the last 4x4 conv; the five convs are the spectral-normed layers."""
    d = conv_dim
    act = nn.LeakyReLU(0.1)
    return nn.Sequential(
        nn.Conv2d(3, d, 4, 2, 1), act, nn.Conv2d(d, 2 * d, 4, 2, 1), act,
        nn.Conv2d(2 * d, 4 * d, 4, 2, 1), act, _Attention(4 * d),
        nn.Conv2d(4 * d, 8 * d, 4, 2, 1), act, _Attention(8 * d), nn.Conv2d(8 * d, 1, 4))


def _normed(model: nn.Module, apply) -> nn.Module:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Conv2d) and child.kernel_size == (4, 4):
            setattr(model, name, apply(child))
    return model


def make_discriminator_inputs(case, device):
    cfg = case.config
    torch.manual_seed(0)
    model = discriminator(cfg["conv_dim"]).to(device=device, dtype=case.dtype)
    shape = (cfg["batch"], 3, 64, 64)
    real = torch.randn(shape, device=device, dtype=case.dtype)
    fake = torch.randn(shape, device=device, dtype=case.dtype)
    return {"model": model, "real": real, "fake": fake}


def _discriminator_provider(apply):
    def setup(inputs, case):
        model = _normed(copy.deepcopy(inputs["model"]), apply).train()
        real, fake = inputs["real"], inputs["fake"]
        # a GAN discriminator step's pattern: two forwards (each iterating u, v), one backward
        return lambda: model(real).mean() - model(fake).mean()

    return setup


def _discriminator_cases(batches, conv_dim):
    return [Case("batch", b, {"dtype": "fp32", "conv_dim": conv_dim, "batch": b}) for b in batches]


def launches_per_layer(device: torch.device, batch: int = 64):
    """{provider: GPU kernels launched by one forward + backward of one spectral-normed conv
    (SAGAN's l3, Conv2d(128, 256, 4, 2, 1)), the plain conv's own kernels subtracted}."""
    from torch.profiler import ProfilerActivity, profile

    def kernels(module):
        x = torch.randn(batch, 128, 16, 16, device=device)
        for _ in range(3):
            module(x).sum().backward()
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            module(x).sum().backward()
            torch.cuda.synchronize(device)
        return sum(1 for e in prof.events() if e.device_type.name == "CUDA")

    torch.manual_seed(0)
    conv = nn.Conv2d(128, 256, 4, 2, 1).to(device).train()
    plain = kernels(copy.deepcopy(conv))
    return {name: kernels(apply(copy.deepcopy(conv))) - plain for name, apply in SPECTRAL_NORMS}


SPECTRAL_NORMS = [
    ("torch hook", torch.nn.utils.spectral_norm),
    ("fastnote hook", fastnote_spectral_norm),
    ("torch parametrization", torch.nn.utils.parametrizations.spectral_norm),
    ("fastnote parametrization", fastnote_parametrizations.spectral_norm),
]

BENCHMARKS = [
    Benchmark(
        op="spectral_norm",
        make_inputs=make_inputs,
        providers=[Provider(name, _provider(apply)) for name, apply in SPECTRAL_NORMS],
        cases=_cases(WEIGHTS),
        smoke_cases=_cases(SMOKE_WEIGHTS),
        modes=("fwd",),
        bytes_moved=bytes_moved,
        device="cpu",
        cpu_real=True,
        cpu_warmup=10,
        cpu_repeats=300,
    ),
    Benchmark(
        op="sagan_discriminator",
        make_inputs=make_discriminator_inputs,
        providers=[Provider(name, _discriminator_provider(apply)) for name, apply in SPECTRAL_NORMS],
        cases=_discriminator_cases((16, 64), 64),
        smoke_cases=_discriminator_cases((2,), 8),
        modes=("both",),
    ),
]


def _launch_report() -> None:
    args = harness.parser(__doc__).parse_args()
    if args.smoke or not torch.cuda.is_available():
        return
    device = torch.device("cuda")
    counts = launches_per_layer(device)
    print("   GPU kernels per spectral-normed conv, forward + backward (the conv's own excluded): "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    slug = harness.slugify(torch.cuda.get_device_name(device))
    out = os.path.join(args.out or harness.RESULTS, slug, "spectral_norm_launches.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        f.write("provider,kernels_per_layer\n")
        for name, count in counts.items():
            f.write(f"{name},{count}\n")
    print(f"   wrote {out}")


if __name__ == "__main__":
    try:
        harness.main(BENCHMARKS)
    finally:
        _launch_report()
