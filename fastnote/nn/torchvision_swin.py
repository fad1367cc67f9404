"""Drop-in for torchvision's Swin (V1) ``ShiftedWindowAttention``: its constructor arguments and
its state_dict layout, the relative position index included, which torchvision stores flat
(``[N*N]``), on the fused path of ``fastnote.nn.ShiftedWindowAttention`` (same order and rule as
torchvision: pad, then roll; no shift along an axis whose padded size the window covers)."""
from __future__ import annotations

from typing import List

import torch

from ..ops.window_attention import swin_window_attention
from ._reads import CALLS_QKV, QKV_PROJ, check_intact
from .window_attention import ShiftedWindowAttention


def _square(name: str, value) -> int:
    pair = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(pair) != 2 or pair[0] != pair[1]:
        raise ValueError(f"{name} must be equal along both axes, got {value!r}")
    return int(pair[0])


class TorchvisionShiftedWindowAttention(ShiftedWindowAttention):
    """``forward(x)`` on ``x: [B, H, W, C]`` as torchvision's ``ShiftedWindowAttention(dim,
    window_size, shift_size, num_heads, qkv_bias, proj_bias, attention_dropout, dropout)``.
    Square windows and equal shifts only; ``attention_dropout`` must be 0 in training (no dropout
    on the attention probabilities in the kernels); ``dropout`` applies to the output, as there.

    >>> import torch, fastnote
    >>> from fastnote.nn.torchvision_swin import TorchvisionShiftedWindowAttention
    >>> m = TorchvisionShiftedWindowAttention(32, [7, 7], [3, 3], 2)
    >>> m.state_dict()["relative_position_index"].shape
    torch.Size([2401])
    >>> m(torch.randn(1, 9, 9, 32)).shape
    torch.Size([1, 9, 9, 32])
    """

    def __init__(self, dim: int, window_size: List[int], shift_size: List[int], num_heads: int,
                 qkv_bias: bool = True, proj_bias: bool = True, attention_dropout: float = 0.0,
                 dropout: float = 0.0):
        ws, shift = _square("window_size", window_size), _square("shift_size", shift_size)
        super().__init__(dim, ws, num_heads, shift_size=shift, qkv_bias=qkv_bias, attn_drop=attention_dropout,
                         proj_drop=dropout)
        if not proj_bias:
            self.proj.bias = None
        self.register_buffer("relative_position_index", self.relative_position_index.flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_dropout()
        check_intact(self, QKV_PROJ, CALLS_QKV)
        n = self.window_size[0] * self.window_size[1]
        out = swin_window_attention(
            x, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias,
            self.relative_position_bias_table, self.window_size[0], self.num_heads, self.shift_size,
            relative_position_index=self.relative_position_index.view(n, n), scale=self.scale,
            mask_value=self.mask_value,
        )
        return self.proj_drop(out)
