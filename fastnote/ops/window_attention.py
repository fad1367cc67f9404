"""Swin window attention (docs/ops.md section 4): the core ``window_attention`` on partitioned windows
and the fused block path ``swin_window_attention`` on ``[B, H, W, C]``, forward and backward.

Gradients reach q, k, v and ``bias`` (hence the relative-position table, through the one small
gather that builds ``bias``). The attention ``mask`` is a constant (Swin and timm keep it in a
buffer): it gets no gradient, and a mask that requires grad is refused rather than silently
ignored. Dropout on the attention probabilities is not implemented (``WindowAttention`` refuses
``attn_drop > 0`` in training). Under autocast, q, k, v and bias run in the autocast dtype.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend, checks, reference
from ._fast import kernel_op, kernels as _kernels

# One definition each, shared with the modules: Swin's mask value for pairs across regions, the
# relative position index and the bias gathered from the table.
MASK_VALUE = reference.MASK_VALUE
relative_position_bias = reference.relative_position_bias


def relative_position_index(window_size: Union[int, Sequence[int]], device=None) -> Tensor:
    """Swin/timm relative position index ``[Wh*Ww, Wh*Ww]`` (int64) for a square or rectangular
    window: ``(dh + Wh - 1) * (2*Ww - 1) + (dw + Ww - 1)``."""
    return reference.relative_position_index(checks.window_pair("window_size", window_size), device=device)


def _unit_last_stride(t: Tensor) -> Tensor:
    # The kernels take any batch/head/row strides (so q, k, v can be views into one qkv tensor)
    # but need the feature dimension contiguous.
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------
# Core op: q, k, v [B*nW, heads, N, d]
# ----------------------------------------------------------------------------------------------

@kernel_op("fastnote::window_attention")
def _forward_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
                scale: float) -> List[Tensor]:
    kernels = _kernels.window_attention

    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    out = backend.empty_like(q)
    lse = backend.empty(q.shape[:3], torch.float32, q.device)
    bias, mask = checks.contiguous(bias, mask)
    kernels.forward(q=q, k=k, v=v, bias=bias, mask=mask, scale=scale, out=out, lse=lse)
    return [out, lse]


@_forward_op.register_fake
def _(q, k, v, bias, mask, scale):
    return [q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)]


@kernel_op("fastnote::window_attention_backward")
def _backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 bias: Optional[Tensor], mask: Optional[Tensor], scale: float, bias_grad: bool) -> List[Tensor]:
    kernels = _kernels.window_attention

    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    grad = grad.to(q.dtype).contiguous()
    out, lse, bias, mask = checks.contiguous(out, lse, bias, mask)
    g = kernels.core_geometry(q, mask)
    plan = kernels.backward_plan(g, q.shape[1], q.shape[3], q.dtype, torch.are_deterministic_algorithms_enabled())
    dq, dk, dv = (backend.empty_like(q) for _ in range(3))
    dq_acc = _dq_accumulator(plan, dq.shape, q.device)
    dbias_partial, _ = _backward_scratch(plan, g, q.shape[1], q.shape[3], q.device,
                                         bias_grad=bias_grad and bias is not None, pad=False)
    kernels.backward(do=grad, q=q, k=k, v=v, out=out, lse=lse, bias=bias, mask=mask, scale=scale,
                     dq=dq if dq_acc is None else dq_acc, dk=dk, dv=dv, dbias_partial=dbias_partial)
    if dq_acc is not None:
        dq.copy_(dq_acc)
    dbias = dbias_partial.sum(0).to(bias.dtype) if dbias_partial is not None else q.new_empty(0)
    return [dq, dk, dv, dbias]


def _dq_accumulator(plan, shape, device) -> Optional[Tensor]:
    """Where the windows span several query tiles, dq sums over key tiles: an fp32 zeroed buffer
    the kernel adds into (None: the kernel writes dq itself)."""
    return None if plan.single else torch.zeros(shape, dtype=torch.float32, device=device)


def _backward_scratch(plan, g, heads: int, d: int, device, *, bias_grad: bool, pad: bool):
    """The backward's fp32 partials, sized by the kernels' ``plan``: (bias-gradient partials or
    None, the fused layout's padded-token k/v partials or None). The bias partials are zeroed
    where the kernel adds into them (and for an empty batch, where no program runs)."""
    kernels = _kernels.window_attention

    dbias_partial = dpad_partial = None
    if bias_grad:
        shape = kernels.dbias_partial_shape(plan, heads, g.N)
        dbias_partial = torch.zeros(shape, dtype=torch.float32, device=device) \
            if plan.accumulated or g.num_windows == 0 else backend.empty(shape, torch.float32, device)
    if pad:
        dpad_partial = backend.empty(kernels.pad_partial_shape(g, heads, d), torch.float32, device)
    return dbias_partial, dpad_partial


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
        raise TypeError(f"{name} must have the dtype of the attention inputs ({checks.dtype_name(dtype)}) "
                        f"or float32, got {checks.dtype_name(bias.dtype)}")


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
    if not _core_inputs_ok(q, k, v, bias, mask):
        _check_core(q, k, v, bias, mask)
    scale = checks.scale(scale, q.shape[3])
    q, k, v, bias = checks.autocast(q, k, v, bias)
    if not backend.kernels_for(q, bias, mask):
        return reference.window_attention(q, k, v, bias=bias, mask=mask, scale=scale)
    return _forward_op(q, k, v, bias, mask, scale)[0]




def _core_inputs_ok(q, k, v, bias, mask) -> bool:
    """The common case of ``_check_core`` in a few comparisons (False: let the checks decide)."""
    if not (type(q) in checks.PLAIN_TENSORS and type(k) in checks.PLAIN_TENSORS and type(v) in checks.PLAIN_TENSORS and q.dtype in checks.FLOAT_DTYPES
            and k.dtype == q.dtype and v.dtype == q.dtype and q.dim() == 4 and k.shape == q.shape
            and v.shape == q.shape and q.device == k.device == v.device):
        return False
    B_, heads, N, _ = q.shape
    if bias is not None and not (type(bias) in checks.PLAIN_TENSORS and bias.dtype in (q.dtype, torch.float32)
                                 and bias.shape == (heads, N, N) and bias.device == q.device):
        return False
    if mask is not None:
        if not (type(mask) in checks.PLAIN_TENSORS and mask.dtype in checks.FLOAT_DTYPES and mask.dim() == 3):
            return False
        nW = mask.shape[0]
        if not (mask.shape[1] == N and mask.shape[2] == N and nW and B_ % nW == 0 and not mask.requires_grad
                and mask.device == q.device):
            return False
    return True


def _check_core(q, k, v, bias, mask) -> None:
    """``window_attention``'s checks, each failure with its message."""
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


# ----------------------------------------------------------------------------------------------
# Fused block path: qkv [B, H, W, 3C] -> attention output [B, H, W, C] (before proj)
# ----------------------------------------------------------------------------------------------

@kernel_op("fastnote::swin_window_attention")
def _block_forward_op(qkv: Tensor, qkv_bias: Optional[Tensor], bias: Optional[Tensor], window_size: int,
                      num_heads: int, shift_size: int, scale: float, mask_value: float,
                      roll_first: bool) -> List[Tensor]:
    return _block_forward_launch(qkv, qkv_bias, bias, window_size, num_heads, shift_size, scale, mask_value,
                                 roll_first)


def _block_forward_launch(qkv, qkv_bias, bias, window_size, num_heads, shift_size, scale, mask_value, roll_first,
                          head_scale=None) -> List[Tensor]:
    """[out, lse] of the fused forward (V1's, and V2's with ``head_scale``)."""
    kernels = _kernels.window_attention

    qkv, qkv_bias, bias = checks.contiguous(qkv, qkv_bias, bias)
    B, H, W, C3 = qkv.shape
    out = backend.empty((B, H, W, C3 // 3), qkv.dtype, qkv.device)
    lse = backend.empty(_lse_shape(qkv, window_size, num_heads), torch.float32, qkv.device)
    kernels.fused_forward(qkv=qkv, qkv_bias=qkv_bias, bias=bias, window_size=window_size, num_heads=num_heads,
                          shift_size=shift_size, scale=scale, mask_value=mask_value, roll_first=roll_first,
                          out=out, lse=lse, head_scale=head_scale)
    return [out, lse]


def _lse_shape(qkv, window_size, num_heads):
    kernels = _kernels.window_attention

    B, H, W, C3 = qkv.shape
    g = kernels.fused_geometry(B, H, W, C3 // 3, window_size, 0)
    return (g.num_windows, num_heads, g.N)


@_block_forward_op.register_fake
def _(qkv, qkv_bias, bias, window_size, num_heads, shift_size, scale, mask_value, roll_first):
    B, H, W, C3 = qkv.shape
    return [qkv.new_empty((B, H, W, C3 // 3)),
            qkv.new_empty(_lse_shape(qkv, window_size, num_heads), dtype=torch.float32)]


@kernel_op("fastnote::swin_window_attention_backward")
def _block_backward_op(grad: Tensor, qkv: Tensor, qkv_bias: Optional[Tensor], bias: Optional[Tensor],
                       out: Tensor, lse: Tensor, window_size: int, num_heads: int, shift_size: int,
                       scale: float, mask_value: float, roll_first: bool, bias_grad: bool) -> List[Tensor]:
    kernels = _kernels.window_attention

    qkv, qkv_bias, bias, out, lse = checks.contiguous(qkv, qkv_bias, bias, out, lse)
    grad = grad.to(qkv.dtype).contiguous()
    dqkv, dqkv_bias, dbias_partial = _block_backward_launch(
        grad, qkv, qkv_bias, bias, out, lse, window_size, num_heads, shift_size, mask_value, roll_first,
        bias_grad and bias is not None, functools.partial(kernels.fused_backward, scale=scale))
    return [dqkv,
            dqkv_bias.to(qkv_bias.dtype) if qkv_bias is not None else qkv.new_empty(0),
            dbias_partial.sum(0).to(bias.dtype) if dbias_partial is not None else qkv.new_empty(0)]


def _block_backward_launch(grad, qkv, qkv_bias, bias, out, lse, window_size, num_heads, shift_size,
                           mask_value, roll_first, bias_grad, launcher):
    """The fused layout's backward buffers, the launch through ``launcher`` (a fused-backward
    launcher with its own arguments bound), and the qkv-bias gradient (the linear part comes from autograd; this is the
    zero-padded tokens' part: their q/k/v are the bias itself): (dqkv, dqkv_bias fp32 [3C],
    dbias partials or None)."""
    kernels = _kernels.window_attention

    B, H, W, C3 = qkv.shape
    C, d = C3 // 3, C3 // 3 // num_heads
    g = kernels.fused_geometry(B, H, W, C, window_size, shift_size, roll_first)
    plan = kernels.backward_plan(g, num_heads, d, qkv.dtype, torch.are_deterministic_algorithms_enabled())
    dqkv = backend.empty_like(qkv)
    dq_acc = _dq_accumulator(plan, out.shape, qkv.device)
    dbias_partial, dpad_partial = _backward_scratch(plan, g, num_heads, d, qkv.device, bias_grad=bias_grad,
                                                    pad=qkv_bias is not None and g.padded)
    launcher(do=grad, qkv=qkv, qkv_bias=qkv_bias, bias=bias, out=out, lse=lse, window_size=window_size,
             num_heads=num_heads, shift_size=shift_size, mask_value=mask_value, roll_first=roll_first,
             dqkv=dqkv, dq=dq_acc, dbias_partial=dbias_partial, dpad_partial=dpad_partial)
    if dq_acc is not None:
        dqkv[..., :C].copy_(dq_acc)
    dqkv_bias = torch.zeros(C3, dtype=torch.float32, device=qkv.device)
    if dpad_partial is not None:
        # [programs, heads, 2, d] -> [2, heads * d]: the k and v parts of the qkv bias
        dqkv_bias[C:] = dpad_partial.sum(0).transpose(0, 1).reshape(2 * C)
    return dqkv, dqkv_bias, dbias_partial


@_block_backward_op.register_fake
def _(grad, qkv, qkv_bias, bias, out, lse, window_size, num_heads, shift_size, scale, mask_value, roll_first,
      bias_grad):
    return [qkv.new_empty(qkv.shape),
            qkv_bias.new_empty(qkv_bias.shape) if qkv_bias is not None else qkv.new_empty(0),
            bias.new_empty(bias.shape) if (bias_grad and bias is not None) else qkv.new_empty(0)]


def _block_setup_context(ctx, inputs, output):
    qkv, qkv_bias, bias, window_size, num_heads, shift_size, scale, mask_value, roll_first = inputs
    ctx.save_for_backward(qkv, qkv_bias, bias, output[0], output[1])
    ctx.config = (window_size, num_heads, shift_size, scale, mask_value, roll_first)


def _block_backward(ctx, grads):
    qkv, qkv_bias, bias, out, lse = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[2]
    dqkv, dqkv_bias, dbias = _block_backward_op(grads[0], qkv, qkv_bias, bias, out, lse, *ctx.config, bias_grad)
    return (dqkv, dqkv_bias if qkv_bias is not None else None, dbias if bias_grad else None,
            None, None, None, None, None, None)


_block_forward_op.register_autograd(_block_backward, setup_context=_block_setup_context)


def _block_inputs_ok(x, qkv_weight, qkv_bias, proj_weight, proj_bias, table, window_size, num_heads, shift_size,
                     index, mask_value, table_required=True) -> bool:
    """The common case of ``_check_block`` in a few comparisons (False: let the checks decide):
    int window, heads and shift, one dtype and device for every tensor."""
    if not (type(x) in checks.PLAIN_TENSORS and x.dtype in checks.FLOAT_DTYPES and x.dim() == 4
            and type(window_size) is int and type(num_heads) is int and type(shift_size) is int
            and window_size >= 1 and num_heads >= 1 and 0 <= shift_size < window_size
            and type(mask_value) in (float, int) and -math.inf < mask_value < math.inf):
        return False
    C = x.shape[3]
    if C % num_heads:
        return False
    dtype, device = x.dtype, x.device
    for t, shape in ((qkv_weight, (3 * C, C)), (qkv_bias, (3 * C,)), (proj_weight, (C, C)), (proj_bias, (C,)),
                     (table, ((2 * window_size - 1) ** 2, num_heads))):
        if t is None and (len(shape) == 1 or not table_required):
            continue
        if not (type(t) in checks.PLAIN_TENSORS and t.dtype == dtype and t.shape == shape and t.device == device):
            return False
    n = window_size * window_size
    return index is None or (type(index) in checks.PLAIN_TENSORS and index.dtype in (torch.int64, torch.int32)
                             and index.shape == (n, n) and index.device == device)


def _check_block(x, qkv_weight, qkv_bias, proj_weight, proj_bias, table, window_size, num_heads, shift_size,
                 index, scale, mask_value, table_required=True):
    """Checks of ``swin_window_attention`` (and of ``swin_window_attention_v2``, whose position bias
    may come dense, without a table: ``table_required=False``); returns (window, heads, shift, scale)."""
    if _block_inputs_ok(x, qkv_weight, qkv_bias, proj_weight, proj_bias, table, window_size, num_heads, shift_size,
                        index, mask_value, table_required):
        return window_size, num_heads, shift_size, checks.scale(scale, x.shape[3] // num_heads)
    checks.tensor("x", x, ndim=4)
    C = x.shape[-1]
    wh, ww = checks.window_pair("window_size", window_size)
    if wh != ww:
        raise ValueError(f"window_size must be square for swin_window_attention, got {window_size!r}")
    num_heads = checks.integer("num_heads", num_heads, minimum=1)
    if C % num_heads:
        raise ValueError(f"num_heads must divide C = x.shape[-1] = {C}, got {num_heads}")
    shift_size = checks.integer("shift_size", shift_size, minimum=0, below=wh, what=" (0 to window_size - 1)")
    for name, t, shape in (("qkv_weight", qkv_weight, [3 * C, C]), ("qkv_bias", qkv_bias, [3 * C]),
                           ("proj_weight", proj_weight, [C, C]), ("proj_bias", proj_bias, [C]),
                           ("relative_position_bias_table", table, [(2 * wh - 1) ** 2, num_heads])):
        if t is not None or name.endswith("weight") or (name.endswith("table") and table_required):
            checks.tensor(name, t, ndim=len(shape))
            checks.shape(name, t, shape)
    if index is not None:
        checks.tensor("relative_position_index", index, ndim=2, dtypes=(torch.int64, torch.int32))
        checks.shape("relative_position_index", index, [wh * wh, wh * wh])
    checks.same_device(x=x, qkv_weight=qkv_weight, qkv_bias=qkv_bias, proj_weight=proj_weight, proj_bias=proj_bias,
                       relative_position_bias_table=table, relative_position_index=index)
    if checks.autocast_dtype(x.device) is None:
        checks.same_dtype(x=x, qkv_weight=qkv_weight, qkv_bias=qkv_bias, proj_weight=proj_weight,
                          proj_bias=proj_bias, relative_position_bias_table=table)
    checks.real("mask_value", mask_value)
    return wh, num_heads, shift_size, checks.scale(scale, C // num_heads)


def swin_window_attention(x: Tensor, qkv_weight: Tensor, qkv_bias: Optional[Tensor], proj_weight: Tensor,
                          proj_bias: Optional[Tensor], relative_position_bias_table: Tensor,
                          window_size: int, num_heads: int, shift_size: int = 0,
                          relative_position_index: Optional[Tensor] = None, scale: Optional[float] = None,
                          mask_value: float = MASK_VALUE, roll_first: bool = False) -> Tensor:
    """The W-MSA / SW-MSA part of a Swin block on ``x: [B, H, W, C]``, fused.

    Same result as ``reference.swin_block_attention``: zero-pad H, W to multiples of
    ``window_size`` (before qkv, as Swin pads), roll by ``-shift_size``, partition, attention with
    the relative position bias (and the shift mask, ``mask_value`` across regions), ``proj``,
    reverse, roll back, crop. Only ``qkv = x @ qkv_weight^T + qkv_bias`` (``[B, H, W, 3C]``) and the
    attention output ``[B, H, W, C]`` are written: rolling, padding, partitioning and the shift
    mask are index arithmetic in the kernels. ``relative_position_index`` defaults to Swin's.
    Gradients reach x and every parameter.

    Along an axis whose padded size the window covers (a 7x7 map with window 7: the last stage of
    every Swin at 224) the shift is dropped, as torchvision's ``ShiftedWindowAttention`` does and
    as the original Swin code and timm decide when they build such a block.

    ``roll_first=True`` follows timm's ``SwinTransformerBlock`` instead: roll the H x W map, then
    pad (the two orders differ only where a map needs padding and the shift is non-zero), with the
    shift taken as given (timm zeroes it itself when it builds a block the window covers).

    >>> import torch, fastnote
    >>> x = torch.randn(1, 9, 9, 32)
    >>> y = fastnote.swin_window_attention(x, torch.randn(96, 32), torch.zeros(96), torch.randn(32, 32),
    ...                                    torch.zeros(32), torch.zeros(169, 2), 7, 2, shift_size=3)
    >>> y.shape
    torch.Size([1, 9, 9, 32])
    """
    ws, num_heads, shift_size, scale = _check_block(x, qkv_weight, qkv_bias, proj_weight, proj_bias,
                                                    relative_position_bias_table, window_size, num_heads,
                                                    shift_size, relative_position_index, scale, mask_value)
    if relative_position_index is None:
        relative_position_index = reference.relative_position_index(ws, device=x.device)
    if not backend.kernels_for(x, qkv_weight, qkv_bias, proj_weight, proj_bias, relative_position_bias_table):
        return reference.swin_block_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias,
                                              relative_position_bias_table, ws, num_heads, shift_size,
                                              index=relative_position_index, scale=scale,
                                              mask_value=float(mask_value), roll_first=roll_first)

    qkv = F.linear(x, qkv_weight, qkv_bias)                      # [B, H, W, 3C], no partitioned copy
    # One tiny gather ([heads, N, N]); its backward scatters dbias into the table.
    bias = relative_position_bias(relative_position_bias_table, relative_position_index, num_heads)
    pad_bias = qkv_bias.to(qkv.dtype) if qkv_bias is not None else None
    bias = checks.autocast(bias)
    out = _block_forward_op(qkv, pad_bias, bias, ws, num_heads, shift_size, scale, float(mask_value),
                            bool(roll_first))[0]
    return F.linear(out, proj_weight, proj_bias)
