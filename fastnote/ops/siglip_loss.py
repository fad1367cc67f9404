"""siglip_loss: SigLIP's pairwise sigmoid loss (docs/ops.md section 3.3) as streaming kernels that
never store the [n, n] logits, on one device or across the ranks of a process group (open_clip's
``SigLipLoss`` with its four ``dist_impl`` schemes).

``logit_scale`` is the multiplier itself, already exponentiated, and ``logit_bias`` the additive
bias, as open_clip's ``SigLipLoss.get_logits`` takes them: ``logits = logit_scale * img @ txt^T +
logit_bias``. The loss is ``-sum(logsigmoid(labels * logits)) / n_img`` with labels +1 on the
diagonal and -1 elsewhere (all -1 for a text chunk of another rank).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend, checks, reference
from ._fast import kernel_op, kernels as _kernels

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _vector(t: Tensor) -> Tensor:
    return t.reshape(1).float().contiguous()


@kernel_op("fastnote::siglip_loss")
def _forward_op(image: Tensor, text: Tensor, logit_scale: Tensor, logit_bias: Tensor, diag_offset: int,
                has_diag: bool) -> Tensor:
    """sum_ij -logsigmoid(l_ij (s image_i . text_j + b)) / n_image, a 0-dim fp32 tensor; l_ij = +1
    where j = i + diag_offset and has_diag, else -1."""
    kernels = _kernels.siglip_loss

    image, text = checks.contiguous(image, text)
    n = image.shape[0]
    rows = backend.empty((n,), torch.float32, image.device)
    kernels.forward(x=image, y=text, scale=_vector(logit_scale), bias=_vector(logit_bias), offset=diag_offset,
                    has_diag=has_diag, loss_rows=rows)
    return rows.sum() / n


@_forward_op.register_fake
def _(image, text, logit_scale, logit_bias, diag_offset, has_diag):
    return image.new_empty((), dtype=torch.float32)


@kernel_op("fastnote::siglip_loss_backward")
def _backward_op(grad: Tensor, image: Tensor, text: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                 diag_offset: int, has_diag: bool) -> List[Tensor]:
    """[d_image, d_text, d_logit_scale, d_logit_bias]."""
    kernels = _kernels.siglip_loss

    image, text = checks.contiguous(image, text)
    scale, bias = _vector(logit_scale), _vector(logit_bias)
    g = grad.reshape(1).float().contiguous()
    n = image.shape[0]
    d_image = backend.empty_like(image)
    d_text = backend.empty_like(text)
    r = backend.empty((2, n), torch.float32, image.device)   # per image row: d scale, d bias shares
    coef = 1.0 / n if n else 0.0
    kernels.backward(grad=g, x=image, y=text, scale=scale, bias=bias, offset=diag_offset, has_diag=has_diag,
                     coef=coef, dx=d_image, r=r)
    if n:
        kernels.backward(grad=g, x=text, y=image, scale=scale, bias=bias, offset=-diag_offset,
                         has_diag=has_diag, coef=coef, dx=d_text)
    else:
        d_text.zero_()
    d_scale = r[0].sum().to(logit_scale.dtype).reshape(logit_scale.shape)
    d_bias = r[1].sum().to(logit_bias.dtype).reshape(logit_bias.shape)
    return [d_image, d_text, d_scale, d_bias]


@_backward_op.register_fake
def _(grad, image, text, logit_scale, logit_bias, diag_offset, has_diag):
    return [image.new_empty(image.shape), text.new_empty(text.shape), logit_scale.new_empty(logit_scale.shape),
            logit_bias.new_empty(logit_bias.shape)]


def _setup_context(ctx, inputs, output):
    image, text, logit_scale, logit_bias, diag_offset, has_diag = inputs
    ctx.diag = (diag_offset, has_diag)
    ctx.save_for_backward(image, text, logit_scale, logit_bias)


def _backward(ctx, grad):
    image, text, logit_scale, logit_bias = ctx.saved_tensors
    d_image, d_text, d_scale, d_bias = _backward_op(grad, image, text, logit_scale, logit_bias, *ctx.diag)
    return d_image, d_text, d_scale, d_bias, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# One block of image rows against one chunk of text rows, either backend

def _chunk_reference(image, text, logit_scale, logit_bias, has_diag: bool) -> Tensor:
    """Plain-torch loss of one (image, text chunk) pair, open_clip's ``_loss`` (``negative_only``
    = not has_diag), fp32 compute."""
    if has_diag:
        return reference.siglip_loss(image, text, logit_scale, logit_bias)
    def up(t):   # as the reference: half to fp32, fp32 and fp64 in their own dtype
        return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t

    with torch.autocast(image.device.type, enabled=False):
        logits = up(logit_scale).reshape(()) * (up(image) @ up(text).t()) + up(logit_bias).reshape(())
        return -F.logsigmoid(-logits).sum() / image.shape[0]


def _chunk_loss(image, text, logit_scale, logit_bias, has_diag: bool, use_kernels: bool) -> Tensor:
    if use_kernels:
        return _forward_op(image, text, logit_scale, logit_bias, 0, has_diag)
    return _chunk_reference(image, text, logit_scale, logit_bias, has_diag)


def _chunk_grads(grad, image, text, logit_scale, logit_bias, has_diag: bool, use_kernels: bool):
    """(d_image, d_text, d_logit_scale, d_logit_bias) of one chunk's loss times ``grad``."""
    if use_kernels:
        return _backward_op(grad, image, text, logit_scale, logit_bias, 0, has_diag)
    leaves = [t.detach().requires_grad_() for t in (image, text, logit_scale, logit_bias)]
    with torch.enable_grad():
        loss = _chunk_reference(*leaves, has_diag)
        return list(torch.autograd.grad(loss, leaves, grad))


