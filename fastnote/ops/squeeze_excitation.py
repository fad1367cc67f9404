"""squeeze_excitation(x, ...) and the fused hswish_se(u, ...) = squeeze_excitation(hard_swish(u), ...)
(SPEC.md section 1). Two streaming passes forward, two backward; the activated tensor
``hard_swish(u)`` is never written. Backward saves ``u`` and the pooled ``[B, C]`` means only."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import backend, checks, reference

ACTIVATIONS = ("relu", "silu", "hard_swish")
GATES = ("hard_sigmoid", "sigmoid")
# The excitation MLP runs one program per image holding the squeeze vector on chip; wider
# squeezes (none in MobileNetV3/EfficientNet) take the reference path.
MAX_SQUEEZE = 1024

@torch.library.custom_op("fastnote::squeeze_excitation", mutates_args=())
def _forward_op(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                activation: str, gate: str, hswish: bool) -> List[Tensor]:
    from ..triton_kernels import squeeze_excitation as kernels

    x = x.contiguous()
    s = kernels.plane_reduce(x, None, hswish, 1.0 / max(x[0, 0].numel() if x.numel() else 1, 1))
    g = kernels.mlp_forward(s, w1.contiguous(), b1, w2.contiguous(), b2, activation, gate)
    out = kernels.apply(x, g, hswish, backend.empty(x.shape, x.dtype, x.device))
    return [out, s]


@_forward_op.register_fake
def _(x, w1, b1, w2, b2, activation, gate, hswish):
    return [x.new_empty(x.shape), x.new_empty(x.shape[:2], dtype=torch.float32)]


@torch.library.custom_op("fastnote::squeeze_excitation_backward", mutates_args=())
def _backward_op(grad: Tensor, x: Tensor, s: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                 activation: str, gate: str, hswish: bool) -> List[Tensor]:
    from ..triton_kernels import squeeze_excitation as kernels

    x = x.contiguous()
    grad = grad.to(x.dtype).contiguous()
    w1, w2 = w1.contiguous(), w2.contiguous()
    g = kernels.mlp_forward(s, w1, b1, w2, b2, activation, gate)
    dg = kernels.plane_reduce(x, grad, hswish, 1.0)
    ds, dw1, db1, dw2, db2 = kernels.mlp_backward(s, w1, b1, w2, b2, dg, activation, gate)
    dx = kernels.input_grad(grad, x, g, ds, hswish, backend.empty(x.shape, x.dtype, x.device))
    return [dx, dw1.to(w1.dtype), db1.to(b1.dtype), dw2.to(w2.dtype), db2.to(b2.dtype)]


@_backward_op.register_fake
def _(grad, x, s, w1, b1, w2, b2, activation, gate, hswish):
    return [x.new_empty(x.shape), w1.new_empty(w1.shape), b1.new_empty(b1.shape),
            w2.new_empty(w2.shape), b2.new_empty(b2.shape)]


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, activation, gate, hswish = inputs
    ctx.save_for_backward(x, output[1], w1, b1, w2, b2)
    ctx.config = (activation, gate, hswish)


def _backward(ctx, grads):
    grad = grads[0]
    x, s, w1, b1, w2, b2 = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = _backward_op(grad, x, s, w1, b1, w2, b2, *ctx.config)
    return dx, dw1, db1, dw2, db2, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _weights(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    C = x.shape[1]
    w1 = checks.tensor("fc1_weight", fc1_weight, ndim=(2, 4))
    w2 = checks.tensor("fc2_weight", fc2_weight, ndim=(2, 4))
    Cr = w1.shape[0]
    checks.shape("fc1_weight", w1, [Cr, C] + ([1, 1] if w1.dim() == 4 else []))
    checks.shape("fc2_weight", w2, [C, Cr] + ([1, 1] if w2.dim() == 4 else []))
    b1 = checks.tensor("fc1_bias", fc1_bias, ndim=1) if fc1_bias is not None else w1.new_zeros(Cr)
    b2 = checks.tensor("fc2_bias", fc2_bias, ndim=1) if fc2_bias is not None else w2.new_zeros(C)
    checks.shape("fc1_bias", b1, [Cr])
    checks.shape("fc2_bias", b2, [C])
    checks.same_device(x=x, fc1_weight=w1, fc1_bias=b1, fc2_weight=w2, fc2_bias=b2)
    return w1.reshape(Cr, C), b1, w2.reshape(C, Cr), b2


def _se(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate, hswish):
    checks.tensor("x", x, ndim=4)
    checks.choice("activation", activation, ACTIVATIONS)
    checks.choice("gate", gate, GATES)
    w1, b1, w2, b2 = _weights(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if not backend.use_triton(x.device) or w1.shape[0] > MAX_SQUEEZE:
        fn = reference.hswish_se if hswish else reference.squeeze_excitation
        return fn(x, w1, b1, w2, b2, activation=activation, gate=gate)
    return _forward_op(x, w1, b1, w2, b2, activation, gate, hswish)[0]


def squeeze_excitation(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                       fc2_bias: Optional[Tensor], activation: str = "relu", gate: str = "hard_sigmoid") -> Tensor:
    """Squeeze-excitation: ``x * gate(fc2(act(fc1(mean_hw(x)))))[:, :, None, None]``.

    x: [B, C, H, W]; fc1_weight [Cr, C] or conv-shaped [Cr, C, 1, 1]; fc2_weight [C, Cr] or
    [C, Cr, 1, 1]; biases [Cr], [C] or None. ``activation`` in ("relu", "silu", "hard_swish"),
    ``gate`` in ("hard_sigmoid", "sigmoid"); MobileNetV3 uses relu + hard_sigmoid. The MLP runs in
    fp32 whatever the dtypes (weights may stay fp32 under AMP while x is fp16/bf16).

    >>> import torch, fastnote
    >>> x = torch.randn(2, 16, 7, 7)
    >>> w1, b1, w2, b2 = torch.randn(8, 16), torch.zeros(8), torch.randn(16, 8), torch.zeros(16)
    >>> fastnote.squeeze_excitation(x, w1, b1, w2, b2).shape
    torch.Size([2, 16, 7, 7])
    """
    return _se(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate, False)


def hswish_se(u: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
              fc2_bias: Optional[Tensor], activation: str = "relu", gate: str = "hard_sigmoid") -> Tensor:
    """``squeeze_excitation(hard_swish(u), ...)`` fused: ``hard_swish(u)`` is never written to memory
    (MobileNetV3's depthwise activation followed by its SE block)."""
    return _se(u, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate, True)
