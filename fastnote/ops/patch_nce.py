"""patch_nce_loss (CUT's PatchNCE, docs/ops.md section 3.1) as a streaming kernel that never stores the
[G, M, M] negative logits, its logits for users who want them, and CUT's patch sampling.

Memory: the kernel path keeps q, k (the caller's) and three fp32 vectors [B*P] (loss, row max, row log-sum) for
backward; the gradient adds dq (and dk with ``detach_k=False``). Eager CUT materialises
[G, M, M] logits plus the [B*P, M+1] concatenation and its softmax.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import backend, checks, reference
from ._fast import kernel_op, kernels as _kernels

_REDUCTIONS = ("none", "mean", "sum")


@kernel_op("fastnote::patch_nce_loss")
def _forward_op(q: Tensor, k: Tensor, groups: int, nce_T: float) -> List[Tensor]:
    """[loss fp32 [R], row statistics fp32 [2, R] (running max, log2 of the sum; for backward)]."""
    kernels = _kernels.patch_nce

    q, k = checks.contiguous(q, k)
    loss = backend.empty((q.shape[0],), torch.float32, q.device)
    stats = backend.empty((2, q.shape[0]), torch.float32, q.device)
    kernels.forward(q=q, k=k, groups=groups, nce_T=nce_T, loss=loss, stats=stats)
    return [loss, stats]


@_forward_op.register_fake
def _(q, k, groups, nce_T):
    return [q.new_empty((q.shape[0],), dtype=torch.float32), q.new_empty((2, q.shape[0]), dtype=torch.float32)]


@kernel_op("fastnote::patch_nce_loss_backward")
def _backward_op(grad: Tensor, q: Tensor, k: Tensor, loss: Tensor, stats: Tensor, groups: int, nce_T: float,
                 with_dk: bool) -> List[Tensor]:
    """[dq, dk] in q's dtype; dk is empty ([0]) unless ``with_dk``."""
    kernels = _kernels.patch_nce

    q, k, loss, stats = checks.contiguous(q, k, loss, stats)
    dq = backend.empty_like(q)
    dk = backend.empty(k.shape if with_dk else (0,), k.dtype, k.device)
    kernels.backward(grad=grad.float(), q=q, k=k, groups=groups, nce_T=nce_T, loss=loss, stats=stats, dq=dq,
                     dk=dk if with_dk else None)
    return [dq, dk]


@_backward_op.register_fake
def _(grad, q, k, loss, stats, groups, nce_T, with_dk):
    return [q.new_empty(q.shape), k.new_empty(k.shape if with_dk else (0,))]


def _setup_context(ctx, inputs, output):
    q, k, groups, nce_T = inputs
    loss, stats = output
    ctx.groups, ctx.nce_T = groups, nce_T
    ctx.save_for_backward(q, k, loss, stats)


def _backward(ctx, grads):
    grad = grads[0]
    q, k, loss, stats = ctx.saved_tensors
    with_dk = ctx.needs_input_grad[1]
    if grad is None:
        grad = torch.zeros_like(loss)
    dq, dk = _backward_op(grad, q, k, loss, stats, ctx.groups, ctx.nce_T, with_dk)
    return dq, (dk if with_dk else None), None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)




