"""Drop-in for timm's Swin ``WindowAttention``: timm's constructor arguments and its state_dict
layout, in which the relative position index is a non-persistent buffer (absent from timm's
checkpoints, and so from this module's)."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .window_attention import WindowAttention


class TimmWindowAttention(WindowAttention):
    """``forward(x, mask=None)`` on ``x: [B*nW, N, C]`` as timm's ``WindowAttention(dim,
    num_heads, head_dim=None, window_size=7, qkv_bias=True, attn_drop=0., proj_drop=0.)``, on the
    core op ``fastnote.window_attention``; the block around it keeps timm's shift, pad and
    partition. ``attn_drop`` must be 0 in training (no dropout on the attention probabilities).

    >>> import torch, fastnote
    >>> from fastnote.nn.timm_swin import TimmWindowAttention
    >>> m = TimmWindowAttention(32, 2, window_size=4)
    >>> "relative_position_index" in m.state_dict()
    False
    >>> m(torch.randn(3, 16, 32)).shape
    torch.Size([3, 16, 32])
    """

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, window_size=7,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__(dim, window_size, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                         proj_drop=proj_drop, head_dim=head_dim)
        self.register_buffer("relative_position_index", self.relative_position_index, persistent=False)

    def _load_from_state_dict(self, *args, **kwargs):
        # The index is not part of the state: nothing to fill in (WindowAttention's override adds
        # it for Swin's persistent layout).
        nn.Module._load_from_state_dict(self, *args, **kwargs)
