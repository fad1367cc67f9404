"""hard_swish and hard_sigmoid, forward and backward: eager torch vs torch.compile vs fastnote.

Shapes: the hard-swish activations of MobileNetV3-Large (224x224 input) at batch 128, swept by
their element count N (bf16 and fp32).

Bytes model (the minimum traffic; N elements of ``itemsize`` bytes):
  fwd   reads x, writes y                          2 * N * itemsize
  bwd   reads grad and x, writes dx                3 * N * itemsize
  both  fwd + bwd                                  5 * N * itemsize
A handful of FLOPs per element: both ops are bandwidth-bound, so the figure of merit is the
achieved GB/s as a fraction of the measured copy bandwidth ("% of copy BW" rows).

    python benchmarks/hardswish.py [--smoke] [--out DIR] [--modes fwd,bwd,both] [--dtypes bf16,fp32]
"""
import math

import torch
import torch.nn.functional as F

import fastnote
import harness
from harness import Benchmark, Case, Provider

# (C, H, W) of hard-swish outputs in MobileNetV3-Large, in increasing element count: the
# 7x7 and 14x14 expansions and depthwise outputs of the late blocks, the 28x28 expansion before
# the stride-2 block, the 112x112 stem, and a 56x56 map for the largest point.
SHAPES = [(672, 7, 7), (960, 7, 7), (480, 14, 14), (672, 14, 14), (240, 28, 28), (16, 112, 112),
          (72, 56, 56)]
BATCH = 128
SMOKE_SHAPES = [(2, 8, 7, 7), (2, 16, 9, 9)]
_TRAFFIC = {"fwd": 2, "bwd": 3, "both": 5}


def _cases(shapes, dtypes):
    return [Case("N", math.prod(shape), {"dtype": dtype, "shape": list(shape)})
            for dtype in dtypes for shape in shapes]


def make_inputs(case, device):
    x = torch.randn(case.config["shape"], device=device, dtype=torch.float32) * 4
    return {"x": x.to(case.dtype).requires_grad_()}


def bytes_moved(case, mode):
    return _TRAFFIC[mode] * case.x_value * case.itemsize


def _benchmark(op, eager_fn, fastnote_fn):
    def eager(inputs, case):
        x = inputs["x"]
        return lambda: eager_fn(x)

    def ours(inputs, case):
        x = inputs["x"]
        return lambda: fastnote_fn(x)

    return Benchmark(
        op=op,
        make_inputs=make_inputs,
        providers=[
            Provider("eager", eager),
            Provider("torch.compile", eager, compile=True),
            Provider("fastnote", ours),
        ],
        cases=_cases([(BATCH, *chw) for chw in SHAPES], ["bf16", "fp32"]),
        smoke_cases=_cases(SMOKE_SHAPES, ["fp32", "bf16"]),
        bytes_moved=bytes_moved,
    )


BENCHMARKS = [
    _benchmark("hard_swish", F.hardswish, fastnote.hard_swish),
    _benchmark("hard_sigmoid", F.hardsigmoid, fastnote.hard_sigmoid),
]

if __name__ == "__main__":
    harness.main(BENCHMARKS)
