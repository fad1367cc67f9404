"""Drop-in for open_clip's ``ClipLoss`` (no parameters, no state)."""
from __future__ import annotations

from torch import nn

from .. import checks
from ..ops.clip_loss import clip_loss


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` interface: ``ClipLoss(local_loss=False, gather_with_grad=False,
    cache_labels=False, rank=0, world_size=1, use_horovod=False)`` and ``forward(image_features,
    text_features, logit_scale, logit_bias=None, output_dict=False)``, with ``logit_scale`` already
    exponentiated. Returns the loss, or ``{"contrastive_loss": loss}`` with ``output_dict=True``.
    See ``fastnote.clip_loss``.

    ``world_size > 1``: the features are gathered over ``group`` (keyword only, beyond open_clip's
    arguments; default the world group, as open_clip uses), whose size and this process's rank in
    it must be ``world_size`` and ``rank``. ``local_loss`` and ``gather_with_grad`` as open_clip's,
    with its gradients under each (its default, ``gather_with_grad=False``, gives each rank the
    single-process gradient of its own rows for the global loss; True gives world_size times it).
    ``logit_bias`` adds one constant to every logit, which the cross-entropy does not see: the loss
    is the same, and its gradient is zero, as open_clip's. ``cache_labels`` is accepted for
    compatibility (the kernels make no labels); ``use_horovod=True`` is refused (fastnote gathers
    over ``torch.distributed``).

    >>> import torch, torch.nn.functional as F, fastnote
    >>> img, txt = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    >>> fastnote.nn.ClipLoss()(img, txt, torch.tensor(10.0)).shape
    torch.Size([])
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, group=None):
        super().__init__()
        self.local_loss = checks.boolean("local_loss", local_loss)
        self.gather_with_grad = checks.boolean("gather_with_grad", gather_with_grad)
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        if use_horovod:
            raise ValueError("fastnote.nn.ClipLoss: use_horovod=True is not supported; the features are "
                             "gathered over torch.distributed (rank, world_size, group=...)")
        self.use_horovod = False
        self.group = group

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        group = checks.process_group("ClipLoss", self.rank, self.world_size, self.group)
        # open_clip's local loss with one process is the global one (its labels are arange(n))
        loss = clip_loss(image_features, text_features, logit_scale, group=group,
                         local_loss=self.local_loss and group is not None, gather_with_grad=self.gather_with_grad)
        if logit_bias is not None:
            bias = checks.scalar("logit_bias", checks.scalar_operand("logit_bias", logit_bias, image_features))
            if bias.requires_grad:    # a zero gradient, as the shift-invariant cross-entropy gives
                loss = loss + (bias * 0).sum().to(loss.dtype)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}")
