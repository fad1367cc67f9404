"""gram(x) = F F^T / norm and style_loss(x, target) = sum((gram(x) - target)^2) / (C*H*W) (docs/ops.md
section 2), one kernel family (``triton_kernels/gram.py``): a triangular tile grid with split-K,
the normalisation (and for the loss the difference, square and sum) fused into the epilogue.

Saved for backward: gram saves x only (dF = (dG + dG^T) F / norm needs nothing else). style_loss
saves x and D = gram(x) - target in fp32 [B, C, C], written by the forward's epilogue only when a
gradient is wanted: backward's dG = 2 D / (C*H*W) needs nothing more of G, D is at most F's size
at the VGG shapes, and keeping it spares backward a second Gram product (C^2 H W FLOPs) and a
pass over x. G itself is never written by style_loss.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from .. import backend, checks, reference
from ._fast import kernel_op, kernels as _kernels

NORMALIZE = ("chw", "hw", "none")   # G = F F^T / norm with norm = C*K, K or 1


def _norm(normalize: str, C: int, K: int) -> float:
    if normalize == "chw":
        return float(C * K)
    return float(K) if normalize == "hw" else 1.0


def _flat(x: Tensor):
    """(F, B, C, K) for the backward launcher: F is x itself when 3-D or when H and W merge into
    one stride (contiguous, channels-last, batch/channel slices: read in place, without making the
    view), else its [B, C, H*W] copy; K = H*W (or N)."""
    B, C, K, strides = _kernels.gram.flat_layout(x.shape, x.stride())
    return (x if strides is not None else x.flatten(2)), B, C, K


def _plan(x: Tensor, style: bool):
    """(F, forward plan): F is x itself unless its H and W do not merge (then one copy)."""
    kernels = _kernels.gram
    plan = kernels.forward_plan(x, style)
    if plan.f_strides is None:
        x = x.flatten(2)
        plan = kernels.forward_plan(x, style)
    return x, plan


# ------------------------------------------------------------------------------------------------
# gram
# ------------------------------------------------------------------------------------------------

@kernel_op("fastnote::gram")
def _gram_op(x: Tensor, normalize: str) -> Tensor:
    kernels = _kernels.gram

    f, plan = _plan(x, False)
    C = plan.C
    out = backend.empty((plan.B, C, C), x.dtype, x.device)
    kernels.forward(f=f, inv_norm=1.0 / _norm(normalize, C, plan.K), plan=plan, out=out, part=_part(plan, x.device))
    return out


def _part(plan, device) -> Optional[Tensor]:
    shape = plan.part_shape
    return None if shape is None else backend.empty(shape, torch.float32, device)


@_gram_op.register_fake
def _(x, normalize):
    return x.new_empty((x.shape[0], x.shape[1], x.shape[1]))


@kernel_op("fastnote::gram_backward")
def _gram_backward_op(grad: Tensor, x: Tensor, normalize: str) -> Tensor:
    """dx = (grad + grad^T) F / norm, computed as 2 sym(grad) F / norm."""
    kernels = _kernels.gram

    f, B, C, K = _flat(x)
    dx = backend.empty_in_layout(x)   # contiguous or channels-last: H and W merge
    kernels.backward(a=grad, f=f, df=dx, pre=0.5, post=2.0 / _norm(normalize, C, K))
    return dx


@_gram_backward_op.register_fake
def _(grad, x, normalize):
    return backend.fake_in_layout(x)


def _gram_setup(ctx, inputs, output):
    x, normalize = inputs
    ctx.normalize = normalize
    ctx.save_for_backward(x)


def _gram_backward(ctx, grad):
    x, = ctx.saved_tensors
    return _gram_backward_op(grad, x, ctx.normalize), None


_gram_op.register_autograd(_gram_backward, setup_context=_gram_setup)


def _check_x(x: Tensor, op: str) -> None:
    if type(x) in checks.PLAIN_TENSORS and x.dtype in checks.FLOAT_DTYPES:
        shape = x.shape
        if (len(shape) == 4 and shape[1] and shape[2] and shape[3]) or (len(shape) == 3 and shape[1] and shape[2]):
            return
    checks.tensor("x", x, ndim=(3, 4))
    checks.has_channels("x", x)
    if math.prod(x.shape[2:]) == 0:
        raise ValueError(f"x must have at least one position (H*W >= 1) for {op}, got shape {list(x.shape)}")


def gram(x: Tensor, normalize: str = "chw") -> Tensor:
    """Gram matrix ``F @ F^T / norm`` of ``F = x.view(B, C, H*W)``, as the perceptual loss's
    ``gram``: [B, C, C] in x's dtype (under autocast, the autocast dtype).

    x: [B, C, H, W] or [B, C, N], fp32/fp16/bf16, any strides (channels-last is read in place).
    normalize: "chw" (norm = C*H*W, the default), "hw" (H*W) or "none" (1). Accumulates in fp32
    and normalises before rounding to x's dtype, so fp16 activations whose raw sums over H*W
    pass 65504 still give a finite G. Only the tiles on or above the diagonal are computed.
    Differentiable.

    >>> import torch, fastnote
    >>> x = torch.randn(2, 8, 5, 5)
    >>> g = fastnote.gram(x)
    >>> g.shape, torch.allclose(g, g.transpose(1, 2))
    (torch.Size([2, 8, 8]), True)
    >>> torch.allclose(g, torch.bmm(x.flatten(2), x.flatten(2).transpose(1, 2)) / (8 * 25), atol=1e-5)
    True
    """
    _check_x(x, "gram")
    if normalize not in NORMALIZE:
        checks.choice("normalize", normalize, NORMALIZE)
    x = checks.autocast(x)
    if x.shape[0] == 0:
        return x.new_zeros((0, x.shape[1], x.shape[1])) + x.sum() * 0   # keeps the graph
    if not backend.kernels_for(x):
        return reference.gram(x, normalize)
    return _gram_op(x, normalize)


# ------------------------------------------------------------------------------------------------
# style_loss
# ------------------------------------------------------------------------------------------------

@kernel_op("fastnote::style_loss")
def _style_op(x: Tensor, target: Tensor, normalize: str, save_diff: bool) -> List[Tensor]:
    """[loss (0-dim fp32), D = gram(x) - target in fp32 [B, C, C] (shape [0] without save_diff)]."""
    kernels = _kernels.gram

    f, plan = _plan(x, True)
    B, C, K = plan.B, plan.C, plan.K
    diff = backend.empty((B, C, C) if save_diff else (0,), torch.float32, x.device)
    losses = backend.empty((plan.loss_programs,), torch.float32, x.device)
    kernels.forward(f=f, inv_norm=1.0 / _norm(normalize, C, K), plan=plan, target=target.reshape(-1, C, C),
                    diff=diff if save_diff else None, part=_part(plan, x.device), losses=losses)
    return [losses.sum(), diff]


@_style_op.register_fake
def _(x, target, normalize, save_diff):
    B, C = x.shape[0], x.shape[1]
    return [x.new_empty((), dtype=torch.float32),
            x.new_empty((B, C, C) if save_diff else (0,), dtype=torch.float32)]


@kernel_op("fastnote::style_loss_backward")
def _style_backward_op(grad: Tensor, x: Tensor, diff: Tensor, normalize: str) -> Tensor:
    """dx for loss = sum(D^2) / (C*K): dG = 2 grad D / (C*K), dx = (dG + dG^T) F / norm."""
    kernels = _kernels.gram

    f, B, C, K = _flat(x)
    dx = backend.empty_in_layout(x)   # contiguous or channels-last: H and W merge
    norm = _norm(normalize, C, K)
    # sym(D) is rescaled to a per-position mean (norm / K) before it is rounded to x's dtype.
    kernels.backward(a=diff, f=f, df=dx, pre=0.5 * norm / K,
                     post=4.0 / (C * norm * norm), coef=grad.reshape(1))
    return dx


@_style_backward_op.register_fake
def _(grad, x, diff, normalize):
    return backend.fake_in_layout(x)


def _style_setup(ctx, inputs, output):
    x, target, normalize, _ = inputs
    ctx.normalize = normalize
    ctx.target_shape = target.shape
    ctx.target_dtype = target.dtype
    ctx.save_for_backward(x, output[1])


def _style_backward(ctx, grads):
    grad_loss = grads[0]
    x, diff = ctx.saved_tensors
    if diff.dim() != 3:
        raise RuntimeError("fastnote::style_loss was called with save_diff=False: no gradient available")
    dx = dtarget = None
    if ctx.needs_input_grad[0]:
        dx = _style_backward_op(grad_loss, x, diff, ctx.normalize)
    if ctx.needs_input_grad[1]:
        C, K = x.shape[1], math.prod(x.shape[2:])
        dtarget = diff * (grad_loss.float() * (-2.0 / (C * K)))
        if len(ctx.target_shape) == 2 or ctx.target_shape[0] == 1:
            dtarget = dtarget.sum(0)
        dtarget = dtarget.reshape(ctx.target_shape).to(ctx.target_dtype)
    return dx, dtarget, None, None


_style_op.register_autograd(_style_backward, setup_context=_style_setup)


def _check_target(x: Tensor, target: Tensor) -> None:
    if type(target) in checks.PLAIN_TENSORS and target.dtype in (x.dtype, torch.float32) and target.device == x.device:
        C = x.shape[1]
        shape = target.shape
        if shape == (C, C) or (len(shape) == 3 and shape[0] in (1, x.shape[0]) and shape[1] == C and shape[2] == C):
            return
    checks.tensor("target_gram", target, ndim=(2, 3))
    B, C = x.shape[0], x.shape[1]
    if target.shape[-1] == target.shape[-2] != C:
        raise ValueError(f"x has {C} channels (shape {list(x.shape)}), but target_gram {list(target.shape)} is "
                         f"the Gram matrix of {target.shape[-1]}")
    if target.dim() == 2:
        checks.shape("target_gram", target, [C, C])
    elif target.shape[0] not in (1, B) or tuple(target.shape[1:]) != (C, C):
        raise ValueError(f"target_gram must have shape [{C}, {C}], [1, {C}, {C}] or [{B}, {C}, {C}] for x of "
                         f"shape {list(x.shape)}, got {list(target.shape)} (one target per image needs x's batch "
                         f"size; a [1, {C}, {C}] target is shared by any batch)")
    if target.dtype not in (x.dtype, torch.float32):
        want = ("dtype float32 (x's)" if x.dtype == torch.float32
                else f"x's dtype ({checks.dtype_name(x.dtype)}) or float32")
        raise TypeError(f"target_gram must have {want}, got {checks.dtype_name(target.dtype)}")
    checks.same_device(x=x, target_gram=target)


def style_loss(x: Tensor, target_gram: Tensor, normalize: str = "chw") -> Tensor:
    """Style loss of one layer: ``sum((gram(x, normalize) - target_gram) ** 2) / (C*H*W)``, the
    perceptual loss's ``MSELoss(reduction='sum')(gram(x), style_gram) / (c * h * w)``.

    x: [B, C, H, W] or [B, C, N]; target_gram: [C, C] or [1, C, C] (broadcast over the batch:
    no need to repeat the style image B times) or [B, C, C], in x's dtype or float32, any
    strides. Returns a 0-dim float32 tensor (the sum is accumulated in fp32 for every input
    dtype). Gradients flow to x and, when it requires one, to target_gram. The Gram matrix is
    never written: the difference, square and sum run in the Gram kernel's epilogue.

    >>> import torch, fastnote
    >>> x, style = torch.randn(2, 8, 6, 6), torch.randn(1, 8, 6, 6)
    >>> target = fastnote.gram(style)[0]                      # [C, C], shared by the batch
    >>> loss = fastnote.style_loss(x, target)
    >>> want = ((fastnote.gram(x) - target) ** 2).sum() / (8 * 36)
    >>> loss.dtype, torch.allclose(loss, want, rtol=1e-4)
    (torch.float32, True)
    """
    _check_x(x, "style_loss")
    if normalize not in NORMALIZE:
        checks.choice("normalize", normalize, NORMALIZE)
    autocast = checks.autocast_dtype(x.device)
    x = checks.autocast(x)
    if autocast is not None and target_gram.dtype not in (x.dtype, torch.float32):
        target_gram = target_gram.float()
    _check_target(x, target_gram)
    if x.shape[0] == 0:  # no image: the sum is empty
        return (x.float().sum() + target_gram.float().sum()) * 0.0
    if not backend.kernels_for(x, target_gram):
        return reference.style_loss(x, target_gram, normalize)
    save_diff = torch.is_grad_enabled() and (x.requires_grad or target_gram.requires_grad)
    return _style_op(x, target_gram, normalize, save_diff)[0]