def _check(feat_q, feat_k, batch_size, nce_T, include_all_negatives_from_minibatch) -> int:
    """Validates the inputs; returns the number of groups G."""
    # The common case in a few comparisons; anything else goes through the checks, for the message.
    if (type(feat_q) in checks.PLAIN_TENSORS and type(feat_k) in checks.PLAIN_TENSORS and feat_q.dtype in checks.FLOAT_DTYPES
            and feat_k.dtype == feat_q.dtype and feat_q.dim() == 2 and feat_k.shape == feat_q.shape
            and feat_q.shape[1] and feat_k.device == feat_q.device
            and type(nce_T) in (float, int) and 0 < nce_T < math.inf
            and type(batch_size) is int and batch_size >= 1
            and type(include_all_negatives_from_minibatch) is bool):
        if include_all_negatives_from_minibatch:
            return 1
        if feat_q.shape[0] % batch_size == 0:
            return batch_size
    checks.tensor("feat_q", feat_q, ndim=2)
    checks.tensor("feat_k", feat_k, ndim=2)
    checks.shape("feat_k", feat_k, list(feat_q.shape))
    checks.same_device(feat_q=feat_q, feat_k=feat_k)
    checks.same_dtype(feat_q=feat_q, feat_k=feat_k)
    checks.has_channels("feat_q", feat_q)
    checks.real("nce_T", nce_T, positive=True)
    batch_size = checks.integer("batch_size", batch_size, minimum=1)
    checks.boolean("include_all_negatives_from_minibatch", include_all_negatives_from_minibatch)
    if include_all_negatives_from_minibatch:
        return 1
    rows = feat_q.shape[0]
    if rows % batch_size:
        raise ValueError(f"batch_size must divide the rows of feat_q (B*P patches in B groups), got batch_size "
                         f"{batch_size} for {rows} rows")
    return batch_size