# ------------------------------------------------------------------------------------------------
# Across ranks: the text chunks travel around the ring of ranks

def _exchange(sends, recvs, group) -> List[Tensor]:
    """Point-to-point round: ``sends`` [(tensor, peer)], ``recvs`` [(like, peer)] with peers as ranks
    of ``group``; returns the received tensors in the order of ``recvs``."""
    import torch.distributed as dist

    def peer(r):
        return r if group is None or group is dist.group.WORLD else dist.get_global_rank(group, r)

    # contiguous receive buffers: irecv fills packed memory (a column-major ``like`` would fail)
    out = [torch.empty_like(like, memory_format=torch.contiguous_format) for like, _ in recvs]
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer(p), group=group) for t, p in sends]
    ops += [dist.P2POp(dist.irecv, buf, peer(p), group=group) for buf, (_, p) in zip(out, recvs)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


def _streams(world: int, bidir: bool) -> List[tuple]:
    """The exchange rounds: each a tuple of the directions that move in it, "R" (a chunk goes to
    the right neighbour, one comes from the left) and "L". open_clip's schemes: ``shift`` moves
    right world - 1 times; ``bidir`` moves both ways (world - 1) // 2 times, then right once more
    when world - 1 is odd. Every rank sees every other rank's chunk exactly once."""
    if not bidir:
        return [("R",)] * (world - 1)
    both, rest = divmod(world - 1, 2)
    return [("L", "R")] * both + [("R",)] * rest


class _RingSigLip(torch.autograd.Function):
    """This rank's loss, sum over every rank's text chunk of the chunk loss of the local image rows
    (the diagonal only in the local chunk), with the chunks passed neighbour to neighbour.

    Forward holds the local chunk and the one in transit, never the gathered text, and saves only
    the local inputs. Backward passes the chunks around again, each with the running sum of its
    gradient (every rank adds its share, with its own upstream gradient), then sends each sum back
    to the chunk's owner: 2 (world - 1) chunk transfers and one gradient transfer per direction,
    against open_clip's world - 1 each way and the world - 1 received chunks it keeps for backward.
    """

    @staticmethod
    def forward(ctx, image, text, logit_scale, logit_bias, group, bidir, use_kernels):
        import torch.distributed as dist

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.ring = (group, bidir, use_kernels, world, rank)
        ctx.save_for_backward(image, text, logit_scale, logit_bias)
        loss = _chunk_loss(image, text, logit_scale, logit_bias, True, use_kernels)
        held = {"L": text, "R": text}
        for moving in _streams(world, bidir):
            got = _exchange([(held[d], _to(d, rank, world)) for d in moving],
                            [(held[d], _from(d, rank, world)) for d in moving], group)
            for d, chunk in zip(moving, got):
                held[d] = chunk
                loss = loss + _chunk_loss(image, chunk, logit_scale, logit_bias, False, use_kernels)
        return loss

    @staticmethod
    def backward(ctx, grad):
        group, bidir, use_kernels, world, rank = ctx.ring
        image, text, logit_scale, logit_bias = ctx.saved_tensors
        g = grad.detach()
        d_image, d_text, d_scale, d_bias = _chunk_grads(g, image, text, logit_scale, logit_bias, True, use_kernels)
        # direction -> the chunk held and the running sum of its gradient, stacked [2, n, d]; the
        # first move of each direction carries the chunk alone ([1, n, d]): no share is in it yet
        held = {d: text[None] for d in ("L", "R")}
        steps = {"L": 0, "R": 0}
        for moving in _streams(world, bidir):
            got = _exchange([(held[d], _to(d, rank, world)) for d in moving],
                            [(held[d], _from(d, rank, world)) for d in moving], group)
            for d, pair in zip(moving, got):
                steps[d] += 1
                chunk = pair[0]
                di, dt, ds, db = _chunk_grads(g, image, chunk, logit_scale, logit_bias, False, use_kernels)
                d_image = d_image + di
                d_scale = d_scale + ds
                d_bias = d_bias + db
                held[d] = torch.stack([chunk, pair[1] + dt if pair.shape[0] == 2 else dt])
        # every sum goes home: the chunk held after k steps to the right belongs to rank - k
        homes = [(d, steps[d]) for d in ("R", "L") if steps[d]]
        if homes:
            back = _exchange([(held[d][1], _home(d, k, rank, world)) for d, k in homes],
                             [(text, _owner_of_mine(d, k, rank, world)) for d, k in homes], group)
            for part in back:
                d_text = d_text + part
        return d_image, d_text, d_scale, d_bias, None, None, None


def _to(direction: str, rank: int, world: int) -> int:
    return (rank + 1) % world if direction == "R" else (rank - 1) % world


def _from(direction: str, rank: int, world: int) -> int:
    return (rank - 1) % world if direction == "R" else (rank + 1) % world


def _home(direction: str, steps: int, rank: int, world: int) -> int:
    """Owner of the chunk this rank holds after ``steps`` moves in ``direction``."""
    return (rank - steps) % world if direction == "R" else (rank + steps) % world


def _owner_of_mine(direction: str, steps: int, rank: int, world: int) -> int:
    """The rank holding this rank's own chunk after ``steps`` moves in ``direction``."""
    return (rank + steps) % world if direction == "R" else (rank - steps) % world


def _collective_loss(image, text, logit_scale, logit_bias, group, dist_impl: str, use_kernels: bool) -> Tensor:
    """open_clip's "reduce" and "gather" schemes: every rank's text chunk comes through all_reduce
    (one rank's chunk at a time, the others adding zeros) or all_gather, and their gradients go
    back through the collectives' own backward; each chunk still goes through the streaming kernel.
    The local chunk is taken from the collective's output too (the same values as ``text``): then
    every rank runs the same collectives in backward, in the same order (a chunk left out of the
    graph on one rank alone would pair one rank's gradient collective with another's)."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if dist_impl == "gather":
        chunks = dist_fn.all_gather(text, group=group)
    else:
        chunks = [dist_fn.all_reduce(text * (rank == i), op=dist.ReduceOp.SUM, group=group) for i in range(world)]
    loss = _chunk_loss(image, chunks[rank], logit_scale, logit_bias, True, use_kernels)
    for i, chunk in enumerate(chunks):
        if i != rank:
            loss = loss + _chunk_loss(image, chunk, logit_scale, logit_bias, False, use_kernels)
    return loss


# ------------------------------------------------------------------------------------------------

def siglip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale, logit_bias, *, group=None,
                dist_impl: str = "bidir") -> Tensor:
    """SigLIP's sigmoid loss: ``logits = logit_scale * image_emb @ text_emb^T + logit_bias``,
    ``-sum(logsigmoid(labels * logits)) / n`` with labels +1 for the matching pairs (the diagonal)
    and -1 elsewhere; a 0-dim float32 tensor, open_clip's ``SigLipLoss``.

    image_emb, text_emb: [n, d], one dtype (fp32, fp16, bf16; under autocast cast to its dtype),
    rows L2-normalised by the caller. ``logit_scale``: the multiplier itself, already
    exponentiated (``model.logit_scale.exp()``), ``logit_bias``: the bias (SigLIP initialises them
    to 10 and -10); each a 0-dim or one-element tensor of any float dtype, or a Python float;
    ``logit_bias=None`` adds no bias, as open_clip's ``get_logits``. Gradients reach all four.

    The kernels stream blocks of text rows past each block of image rows and never store the
    [n, n] logits; backward recomputes them in two passes (image rows against the text, text rows
    against the images): deterministic, no atomics. Extra memory beyond the inputs and their
    gradients: three fp32 vectors of n.

    ``group`` (a ``torch.distributed`` process group; every rank passes its own n_local rows, the
    same n_local everywhere): the text chunks of the other ranks come to this rank's images, and
    the result is this rank's loss as open_clip's ``SigLipLoss(rank, world_size)`` computes it,
    the sum over all text chunks of ``-sum(logsigmoid(labels * logits)) / n_local`` with the
    diagonal only in the local chunk. The mean over ranks of these losses is the single-process
    loss on the concatenated batch; each rank's gradients of its own rows are world_size times
    that loss's gradients (what DDP's averaging expects: each text chunk's gradient is summed over
    every rank's share), and the scale and bias gradients are this rank's own, which DDP averages.
    ``dist_impl``: "bidir" (default) and "shift" pass the chunks neighbour to neighbour with
    point-to-point sends (both directions at once, or to the right only) holding one chunk in
    transit at a time, and pass them around again in backward; "reduce" and "gather" bring
    them with all_reduce or all_gather as open_clip does (and keep them for backward).

    >>> import torch, torch.nn.functional as F, fastnote
    >>> img, txt = F.normalize(torch.randn(8, 16), dim=1), F.normalize(torch.randn(8, 16), dim=1)
    >>> scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    >>> loss = fastnote.siglip_loss(img, txt, scale, bias)
    >>> torch.allclose(loss, fastnote.reference.siglip_loss(img, txt, scale, bias), atol=1e-5)
    True
    """
    logit_scale = checks.scalar_operand("logit_scale", logit_scale, image_emb)
    # None: no bias, as open_clip's get_logits skips it
    logit_bias = checks.scalar_operand("logit_bias", 0.0 if logit_bias is None else logit_bias, image_emb)
    checks.embedding_pair(image_emb, text_emb, logit_scale, logit_bias)
    checks.choice("dist_impl", dist_impl, DIST_IMPLS)
    img, txt = checks.autocast(image_emb, text_emb)
    use_kernels = backend.kernels_for(img)
    if group is not None:
        import torch.distributed as dist

        if dist.get_world_size(group) > 1:
            if dist_impl in ("bidir", "shift"):
                return _RingSigLip.apply(img, txt, logit_scale, logit_bias, group, dist_impl == "bidir", use_kernels)
            return _collective_loss(img, txt, logit_scale, logit_bias, group, dist_impl, use_kernels)
    if not use_kernels:
        return reference.siglip_loss(img, txt, logit_scale, logit_bias)
    return _forward_op(img, txt, logit_scale, logit_bias, 0, True)
