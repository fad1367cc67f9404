"""Drop-in for open_clip's ``ClipLoss`` (no parameters, no state)."""
from __future__ import annotations

from torch import nn

from ..ops.clip_loss import clip_loss


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` interface: ``forward(image_features, text_features, logit_scale,
    output_dict=False)`` with ``logit_scale`` already exponentiated. ``group``: a
    ``torch.distributed`` process group to gather the features over (with their gradient, as
    ``gather_with_grad=True``), None for one process; ``local_loss`` as open_clip's. See
    ``fastnote.clip_loss``.

    >>> import torch, torch.nn.functional as F, fastnote
    >>> img, txt = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    >>> fastnote.nn.ClipLoss()(img, txt, torch.tensor(10.0)).shape
    torch.Size([])
    """

    def __init__(self, group=None, local_loss: bool = False):
        super().__init__()
        self.group = group
        self.local_loss = local_loss

    def forward(self, image_features, text_features, logit_scale, output_dict: bool = False):
        loss = clip_loss(image_features, text_features, logit_scale, group=self.group, local_loss=self.local_loss)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return f"local_loss={self.local_loss}, distributed={self.group is not None}"
