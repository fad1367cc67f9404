"""spandrel's SwinIR and Swin2SR ``SwinTransformerBlock`` on fastnote's fused window attention.

``fused_block_class(cls, version)`` gives a subclass of spandrel's block class whose ``forward``
runs the block's windowed attention (roll, partition, attention with the relative position bias and
the shift mask, projection, reverse, roll back) as one fused op on the block's own ``attn``
parameters, in the block's order: it rolls the map as given and does not pad (the model pads the
image to window multiples), which is the fused op's ``roll_first=True`` with nothing to pad.

- SwinIR (V1) -> ``fastnote.swin_window_attention`` (``qkv``, ``proj``, the table and the saved
  index, the attention's ``scale``); pre-norm block.
- Swin2SR (V2) -> ``fastnote.swin_window_attention_v2`` (``qkv`` with ``cat(q_bias, 0, v_bias)``,
  ``logit_scale``, the table ``16 * sigmoid(cpb_mlp(relative_coords_table))``); post-norm block.

The shift mask is computed from the geometry (the same -100 regions as the block's
``calculate_mask`` and its ``attn_mask`` buffer, which stays in place and in the state_dict).
The block's own ``forward`` runs instead where the fused op would not compute what it does: a map
whose sides are not window multiples (the library fails there), attention dropout active in
training, a window that does not match the attention's, or ``attn``, ``qkv`` or ``proj`` changed after
patching (a LoRA layer, another attention class, a hook: ``fastnote.nn._reads``).
"""
from __future__ import annotations

from typing import Dict

import torch

from ..ops.window_attention import swin_window_attention
from ..ops.window_attention_v2 import swin_window_attention_v2
from ._reads import LINEAR, compile_reads, intact

# the modules spandrel's blocks and their WindowAttention are defined in, per version
SPANDREL_MODULES = {1: "spandrel.architectures.SwinIR.__arch.SwinIR",
                    2: "spandrel.architectures.Swin2SR.__arch.Swin2SR"}


def _reads(version: int):
    """What the fused block reads without calling (``fastnote.nn._reads``): checked by fastnote.patch
    and on every call."""
    return (("attn", (SPANDREL_MODULES[version], "WindowAttention.forward")), ("attn.qkv", LINEAR),
            ("attn.proj", LINEAR))


def _fusable(block, H: int, W: int) -> bool:
    attn, ws = block.attn, block.window_size
    return (isinstance(ws, int) and H % ws == 0 and W % ws == 0 and tuple(attn.window_size) == (ws, ws)
            and not (attn.training and attn.attn_drop.p > 0) and intact(block, block._fastnote_compiled_reads))


class _FusedSwinIRBlock:
    _fastnote_fused_children = ("attn",)   # read by fastnote.patch: the block uses attn's parameters itself
    _fastnote_reads = _reads(1)

    def forward(self, x, x_size):
        H, W = (int(s) for s in x_size)
        if not _fusable(self, H, W):
            return super().forward(x, x_size)
        attn = self.attn
        B, _, C = x.shape
        shortcut = x
        out = swin_window_attention(self.norm1(x).view(B, H, W, C), attn.qkv.weight, attn.qkv.bias, attn.proj.weight,
                                    attn.proj.bias, attn.relative_position_bias_table, self.window_size,
                                    attn.num_heads, shift_size=int(self.shift_size),
                                    relative_position_index=attn.relative_position_index, scale=attn.scale,
                                    roll_first=True)
        x = shortcut + self.drop_path(attn.proj_drop(out).view(B, H * W, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _FusedSwin2SRBlock:
    _fastnote_fused_children = ("attn",)
    _fastnote_reads = _reads(2)

    def forward(self, x, x_size):
        H, W = (int(s) for s in x_size)
        if not _fusable(self, H, W):
            return super().forward(x, x_size)
        attn = self.attn
        B, _, C = x.shape
        table = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads))
        out = swin_window_attention_v2(x.view(B, H, W, C), attn.qkv.weight, attn.q_bias, attn.v_bias, attn.proj.weight,
                                       attn.proj.bias, attn.logit_scale, table, self.window_size, attn.num_heads,
                                       shift_size=int(self.shift_size),
                                       relative_position_index=attn.relative_position_index, roll_first=True)
        x = x + self.drop_path(self.norm1(attn.proj_drop(out).view(B, H * W, C)))
        return x + self.drop_path(self.norm2(self.mlp(x)))


_FUSED: Dict[type, type] = {}
_NAMES = {1: "SwinIR", 2: "Swin2SR"}


def fused_block_class(cls: type, version: int) -> type:
    """The fused subclass of spandrel's block class ``cls`` (``version`` 1: SwinIR's, 2: Swin2SR's)."""
    if cls not in _FUSED:
        mixin = _FusedSwinIRBlock if version == 1 else _FusedSwin2SRBlock
        name = f"Fused{_NAMES[version]}Block"
        doc = f"spandrel's {_NAMES[version]} {cls.__name__} on fastnote's fused window attention."
        _FUSED[cls] = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name, "__doc__": doc,
                                                "_fastnote_compiled_reads": compile_reads(mixin._fastnote_reads)})
    return _FUSED[cls]


def __getattr__(name: str):
    # the names pickling records, resolved without importing spandrel when fastnote is imported
    if name in ("FusedSwinIRBlock", "FusedSwin2SRBlock"):
        version = 1 if name == "FusedSwinIRBlock" else 2
        module = __import__(SPANDREL_MODULES[version], fromlist=["SwinTransformerBlock"])
        return fused_block_class(module.SwinTransformerBlock, version)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