def patch_nce_loss(feat_q: Tensor, feat_k: Tensor, batch_size: int, nce_T: float = 0.07,
                   include_all_negatives_from_minibatch: bool = False, reduction: str = "none",
                   detach_k: bool = True) -> Tensor:
    """CUT's PatchNCE loss: per row ``cross_entropy(cat([l_pos, l_neg], 1) / nce_T, 0)``.

    feat_q, feat_k: [B*P, d], one dtype (fp32, fp16, bf16) and device, rows L2-normalised by the
    caller (as ``patch_sample`` does). Negatives of row i are the keys of its group: the P rows
    of its image (``batch_size`` = B groups), or all B*P rows when
    ``include_all_negatives_from_minibatch`` (then ``batch_size`` need not divide the rows, as
    in CUT). The positive's own column is set to -10 before the division by ``nce_T``, exactly
    as CUT does, and still counts in the denominator as exp(-10 / nce_T). ``reduction``: "none"
    ([B*P]), "mean" or "sum" (0-dim). The loss is float32 whatever the input dtype (fp32
    accumulation). feat_k is detached, as in CUT; ``detach_k=False`` lets the gradient reach it.

    The kernel streams the keys with an online log-sum-exp and never stores the [G, M, M]
    logits; backward recomputes them tile by tile (see ``fastnote.triton_kernels.patch_nce``).

    >>> import torch, torch.nn.functional as F, fastnote
    >>> q = F.normalize(torch.randn(2 * 16, 32), dim=1)
    >>> k = F.normalize(q + 0.1 * torch.randn(2 * 16, 32), dim=1)
    >>> fastnote.patch_nce_loss(q, k, batch_size=2).shape
    torch.Size([32])
    >>> loss = fastnote.patch_nce_loss(q, k, 2, reduction="mean")
    >>> torch.allclose(loss, fastnote.reference.patch_nce_loss(q, k, batch_size=2).mean(), atol=1e-5)
    True
    """
    groups = _check(feat_q, feat_k, batch_size, nce_T, include_all_negatives_from_minibatch)
    if reduction not in _REDUCTIONS:
        checks.choice("reduction", reduction, _REDUCTIONS)
    checks.boolean("detach_k", detach_k)
    q, k = checks.autocast(feat_q, feat_k)
    if detach_k:
        k = k.detach()
    if not backend.kernels_for(q):
        loss = reference.patch_nce_loss(q, k, nce_T=float(nce_T), batch_size=groups,
                                        include_all_negatives_from_minibatch=groups == 1,
                                        detach_k=detach_k)
    else:
        loss = _forward_op(q, k, groups, float(nce_T))[0]
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def patch_nce_loss_layers(feats_q: Sequence[Tensor], feats_k: Sequence[Tensor], batch_size: int,
                          nce_T: float = 0.07, include_all_negatives_from_minibatch: bool = False,
                          reduction: str = "none", detach_k: bool = True) -> List[Tensor]:
    """``patch_nce_loss`` of every NCE layer at once: ``[patch_nce_loss(q, k, ...) for q, k in
    zip(feats_q, feats_k)]``, the per-layer losses CUT's ``calculate_NCE_loss`` sums, with the
    same arguments for every layer.

    Where the layers stack (every feat_q one shape, dtype and device, as CUT's MLP head makes
    them: ``[B * num_patches, 256]``), their rows are concatenated and one kernel launch computes
    every layer's loss, each row against its own layer's and image's keys (the layers become more
    groups), and one backward launch their gradients: at CUT's default (batch 1, 256 patches, 5
    layers) each layer is far too small to fill a GPU, so the per-layer calls cost their launches.
    The concatenation copies the features once (``[L * B * P, d]``, queries and keys), and the
    op holds both copies until its backward: at CUT's default 2.5 MiB in fp32, which in
    ``examples/cut_patchnce.py``'s whole step (``benchmarks/memory.py``) turns fastnote's 2.1 MiB
    saving on the loss into 0.4 MiB more than eager at the peak. So the example keeps one
    ``patch_nce_loss`` per layer, which copies nothing; take this where launches cost more than
    that memory. The gradients come back through the concatenation as views. Layers that do not
    stack (different widths, as without the MLP head) take one call each.

    Each result equals that layer's own ``patch_nce_loss``: the forward bitwise; the backward
    scales the upstream gradient by its largest magnitude over all stacked rows, so it is bitwise
    the per-layer one when every layer's upstream gradient is the same (CUT's sum of layer
    means), and otherwise may differ from it in the last bits.

    Returns a list with one loss per layer (``reduction`` as in ``patch_nce_loss``; where the
    layers stack, views of one result).

    >>> import torch, torch.nn.functional as F, fastnote
    >>> qs = [F.normalize(torch.randn(16, 32), dim=1) for _ in range(3)]
    >>> ks = [F.normalize(q + 0.1 * torch.randn_like(q), dim=1) for q in qs]
    >>> losses = fastnote.patch_nce_loss_layers(qs, ks, batch_size=1, reduction="mean")
    >>> len(losses), losses[0].shape
    (3, torch.Size([]))
    >>> torch.allclose(losses[2], fastnote.patch_nce_loss(qs[2], ks[2], 1, reduction="mean"))
    True
    """
    if isinstance(feats_q, Tensor) or isinstance(feats_k, Tensor):
        raise TypeError("feats_q and feats_k must be sequences of tensors, one per layer (use patch_nce_loss "
                        "for one layer)")
    feats_q, feats_k = list(feats_q), list(feats_k)
    if not feats_q or len(feats_q) != len(feats_k):
        raise ValueError(f"feats_q and feats_k must hold the same number of layers, at least one; got "
                         f"{len(feats_q)} and {len(feats_k)}")
    groups = [_check(q, k, batch_size, nce_T, include_all_negatives_from_minibatch) for q, k in zip(feats_q, feats_k)]
    if reduction not in _REDUCTIONS:
        checks.choice("reduction", reduction, _REDUCTIONS)
    checks.boolean("detach_k", detach_k)
    first = feats_q[0]
    if len(feats_q) == 1 or any(q.shape != first.shape or q.dtype != first.dtype or q.device != first.device
                                for q in feats_q[1:]):
        return [patch_nce_loss(q, k, batch_size, nce_T, include_all_negatives_from_minibatch, reduction, detach_k)
                for q, k in zip(feats_q, feats_k)]
    layers, rows = len(feats_q), first.shape[0]
    q = torch.cat(feats_q)
    k = torch.cat([f.detach() for f in feats_k] if detach_k else feats_k)
    # each layer's G groups of M rows become G of the L * G groups of the stacked rows
    loss = patch_nce_loss(q, k, layers * groups[0], nce_T, False, "none", detach_k)
    if reduction == "none":
        return list(loss.split(rows))
    per_layer = loss.view(layers, rows)
    return list((per_layer.mean(1) if reduction == "mean" else per_layer.sum(1)).unbind(0))


