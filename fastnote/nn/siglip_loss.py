"""Drop-in for open_clip's ``SigLipLoss`` (no parameters, no state)."""
from __future__ import annotations

from torch import nn

from .. import checks
from ..ops.siglip_loss import DIST_IMPLS, siglip_loss


class SigLipLoss(nn.Module):
    """open_clip's ``SigLipLoss`` interface: ``SigLipLoss(cache_labels=False, rank=0, world_size=1,
    dist_impl=None)`` and ``forward(image_features, text_features, logit_scale, logit_bias,
    output_dict=False)``, with ``logit_scale`` already exponentiated. Returns the loss, or
    ``{"contrastive_loss": loss}`` with ``output_dict=True``. See ``fastnote.siglip_loss``.

    ``world_size > 1``: the other ranks' text features come to this rank over ``group`` (keyword
    only, beyond open_clip's arguments; default the world group, as open_clip uses), whose size
    and this process's rank in it must be ``world_size`` and ``rank``. ``dist_impl`` in
    ("bidir", "shift", "reduce", "gather"), default "bidir" as open_clip; all four give the same
    loss and gradients. ``cache_labels`` is accepted for compatibility: the kernels make no labels.

    >>> import torch, torch.nn.functional as F, fastnote
    >>> img, txt = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    >>> fastnote.nn.SigLipLoss()(img, txt, torch.tensor(10.0), torch.tensor(-10.0)).shape
    torch.Size([])
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl=None, *,
                 group=None):
        super().__init__()
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {DIST_IMPLS} or None, got {dist_impl!r}")
        self.group = group

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False):
        group = checks.process_group("SigLipLoss", self.rank, self.world_size, self.group)
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, group=group,
                           dist_impl=self.dist_impl)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}"
