"""spandrel's SwinIR and Swin2SR blocks (family ``spandrel_swin``).

Where it hooks: the block, as for timm's Swin. spandrel's ``SwinTransformerBlock`` (SwinIR's, and
Swin2SR's with V2 attention) has its class switched in place to ``fastnote.nn.spandrel_swin``'s
fused subclass: roll, partition, attention, reverse and roll back in one fused op
(``swin_window_attention`` / ``swin_window_attention_v2``, ``roll_first=True``: the block rolls and
never pads), on the block's own ``attn`` parameters; same parameter objects and state_dict (the
``attn_mask`` buffer included), and the walk does not go into ``attn``. Without this family (or
with ``include`` leaving it out) SwinIR's attention still goes to the core op through the
``WindowAttention`` family.

Recognised by structure (``norm1``, ``norm2``, ``mlp``, ``drop_path``, ``window_size``,
``shift_size``, ``calculate_mask``; an ``attn`` with ``qkv``, ``proj`` and either a
``relative_position_bias_table`` (SwinIR) or ``logit_scale``, ``cpb_mlp``, ``q_bias`` / ``v_bias``
(Swin2SR)), with a ``forward`` that is spandrel's own (the fused one replaces it). Left with the
reason: attention dropout > 0, a forward that is not spandrel's, shapes that do not match.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..nn.spandrel_swin import SPANDREL_MODULES as _MODULES
from ..nn.spandrel_swin import _FusedSwin2SRBlock, _FusedSwinIRBlock, fused_block_class
from .probe import _bypassed_forward_reason, _forward_is, _is_fastnote
from .registry import Result, Site, register

_MIXINS = {1: _FusedSwinIRBlock, 2: _FusedSwin2SRBlock}


def _version(m: nn.Module) -> int:
    attn = getattr(m, "attn", None)
    if not (attn is not None and all(isinstance(getattr(m, n, None), nn.Module)
                                     for n in ("norm1", "norm2", "mlp", "drop_path"))
            and hasattr(m, "window_size") and hasattr(m, "shift_size") and callable(getattr(m, "calculate_mask", None))
            and isinstance(getattr(attn, "qkv", None), nn.Linear) and isinstance(getattr(attn, "proj", None), nn.Linear)
            and getattr(attn, "relative_position_index", None) is not None):
        return 0
    if isinstance(getattr(attn, "relative_position_bias_table", None), nn.Parameter):
        return 1
    if isinstance(getattr(attn, "logit_scale", None), nn.Parameter) and isinstance(getattr(attn, "cpb_mlp", None),
                                                                                   nn.Module):
        return 2
    return 0


def _reason(m: nn.Module, version: int) -> Optional[str]:
    if not _forward_is(type(m), _MODULES[version], "SwinTransformerBlock.forward"):
        return (f"{type(m).__name__} has the structure of spandrel's SwinTransformerBlock but not its forward: the "
                f"fused path replaces that forward, so it is not used")
    reason = _bypassed_forward_reason(m, _MIXINS[version]._fastnote_reads)
    if reason is not None:
        return reason
    attn, ws = m.attn, m.window_size
    C, heads = attn.qkv.in_features, attn.num_heads
    if not isinstance(ws, int) or tuple(attn.window_size) != (ws, ws) or not 0 <= m.shift_size < ws:
        return f"window {ws} / shift {m.shift_size} do not match the attention's window {attn.window_size}"
    if tuple(attn.qkv.weight.shape) != (3 * C, C) or tuple(attn.proj.weight.shape) != (C, C) or C % heads:
        return "qkv / proj widths do not split into num_heads heads of the block's width"
    if tuple(attn.relative_position_index.shape) != (ws * ws, ws * ws):
        return "relative position index does not match window_size"
    if attn.attn_drop.p > 0:
        return f"attention dropout p={attn.attn_drop.p} > 0: the kernels implement no dropout on the attention " \
               f"probabilities"
    if version == 1:
        if tuple(attn.relative_position_bias_table.shape) != ((2 * ws - 1) ** 2, heads):
            return "relative position table does not match window_size and num_heads"
    elif attn.qkv.bias is not None or (getattr(attn, "q_bias", None) is None) != (getattr(attn, "v_bias", None) is None):
        return "Swin2SR attention whose qkv bias is not cat(q_bias, 0, v_bias)"
    return None


def _spandrel_block(old: nn.Module, site: Optional[Site] = None) -> Result:
    if _is_fastnote(old):
        return None
    version = _version(old)
    if version == 0 or not type(old).__module__.startswith("spandrel."):
        return None
    reason = _reason(old, version)
    if reason is not None:
        return reason
    op = "swin_window_attention" if version == 1 else "swin_window_attention_v2"
    return fused_block_class(type(old), version), f"roll, partition, attention, reverse fused ({op}, roll_first)"


register("spandrel_swin", (_spandrel_block,))
