"""timm's Swin, two ways.

- ``TimmWindowAttention``: drop-in for timm's ``WindowAttention`` (the attention core, on
  windows the block has already shifted, padded and partitioned): timm's constructor arguments and
  its state_dict layout, in which the relative position index is a non-persistent buffer (absent
  from timm's checkpoints, and so from this module's).
- ``FusedSwinTransformerBlock``: timm's ``SwinTransformerBlock`` (a subclass, made when first
  asked for, so that importing fastnote does not import timm) whose ``_attn`` runs the whole roll +
  pad + partition + attention + reverse + roll-back path as ``fastnote.swin_window_attention`` in
  timm's order (``roll_first=True``: roll the map, then pad), on the block's own ``attn``
  parameters. Same submodules, parameters and state_dict; ``fastnote.patch`` switches a block's
  class to it in place (the same object: a later ``set_input_size`` changes the block that
  ``fastnote.unpatch`` switches back). The name resolves through this module (``fastnote.nn.timm_swin.FusedSwinTransformerBlock``),
  so a pickled patched model loads where timm and fastnote are installed.
- ``FusedSwinTransformerV2Block``: the same for timm's ``SwinTransformerV2Block``, its ``_attn``
  on ``fastnote.swin_window_attention_v2`` (cosine attention, ``logit_scale``, the position bias
  ``16 * sigmoid(cpb_mlp(coords))`` computed per call from the block's ``attn``), in timm's order.

Both read the geometry from the block on every call, so ``set_input_size`` needs nothing more; a
window or shift that ``set_input_size`` made unequal along the two axes runs timm's own ``_attn``
(the fused kernels take square windows and one shift).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..checks import window_pair
from ..ops.window_attention import relative_position_index, swin_window_attention
from ..ops.window_attention_v2 import swin_window_attention_v2
from ._reads import LINEAR, compile_reads, intact
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

    # timm's initialisation hooks, which its walks call by name: ``init_weights(needs_reset=True)``
    # calls ``reset_parameters`` on every module that has one, ``reinit_non_persistent_buffers``
    # (after ``to_empty`` from the meta device) calls ``init_non_persistent_buffers``: without them
    # the index (not in the state_dict) would keep uninitialised memory.
    def reset_parameters(self) -> None:
        """timm's: the bias table drawn from a truncated normal (std 0.02), the index rebuilt."""
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._init_buffers()

    def _init_buffers(self) -> None:
        index = self.relative_position_index
        with torch.no_grad():
            index.copy_(relative_position_index(self.window_size, device=index.device))

    def init_non_persistent_buffers(self) -> None:
        """timm's: the non-persistent index recomputed in place."""
        self._init_buffers()

    def set_window_size(self, window_size) -> None:
        """timm's ``WindowAttention.set_window_size`` (what timm's ``set_input_size`` calls on a
        block's ``attn``): the bias table resized by timm's own interpolation
        (``timm.layers.resize_rel_pos_bias_table``, so the numbers are timm's) into a new
        parameter, and the index rebuilt. Needs timm."""
        window_size = window_pair("window_size", tuple(window_size) if isinstance(window_size, list)
                                  else window_size)
        if window_size == self.window_size:
            return
        from timm.layers import resize_rel_pos_bias_table

        old, self.window_size = self.window_size, window_size
        wh, ww = window_size
        table = self.relative_position_bias_table
        with torch.no_grad():
            resized = resize_rel_pos_bias_table(table, new_window_size=window_size,
                                                new_bias_shape=((2 * wh - 1) * (2 * ww - 1), self.num_heads),
                                                old_window_size=old)
        self.relative_position_bias_table = nn.Parameter(resized, requires_grad=table.requires_grad)
        self.register_buffer("relative_position_index",
                             relative_position_index(window_size, device=self.relative_position_index.device),
                             persistent=False)


class _FusedAttention:
    """The ``_attn`` of a fused timm block: ``x`` [B, H, W, C] (after ``norm1``) -> [B, H, W, C]."""

    _fastnote_fused_children = ("attn",)   # read by fastnote.patch: the block uses attn's parameters itself
    # what the fused path reads without calling (fastnote.nn._reads), checked by fastnote.patch and on every call
    _fastnote_reads = (("attn", ("timm.models.swin_transformer", "WindowAttention.forward")),
                       ("attn.qkv", LINEAR), ("attn.proj", LINEAR))

    def _attn(self, x):
        attn = self.attn
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        if wh != ww or sh != sw or not intact(self, self._fastnote_compiled_reads):
            # timm's own path: the fused one takes square windows, one shift, and attn, qkv and proj as
            # patched (a LoRA layer put in place of qkv after patching, a hook, are called there)
            return super()._attn(x)
        if attn.training and attn.attn_drop.p > 0:
            raise ValueError("fastnote's fused Swin block has no attention dropout: attn_drop must be 0 in training")
        out = swin_window_attention(x, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias,
                                    attn.relative_position_bias_table, wh, attn.num_heads, shift_size=sh,
                                    relative_position_index=attn.relative_position_index, scale=attn.scale,
                                    roll_first=True)
        return attn.proj_drop(out)


class _FusedAttentionV2:
    """The ``_attn`` of a fused timm Swin V2 block: ``x`` [B, H, W, C] -> [B, H, W, C] (before
    the block's post-attention ``norm1``)."""

    _fastnote_fused_children = ("attn",)
    _fastnote_reads = (("attn", ("timm.models.swin_transformer_v2", "WindowAttention.forward")),
                       ("attn.qkv", LINEAR), ("attn.proj", LINEAR))

    def _attn(self, x):
        attn = self.attn
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        if wh != ww or sh != sw or not intact(self, self._fastnote_compiled_reads):
            return super()._attn(x)   # timm's own path, as in V1's
        if attn.training and attn.attn_drop.p > 0:
            raise ValueError("fastnote's fused Swin V2 block has no attention dropout: attn_drop must be 0 in "
                             "training")
        # V2's bias before the gather: the sigmoid commutes with it, and the table is the smaller tensor
        table = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads))
        out = swin_window_attention_v2(x, attn.qkv.weight, attn.q_bias, attn.v_bias, attn.proj.weight,
                                       attn.proj.bias, attn.logit_scale, table, wh, attn.num_heads, shift_size=sh,
                                       relative_position_index=attn.relative_position_index, roll_first=True)
        return attn.proj_drop(out)


_FUSED: Dict[type, type] = {}


def _fused_class(cls: type, mixin: type) -> type:
    if cls not in _FUSED:
        name = "Fused" + cls.__name__
        doc = f"timm's {cls.__name__} on fastnote's fused path."
        _FUSED[cls] = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name, "__doc__": doc,
                                                "_fastnote_compiled_reads": compile_reads(mixin._fastnote_reads)})
    return _FUSED[cls]


def fused_block_class(cls: type) -> type:
    """The fused subclass of timm's block class ``cls`` (made once per class)."""
    return _fused_class(cls, _FusedAttention)


def fused_v2_block_class(cls: type) -> type:
    """The fused subclass of timm's Swin V2 block class ``cls`` (made once per class)."""
    return _fused_class(cls, _FusedAttentionV2)


def __getattr__(name: str):
    if name == "FusedSwinTransformerBlock":
        from timm.models.swin_transformer import SwinTransformerBlock

        return fused_block_class(SwinTransformerBlock)
    if name == "FusedSwinTransformerV2Block":
        from timm.models.swin_transformer_v2 import SwinTransformerV2Block

        return fused_v2_block_class(SwinTransformerV2Block)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
