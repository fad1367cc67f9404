"""Swin window attention (SPEC.md section 4): the core ``window_attention`` on partitioned windows
and the fused block path ``swin_window_attention`` on ``[B, H, W, C]``, forward and backward.

Gradients reach q, k, v and ``bias`` (hence the relative-position table, through the one small
gather that builds ``bias``). The attention ``mask`` is a constant (Swin and timm keep it in a
buffer): it gets no gradient, and a mask that requires grad is refused rather than silently
ignored. Dropout on the attention probabilities is not implemented (``WindowAttention`` refuses
``attn_drop > 0`` in training). Under autocast, q, k, v and bias run in the autocast dtype.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend, checks, reference

MASK_VALUE = -100.0  # Swin's and timm's value for masked pairs (not -inf)


def relative_position_index(window_size: Union[int, Sequence[int]], device=None) -> Tensor:
    """Swin/timm relative position index ``[Wh*Ww, Wh*Ww]`` (int64) for a square or rectangular
    window: ``(dh + Wh - 1) * (2*Ww - 1) + (dw + Ww - 1)``; equals ``reference.relative_position_index``
    for square windows."""
    wh, ww = window_pair("window_size", window_size)
    coords = torch.stack(torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device),
                                        indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def window_pair(name: str, window_size) -> Tuple[int, int]:
    if isinstance(window_size, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {window_size!r}")
    if isinstance(window_size, int):
        pair = (window_size, window_size)
    elif isinstance(window_size, (tuple, list)) and len(window_size) == 2 \
            and all(isinstance(w, int) and not isinstance(w, bool) for w in window_size):
        pair = (int(window_size[0]), int(window_size[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {window_size!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be >= 1, got {window_size!r}")
    return pair


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _scale(scale, d: int) -> float:
    if scale is None:
        return d ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _unit_last_stride(t: Tensor) -> Tensor:
    # The kernels take any batch/head/row strides (so q, k, v can be views into one qkv tensor)
    # but need the feature dimension contiguous.
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------
# Core op: q, k, v [B*nW, heads, N, d]
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("fastnote::window_attention", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                scale: float) -> List[Tensor]:
    from ..triton_kernels import window_attention as kernels

    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    out = backend.empty(q.shape, q.dtype, q.device)
    lse = backend.empty(q.shape[:3], torch.float32, q.device)
    kernels.forward(q, k, v, bias.contiguous() if bias is not None else None,
                    mask.contiguous() if mask is not None else None, scale, out, lse)
    return [out, lse]


@_forward_op.register_fake
def _(q, k, v, bias, mask, scale):
    return [q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)]


@torch.library.custom_op("fastnote::window_attention_backward", mutates_args=())
def _backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 bias: Optional[Tensor], mask: Optional[Tensor], scale: float, bias_grad: bool) -> List[Tensor]:
    from ..triton_kernels import window_attention as kernels

    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    grad = grad.to(q.dtype).contiguous()
    dq, dk, dv = (backend.empty(q.shape, q.dtype, q.device) for _ in range(3))
    dbias = kernels.backward(grad, q, k, v, out.contiguous(), lse.contiguous(),
                             bias.contiguous() if bias is not None else None, bias_grad and bias is not None,
                             mask.contiguous() if mask is not None else None, scale, dq, dk, dv)
    dbias = dbias.to(bias.dtype) if dbias is not None else q.new_empty(0)
    return [dq, dk, dv, dbias]


@_backward_op.register_fake
def _(grad, q, k, v, out, lse, bias, mask, scale, bias_grad):
    dbias = bias.new_empty(bias.shape) if (bias_grad and bias is not None) else q.new_empty(0)
    return [q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), dbias]


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, scale = inputs
    ctx.save_for_backward(q, k, v, bias, mask, output[0], output[1])
    ctx.scale = scale


def _backward(ctx, grads):
    q, k, v, bias, mask, out, lse = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = _backward_op(grads[0], q, k, v, out, lse, bias, mask, ctx.scale, bias_grad)
    return dq, dk, dv, (dbias if bias_grad else None), None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _check_bias(name: str, bias: Optional[Tensor], dtype: torch.dtype, shape) -> None:
    if bias is None:
        return
    checks.tensor(name, bias, ndim=len(shape))
    checks.shape(name, bias, shape)
    if bias.dtype not in (dtype, torch.float32):
        raise TypeError(f"{name} must have the dtype of the attention inputs ({str(dtype).replace('torch.', '')}) "
                        f"or float32, got {str(bias.dtype).replace('torch.', '')}")


def window_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None,
                     mask: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """``softmax(q @ k^T * scale + bias[h] + mask[w % nW]) @ v`` per window and head (Swin W-MSA/SW-MSA).

    q, k, v: ``[B*nW, heads, N, d]`` with the ``nW`` windows of one image contiguous (Swin's order);
    any strides (views of one qkv tensor are read in place). ``bias``: ``[heads, N, N]`` or None
    (gradient computed). ``mask``: ``[nW, N, N]`` or None, shared over the batch, a constant (0 and
    -100.0 in Swin; no gradient, and one that requires grad is refused). ``scale``: default
    ``d ** -0.5``. fp32/fp16/bf16 (bias may also be fp32 with half inputs); under autocast q, k, v
    and bias are cast to the autocast dtype. Returns ``[B*nW, heads, N, d]`` in q's dtype.

    >>> import torch, fastnote
    >>> q = k = v = torch.randn(4, 3, 49, 32)
    >>> fastnote.window_attention(q, k, v, bias=torch.zeros(3, 49, 49), mask=torch.zeros(2, 49, 49)).shape
    torch.Size([4, 3, 49, 32])
    """
    checks.tensor("q", q, ndim=4)
    checks.tensor("k", k, ndim=4)
    checks.tensor("v", v, ndim=4)
    checks.shape("k", k, list(q.shape))
    checks.shape("v", v, list(q.shape))
    checks.same_dtype(q=q, k=k, v=v)
    B_, heads, N, d = q.shape
    _check_bias("bias", bias, q.dtype, [heads, N, N])
    if mask is not None:
        checks.tensor("mask", mask, ndim=3)
        checks.shape("mask", mask, [None, N, N])
        nW = mask.shape[0]
        if nW == 0 or B_ % nW:
            raise ValueError(f"mask must have a number of windows nW dividing the batch of windows "
                             f"q.shape[0] = {B_} (mask [nW, N, N] is shared by the B = B*nW / nW images), "
                             f"got mask of shape {list(mask.shape)}")
        if mask.requires_grad:
            raise ValueError("mask must not require grad: it is a constant (Swin's shift mask buffer) and "
                             "window_attention computes no gradient for it; pass mask.detach()")
    checks.same_device(q=q, k=k, v=v, bias=bias, mask=mask)
    scale = _scale(scale, d)
    dtype = _autocast_dtype(q.device)
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if not backend.use_triton(q.device):
        return reference.window_attention(q, k, v, bias=bias, mask=mask, scale=scale)
    return _forward_op(q, k, v, bias, mask, scale)[0]


# ----------------------------------------------------------------------------------------------
# Fused block path: qkv [B, H, W, 3C] -> attention output [B, H, W, C] (before proj)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("fastnote::swin_window_attention", mutates_args=())
def _block_forward_op(qkv: Tensor, qkv_bias: Optional[Tensor], bias: Optional[Tensor], window_size: int,
                      num_heads: int, shift_size: int, scale: float, mask_value: float) -> List[Tensor]:
    from ..triton_kernels import window_attention as kernels

    qkv = qkv.contiguous()
    B, H, W, C3 = qkv.shape
    out = backend.empty((B, H, W, C3 // 3), qkv.dtype, qkv.device)
    lse = backend.empty(_lse_shape(qkv, window_size, num_heads), torch.float32, qkv.device)
    kernels.fused_forward(qkv, qkv_bias.contiguous() if qkv_bias is not None else None,
                          bias.contiguous() if bias is not None else None, window_size, shift_size,
                          num_heads, scale, mask_value, out, lse)
    return [out, lse]


def _lse_shape(qkv, window_size, num_heads):
    B, H, W, _ = qkv.shape
    nW = -(-H // window_size) * -(-W // window_size)
    return (B * nW, num_heads, window_size * window_size)


@_block_forward_op.register_fake
def _(qkv, qkv_bias, bias, window_size, num_heads, shift_size, scale, mask_value):
    B, H, W, C3 = qkv.shape
    return [qkv.new_empty((B, H, W, C3 // 3)),
            qkv.new_empty(_lse_shape(qkv, window_size, num_heads), dtype=torch.float32)]


@torch.library.custom_op("fastnote::swin_window_attention_backward", mutates_args=())
def _block_backward_op(grad: Tensor, qkv: Tensor, qkv_bias: Optional[Tensor], bias: Optional[Tensor],
                       out: Tensor, lse: Tensor, window_size: int, num_heads: int, shift_size: int,
                       scale: float, mask_value: float, bias_grad: bool) -> List[Tensor]:
    from ..triton_kernels import window_attention as kernels

    qkv = qkv.contiguous()
    grad = grad.to(qkv.dtype).contiguous()
    dqkv = backend.empty(qkv.shape, qkv.dtype, qkv.device)
    dqkv_bias = torch.zeros(qkv.shape[-1], dtype=torch.float32, device=qkv.device)
    bias_grad = bias_grad and bias is not None
    dbias = kernels.fused_backward(grad, qkv, qkv_bias.contiguous() if qkv_bias is not None else None,
                                   bias.contiguous() if bias is not None else None, bias_grad,
                                   out.contiguous(), lse.contiguous(), window_size, shift_size, num_heads,
                                   scale, mask_value, dqkv, dqkv_bias)
    return [dqkv,
            dqkv_bias.to(qkv_bias.dtype) if qkv_bias is not None else qkv.new_empty(0),
            dbias.to(bias.dtype) if dbias is not None else qkv.new_empty(0)]


@_block_backward_op.register_fake
def _(grad, qkv, qkv_bias, bias, out, lse, window_size, num_heads, shift_size, scale, mask_value, bias_grad):
    return [qkv.new_empty(qkv.shape),
            qkv_bias.new_empty(qkv_bias.shape) if qkv_bias is not None else qkv.new_empty(0),
            bias.new_empty(bias.shape) if (bias_grad and bias is not None) else qkv.new_empty(0)]


def _block_setup_context(ctx, inputs, output):
    qkv, qkv_bias, bias, window_size, num_heads, shift_size, scale, mask_value = inputs
    ctx.save_for_backward(qkv, qkv_bias, bias, output[0], output[1])
    ctx.config = (window_size, num_heads, shift_size, scale, mask_value)


def _block_backward(ctx, grads):
    qkv, qkv_bias, bias, out, lse = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[2]
    dqkv, dqkv_bias, dbias = _block_backward_op(grads[0], qkv, qkv_bias, bias, out, lse, *ctx.config, bias_grad)
    return (dqkv, dqkv_bias if qkv_bias is not None else None, dbias if bias_grad else None,
            None, None, None, None, None)


_block_forward_op.register_autograd(_block_backward, setup_context=_block_setup_context)


def swin_window_attention(x: Tensor, qkv_weight: Tensor, qkv_bias: Optional[Tensor], proj_weight: Tensor,
                          proj_bias: Optional[Tensor], relative_position_bias_table: Tensor,
                          window_size: int, num_heads: int, shift_size: int = 0,
                          relative_position_index: Optional[Tensor] = None, scale: Optional[float] = None,
                          mask_value: float = MASK_VALUE) -> Tensor:
    """The W-MSA / SW-MSA part of a Swin block on ``x: [B, H, W, C]``, fused.

    Same result as ``reference.swin_block_attention``: zero-pad H, W to multiples of
    ``window_size`` (before qkv, as Swin pads), roll by ``-shift_size``, partition, attention with
    the relative position bias (and the shift mask, ``mask_value`` across regions), ``proj``,
    reverse, roll back, crop. Only ``qkv = x @ qkv_weight^T + qkv_bias`` (``[B, H, W, 3C]``) and the
    attention output ``[B, H, W, C]`` are written: rolling, padding, partitioning and the shift
    mask are index arithmetic in the kernels. ``relative_position_index`` defaults to Swin's.
    Gradients reach x and every parameter.

    >>> import torch, fastnote
    >>> x = torch.randn(1, 9, 9, 32)
    >>> y = fastnote.swin_window_attention(x, torch.randn(96, 32), torch.zeros(96), torch.randn(32, 32),
    ...                                    torch.zeros(32), torch.zeros(169, 2), 7, 2, shift_size=3)
    >>> y.shape
    torch.Size([1, 9, 9, 32])
    """
    checks.tensor("x", x, ndim=4)
    B, H, W, C = x.shape
    wh, ww = window_pair("window_size", window_size)
    if wh != ww:
        raise ValueError(f"window_size must be square for swin_window_attention, got {window_size!r}")
    ws = wh
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or C % num_heads:
        raise ValueError(f"num_heads must be a positive int dividing C = x.shape[-1] = {C}, got {num_heads!r}")
    if isinstance(shift_size, bool) or not isinstance(shift_size, int) or not 0 <= shift_size < ws:
        raise ValueError(f"shift_size must be an int in [0, window_size) = [0, {ws}), got {shift_size!r}")
    checks.tensor("qkv_weight", qkv_weight, ndim=2)
    checks.shape("qkv_weight", qkv_weight, [3 * C, C])
    if qkv_bias is not None:
        checks.tensor("qkv_bias", qkv_bias, ndim=1)
        checks.shape("qkv_bias", qkv_bias, [3 * C])
    checks.tensor("proj_weight", proj_weight, ndim=2)
    checks.shape("proj_weight", proj_weight, [C, C])
    if proj_bias is not None:
        checks.tensor("proj_bias", proj_bias, ndim=1)
        checks.shape("proj_bias", proj_bias, [C])
    checks.tensor("relative_position_bias_table", relative_position_bias_table, ndim=2)
    checks.shape("relative_position_bias_table", relative_position_bias_table, [(2 * ws - 1) ** 2, num_heads])
    N = ws * ws
    if relative_position_index is None:
        relative_position_index = reference.relative_position_index(ws, device=x.device)
    checks.tensor("relative_position_index", relative_position_index, ndim=2, dtypes=(torch.int64, torch.int32))
    checks.shape("relative_position_index", relative_position_index, [N, N])
    checks.same_device(x=x, qkv_weight=qkv_weight, qkv_bias=qkv_bias, proj_weight=proj_weight, proj_bias=proj_bias,
                       relative_position_bias_table=relative_position_bias_table,
                       relative_position_index=relative_position_index)
    autocast = _autocast_dtype(x.device)
    if autocast is None:
        checks.same_dtype(x=x, qkv_weight=qkv_weight, qkv_bias=qkv_bias, proj_weight=proj_weight,
                          proj_bias=proj_bias, relative_position_bias_table=relative_position_bias_table)
    if not isinstance(mask_value, (int, float)) or isinstance(mask_value, bool):
        raise TypeError(f"mask_value must be a float, got {type(mask_value).__name__}")
    scale = _scale(scale, C // num_heads)

    if not backend.use_triton(x.device):
        return reference.swin_block_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias,
                                              relative_position_bias_table, ws, num_heads, shift_size,
                                              index=relative_position_index, scale=scale,
                                              mask_value=float(mask_value))

    qkv = F.linear(x, qkv_weight, qkv_bias)                      # [B, H, W, 3C], no partitioned copy
    # One tiny gather ([heads, N, N]); its backward scatters dbias into the table.
    bias = relative_position_bias_table[relative_position_index.reshape(-1)].view(N, N, num_heads).permute(2, 0, 1)
    pad_bias = qkv_bias.to(qkv.dtype) if qkv_bias is not None else None
    if autocast is not None:
        bias = bias.to(autocast)
    out = _block_forward_op(qkv, pad_bias, bias, ws, num_heads, shift_size, scale, float(mask_value))[0]
    return F.linear(out, proj_weight, proj_bias)
