"""Swin V2 window attention drop-ins: ``WindowAttentionV2`` (timm's ``WindowAttention`` of
``swin_transformer_v2``: the core on windows the block has shifted, padded and partitioned) and
``ShiftedWindowAttentionV2`` (torchvision's, on ``[B, H, W, C]``, fused). Cosine attention with a
per-head ``logit_scale`` and the continuous position bias ``16 * sigmoid(cpb_mlp(coords))``; the
MLP and the gather stay in torch (small), the attention runs in the kernels.

``from_timm`` / ``from_torchvision`` build one from the library's module around the very same
parameter and buffer objects (no copy), so an optimizer that holds them keeps working.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checks import window_pair
from ..ops.window_attention import MASK_VALUE, relative_position_index
from ..ops.window_attention_v2 import swin_window_attention_v2, window_attention_v2
from ._reads import CALLS_QKV, QKV_PROJ, check_intact


def relative_coords_table(window_size: Tuple[int, int], pretrained_window_size: Tuple[int, int] = (0, 0),
                          device=None, dtype=None) -> torch.Tensor:
    """Swin V2's log-spaced relative coordinates, ``[1, 2Wh-1, 2Ww-1, 2]``: each offset divided by
    (window - 1) (the pretraining window's, when given; at least 1), times 8, then
    ``sign(t) * log2(1 + |t|) / log2(8)``."""
    wh, ww = window_size
    ph, pw = pretrained_window_size
    h = torch.arange(-(wh - 1), wh, device=device, dtype=torch.float32)
    w = torch.arange(-(ww - 1), ww, device=device, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(h, w, indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    den = (ph, pw) if ph > 0 else (wh, ww)
    table[..., 0] /= max(den[0] - 1, 1)
    table[..., 1] /= max(den[1] - 1, 1)
    table = table * 8
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table.to(dtype=dtype)


def cpb_mlp(num_heads: int) -> nn.Sequential:
    """Swin V2's continuous position bias MLP: Linear(2, 512), ReLU, Linear(512, heads, no bias)."""
    return nn.Sequential(nn.Linear(2, 512, bias=True), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False))


