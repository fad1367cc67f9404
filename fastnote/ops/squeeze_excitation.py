"""squeeze_excitation(x, ...) and the fused hswish_se(u, ...) = squeeze_excitation(hard_swish(u), ...)
(docs/ops.md section 1). Two streaming passes forward, two backward; the activated tensor
``hard_swish(u)`` is never written. Backward saves ``u`` and the pooled ``[B, C]`` means only."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import backend, checks, reference
from ._fast import kernel_op, kernels as _kernels

ACTIVATIONS = ("relu", "silu", "hard_swish")
GATES = ("hard_sigmoid", "sigmoid")
# The excitation MLP runs one program per image holding the squeeze vector on chip; wider
# squeezes (none in MobileNetV3/EfficientNet) take the reference path.
MAX_SQUEEZE = 1024

def _layout(x: Tensor):
    """(x in a layout the kernels take, whether that is channels-last): a channels-last ``x`` (a
    model converted with ``.to(memory_format=torch.channels_last)``) as it is, any other one
    contiguous (one copy at most)."""
    if backend.channels_last(x):
        return x, True
    return x.contiguous(), False


@kernel_op("fastnote::squeeze_excitation")
def _forward_op(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                activation: str, gate: str, hswish: bool) -> List[Tensor]:
    kernels = _kernels.squeeze_excitation

    x, cl = _layout(x)
    s = backend.empty(x.shape[:2], torch.float32, x.device)   # s and g are outputs: no shared storage
    g = backend.empty(x.shape[:2], torch.float32, x.device)
    kernels.plane_reduce(x=x, grad=None, hswish=hswish, scale=1.0 / max(x.shape[2] * x.shape[3], 1), out=s,
                         channels_last=cl)
    # The kernels read every weight and bias as packed memory: strided ones are copied (views of a
    # larger buffer, an expanded scalar bias); contiguous ones go as they are.
    kernels.mlp_forward(s=s, w1=_matrix(w1), b1=b1.contiguous(), w2=_matrix(w2), b2=b2.contiguous(),
                        activation=activation, gate=gate, g=g)
    out = kernels.apply(x=x, g=g, hswish=hswish, out=backend.empty_in_layout(x), channels_last=cl)
    return [out, s, g]     # s and g, [B, C] fp32 each, are kept for backward


def _matrix(w: Tensor) -> Tensor:
    """A weight [out, in] or conv-shaped [out, in, 1, 1] whose memory is a row-major [out, in]
    matrix: the kernels read it through its pointer and out = shape[0] alone, so a contiguous
    weight of either shape goes as it is (no reshape on the hot path); others are copied."""
    return w if w.is_contiguous() else w.reshape(w.shape[0], w.shape[1]).contiguous()


@_forward_op.register_fake
def _(x, w1, b1, w2, b2, activation, gate, hswish):
    return [backend.fake_in_layout(x), x.new_empty(x.shape[:2], dtype=torch.float32),
            x.new_empty(x.shape[:2], dtype=torch.float32)]


@kernel_op("fastnote::squeeze_excitation_backward")
def _backward_op(grad: Tensor, x: Tensor, s: Tensor, g: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                 activation: str, gate: str, hswish: bool) -> List[Tensor]:
    """g: the forward's gate values (saved: [B, C] fp32, cheaper than a launch to recompute)."""
    kernels = _kernels.squeeze_excitation

    x, cl = _layout(x)
    grad = (grad if grad.dtype == x.dtype else grad.to(x.dtype)).contiguous(
        memory_format=torch.channels_last if cl else torch.contiguous_format)
    m1, m2 = _matrix(w1), _matrix(w2)
    B, C = s.shape
    CR = m1.shape[0]
    # NaN-poisoned under the tests, like every kernel output: a value a kernel fails to write shows
    dg = backend.empty((B, C), torch.float32, x.device)
    kernels.plane_reduce(x=x, grad=grad, hswish=hswish, scale=1.0, out=dg, channels_last=cl)
    a, dz1 = backend.empty((2, B, CR), torch.float32, x.device).unbind(0)
    dz2, ds = backend.empty((2, B, C), torch.float32, x.device).unbind(0)
    ds, dw1, db1, dw2, db2 = kernels.mlp_backward(s=s, w1=m1, b1=b1.contiguous(), w2=m2, b2=b2.contiguous(),
                                                  dg=dg, activation=activation, gate=gate, a=a, dz1=dz1, dz2=dz2,
                                                  ds=ds)
    del dg, a, dz1   # freed before dx is allocated (the backward's peak)
    dx = kernels.input_grad(grad=grad, x=x, g=g, ds=ds, hswish=hswish, out=backend.empty_in_layout(x),
                            channels_last=cl)
    return [dx, _like(dw1, w1), _like(db1, b1), _like(dw2, w2), _like(db2, b2)]


