"""Swin window attention: the core op, torchvision's fused path, timm's fused block, and Swin V2.

- ``WindowAttention``: Swin's / timm's ``WindowAttention`` (``qkv``, ``proj``,
  ``relative_position_bias_table``, an ``[N, N]`` ``relative_position_index``) -> the core op
  module ``fastnote.nn.WindowAttention`` (Swin's layout, the index saved) or
  ``fastnote.nn.timm_swin.TimmWindowAttention`` (timm's, the index not saved), inside a block that
  keeps its own shift, pad and partition code.
- ``ShiftedWindowAttention``: torchvision's ``ShiftedWindowAttention`` (flat ``[N*N]`` index,
  ``[B, H, W, C]`` input) -> fastnote's, in torchvision's order (pad, then roll); timm's
  ``SwinTransformerBlock`` -> the same block object's class switched to
  ``fastnote.nn.timm_swin.FusedSwinTransformerBlock``, in timm's order (roll, then pad).
- Swin V2 attention (cosine similarity, ``logit_scale``, the ``cpb_mlp`` continuous position
  bias) is left with its reason: fastnote has no kernel for it.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import nn

from .. import nn as fnn
from ..nn.timm_swin import TimmWindowAttention, fused_block_class
from ..nn.torchvision_swin import TorchvisionShiftedWindowAttention
from .probe import _is_fastnote, _mode_of, _no_meta_left, _on_meta
from .registry import Result, Site, register


def _window_pair(ws) -> Tuple[int, int]:
    return tuple(int(w) for w in ws) if isinstance(ws, (tuple, list)) else (int(ws), int(ws))


def _dropout_p(m, name) -> float:
    d = getattr(m, name, 0.0)
    return float(d.p if isinstance(d, nn.Dropout) else d or 0.0)


def _window_attention_like(m: nn.Module) -> bool:
    return (isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "proj", None), nn.Linear)
            and isinstance(getattr(m, "num_heads", None), int) and hasattr(m, "window_size"))


def _v2_reason(m: nn.Module) -> Optional[str]:
    if hasattr(m, "cpb_mlp") or hasattr(m, "logit_scale"):
        return ("Swin V2 attention (cosine similarity, continuous position bias): fastnote has no kernel "
                "for it")
    return None


def _window_attention(old: nn.Module, site: Optional[Site] = None) -> Result:
    if not _window_attention_like(old) or _is_fastnote(old):
        return None
    table = getattr(old, "relative_position_bias_table", None)
    index = old._buffers.get("relative_position_index")
    if table is None or index is None:
        return _v2_reason(old)
    if index.dim() != 2:
        return None  # torchvision's layout: _shifted_window_attention
    wh, ww = _window_pair(old.window_size)
    heads = old.num_heads
    if tuple(table.shape) != ((2 * wh - 1) * (2 * ww - 1), heads) or tuple(index.shape) != (wh * ww, wh * ww):
        return "relative position table or index does not match window_size and num_heads"
    p = _dropout_p(old, "attn_drop")
    if p > 0:
        return f"attention dropout p={p} > 0: the kernels implement no dropout on the attention probabilities"
    attn_dim = old.qkv.out_features // 3
    if attn_dim % heads or old.proj.in_features != attn_dim or old.qkv.out_features != 3 * attn_dim:
        return "qkv / proj widths do not split into num_heads heads"
    head_dim = attn_dim // heads
    scale = float(getattr(old, "scale", head_dim ** -0.5))
    if "relative_position_index" in old._non_persistent_buffers_set:   # timm's layout
        if abs(scale - head_dim ** -0.5) > 1e-12 * scale:
            return f"scale {scale} is not head_dim ** -0.5 (timm's layout takes no qk_scale)"
        new = _on_meta(lambda: TimmWindowAttention(old.qkv.in_features, heads, head_dim=head_dim,
                                                   window_size=(wh, ww), qkv_bias=old.qkv.bias is not None))
    else:                                                               # Swin's: the index is saved
        new = _on_meta(lambda: fnn.WindowAttention(old.qkv.in_features, (wh, ww), heads,
                                                   qkv_bias=old.qkv.bias is not None, qk_scale=scale,
                                                   head_dim=head_dim))
    new.qkv, new.proj = old.qkv, old.proj
    new.relative_position_bias_table = table
    if isinstance(getattr(old, "proj_drop", None), nn.Module):
        new.proj_drop = old.proj_drop
    new._buffers["relative_position_index"] = index
    note = ("core op: the block around it keeps its own shift, pad and partition (timm rolls before "
            "padding, the fused path follows torchvision's order)")
    return _mode_of(old, _no_meta_left(new, "WindowAttention")), note


def _shifted_window_attention(old: nn.Module, site: Optional[Site] = None) -> Result:
    if not _window_attention_like(old) or _is_fastnote(old):
        return None
    table = getattr(old, "relative_position_bias_table", None)
    index = old._buffers.get("relative_position_index")
    if table is None or index is None:
        return _v2_reason(old) if hasattr(old, "shift_size") else None
    if index.dim() != 1:
        return None
    if not hasattr(old, "shift_size"):
        return "flat relative position index without shift_size: not torchvision's ShiftedWindowAttention"
    wh, ww = _window_pair(old.window_size)
    sh, sw = _window_pair(old.shift_size)
    if wh != ww:
        return f"rectangular window {old.window_size}: the fused path takes square windows"
    if sh != sw:
        return f"unequal shifts {old.shift_size}: the fused path takes one shift for both axes"
    p = _dropout_p(old, "attention_dropout")
    if p > 0:
        return f"attention dropout p={p} > 0: the kernels implement no dropout on the attention probabilities"
    C, heads = old.qkv.in_features, old.num_heads
    if old.qkv.out_features != 3 * C or old.proj.in_features != C or C % heads:
        return "qkv / proj widths do not match dim and num_heads"
    new = _on_meta(lambda: TorchvisionShiftedWindowAttention(
        C, [wh, ww], [sh, sw], heads, qkv_bias=old.qkv.bias is not None, proj_bias=old.proj.bias is not None,
        dropout=_dropout_p(old, "dropout")))
    new.qkv, new.proj = old.qkv, old.proj
    new.relative_position_bias_table = table
    new._buffers["relative_position_index"] = index
    note = "fused: pad, shift, partition, attention, reverse"
    return _mode_of(old, _no_meta_left(new, "ShiftedWindowAttention")), note


def _timm_swin_block(old: nn.Module, site: Optional[Site] = None) -> Result:
    """timm's ``SwinTransformerBlock`` (its class, not a look-alike: the fused path replaces the
    block's private ``_attn``) -> the same block on fastnote's fused path in timm's order."""
    cls = type(old)
    if cls.__name__ != "SwinTransformerBlock" or not cls.__module__.startswith("timm.") \
            or not callable(getattr(old, "_attn", None)):
        return None
    attn = getattr(old, "attn", None)
    ws, shift = tuple(getattr(old, "window_size", ())), tuple(getattr(old, "shift_size", ()))
    if attn is None or _is_fastnote(attn) or not _window_attention_like(attn) \
            or getattr(getattr(attn, "relative_position_index", None), "shape", None) != (ws[0] * ws[-1],) * 2:
        return ("timm Swin block whose attn is not timm's WindowAttention (or is already fastnote's core op): "
                "left on the block's own path")
    if len(ws) != 2 or ws[0] != ws[1] or len(shift) != 2 or shift[0] != shift[1]:
        return (f"timm Swin block with window {ws} and shift {shift}: the fused path takes square windows and "
                f"equal shifts (its attention core is still replaced)")
    dim = old.norm1.normalized_shape[-1] if hasattr(old.norm1, "normalized_shape") else attn.qkv.in_features
    if tuple(attn.qkv.weight.shape) != (3 * dim, dim) or tuple(attn.proj.weight.shape) != (dim, dim):
        return "timm Swin block whose attention width differs from the block's (head_dim set): fused path not used"
    if _dropout_p(attn, "attn_drop") > 0:
        return "timm Swin block with attention dropout: the fused path has none"
    # a class, not a module: the block itself is switched to it in place (the engine's _Patcher.reclass), so
    # what changes the block later (timm's set_input_size) changes what unpatch gives back
    return fused_block_class(cls), ("roll, pad, partition and their reverse fused into the attention (timm's "
                                    "order: roll, then pad)")


register("WindowAttention", (_window_attention,))
register("ShiftedWindowAttention", (_shifted_window_attention, _timm_swin_block))