class _CosineAttention(nn.Module):
    """What both drop-ins share: the position bias from the MLP and the dropout rule."""

    num_heads: int
    window_size: Tuple[int, int]

    def position_bias_table(self) -> torch.Tensor:
        """``16 * sigmoid(cpb_mlp(coords))``, ``[(2Wh-1)(2Ww-1), heads]``: V2's bias before the
        gather (the sigmoid commutes with it, and the table is smaller than ``[heads, N, N]``)."""
        return 16 * torch.sigmoid(self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads))

    def relative_position_bias(self) -> torch.Tensor:
        """The dense ``[heads, N, N]`` additive bias (gradient to the MLP through autograd)."""
        n = self.window_size[0] * self.window_size[1]
        table = self.position_bias_table()
        return table[self.relative_position_index.reshape(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()

    def _check_dropout(self, p: float) -> None:
        if self.training and p > 0:
            raise ValueError(f"attention dropout > 0 is not supported in training (got {p}): the fused kernels "
                             "implement no dropout on the attention probabilities; use 0.0 (timm's and "
                             "torchvision's default) or eval mode")


class WindowAttentionV2(_CosineAttention):
    """timm's Swin V2 ``WindowAttention(dim, window_size, num_heads, qkv_bias=True,
    qkv_bias_separate=False, attn_drop=0., proj_drop=0., pretrained_window_size=(0, 0))``:
    ``forward(x, mask=None)`` on ``x: [B*nW, N, C]``, ``mask: [nW, N, N]``, on the core op
    ``fastnote.window_attention_v2``.

    Same parameters and buffers as timm (timm 1.0): ``logit_scale`` ``[heads, 1, 1]``, ``cpb_mlp``,
    ``qkv`` (no bias), ``q_bias`` and ``v_bias`` (``k_bias``: a zero, non-persistent buffer),
    ``proj``, and the non-persistent ``relative_coords_table`` and ``relative_position_index``;
    state_dicts load both ways with ``strict=True``. ``attn_drop`` must be 0 in training.

    >>> import torch
    >>> from fastnote.nn import WindowAttentionV2
    >>> m = WindowAttentionV2(32, (8, 8), 2)
    >>> sorted(m.state_dict())[:3]
    ['cpb_mlp.0.bias', 'cpb_mlp.0.weight', 'cpb_mlp.2.weight']
    >>> m(torch.randn(3, 64, 32)).shape
    torch.Size([3, 64, 32])
    """

    def __init__(self, dim: int, window_size, num_heads: int, qkv_bias: bool = True,
                 qkv_bias_separate: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 pretrained_window_size=(0, 0), device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.window_size = window_pair("window_size", tuple(window_size) if isinstance(window_size, list)
                                       else window_size)
        ps = pretrained_window_size
        self.pretrained_window_size = (ps, ps) if isinstance(ps, int) else tuple(ps)
        self.num_heads = num_heads
        self.qkv_bias_separate = qkv_bias_separate
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10), **dd))
        self.cpb_mlp = cpb_mlp(num_heads).to(**dd)
        self.qkv = nn.Linear(dim, dim * 3, bias=False, **dd)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim, **dd))
            self.register_buffer("k_bias", torch.zeros(dim, **dd), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(dim, **dd))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_buffer("relative_coords_table",
                             relative_coords_table(self.window_size, self.pretrained_window_size, device, dtype),
                             persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size, device=device),
                             persistent=False)

    @classmethod
    def from_timm(cls, module: nn.Module) -> "WindowAttentionV2":
        """The drop-in for timm's ``swin_transformer_v2.WindowAttention`` ``module``, around its own
        parameter and buffer objects (shared, not copied), in its training mode."""
        ours = cls.__new__(cls)
        nn.Module.__init__(ours)
        for name in ("dim", "num_heads", "qkv_bias_separate"):
            setattr(ours, name, getattr(module, name))
        ours.window_size = tuple(module.window_size)
        ours.pretrained_window_size = tuple(module.pretrained_window_size)
        for name, child in module.named_children():
            if name != "softmax":
                ours.add_module(name, child)
        for name, p in module.named_parameters(recurse=False):
            ours.register_parameter(name, p)
        for name in ("q_bias", "v_bias"):
            if getattr(module, name, None) is None:
                setattr(ours, name, None)
        persistent = set(module.state_dict(keep_vars=True))
        for name, b in module.named_buffers(recurse=False):
            ours.register_buffer(name, b, persistent=name in persistent)
        if getattr(module, "k_bias", None) is None:
            ours.k_bias = None
        ours.train(module.training)
        return ours

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_dropout(self.attn_drop.p)
        B_, N, C = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv = self.qkv(x) + torch.cat((self.q_bias, self.k_bias, self.v_bias)) if self.qkv_bias_separate \
                else nn.functional.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # strided views
        out = window_attention_v2(q, k, v, self.logit_scale, bias=self.relative_position_bias(), mask=mask)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B_, N, C)))

    # timm's initialisation hooks, which its walks call by name: ``init_weights(needs_reset=True)``
    # calls ``reset_parameters`` on every module that has one, ``reinit_non_persistent_buffers``
    # (after ``to_empty`` from the meta device) calls ``init_non_persistent_buffers``: without them
    # k_bias, the coordinates table and the index (none in the state_dict) would keep
    # uninitialised memory.
    def reset_parameters(self) -> None:
        """timm's: ``logit_scale`` log(10), the q and v biases zero, the buffers recomputed."""
        with torch.no_grad():
            self.logit_scale.fill_(math.log(10))
            if self.q_bias is not None:
                self.q_bias.zero_()
                self.v_bias.zero_()
        self._init_buffers()

    def _init_buffers(self) -> None:
        weight = self.proj.weight
        with torch.no_grad():
            if self.k_bias is not None:
                self.k_bias.zero_()
            self.relative_coords_table.copy_(relative_coords_table(
                self.window_size, self.pretrained_window_size, weight.device, weight.dtype))
            self.relative_position_index.copy_(relative_position_index(self.window_size, device=weight.device))

    def init_non_persistent_buffers(self) -> None:
        """timm's: k_bias, the coordinates table and the index recomputed in place."""
        self._init_buffers()

    def set_window_size(self, window_size) -> None:
        """timm's ``set_window_size`` (what timm's ``set_input_size`` calls on a block's ``attn``):
        the coordinates table and the index rebuilt for the new window (the MLP is unchanged: it
        takes continuous coordinates)."""
        window_size = window_pair("window_size", tuple(window_size) if isinstance(window_size, list)
                                  else window_size)
        if window_size == self.window_size:
            return
        self.window_size = window_size
        table = self.relative_coords_table
        self.register_buffer("relative_coords_table",
                             relative_coords_table(window_size, self.pretrained_window_size, table.device, table.dtype),
                             persistent=False)
        self.register_buffer("relative_position_index",
                             relative_position_index(window_size, device=table.device), persistent=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"


class ShiftedWindowAttentionV2(_CosineAttention):
    """torchvision's ``ShiftedWindowAttentionV2(dim, window_size, shift_size, num_heads,
    qkv_bias=True, proj_bias=True, attention_dropout=0.0, dropout=0.0)``: ``forward(x)`` on
    ``x: [B, H, W, C]``, fused (``fastnote.swin_window_attention_v2``, torchvision's order: pad, then
    roll; no shift along an axis whose padded size the window covers).

    Same parameters and buffers as torchvision 0.28: ``qkv`` (its bias ``[3C]`` whose k third the
    forward ignores, so its gradient there is zero), ``proj``, ``logit_scale``, ``cpb_mlp``, and
    the persistent ``relative_coords_table`` and flat ``relative_position_index``. Square windows
    and equal shifts; ``attention_dropout`` must be 0 in training, ``dropout`` applies to the output.

    >>> import torch
    >>> from fastnote.nn import ShiftedWindowAttentionV2
    >>> m = ShiftedWindowAttentionV2(32, [8, 8], [4, 4], 2)
    >>> m.state_dict()["relative_position_index"].shape
    torch.Size([4096])
    >>> m(torch.randn(1, 10, 12, 32)).shape
    torch.Size([1, 10, 12, 32])
    """

    def __init__(self, dim: int, window_size: List[int], shift_size: List[int], num_heads: int,
                 qkv_bias: bool = True, proj_bias: bool = True, attention_dropout: float = 0.0,
                 dropout: float = 0.0):
        super().__init__()
        if len(window_size) != 2 or len(shift_size) != 2:
            raise ValueError("window_size and shift_size must be of length 2")
        _square("window_size", window_size)
        _square("shift_size", shift_size)
        self.window_size = list(window_size)
        self.shift_size = list(shift_size)
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.register_buffer("relative_coords_table", relative_coords_table(tuple(self.window_size)))
        self.register_buffer("relative_position_index", relative_position_index(tuple(self.window_size)).flatten())
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1))))
        self.cpb_mlp = cpb_mlp(num_heads)
        if qkv_bias:
            with torch.no_grad():
                self.qkv.bias[dim:2 * dim].zero_()

    @classmethod
    def from_torchvision(cls, module: nn.Module) -> "ShiftedWindowAttentionV2":
        """The drop-in for torchvision's ``ShiftedWindowAttentionV2`` ``module``, around its own
        parameter and buffer objects (shared, not copied), in its training mode."""
        ours = cls.__new__(cls)
        nn.Module.__init__(ours)
        _square("window_size", module.window_size)
        _square("shift_size", module.shift_size)
        for name in ("num_heads", "attention_dropout", "dropout"):
            setattr(ours, name, getattr(module, name))
        ours.window_size, ours.shift_size = list(module.window_size), list(module.shift_size)
        for name, child in module.named_children():
            ours.add_module(name, child)
        for name, p in module.named_parameters(recurse=False):
            ours.register_parameter(name, p)
        persistent = set(module.state_dict(keep_vars=True))
        for name, b in module.named_buffers(recurse=False):
            ours.register_buffer(name, b, persistent=name in persistent)
        ours.train(module.training)
        return ours

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_dropout(self.attention_dropout)
        check_intact(self, QKV_PROJ, CALLS_QKV)
        C = x.shape[-1]
        n = self.window_size[0] * self.window_size[1]
        bias = self.qkv.bias
        q_bias, v_bias = (bias[:C], bias[2 * C:]) if bias is not None else (None, None)
        out = swin_window_attention_v2(x, self.qkv.weight, q_bias, v_bias, self.proj.weight, self.proj.bias,
                                       self.logit_scale, self.position_bias_table(), self.window_size[0],
                                       self.num_heads, self.shift_size[0],
                                       relative_position_index=self.relative_position_index.view(n, n),
                                       mask_value=MASK_VALUE)
        return nn.functional.dropout(out, p=self.dropout, training=self.training)


def _square(name: str, value: Sequence[int]) -> int:
    pair = list(value)
    if len(pair) != 2 or pair[0] != pair[1]:
        raise ValueError(f"{name} must be equal along both axes, got {value!r}")
    return int(pair[0])