def _like(grad: Tensor, param: Tensor) -> Tensor:
    """The fp32 gradient in the parameter's dtype and shape (conv-shaped weights), without a call
    where nothing changes."""
    if grad.dtype != param.dtype:
        grad = grad.to(param.dtype)
    return grad if grad.dim() == param.dim() else grad.reshape(param.shape)


@_backward_op.register_fake
def _(grad, x, s, g, w1, b1, w2, b2, activation, gate, hswish):
    return [backend.fake_in_layout(x), w1.new_empty(w1.shape), b1.new_empty(b1.shape),
            w2.new_empty(w2.shape), b2.new_empty(b2.shape)]


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, activation, gate, hswish = inputs
    ctx.save_for_backward(x, output[1], output[2], w1, b1, w2, b2)
    ctx.config = (activation, gate, hswish)


def _backward(ctx, grads):
    grad = grads[0]
    x, s, g, w1, b1, w2, b2 = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = _backward_op(grad, x, s, g, w1, b1, w2, b2, *ctx.config)
    return dx, dw1, db1, dw2, db2, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _weights(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """The weights as given (2-D or conv-shaped, the op takes both) and the biases (zeros for None)."""
    w1, b1, w2, b2 = fc1_weight, fc1_bias, fc2_weight, fc2_bias
    # The common case in a few comparisons; anything else goes through the checks, for the message.
    if (type(w1) in checks.PLAIN_TENSORS and type(w2) in checks.PLAIN_TENSORS and type(b1) in checks.PLAIN_TENSORS and type(b2) in checks.PLAIN_TENSORS
            and w1.dtype in checks.FLOAT_DTYPES and w2.dtype in checks.FLOAT_DTYPES
            and b1.dtype in checks.FLOAT_DTYPES and b2.dtype in checks.FLOAT_DTYPES):
        Cr, C = w1.shape[0], x.shape[1]
        if (w1.shape in ((Cr, C), (Cr, C, 1, 1)) and w2.shape in ((C, Cr), (C, Cr, 1, 1))
                and b1.shape == (Cr,) and b2.shape == (C,)
                and x.device == w1.device == w2.device == b1.device == b2.device):
            return w1, b1, w2, b2
    return _checked_weights(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)


def _checked_weights(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    C = x.shape[1]
    w1 = checks.tensor("fc1_weight", fc1_weight, ndim=(2, 4))
    w2 = checks.tensor("fc2_weight", fc2_weight, ndim=(2, 4))
    Cr = w1.shape[0]
    if w1.shape[1] != C:
        # one of the two is wrong: name both (usually x, the weights come from the module)
        raise ValueError(f"x has {C} channels (shape {list(x.shape)}), but fc1_weight {list(w1.shape)} "
                         f"takes {w1.shape[1]}")
    checks.shape("fc1_weight", w1, [Cr, C] + ([1, 1] if w1.dim() == 4 else []))
    checks.shape("fc2_weight", w2, [C, Cr] + ([1, 1] if w2.dim() == 4 else []))
    b1 = checks.tensor("fc1_bias", fc1_bias, ndim=1) if fc1_bias is not None else w1.new_zeros(Cr)
    b2 = checks.tensor("fc2_bias", fc2_bias, ndim=1) if fc2_bias is not None else w2.new_zeros(C)
    checks.shape("fc1_bias", b1, [Cr])
    checks.shape("fc2_bias", b2, [C])
    checks.same_device(x=x, fc1_weight=w1, fc1_bias=b1, fc2_weight=w2, fc2_bias=b2)
    return w1, b1, w2, b2


def _se(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, gate, hswish):
    if not (type(x) in checks.PLAIN_TENSORS and x.dtype in checks.FLOAT_DTYPES and x.dim() == 4):
        checks.tensor("x", x, ndim=4)
    if activation not in ACTIVATIONS:
        checks.choice("activation", activation, ACTIVATIONS)
    if gate not in GATES:
        checks.choice("gate", gate, GATES)
    w1, b1, w2, b2 = _weights(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if not backend.kernels_for(x, w1, b1, w2, b2) or w1.shape[0] > MAX_SQUEEZE:
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
