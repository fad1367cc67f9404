"""hard_swish(x) = x * relu6(x + 3) / 6 and hard_sigmoid(x) = relu6(x + 3) / 6 (docs/ops.md section 1.1):
torch's own ops, on every path.

A standalone elementwise activation has nothing to fuse: a kernel of its own reads x and writes y
(backward: reads grad and x, writes dx), exactly as ATen's does, so it can at best tie on the GPU,
and everything else is cost. Measured on an H200 (bf16), a Triton kernel of our own took 10.1 us of
GPU time against ATen's 9.5 at 4M elements and reached the same 3.9 TB/s at 64M; its Python call
(an ``autograd.Function`` around the launch) cost 2x to 5x ATen's host time per call; and under
``torch.compile`` a custom op would stop inductor fusing the activation into its neighbours (a
convolution's batch norm, the next multiply). So these functions check their input and call
``F.hardswish`` / ``F.hardsigmoid``. Where fusing pays, fastnote fuses: ``hswish_se`` computes
h-swish inside squeeze-excitation's passes without ever writing it, and ``squeeze_excitation``'s
gate is a hard-sigmoid in its kernels."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .. import checks


def hard_swish(x: Tensor) -> Tensor:
    """``x * relu6(x + 3) / 6``, elementwise; any shape, fp32/fp16/bf16, output in x's dtype.
    torch's ``F.hardswish`` (see the module docstring for why), gradients included.

    >>> import torch, fastnote
    >>> [round(v, 4) for v in fastnote.hard_swish(torch.tensor([-4.0, 0.0, 1.0, 4.0])).tolist()]
    [-0.0, 0.0, 0.6667, 4.0]
    """
    checks.tensor("x", x)
    return F.hardswish(x)


def hard_sigmoid(x: Tensor) -> Tensor:
    """``relu6(x + 3) / 6``, elementwise; any shape, fp32/fp16/bf16, output in x's dtype.
    torch's ``F.hardsigmoid``, as ``hard_swish``."""
    checks.tensor("x", x)
    return F.hardsigmoid(x)