def patch_nce_logits(feat_q: Tensor, feat_k: Tensor, batch_size: int, nce_T: float = 0.07,
                     include_all_negatives_from_minibatch: bool = False, detach_k: bool = True) -> Tensor:
    """The [B*P, M+1] PatchNCE logits ``cat([l_pos, l_neg], 1) / nce_T`` that CUT hands to its
    cross-entropy (M = P, or B*P with ``include_all_negatives_from_minibatch``), in feat_q's
    dtype; arguments as ``patch_nce_loss``. The result is O(B*P * M) by definition, so this is
    plain torch (``fastnote.reference``; differentiable): use ``patch_nce_loss`` for the loss.

    >>> import torch, fastnote
    >>> fastnote.patch_nce_logits(torch.randn(6, 8), torch.randn(6, 8), batch_size=2).shape
    torch.Size([6, 4])
    """
    groups = _check(feat_q, feat_k, batch_size, nce_T, include_all_negatives_from_minibatch)
    q, k = checks.autocast(feat_q, feat_k)
    return reference.patch_nce_logits(q, k, nce_T=float(nce_T), batch_size=groups,
                                      include_all_negatives_from_minibatch=groups == 1, detach_k=detach_k)


def patch_sample(feat: Tensor, num_patches: int, patch_ids: Optional[Tensor] = None,
                 normalize: bool = True) -> Tuple[Tensor, Tensor]:
    """CUT's PatchSampleF (without its MLP) on one feature map: the rows at ``num_patches``
    random positions, or at ``patch_ids``, as ``[B * P, C]``, and the positions used.

    feat: [B, C, H, W]. Without ``patch_ids`` the positions are
    ``torch.randperm(H * W, device=feat.device)[:min(num_patches, H * W)]``, the same draw as
    CUT's, so seeded runs sample the same patches; pass the returned ids to sample the query
    features at the key positions, as CUT does. ``normalize``: CUT's l2norm
    ``x / (x.pow(2).sum(1, keepdim=True).pow(0.5) + 1e-7)`` per row.

    Plain torch, gathering straight from NCHW: one gather reads the B*C*P sampled elements
    (CUT first permutes and flattens the whole B*C*H*W map into a copy), then one transpose copy
    of [B, P, C] and the few elementwise ops of the norm on the sampled rows only. Not a single
    fused pass; what it saves is the full-map copy, the part that scales with H*W.

    >>> import torch, fastnote
    >>> x, ids = fastnote.patch_sample(torch.randn(2, 8, 5, 5), 6)
    >>> x.shape, ids.shape
    (torch.Size([12, 8]), torch.Size([6]))
    """
    checks.tensor("feat", feat, ndim=4)
    B, C, H, W = feat.shape
    num_patches = checks.integer("num_patches", num_patches, minimum=1)
    if patch_ids is None:
        patch_ids = torch.randperm(H * W, device=feat.device)[:min(num_patches, H * W)]
    else:
        checks.tensor("patch_ids", patch_ids, ndim=1, dtypes=(torch.int64, torch.int32))
        checks.same_device(feat=feat, patch_ids=patch_ids)
    x = feat.flatten(2)[:, :, patch_ids]                     # [B, C, P]: only the sampled positions
    x = x.transpose(1, 2).reshape(-1, C)                     # [B * P, C]
    if normalize:
        x = x / (x.pow(2).sum(1, keepdim=True).pow(0.5) + 1e-7)
    return x, patch_ids
