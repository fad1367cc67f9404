"""hswish_se: MobileNetV3's hard-swish followed by squeeze-excitation, forward and backward.

Providers: eager (``F.hardswish`` then a torchvision-style ``SqueezeExcitation`` written out:
adaptive average pool, 1x1 conv, relu, 1x1 conv, hard-sigmoid, multiply), torch.compile of that
eager function, and ``fastnote.hswish_se``, which never writes ``hard_swish(u)``.

Shapes: batch 128 and the SE layers of MobileNetV3-Large (224x224 input), x axis = the layer's
index in this list: (C, H, W) = (72, 28, 28), (120, 28, 28), (480, 14, 14), (672, 14, 14),
(672, 7, 7), (960, 7, 7), squeeze channels Cr = make_divisible(C // 4, 8); bf16 and fp32; the
SE weights are in the activation dtype. The same layers in bf16 once more with the input in
channels_last (``layout`` in the config, plotted apart), as a model converted with
``.to(memory_format=torch.channels_last)`` feeds them: eager keeps that layout through its
elementwise ops, and so do the kernels (no copy in or out).

Bytes model (minimum traffic of the computation), T = B*C*H*W*itemsize:
  fwd   read u, write out                                                     2T
  bwd   read grad and u, write du                                             3T
  both  fwd + bwd                                                             5T
The weights and the [B, C] pooled tensors are negligible. fastnote's kernels make two passes
each way (triton_kernels/squeeze_excitation.py): 3T forward (pool, then gate) and 5T backward,
so at full copy bandwidth they would show 67% and 60% of the speed of light. Eager moves about 6T
forward (write hard_swish(u), read it to pool, read it again and write the product) and more
than 8T backward; every provider is rated against the same minimum, so the GB/s compare like for
like. FLOPs are negligible (the MLP is B*C*Cr*4 multiply-adds): bandwidth-bound.

    python benchmarks/squeeze_excitation.py [--smoke] [--out DIR] [--modes fwd,bwd,both] [--dtypes bf16,fp32]
"""
import torch
import torch.nn.functional as F

import fastnote
import harness
from harness import Benchmark, Case, Provider

SE_LAYERS = [(72, 28, 28), (120, 28, 28), (480, 14, 14), (672, 14, 14), (672, 7, 7), (960, 7, 7)]
BATCH = 128
SMOKE_LAYERS = [(16, 7, 7), (24, 5, 5)]
SMOKE_BATCH = 2
_TRAFFIC = {"fwd": 2, "bwd": 3, "both": 5}


def make_divisible(v, divisor=8):
    """torchvision's _make_divisible: round to a multiple of divisor, never down by more than 10%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _cases(batch, layers, dtypes, layout=None):
    extra = {"layout": layout} if layout else {}   # NCHW cases keep the configs of earlier results
    return [Case("se_layer", i, {"dtype": dtype, "B": batch, "C": C, "H": H, "W": W,
                                 "Cr": make_divisible(C // 4, 8), **extra})
            for dtype in dtypes for i, (C, H, W) in enumerate(layers)]


CASES = _cases(BATCH, SE_LAYERS, ["bf16", "fp32"]) + _cases(BATCH, SE_LAYERS, ["bf16"], "channels_last")
# --quick: the first layer of each dtype, and of the channels_last series
QUICK_CASES = [CASES[0], CASES[len(SE_LAYERS)], CASES[2 * len(SE_LAYERS)]]


def make_inputs(case, device):
    cfg = case.config
    B, C, H, W, Cr = cfg["B"], cfg["C"], cfg["H"], cfg["W"], cfg["Cr"]

    def param(*shape, fan_in):
        t = (torch.rand(*shape, device=device) * 2 - 1) / fan_in ** 0.5  # conv's default init range
        return t.to(case.dtype).requires_grad_()

    u = (torch.randn(B, C, H, W, device=device) * 3).to(case.dtype)
    if cfg.get("layout") == "channels_last":
        u = u.to(memory_format=torch.channels_last)
    u.requires_grad_()
    return {"u": u, "fc1_weight": param(Cr, C, 1, 1, fan_in=C), "fc1_bias": param(Cr, fan_in=C),
            "fc2_weight": param(C, Cr, 1, 1, fan_in=Cr), "fc2_bias": param(C, fan_in=Cr)}


def eager_hswish_se(u, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """F.hardswish, then torchvision's SqueezeExcitation(C, Cr) with its default activations."""
    y = F.hardswish(u)
    scale = F.adaptive_avg_pool2d(y, 1)
    scale = F.relu(F.conv2d(scale, fc1_weight, fc1_bias))
    scale = F.hardsigmoid(F.conv2d(scale, fc2_weight, fc2_bias))
    return scale * y


def bytes_moved(case, mode):
    cfg = case.config
    return _TRAFFIC[mode] * cfg["B"] * cfg["C"] * cfg["H"] * cfg["W"] * case.itemsize


def eager(inputs, case):
    return lambda: eager_hswish_se(**inputs)


def ours(inputs, case):
    return lambda: fastnote.hswish_se(**inputs)


BENCHMARKS = [
    Benchmark(
        op="hswish_se",
        make_inputs=make_inputs,
        providers=[
            Provider("eager", eager),
            Provider("torch.compile", eager, compile=True),
            Provider("fastnote", ours),
        ],
        cases=CASES,
        quick_cases=QUICK_CASES,
        smoke_cases=_cases(SMOKE_BATCH, SMOKE_LAYERS, ["fp32", "bf16"])
        + _cases(SMOKE_BATCH, SMOKE_LAYERS[:1], ["fp32"], "channels_last"),
        bytes_moved=bytes_moved,
        plot_by=("dtype", "layout"),
    )
]

if __name__ == "__main__":
    harness.main(BENCHMARKS)
