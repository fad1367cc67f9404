"""Swin V2 window attention (docs/ops.md section 4.4): cosine attention with a per-head logit scale
and the continuous position bias, on the V1 kernels with their ``COSINE`` switch on. The core
``window_attention_v2`` on partitioned windows and the fused block path
``swin_window_attention_v2`` on ``[B, H, W, C]``, forward and backward.

The kernels take the dense ``[heads, N, N]`` additive bias as V1 does; building it
(``16 * sigmoid(cpb_mlp(coords))`` gathered by the relative position index) stays in torch, and its
gradient flows back into the MLP through autograd. Gradients reach q, k, v (through the
normalisation), ``logit_scale`` (zero where it is clamped at log 100) and the bias. The shift
mask is a constant, as in V1. Under autocast, q, k, v and the bias run in the autocast dtype; the
logit scale stays in its own.
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend, checks, reference
from ._fast import kernel_op, kernels as _kernels
from .window_attention import (MASK_VALUE, _backward_scratch, _block_backward_launch, _block_forward_launch,
                               _check_block, _check_core, _core_inputs_ok, _dq_accumulator, _lse_shape,
                               _unit_last_stride, relative_position_bias)

LOGIT_SCALE_MAX = reference.LOGIT_SCALE_MAX   # log(1 / 0.01)


def _head_scale(logit_scale: Tensor) -> Tensor:
    """exp(min(logit_scale, log 100)) as fp32 [heads], what the kernels read."""
    return torch.clamp(logit_scale.detach().reshape(-1).float(), max=LOGIT_SCALE_MAX).exp()


def _logit_scale_grad(partial: Tensor, logit_scale: Tensor) -> Tensor:
    """d logit_scale from the kernels' per-program parts of d scale_h ([programs, heads] fp32):
    their sum times d scale / d logit_scale = scale where logit_scale <= log 100 (clamp's rule:
    the bound itself passes), else 0."""
    flat = logit_scale.detach().reshape(-1).float()
    scale = torch.clamp(flat, max=LOGIT_SCALE_MAX).exp()
    grad = partial.sum(0) * torch.where(flat <= LOGIT_SCALE_MAX, scale, 0.0)
    return grad.reshape(logit_scale.shape).to(logit_scale.dtype)


# ----------------------------------------------------------------------------------------------
# Core op: q, k, v [B*nW, heads, N, d]
# ----------------------------------------------------------------------------------------------

@kernel_op("fastnote::window_attention_v2")
def _forward_op(q: Tensor, k: Tensor, v: Tensor, logit_scale: Tensor, bias: Optional[Tensor],
                mask: Optional[Tensor]) -> List[Tensor]:
    kernels = _kernels.window_attention

    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    out = backend.empty_like(q)
    lse = backend.empty(q.shape[:3], torch.float32, q.device)
    bias, mask = checks.contiguous(bias, mask)
    kernels.forward(q=q, k=k, v=v, bias=bias, mask=mask, scale=1.0, out=out, lse=lse,
                    head_scale=_head_scale(logit_scale))
    return [out, lse]


@_forward_op.register_fake
def _(q, k, v, logit_scale, bias, mask):
    return [q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)]


@kernel_op("fastnote::window_attention_v2_backward")
def _backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, logit_scale: Tensor,
                 bias: Optional[Tensor], mask: Optional[Tensor], bias_grad: bool) -> List[Tensor]:
    kernels = _kernels.window_attention

    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    grad = grad.to(q.dtype).contiguous()
    out, lse, bias, mask = checks.contiguous(out, lse, bias, mask)
    heads, d = q.shape[1], q.shape[3]
    g = kernels.core_geometry(q, mask)
    plan = kernels.backward_plan(g, heads, d, q.dtype, torch.are_deterministic_algorithms_enabled())
    dq, dk, dv = (backend.empty_like(q) for _ in range(3))
    dq_acc = _dq_accumulator(plan, dq.shape, q.device)
    dbias_partial, _ = _backward_scratch(plan, g, heads, d, q.device, bias_grad=bias_grad and bias is not None,
                                         pad=False)
    dscale_partial = _scale_partial(kernels, plan, g, heads, q.device)
    kernels.backward(do=grad, q=q, k=k, v=v, out=out, lse=lse, bias=bias, mask=mask, scale=1.0,
                     dq=dq if dq_acc is None else dq_acc, dk=dk, dv=dv, dbias_partial=dbias_partial,
                     head_scale=_head_scale(logit_scale), dscale_partial=dscale_partial)
    if dq_acc is not None:
        dq.copy_(dq_acc)
    dbias = dbias_partial.sum(0).to(bias.dtype) if dbias_partial is not None else q.new_empty(0)
    return [dq, dk, dv, _logit_scale_grad(dscale_partial, logit_scale), dbias]


def _scale_partial(kernels, plan, g, heads: int, device) -> Tensor:
    """The per-program parts of d scale_h, written whole by the kernel (zeros when no program runs)."""
    shape = kernels.scale_partial_shape(plan, heads)
    if g.num_windows == 0 or g.N == 0:
        return torch.zeros(shape, dtype=torch.float32, device=device)
    return backend.empty(shape, torch.float32, device)


@_backward_op.register_fake
def _(grad, q, k, v, out, lse, logit_scale, bias, mask, bias_grad):
    dbias = bias.new_empty(bias.shape) if (bias_grad and bias is not None) else q.new_empty(0)
    return [q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), logit_scale.new_empty(logit_scale.shape),
            dbias]


def _setup_context(ctx, inputs, output):
    q, k, v, logit_scale, bias, mask = inputs
    ctx.save_for_backward(q, k, v, logit_scale, bias, mask, output[0], output[1])


def _backward(ctx, grads):
    q, k, v, logit_scale, bias, mask, out, lse = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dlogit, dbias = _backward_op(grads[0], q, k, v, out, lse, logit_scale, bias, mask, bias_grad)
    return dq, dk, dv, dlogit, (dbias if bias_grad else None), None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _check_logit_scale(logit_scale, heads: int) -> None:
    checks.tensor("logit_scale", logit_scale, ndim=3)
    checks.shape("logit_scale", logit_scale, [heads, 1, 1])


def _logit_scale_ok(logit_scale, heads: int, device) -> bool:
    return (type(logit_scale) in checks.PLAIN_TENSORS and logit_scale.dtype in checks.FLOAT_DTYPES
            and logit_scale.shape == (heads, 1, 1) and logit_scale.device == device)


def window_attention_v2(q: Tensor, k: Tensor, v: Tensor, logit_scale: Tensor, bias: Optional[Tensor] = None,
                        mask: Optional[Tensor] = None) -> Tensor:
    """Swin V2's cosine window attention per window and head:
    ``softmax(q^ @ k^^T * exp(min(logit_scale[h], log 100)) + bias[h] + mask[w % nW]) @ v`` with
    ``q^ = q / max(||q||, 1e-12)`` per row (``F.normalize``), likewise k^.

    q, k, v: ``[B*nW, heads, N, d]`` as ``window_attention`` (any strides with a unit last one).
    ``logit_scale``: ``[heads, 1, 1]`` (Swin V2's parameter; gradient computed, zero where clamped).
    ``bias``: ``[heads, N, N]`` (V2's ``16 * sigmoid(cpb)`` gathered by the relative position index)
    or None, gradient computed. ``mask``: ``[nW, N, N]`` constant or None. No ``d ** -0.5``: the
    head's scale replaces it. fp32/fp16/bf16. Returns ``[B*nW, heads, N, d]`` in q's dtype.

    >>> import torch, fastnote
    >>> q = k = v = torch.randn(4, 3, 64, 32)
    >>> fastnote.window_attention_v2(q, k, v, torch.full((3, 1, 1), 2.3), bias=torch.zeros(3, 64, 64)).shape
    torch.Size([4, 3, 64, 32])
    """
    if not (_core_inputs_ok(q, k, v, bias, mask) and _logit_scale_ok(logit_scale, q.shape[1], q.device)):
        _check_core(q, k, v, bias, mask)
        _check_logit_scale(logit_scale, q.shape[1])
        checks.same_device(q=q, logit_scale=logit_scale)
    q, k, v, bias = checks.autocast(q, k, v, bias)
    if not backend.kernels_for(q, logit_scale, bias, mask):
        return reference.window_attention_v2(q, k, v, logit_scale, bias=bias, mask=mask)
    return _forward_op(q, k, v, logit_scale, bias, mask)[0]


# ----------------------------------------------------------------------------------------------
# Fused block path: qkv [B, H, W, 3C] -> attention output [B, H, W, C] (before proj)
# ----------------------------------------------------------------------------------------------

@kernel_op("fastnote::swin_window_attention_v2")
def _block_forward_op(qkv: Tensor, qkv_bias: Optional[Tensor], logit_scale: Tensor, bias: Optional[Tensor],
                      window_size: int, num_heads: int, shift_size: int, mask_value: float,
                      roll_first: bool) -> List[Tensor]:
    return _block_forward_launch(qkv, qkv_bias, bias, window_size, num_heads, shift_size, 1.0, mask_value, roll_first,
                                 head_scale=_head_scale(logit_scale))


@_block_forward_op.register_fake
def _(qkv, qkv_bias, logit_scale, bias, window_size, num_heads, shift_size, mask_value, roll_first):
    B, H, W, C3 = qkv.shape
    return [qkv.new_empty((B, H, W, C3 // 3)),
            qkv.new_empty(_lse_shape(qkv, window_size, num_heads), dtype=torch.float32)]


@kernel_op("fastnote::swin_window_attention_v2_backward")
def _block_backward_op(grad: Tensor, qkv: Tensor, qkv_bias: Optional[Tensor], logit_scale: Tensor,
                       bias: Optional[Tensor], out: Tensor, lse: Tensor, window_size: int, num_heads: int,
                       shift_size: int, mask_value: float, roll_first: bool, bias_grad: bool) -> List[Tensor]:
    kernels = _kernels.window_attention

    qkv, qkv_bias, bias, out, lse = checks.contiguous(qkv, qkv_bias, bias, out, lse)
    grad = grad.to(qkv.dtype).contiguous()
    B, H, W, C3 = qkv.shape
    g = kernels.fused_geometry(B, H, W, C3 // 3, window_size, shift_size, roll_first)
    plan = kernels.backward_plan(g, num_heads, C3 // 3 // num_heads, qkv.dtype,
                                 torch.are_deterministic_algorithms_enabled())
    dscale_partial = _scale_partial(kernels, plan, g, num_heads, qkv.device)
    launch = functools.partial(kernels.fused_backward, scale=1.0, head_scale=_head_scale(logit_scale),
                               dscale_partial=dscale_partial)
    dqkv, dqkv_bias, dbias_partial = _block_backward_launch(
        grad, qkv, qkv_bias, bias, out, lse, window_size, num_heads, shift_size, mask_value, roll_first,
        bias_grad and bias is not None, launch)
    return [dqkv,
            dqkv_bias.to(qkv_bias.dtype) if qkv_bias is not None else qkv.new_empty(0),
            _logit_scale_grad(dscale_partial, logit_scale),
            dbias_partial.sum(0).to(bias.dtype) if dbias_partial is not None else qkv.new_empty(0)]


@_block_backward_op.register_fake
def _(grad, qkv, qkv_bias, logit_scale, bias, out, lse, window_size, num_heads, shift_size, mask_value, roll_first,
      bias_grad):
    return [qkv.new_empty(qkv.shape),
            qkv_bias.new_empty(qkv_bias.shape) if qkv_bias is not None else qkv.new_empty(0),
            logit_scale.new_empty(logit_scale.shape),
            bias.new_empty(bias.shape) if (bias_grad and bias is not None) else qkv.new_empty(0)]


def _block_setup_context(ctx, inputs, output):
    qkv, qkv_bias, logit_scale, bias, window_size, num_heads, shift_size, mask_value, roll_first = inputs
    ctx.save_for_backward(qkv, qkv_bias, logit_scale, bias, output[0], output[1])
    ctx.config = (window_size, num_heads, shift_size, mask_value, roll_first)


def _block_backward(ctx, grads):
    qkv, qkv_bias, logit_scale, bias, out, lse = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dqkv, dqkv_bias, dlogit, dbias = _block_backward_op(grads[0], qkv, qkv_bias, logit_scale, bias, out, lse,
                                                        *ctx.config, bias_grad)
    return (dqkv, dqkv_bias if qkv_bias is not None else None, dlogit, dbias if bias_grad else None,
            None, None, None, None, None)


_block_forward_op.register_autograd(_block_backward, setup_context=_block_setup_context)


def _check_block_v2(x, qkv_weight, q_bias, v_bias, proj_weight, proj_bias, logit_scale, position_bias,
                    window_size, num_heads, shift_size, index, mask_value):
    """Checks of ``swin_window_attention_v2``: V1's block checks (the position bias checked there as
    its table when it is one), then V2's own arguments; returns (window, heads, shift)."""
    if (q_bias is None) != (v_bias is None):
        raise ValueError("q_bias and v_bias must both be tensors (Swin V2's qkv bias is cat(q_bias, 0, v_bias)) "
                         f"or both None, got q_bias {type(q_bias).__name__} and v_bias {type(v_bias).__name__}")
    dense = isinstance(position_bias, Tensor) and position_bias.dim() == 3
    ws, num_heads, shift_size, _ = _check_block(x, qkv_weight, None, proj_weight, proj_bias,
                                                None if dense else position_bias, window_size, num_heads,
                                                shift_size, index, None, mask_value, table_required=not dense)
    C = x.shape[-1]
    for name, t in (("q_bias", q_bias), ("v_bias", v_bias)):
        if t is not None:
            checks.tensor(name, t, ndim=1)
            checks.shape(name, t, [C])
    if dense:
        checks.tensor("relative_position_bias", position_bias, ndim=3)
        checks.shape("relative_position_bias", position_bias, [num_heads, ws * ws, ws * ws])
    _check_logit_scale(logit_scale, num_heads)
    checks.same_device(x=x, q_bias=q_bias, v_bias=v_bias, logit_scale=logit_scale,
                       relative_position_bias=position_bias)
    if checks.autocast_dtype(x.device) is None:
        checks.same_dtype(x=x, q_bias=q_bias, v_bias=v_bias)
    return ws, num_heads, shift_size


def swin_window_attention_v2(x: Tensor, qkv_weight: Tensor, q_bias: Optional[Tensor], v_bias: Optional[Tensor],
                             proj_weight: Tensor, proj_bias: Optional[Tensor], logit_scale: Tensor,
                             relative_position_bias: Tensor, window_size: int, num_heads: int,
                             shift_size: int = 0, relative_position_index: Optional[Tensor] = None,
                             mask_value: float = MASK_VALUE, roll_first: bool = False) -> Tensor:
    """The W-MSA / SW-MSA part of a Swin V2 block on ``x: [B, H, W, C]``, fused: as
    ``swin_window_attention`` (pad, roll, partition, the shift mask, reverse, roll back, crop, all
    index arithmetic in the kernels; ``roll_first=True`` for timm's order, torchvision's otherwise)
    with cosine attention (``window_attention_v2``) as the core and Swin V2's qkv bias
    ``cat(q_bias, 0, v_bias)`` (k has none; both None for no bias).

    ``relative_position_bias``: the additive bias after V2's ``16 * sigmoid``, either dense
    ``[heads, N, N]`` or as a table ``[(2Ws-1)^2, heads]`` (``16 * sigmoid(cpb_mlp(coords))``; the
    sigmoid commutes with the gather) gathered with ``relative_position_index`` (Swin's by default).
    ``logit_scale``: ``[heads, 1, 1]``. Gradients reach x and every parameter.

    >>> import torch, fastnote
    >>> x = torch.randn(1, 9, 9, 32)
    >>> y = fastnote.swin_window_attention_v2(x, torch.randn(96, 32), torch.zeros(32), torch.zeros(32),
    ...                                       torch.randn(32, 32), torch.zeros(32), torch.full((2, 1, 1), 2.3),
    ...                                       torch.zeros(2, 64, 64), 8, 2, shift_size=4)
    >>> y.shape
    torch.Size([1, 9, 9, 32])
    """
    ws, num_heads, shift_size = _check_block_v2(x, qkv_weight, q_bias, v_bias, proj_weight, proj_bias, logit_scale,
                                                relative_position_bias, window_size, num_heads, shift_size,
                                                relative_position_index, mask_value)
    if not backend.kernels_for(x, qkv_weight, q_bias, v_bias, proj_weight, proj_bias, logit_scale,
                               relative_position_bias):
        return reference.swin_block_attention_v2(x, qkv_weight, q_bias, v_bias, proj_weight, proj_bias, logit_scale,
                                                 relative_position_bias, ws, num_heads, shift_size,
                                                 index=relative_position_index, mask_value=float(mask_value),
                                                 roll_first=roll_first)
    qkv_bias = torch.cat((q_bias, torch.zeros_like(q_bias), v_bias)) if q_bias is not None else None
    qkv = F.linear(x, qkv_weight, qkv_bias)                      # [B, H, W, 3C], no partitioned copy
    bias = relative_position_bias
    if bias.dim() == 2:
        index = relative_position_index if relative_position_index is not None \
            else reference.relative_position_index(ws, device=x.device)
        bias = _gather(bias, index, num_heads)
    bias = checks.autocast(bias)
    pad_bias = qkv_bias.to(qkv.dtype) if qkv_bias is not None else None
    out = _block_forward_op(qkv, pad_bias, logit_scale, bias, ws, num_heads, shift_size, float(mask_value),
                            bool(roll_first))[0]
    return F.linear(out, proj_weight, proj_bias)


_gather = relative_position_bias
