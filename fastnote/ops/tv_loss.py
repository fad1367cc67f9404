"""tv_loss(y): anisotropic total variation / (C*H*W) (docs/ops.md section 2.3), the perceptual loss's
``L_tv``. Forward is one pass over y (per-program fp32 partial sums, added by torch in a fixed
order); backward is one pass reading y and writing dy. Saved for backward: y itself (the signs of
its differences are the whole gradient). Kernels: ``triton_kernels/tv_loss.py``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend, checks, reference
from ._fast import kernel_op, kernels as _kernels


@kernel_op("fastnote::tv_loss")
def _tv_op(y: Tensor) -> Tensor:
    kernels = _kernels.tv_loss

    return kernels.forward(y=y, part=backend.empty((kernels.programs(y),), torch.float32, y.device)).sum()


@_tv_op.register_fake
def _(y):
    return y.new_empty((), dtype=torch.float32)


@kernel_op("fastnote::tv_loss_backward")
def _tv_backward_op(grad: Tensor, y: Tensor) -> Tensor:
    kernels = _kernels.tv_loss

    dy = backend.empty_in_layout(y)
    kernels.backward(y=y, grad=grad.reshape(1), dy=dy)
    return dy


@_tv_backward_op.register_fake
def _(grad, y):
    return backend.fake_in_layout(y)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    y, = ctx.saved_tensors
    return _tv_backward_op(grad, y)


_tv_op.register_autograd(_backward, setup_context=_setup)


def tv_loss(y: Tensor) -> Tensor:
    """Anisotropic total variation ``(sum|y[..., :, 1:] - y[..., :, :-1]| + sum|y[..., 1:, :] -
    y[..., :-1, :]|) / (C*H*W)`` of y: [B, C, H, W] (not divided by B, as in the perceptual-loss
    code). Any strides (channels-last included), fp32/fp16/bf16; returns a 0-dim float32 tensor.
    Where two neighbours are equal the gradient of |0| is 0, as torch's abs gives.

    >>> import torch, fastnote
    >>> y = torch.tensor([[[[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]]]])    # C=1, H=2, W=3
    >>> fastnote.tv_loss(y)                                          # (1 + 2 + 0 + 0) + (2 + 1 + 1), / 6
    tensor(1.1667)
    """
    checks.tensor("y", y, ndim=4)
    if y.shape[1] * y.shape[2] * y.shape[3] == 0:
        raise ValueError(f"y must have C, H and W >= 1, got shape {list(y.shape)}")
    if y.shape[0] == 0:
        return y.float().sum() * 0.0
    if not backend.kernels_for(y):
        return reference.tv_loss(y)
    return _tv_op(y)
