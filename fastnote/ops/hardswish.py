"""hard_swish(x) = x * relu6(x + 3) / 6 and hard_sigmoid(x) = relu6(x + 3) / 6 (docs/ops.md section 1.1),
with torch's exact gradients at the kinks x = -3 and x = 3."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend, checks, reference
from ._fast import kernel_op, kernels as _kernels

_REFERENCE = {"hard_swish": reference.hard_swish, "hard_sigmoid": reference.hard_sigmoid}


@kernel_op("fastnote::hard_activation")
def _forward_op(x: Tensor, kind: str) -> Tensor:
    kernels = _kernels.hardswish

    x = x.contiguous()
    return kernels.forward(x=x, kind=kind, out=backend.empty_like(x))


@_forward_op.register_fake
def _(x, kind):
    return x.new_empty(x.shape)


@kernel_op("fastnote::hard_activation_backward")
def _backward_op(grad: Tensor, x: Tensor, kind: str) -> Tensor:
    kernels = _kernels.hardswish

    x = x.contiguous()
    if grad.dtype != x.dtype:
        grad = grad.to(x.dtype)
    grad = grad.contiguous()
    return kernels.backward(grad=grad, x=x, kind=kind, out=backend.empty_like(x))


@_backward_op.register_fake
def _(grad, x, kind):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, kind = inputs
    ctx.save_for_backward(x)
    ctx.kind = kind


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return _backward_op(grad, x, ctx.kind), None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _apply(x: Tensor, kind: str) -> Tensor:
    checks.tensor("x", x)
    if not backend.use_triton(x.device):
        return _REFERENCE[kind](x)
    return _forward_op(x, kind)


def hard_swish(x: Tensor) -> Tensor:
    """``x * relu6(x + 3) / 6``, elementwise; any shape, fp32/fp16/bf16, output in x's dtype.

    >>> import torch, fastnote
    >>> [round(v, 4) for v in fastnote.hard_swish(torch.tensor([-4.0, 0.0, 1.0, 4.0])).tolist()]
    [-0.0, 0.0, 0.6667, 4.0]
    """
    return _apply(x, "hard_swish")


def hard_sigmoid(x: Tensor) -> Tensor:
    """``relu6(x + 3) / 6``, elementwise; any shape, fp32/fp16/bf16, output in x's dtype."""
    return _apply(x, "hard_sigmoid")
