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
- Swin V2 (cosine similarity, ``logit_scale``, the ``cpb_mlp`` continuous position bias), in the
  same two families: timm's ``swin_transformer_v2.WindowAttention`` -> ``fastnote.nn.WindowAttentionV2``
  (the core op, "WindowAttention"); torchvision's ``ShiftedWindowAttentionV2`` -> fastnote's, fused
  in torchvision's order, and timm's ``SwinTransformerV2Block`` -> the same block switched to
  ``fastnote.nn.timm_swin.FusedSwinTransformerV2Block``, fused in timm's order
  ("ShiftedWindowAttention"). What does not fit (a rectangular window or unequal shifts on the
  fused paths, attention dropout, another layout) is left with its reason.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import nn

from .. import nn as fnn
from ..nn.timm_swin import (TimmWindowAttention, _FusedAttention, _FusedAttentionV2, fused_block_class,
                            fused_v2_block_class)
from ..nn.torchvision_swin import TorchvisionShiftedWindowAttention
from .probe import (_bypassed_forward_reason, _is_fastnote, _leave_if_hooked, _linears_reason, _mode_of, _no_meta_left,
                    _on_meta)
from .registry import Result, Site, register


def _window_pair(ws) -> Tuple[int, int]:
    return tuple(int(w) for w in ws) if isinstance(ws, (tuple, list)) else (int(ws), int(ws))


def _dropout_p(m, name) -> float:
    d = getattr(m, name, 0.0)
    return float(d.p if isinstance(d, nn.Dropout) else d or 0.0)


def _window_attention_like(m: nn.Module) -> bool:
    # qkv and proj any module: a LoRA wrapper (peft's) or a quantised layer in their place is then
    # reported (_linears_reason) before anything reads their widths
    return (isinstance(getattr(m, "qkv", None), nn.Module) and isinstance(getattr(m, "proj", None), nn.Module)
            and isinstance(getattr(m, "num_heads", None), int) and hasattr(m, "window_size"))


def _is_v2(m: nn.Module) -> bool:
    return hasattr(m, "cpb_mlp") or hasattr(m, "logit_scale")


def _v2_layout_reason(m: nn.Module, index_dim: int) -> Optional[str]:
    """Why a Swin V2 attention module is not in the layout the drop-ins take (timm's: index_dim 2,
    torchvision's: 1), or None. Parameters, buffers and widths only; the caller checks dropout and
    the window shape its path needs."""
    what = "Swin V2 attention (cosine similarity, continuous position bias)"
    index = m._buffers.get("relative_position_index")
    coords = m._buffers.get("relative_coords_table")
    mlp, scale, heads = getattr(m, "cpb_mlp", None), getattr(m, "logit_scale", None), m.num_heads
    if index is None or coords is None or not isinstance(mlp, nn.Sequential) or not isinstance(scale, nn.Parameter):
        return (f"{what} without relative_position_index, relative_coords_table, a cpb_mlp and a logit_scale "
                f"parameter: not timm's or torchvision's layout")
    if index.dim() != index_dim:
        return f"{what}: relative_position_index of {index.dim()} dims, not this layout's {index_dim}"
    last = mlp[-1] if len(mlp) else None
    if not isinstance(last, nn.Linear) or last.out_features != heads or tuple(scale.shape) != (heads, 1, 1):
        return f"{what}: cpb_mlp output or logit_scale does not match num_heads={heads}"
    wh, ww = _window_pair(m.window_size)
    if tuple(coords.shape) != (1, 2 * wh - 1, 2 * ww - 1, 2) or index.numel() != (wh * ww) ** 2:
        return f"{what}: relative_coords_table or relative_position_index does not match window_size {m.window_size}"
    dim = m.qkv.in_features
    if tuple(m.qkv.weight.shape) != (3 * dim, dim) or tuple(m.proj.weight.shape) != (dim, dim) or dim % heads:
        return f"{what}: qkv / proj widths do not match dim and num_heads"
    return None


def _timm_v2_reason(m: nn.Module) -> Optional[str]:
    """Why ``m`` is not timm's Swin V2 ``WindowAttention`` as ``WindowAttentionV2.from_timm`` takes
    it (or None)."""
    reason = _v2_layout_reason(m, 2)
    if reason is not None:
        return reason
    if m.qkv.bias is not None or not all(hasattr(m, a) for a in ("q_bias", "v_bias", "dim", "qkv_bias_separate",
                                                                  "pretrained_window_size")):
        return ("Swin V2 attention with a qkv bias of its own, or without timm's q_bias / v_bias, dim, "
                "qkv_bias_separate and pretrained_window_size: not timm's layout")
    if (m.q_bias is None) != (m.v_bias is None) or m.dim != m.qkv.in_features:
        return "Swin V2 attention with one of q_bias / v_bias, or dim unlike qkv's width: not timm's layout"
    p = _dropout_p(m, "attn_drop")
    if p > 0:
        return f"attention dropout p={p} > 0: the kernels implement no dropout on the attention probabilities"
    return None


def _timm_v2_attention(old: nn.Module) -> Result:
    reason = _linears_reason(old, "qkv", "proj") or _timm_v2_reason(old)
    if reason is not None:
        return reason
    note = "core op (cosine attention): the block around it keeps its own shift, pad and partition"
    return fnn.WindowAttentionV2.from_timm(old), note


