"""Drop-in for CUT's ``PatchNCELoss`` (no parameters, no state)."""
from __future__ import annotations

from torch import nn

from ..ops.patch_nce import patch_nce_loss


class PatchNCELoss(nn.Module):
    """CUT's PatchNCE loss: ``forward(feat_q, feat_k)`` returns the per-row loss [B*P].

    ``PatchNCELoss(nce_T=0.07, batch_size=1, include_all_negatives_from_minibatch=False)``, or
    ``PatchNCELoss(opt)`` with CUT's options namespace, read at every forward as CUT does
    (``opt.nce_T``, ``opt.batch_size``, ``opt.nce_includes_all_negatives_from_minibatch``), so
    CUT's ``self.criterionNCE.append(PatchNCELoss(opt).to(self.device))`` works after swapping
    the import. feat_k is detached, as in CUT. See ``fastnote.patch_nce_loss``.

    >>> import torch, torch.nn.functional as F, fastnote
    >>> q = F.normalize(torch.randn(64, 16), dim=1)
    >>> fastnote.nn.PatchNCELoss(batch_size=2)(q, q).shape
    torch.Size([64])
    """

    def __init__(self, nce_T=0.07, batch_size: int = 1, include_all_negatives_from_minibatch: bool = False):
        super().__init__()
        if isinstance(nce_T, (int, float)) and not isinstance(nce_T, bool):
            self.opt = None
            self.nce_T = float(nce_T)
            self.batch_size = batch_size
            self.include_all_negatives_from_minibatch = include_all_negatives_from_minibatch
        else:
            missing = [a for a in ("nce_T", "batch_size", "nce_includes_all_negatives_from_minibatch")
                       if not hasattr(nce_T, a)]
            if missing:
                raise TypeError("PatchNCELoss takes nce_T (a float) or CUT's options namespace with nce_T, "
                                f"batch_size and nce_includes_all_negatives_from_minibatch; got a "
                                f"{type(nce_T).__name__} without {', '.join(missing)}")
            self.opt = nce_T

    def _options(self):
        if self.opt is None:
            return self.nce_T, self.batch_size, self.include_all_negatives_from_minibatch
        opt = self.opt
        return opt.nce_T, opt.batch_size, bool(opt.nce_includes_all_negatives_from_minibatch)

    def forward(self, feat_q, feat_k):
        nce_T, batch_size, all_negatives = self._options()
        return patch_nce_loss(feat_q, feat_k, batch_size, nce_T, all_negatives)

    def extra_repr(self) -> str:
        nce_T, batch_size, all_negatives = self._options()
        return f"nce_T={nce_T}, batch_size={batch_size}, include_all_negatives_from_minibatch={all_negatives}"
