"""Drop-in for SAGAN's ``Self_Attn`` (same state_dict keys: query_conv.*, key_conv.*, value_conv.*,
gamma)."""
from __future__ import annotations

import torch
from torch import nn

from .. import checks
from ..ops.sagan_attention import sagan_attention


class SelfAttention(nn.Module):
    """SAGAN self-attention block: ``out = gamma * attention_output + x`` on x [B, C, W, H], with
    1x1 convs ``query_conv``, ``key_conv`` (C -> C // 8) and ``value_conv`` (C -> C) and the
    scalar ``gamma`` (initialised to 0), so a ``Self_Attn`` state_dict loads as it is.

    ``forward(x)`` returns ``(out, attention)`` like ``Self_Attn``, but ``attention`` is None
    unless ``return_attention=True``: not materialising the [B, N, N] map (N = W*H) is what makes
    the block O(N) in memory. With ``return_attention=True`` it is computed as well, O(N^2).

    ``activation`` is accepted and stored, unused, as ``Self_Attn`` does, so ``Self_Attn(C, 'relu')``
    call sites keep working; ``return_attention`` is keyword-only for the same reason.
    """

    def __init__(self, in_dim: int, activation=None, *, return_attention: bool = False):
        super().__init__()
        if in_dim < 8:
            raise ValueError(f"in_dim must be >= 8 (query/key convs have in_dim // 8 channels), got {in_dim}")
        self.chanel_in = in_dim  # Self_Attn's attribute name, spelling included
        self.activation = activation
        self.return_attention = return_attention
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        checks.tensor("x", x, ndim=4)
        B, C, W, H = x.shape
        N = W * H
        q = self.query_conv(x).reshape(B, -1, N)
        k = self.key_conv(x).reshape(B, -1, N)
        v = self.value_conv(x).reshape(B, C, N)
        result = sagan_attention(q, k, v, x=x, gamma=self.gamma, return_attention=self.return_attention)
        if self.return_attention:
            return result
        return result, None

    def extra_repr(self) -> str:
        return f"in_dim={self.chanel_in}, return_attention={self.return_attention}"
