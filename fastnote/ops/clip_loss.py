"""clip_loss: CLIP's symmetric contrastive loss as streaming kernels that never store the [n, n]
logits, on one device or across the ranks of a process group (open_clip's ClipLoss, with its
gather_with_grad and local_loss options).

``logit_scale`` is the multiplier itself, already exponentiated (``model.logit_scale.exp()``), as
CLIP's and open_clip's training code pass it; ``fastnote.reference.clip_loss`` takes the
log-temperature of docs/ops.md section 3.2 by default, so this op is checked against
``reference.clip_loss(image, text, logit_scale, exponentiated=True)``.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend, checks, reference
from ._fast import kernel_op, kernels as _kernels


def _scale_vector(logit_scale: Tensor) -> Tensor:
    """The one-value scale as fp32 for the kernels, which read its first element (a 0-dim or
    one-element fp32 tensor goes as it is)."""
    return logit_scale if logit_scale.dtype == torch.float32 else logit_scale.float()


@kernel_op("fastnote::clip_loss")
def _forward_op(image: Tensor, text: Tensor, logit_scale: Tensor) -> List[Tensor]:
    """[loss (0-dim fp32), row and column statistics [2, n] fp32 each (max, log-sum; for backward)]."""
    kernels = _kernels.clip_loss

    image, text = checks.contiguous(image, text)
    scale = _scale_vector(logit_scale)
    n = image.shape[0]
    lse_r = backend.empty((2, n), torch.float32, image.device)
    lse_c = backend.empty((2, n), torch.float32, image.device)
    ce = backend.empty((2, n), torch.float32, image.device)   # both directions, one allocation
    kernels.row_lse(x=image, y=text, scale=scale, offset=0, stats=lse_r, ce=ce[0])
    kernels.row_lse(x=text, y=image, scale=scale, offset=0, stats=lse_c, ce=ce[1])
    loss = ce.mean()   # sum over both directions / (2 n)
    return [loss, lse_r, lse_c]


@_forward_op.register_fake
def _(image, text, logit_scale):
    n = image.shape[0]
    return [image.new_empty((), dtype=torch.float32), image.new_empty((2, n), dtype=torch.float32),
            image.new_empty((2, n), dtype=torch.float32)]


@kernel_op("fastnote::clip_loss_backward")
def _backward_op(grad: Tensor, image: Tensor, text: Tensor, logit_scale: Tensor, lse_r: Tensor,
                 lse_c: Tensor) -> List[Tensor]:
    """[d_image, d_text, d_logit_scale]."""
    kernels = _kernels.clip_loss

    image, text, lse_r, lse_c = checks.contiguous(image, text, lse_r, lse_c)
    scale = _scale_vector(logit_scale)
    g = grad.reshape(1).float().contiguous()
    n = image.shape[0]
    d_image = backend.empty_like(image)
    d_text = backend.empty_like(text)
    r = backend.empty((2, n), torch.float32, image.device)   # image-to-text, text-to-image halves
    coef = 1.0 / (2 * n) if n else 0.0
    kernels.row_grad(grad=g, x=image, y=text, scale=scale, lse_x=lse_r, lse_y=lse_c, offset=0, coef=coef,
                     dx=d_image, r=r[0])
    kernels.row_grad(grad=g, x=text, y=image, scale=scale, lse_x=lse_c, lse_y=lse_r, offset=0, coef=coef,
                     dx=d_text, r=r[1])
    d_scale = r.sum().to(logit_scale.dtype).reshape(logit_scale.shape)
    return [d_image, d_text, d_scale]


@_backward_op.register_fake
def _(grad, image, text, logit_scale, lse_r, lse_c):
    return [image.new_empty(image.shape), text.new_empty(text.shape), logit_scale.new_empty(logit_scale.shape)]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1], output[2])


def _backward(ctx, grads):
    image, text, logit_scale, lse_r, lse_c = ctx.saved_tensors
    grad = grads[0] if grads[0] is not None else torch.zeros((), device=image.device)
    return tuple(_backward_op(grad, image, text, logit_scale, lse_r, lse_c))


_forward_op.register_autograd(_backward, setup_context=_setup_context)


@kernel_op("fastnote::clip_row_loss")
def _row_forward_op(a: Tensor, b: Tensor, logit_scale: Tensor, offset: int) -> List[Tensor]:
    """One-sided: mean_i CE(logit_scale * a_i . b^T, target i + offset). [loss (0-dim fp32),
    row statistics [2, n_a]]."""
    kernels = _kernels.clip_loss

    a, b = checks.contiguous(a, b)
    n = a.shape[0]
    lse = backend.empty((2, n), torch.float32, a.device)
    ce = backend.empty((n,), torch.float32, a.device)
    kernels.row_lse(x=a, y=b, scale=_scale_vector(logit_scale), offset=offset, stats=lse, ce=ce)
    return [ce.sum() / n, lse]


@_row_forward_op.register_fake
def _(a, b, logit_scale, offset):
    return [a.new_empty((), dtype=torch.float32), a.new_empty((2, a.shape[0]), dtype=torch.float32)]


@kernel_op("fastnote::clip_row_loss_backward")
def _row_backward_op(grad: Tensor, a: Tensor, b: Tensor, logit_scale: Tensor, lse: Tensor,
                     offset: int) -> List[Tensor]:
    """[d_a, d_b, d_logit_scale]."""
    kernels = _kernels.clip_loss

    a, b, lse = checks.contiguous(a, b, lse)
    scale = _scale_vector(logit_scale)
    g = grad.reshape(1).float().contiguous()
    n = a.shape[0]
    d_a = backend.empty_like(a)
    d_b = backend.empty_like(b)
    r = backend.empty((n,), torch.float32, a.device)
    coef = 1.0 / n if n else 0.0
    kernels.row_grad(grad=g, x=a, y=b, scale=scale, lse_x=lse, lse_y=None, offset=offset, coef=coef, dx=d_a, r=r)
    if n:
        kernels.row_grad(grad=g, x=b, y=a, scale=scale, lse_x=None, lse_y=lse, offset=-offset, coef=coef, dx=d_b,
                         r=None)
    else:
        d_b.zero_()
    d_scale = r.sum().to(logit_scale.dtype).reshape(logit_scale.shape)
    return [d_a, d_b, d_scale]


@_row_backward_op.register_fake
def _(grad, a, b, logit_scale, lse, offset):
    return [a.new_empty(a.shape), b.new_empty(b.shape), logit_scale.new_empty(logit_scale.shape)]


def _row_setup_context(ctx, inputs, output):
    a, b, logit_scale, offset = inputs
    ctx.offset = offset
    ctx.save_for_backward(a, b, logit_scale, output[1])


def _row_backward(ctx, grads):
    a, b, logit_scale, lse = ctx.saved_tensors
    grad = grads[0] if grads[0] is not None else torch.zeros((), device=a.device)
    d_a, d_b, d_scale = _row_backward_op(grad, a, b, logit_scale, lse, ctx.offset)
    return d_a, d_b, d_scale, None


_row_forward_op.register_autograd(_row_backward, setup_context=_row_setup_context)


def _row_loss_reference(a, b, logit_scale, offset):
    """Plain-torch one-sided loss (open_clip's local_loss half), fp32 compute (fp64 for fp64 inputs)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    with torch.autocast(a.device.type, enabled=False):
        logits = logit_scale.to(dtype) * (a.to(dtype) @ b.to(dtype).t())
        labels = torch.arange(a.shape[0], device=a.device) + offset
        return F.cross_entropy(logits, labels)


def _gather(t: Tensor, group, with_grad: bool, keep_own: bool) -> Tensor:
    """All ranks' ``t`` concatenated in rank order. ``with_grad`` (open_clip's gather_with_grad=True):
    the gradient flows back to each rank, whose slice gets the sum of every rank's gradient for it.
    Else the gathered copies are constants, and with ``keep_own`` this rank's slice is ``t`` itself,
    so its gradient is this rank's own loss's alone (open_clip's gather_with_grad=False, which keeps
    its own slice for the global loss but not for the local one)."""
    import torch.distributed as dist

    if with_grad:
        import torch.distributed.nn.functional as dist_fn

        return torch.cat(dist_fn.all_gather(t, group=group), dim=0)
    src = t.detach().contiguous()
    parts = [torch.empty_like(src) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(parts, src, group=group)
    if keep_own:
        parts[dist.get_rank(group=group)] = t
    return torch.cat(parts, dim=0)


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale, *, group=None, local_loss: bool = False,
              gather_with_grad: bool = True) -> Tensor:
    """CLIP's symmetric contrastive loss: ``logits = logit_scale * image_emb @ text_emb^T``,
    ``(CE(logits, arange(n)) + CE(logits^T, arange(n))) / 2``; a 0-dim float32 tensor.

    image_emb, text_emb: [n, d], one dtype (fp32, fp16, bf16; under autocast cast to its dtype),
    rows L2-normalised by the caller as in CLIP. ``logit_scale``: the multiplier itself, already
    exponentiated (``model.logit_scale.exp()``, as CLIP and open_clip pass it; docs/ops.md section 3.2 and
    ``fastnote.reference.clip_loss`` take the log, ``exponentiated=True`` there matches this),
    a 0-dim or one-element tensor of any float dtype, or a Python float. Gradients reach both
    embeddings and logit_scale.

    The kernels stream tiles of the other side with an online log-sum-exp (rows, then columns)
    and never store the [n, n] logits; backward recomputes tiles in two passes (one over rows
    for d_image, one over columns for d_text): deterministic, no atomics. Extra memory beyond
    the inputs and their gradients: six fp32 vectors of n.

    ``group`` (a ``torch.distributed`` process group; every rank passes its own n_local rows,
    the same n_local everywhere): features are all-gathered, and the loss is the single-process
    loss on the concatenated batch (N = world_size * n_local rows). The gradients are open_clip's
    under the same ``gather_with_grad``: True (the default here; open_clip's ``ClipLoss``
    defaults to False, and so does ``fastnote.nn.ClipLoss``): the features are gathered with their
    gradient, and each rank's gradient for its own rows is the sum of every rank's contribution,
    world_size times the single-process gradient, which DDP's averaging brings back to it.
    False: the other ranks' features are constants; with the global loss this rank's own slice
    keeps its gradient, which is then the single-process gradient of those rows; with
    ``local_loss`` only this rank's rows of the logits reach its features. ``local_loss=True``: only
    this rank's rows, open_clip's option: ``(CE(s * img_local @ txt_all^T, labels) +
    CE(s * txt_local @ img_all^T, labels)) / 2`` with ``labels = arange(n_local) + rank *
    n_local``; the mean over ranks is the global loss. Memory per rank: the gathered features
    2 N d (input dtype) and their gradients 2 N d, plus O(N) fp32 (global: six vectors of N;
    local: six of n_local) -- never N^2 (open_clip's global loss holds two [N, N] logits and
    their softmax; its local one [n_local, N]).

    >>> import torch, torch.nn.functional as F, fastnote
    >>> img, txt = F.normalize(torch.randn(8, 16), dim=1), F.normalize(torch.randn(8, 16), dim=1)
    >>> loss = fastnote.clip_loss(img, txt, torch.tensor(14.3))
    >>> ref = fastnote.reference.clip_loss(img, txt, torch.tensor(14.3), exponentiated=True)
    >>> torch.allclose(loss, ref, atol=1e-5)
    True
    """
    logit_scale = checks.scalar_operand("logit_scale", logit_scale, image_emb)
    checks.embedding_pair(image_emb, text_emb, logit_scale)
    checks.boolean("local_loss", local_loss)
    checks.boolean("gather_with_grad", gather_with_grad)
    img, txt = checks.autocast(image_emb, text_emb)
    if group is None and local_loss:
        raise ValueError("local_loss=True needs a process group (group=...): without one every row is local")
    use_kernels = backend.kernels_for(img)
    if group is not None:
        import torch.distributed as dist

        rank = dist.get_rank(group=group)
        all_img = _gather(img, group, gather_with_grad, keep_own=not local_loss)
        all_txt = _gather(txt, group, gather_with_grad, keep_own=not local_loss)
        if local_loss:
            offset = rank * img.shape[0]
            if use_kernels:
                li = _row_forward_op(img, all_txt, logit_scale, offset)[0]
                lt = _row_forward_op(txt, all_img, logit_scale, offset)[0]
            else:
                li = _row_loss_reference(img, all_txt, logit_scale, offset)
                lt = _row_loss_reference(txt, all_img, logit_scale, offset)
            return (li + lt) / 2
        img, txt = all_img, all_txt
    if not use_kernels:
        return reference.clip_loss(img, txt, logit_scale, exponentiated=True)
    return _forward_op(img, txt, logit_scale)[0]
