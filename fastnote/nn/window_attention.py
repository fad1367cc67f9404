"""Drop-ins for Swin's / timm's ``WindowAttention`` (same parameter and buffer names), and
``ShiftedWindowAttention``, the fused W-MSA / SW-MSA path on ``[B, H, W, C]``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..checks import window_pair
from ..ops.window_attention import (MASK_VALUE, relative_position_bias, relative_position_index,
                                    swin_window_attention, window_attention)
from ._reads import CALLS_QKV, QKV_PROJ, check_intact


class WindowAttention(nn.Module):
    """Window multi-head self-attention with relative position bias, as Swin's and timm's
    ``WindowAttention``: ``qkv`` (Linear dim -> 3 * heads * head_dim), ``proj``,
    ``relative_position_bias_table`` ``[(2Wh-1)(2Ww-1), heads]`` and the buffer
    ``relative_position_index``. ``forward(x, mask=None)`` on ``x: [B*nW, N, C]`` (or
    ``[B*nW, Wh, Ww, C]``), ``mask: [nW, N, N]``.

    State dicts of both originals load with ``strict=True``: Swin's saves the index buffer, timm's
    marks it non-persistent; a missing index is filled with the module's own (the same values).
    ``qk_scale`` (Swin) and ``head_dim`` (timm) are accepted. Dropout on the attention
    probabilities is not implemented: ``attn_drop > 0`` raises ``ValueError`` in training mode (it
    is a no-op in eval mode; Swin and timm default to 0). ``proj_drop`` works as usual.
    """

    def __init__(self, dim: int, window_size, num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 head_dim: Optional[int] = None):
        super().__init__()
        self.dim = dim
        self.window_size = window_pair("window_size", window_size)
        self.num_heads = num_heads
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"num_heads must divide dim (or pass head_dim), got dim={dim}, num_heads={num_heads}")
            head_dim = dim // num_heads
        self.head_dim = head_dim
        attn_dim = head_dim * num_heads
        self.scale = qk_scale or head_dim ** -0.5
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # timm's checkpoints lack the (non-persistent there) index: fill in this module's own.
        key = prefix + "relative_position_index"
        if key not in state_dict:
            state_dict[key] = self.relative_position_index
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _check_dropout(self):
        if self.training and self.attn_drop.p > 0:
            raise ValueError(f"attn_drop > 0 is not supported in training (got attn_drop={self.attn_drop.p}): "
                             "the fused kernels implement no dropout on the attention probabilities; "
                             "use attn_drop=0.0 (Swin's and timm's default) or eval mode")

    def relative_position_bias(self) -> torch.Tensor:
        """``[heads, N, N]``, gathered from the table (one small gather; its gradient reaches the table)."""
        return relative_position_bias(self.relative_position_bias_table, self.relative_position_index,
                                      self.num_heads)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_dropout()
        shape = x.shape
        n = self.window_size[0] * self.window_size[1]
        if x.dim() == 4:
            x = x.reshape(shape[0], shape[1] * shape[2], shape[3])
        if x.dim() != 3 or x.shape[1] != n:
            raise ValueError(f"x must have shape [B*nW, N, C] with N = Wh*Ww = {n} for window_size "
                             f"{self.window_size}, got {list(shape)}")
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                  # strided views, read in place
        out = window_attention(q, k, v, bias=self.relative_position_bias(), mask=mask, scale=self.scale)
        out = self.proj(out.transpose(1, 2).reshape(B_, N, self.num_heads * self.head_dim))
        out = self.proj_drop(out)
        return out.reshape(*shape[:-1], out.shape[-1]) if len(shape) == 4 else out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"


class ShiftedWindowAttention(WindowAttention):
    """The attention part of a Swin block on ``x: [B, H, W, C]``: pad to multiples of the window,
    cyclic shift by ``shift_size`` (SW-MSA, with its mask) or not (W-MSA), window attention,
    ``proj``, reverse, roll back, crop; fused (``fastnote.swin_window_attention``): no rolled,
    padded or partitioned copy of x or of the output is written. Parameters and buffer are those
    of ``WindowAttention``, so a Swin block's ``attn`` state_dict loads as is. Square windows.
    """

    def __init__(self, dim: int, window_size, num_heads: int, shift_size: int = 0, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 mask_value: float = MASK_VALUE):
        super().__init__(dim, window_size, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                         attn_drop=attn_drop, proj_drop=proj_drop)
        if self.window_size[0] != self.window_size[1]:
            raise ValueError(f"window_size must be square for ShiftedWindowAttention, got {window_size!r}")
        self.shift_size = shift_size
        self.mask_value = mask_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_dropout()
        check_intact(self, QKV_PROJ, CALLS_QKV)
        out = swin_window_attention(
            x, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias,
            self.relative_position_bias_table, self.window_size[0], self.num_heads, self.shift_size,
            relative_position_index=self.relative_position_index, scale=self.scale, mask_value=self.mask_value,
        )
        return self.proj_drop(out)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", shift_size={self.shift_size}"