def _torchvision_geometry_reason(old: nn.Module) -> Optional[str]:
    """Why torchvision's (V1 or V2) shifted window attention cannot take the fused path, or None:
    its window and shift must be square, its attention dropout 0."""
    wh, ww = _window_pair(old.window_size)
    sh, sw = _window_pair(old.shift_size)
    if wh != ww:
        return f"rectangular window {old.window_size}: the fused path takes square windows"
    if sh != sw:
        return f"unequal shifts {old.shift_size}: the fused path takes one shift for both axes"
    p = _dropout_p(old, "attention_dropout")
    if p > 0:
        return f"attention dropout p={p} > 0: the kernels implement no dropout on the attention probabilities"
    return None


def _torchvision_v2_attention(old: nn.Module) -> Result:
    reason = _linears_reason(old, "qkv", "proj") or _v2_layout_reason(old, 1)
    if reason is not None:
        return reason
    reason = _torchvision_geometry_reason(old)
    if reason is not None:
        return reason
    if not hasattr(old, "dropout"):
        return "Swin V2 attention without torchvision's dropout attribute: not torchvision's layout"
    note = "fused (cosine attention): pad, shift, partition, attention, reverse"
    return fnn.ShiftedWindowAttentionV2.from_torchvision(old), note


def _window_attention(old: nn.Module, site: Optional[Site] = None) -> Result:
    if not _window_attention_like(old) or _is_fastnote(old):
        return None
    table = getattr(old, "relative_position_bias_table", None)
    index = old._buffers.get("relative_position_index")
    if index is not None and index.dim() == 1:
        return None  # torchvision's layout: _shifted_window_attention
    if table is None or index is None:
        return _timm_v2_attention(old) if _is_v2(old) else None
    if index.dim() != 2:
        return None
    wh, ww = _window_pair(old.window_size)
    heads = old.num_heads
    if tuple(table.shape) != ((2 * wh - 1) * (2 * ww - 1), heads) or tuple(index.shape) != (wh * ww, wh * ww):
        return "relative position table or index does not match window_size and num_heads"
    reason = _linears_reason(old, "qkv", "proj")
    if reason is not None:
        return reason
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
        return _torchvision_v2_attention(old) if _is_v2(old) and hasattr(old, "shift_size") else None
    if index.dim() != 1:
        return None
    if not hasattr(old, "shift_size"):
        return "flat relative position index without shift_size: not torchvision's ShiftedWindowAttention"
    reason = _linears_reason(old, "qkv", "proj") or _torchvision_geometry_reason(old)
    if reason is not None:
        return reason
    C, heads = old.qkv.in_features, old.num_heads
    if old.qkv.out_features != 3 * C or old.proj.in_features != C or C % heads:
        return "qkv / proj widths do not match dim and num_heads"
    new = _on_meta(lambda: TorchvisionShiftedWindowAttention(
        C, list(_window_pair(old.window_size)), list(_window_pair(old.shift_size)), heads,
        qkv_bias=old.qkv.bias is not None, proj_bias=old.proj.bias is not None,
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
    reason = _bypassed_forward_reason(old, _FusedAttention._fastnote_reads)
    if reason is not None:
        return f"timm Swin block, fused path not used: {reason}"
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


def _timm_swin_v2_block(old: nn.Module, site: Optional[Site] = None) -> Result:
    """timm's ``SwinTransformerV2Block`` (its class: the fused path replaces the block's private
    ``_attn``) -> the same block on fastnote's fused V2 path in timm's order. A block left here
    still has its attention core replaced (``_window_attention``) where that fits."""
    cls = type(old)
    if cls.__name__ != "SwinTransformerV2Block" or not cls.__module__.startswith("timm.") \
            or not callable(getattr(old, "_attn", None)):
        return None
    attn = getattr(old, "attn", None)
    if attn is None or _is_fastnote(attn) or not _window_attention_like(attn) or not _is_v2(attn):
        return ("timm Swin V2 block whose attn is not timm's V2 WindowAttention (or is already fastnote's core op): "
                "left on the block's own path")
    reason = _bypassed_forward_reason(old, _FusedAttentionV2._fastnote_reads) or _timm_v2_reason(attn)
    if reason is not None:
        return f"timm Swin V2 block, fused path not used: {reason}"
    ws, shift = tuple(getattr(old, "window_size", ())), tuple(getattr(old, "shift_size", ()))
    if len(ws) != 2 or ws[0] != ws[1] or len(shift) != 2 or shift[0] != shift[1]:
        return (f"timm Swin V2 block with window {ws} and shift {shift}: the fused path takes square windows and "
                f"equal shifts (its attention core is still replaced)")
    if _window_pair(attn.window_size) != ws:
        return f"timm Swin V2 block whose attn window {attn.window_size} is not the block's {ws}: fused path not used"
    dim = old.norm1.normalized_shape[-1] if hasattr(old.norm1, "normalized_shape") else attn.qkv.in_features
    if attn.qkv.in_features != dim:
        return "timm Swin V2 block whose attention width differs from the block's: fused path not used"
    # switched in place, as V1's block: a later set_input_size changes what unpatch gives back
    return fused_v2_block_class(cls), ("cosine attention with roll, pad, partition and their reverse fused (timm's "
                                       "order: roll, then pad)")


# The block converters switch a block's class: the engine checks the children they read itself
# (``_fastnote_fused_children``) for hooks.
register("WindowAttention", (_leave_if_hooked(_window_attention),))
register("ShiftedWindowAttention", (_leave_if_hooked(_shifted_window_attention), _timm_swin_block, _timm_swin_v2_block))
