"""Hugging Face transformers' Swin and Swin V2 blocks (family ``hf_swin``).

Where it hooks: the block. ``SwinLayer`` / ``Swinv2Layer`` (the layer that pads, rolls, partitions,
calls the attention with the shift mask, reverses, rolls back and crops) has its class switched in
place to ``fastnote.nn.hf_swin``'s fused subclass, whose ``forward`` runs that whole windowed
attention section as ``fastnote.swin_window_attention`` (V1) or ``swin_window_attention_v2`` (V2)
on the block's own parameters: same submodules, parameter objects and state_dict keys, and the
walk does not go into the block's ``attention`` (the fused forward reads it). Chosen over

- an attention-level swap on the core op: the block would still pad, roll and partition into
  copies, and the V1 attention receives the bias already summed with the shift mask;
- a ``"fastnote"`` entry in transformers' attention-function registry (``AttentionInterface``;
  this version's V1 attention calls it, V2's does not): the function gets q, k, v already
  partitioned and one dense ``[B*nW, heads, N, N]`` bias-plus-mask tensor, so neither the copies
  nor that tensor would go; and it is chosen through the model's shared config.

Recognised by structure: the block's submodules and attributes (``attention`` with ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj`` and ``relative_position_bias`` for V1; ``attention.self`` with
``query``, ``key`` (no bias), ``value``, ``logit_scale``, ``continuous_position_bias_mlp``,
``relative_coords_table`` and ``attention.output.dense`` for V2; norms, MLP, ``window_size``,
``shift_size``), and, since the fused forward replaces the block's, a ``forward`` that is the
library's own (a subclass that overrides it, or a copy of the class elsewhere, is left with its
reason). For V2 a probe of the attention (zeros in, a -1/0 mask, its attention weights out)
measures how often the library adds the shift mask: twice in this version (-200 across regions),
the value the fused op is given.

Left, with the reason (reported at the block's attention, the module that looks like attention):
attention dropout > 0 (the kernels have none), a V2 key projection with a bias, a layout or
forward that is not the library's (or whose parameters are not those the fused forward is written
for: another transformers version), a V1 attention backend other than eager or sdpa
(``config._attn_implementation``: a function registered with ``AttentionInterface`` may compute
anything). At run time the fused block hands over to the library's
``forward`` where the result would differ (attention weights requested, see ``fastnote.nn.hf_swin``).
"""
from __future__ import annotations

import copy
import inspect
import weakref
from typing import Optional, Tuple

import torch
from torch import nn

from ..nn.hf_swin import (HF_PLAIN_ATTENTION, HF_SWIN_MODULES, HF_SWIN_V2_MASK_VALUE, _FusedSwinLayer,
                          _FusedSwinv2Layer, fused_layer_class, hf_attention_backend)
from .probe import PROBE_TOLERANCE, _bypassed_forward_reason, _forward_is, _hook_reason, _is_fastnote
from .registry import Result, Site, register

_V1_MODULE, _V2_MODULE = HF_SWIN_MODULES[1], HF_SWIN_MODULES[2]

# attention module of a block left by the block converter -> the reason, reported when the walk
# reaches that attention (one entry, at the module that looks like attention)
_LEFT: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def _modules_at(m, *names) -> bool:
    """A module at each of ``names``: the library's nn.Linear, or what was put in its place (peft's
    LoRA layer, a quantised layer), which ``_bypassed_forward_reason`` then reports."""
    return all(isinstance(getattr(m, n, None), nn.Module) for n in names)


def _library_forward(cls: type, module_name: str, class_name: str, fused_forward) -> Optional[str]:
    """None if ``cls.forward`` is the library's ``class_name.forward`` with the parameters the fused
    ``forward`` is written for, else the reason. (transformers 4.x's ``Swinv2Layer.forward`` also
    takes ``head_mask``, positionally: the fused forward would take it for another argument.)"""
    if not _forward_is(cls, module_name, f"{class_name}.forward"):
        return (f"{cls.__name__} has the structure of transformers' {class_name} but not its forward: the fused "
                f"path replaces that forward, so it is not used")
    theirs, ours = (inspect.signature(f).parameters.values() for f in (cls.forward, fused_forward))
    if not _takes_the_same_calls(list(theirs), list(ours)):
        return (f"this transformers version's {class_name}.forward takes ({', '.join(p.name for p in theirs)}); "
                f"the fused forward is written for ({', '.join(p.name for p in ours)})")
    return None


# modules the fused layers read the parameters of and never call: (path in the layer, the forward
# the fused maths is written from), per version; the fused layers check them again on every call
_BYPASSED = {1: _FusedSwinLayer._fastnote_reads, 2: _FusedSwinv2Layer._fastnote_reads}


def _takes_the_same_calls(theirs, ours) -> bool:
    """Whether a forward with parameters ``ours`` takes every call the library's (``theirs``) takes,
    as the library does: the same positional parameters in the same order, and its keyword-only
    ones (or any, when it takes ``**kwargs``)."""
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                  inspect.Parameter.VAR_POSITIONAL)
    if [(p.name, p.kind) for p in theirs if p.kind in positional] != \
            [(p.name, p.kind) for p in ours if p.kind in positional]:
        return False
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ours)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in theirs) and not any_keyword:
        return False
    named = {p.name for p in ours if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return any_keyword or all(p.name in named for p in theirs if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _version(m: nn.Module) -> int:
    """1 or 2 when ``m`` has the structure of transformers' SwinLayer / Swinv2Layer, else 0."""
    if not (isinstance(getattr(m, "attention", None), nn.Module) and isinstance(getattr(m, "layernorm_before", None),
                                                                                nn.LayerNorm)
            and isinstance(getattr(m, "layernorm_after", None), nn.LayerNorm) and hasattr(m, "window_size")
            and hasattr(m, "shift_size") and hasattr(m, "drop_path") and callable(getattr(m, "maybe_pad", None))
            and callable(getattr(m, "get_attn_mask", None))):
        return 0
    attn = m.attention
    rpb = getattr(attn, "relative_position_bias", None)
    if (_modules_at(attn, "q_proj", "k_proj", "v_proj", "o_proj") and rpb is not None
            and isinstance(getattr(rpb, "relative_position_bias_table", None), nn.Parameter)
            and isinstance(getattr(m, "mlp", None), nn.Module) and isinstance(getattr(m, "dropout", None), nn.Dropout)
            and callable(getattr(m, "set_shift_and_window_size", None))):
        return 1
    sa, out = getattr(attn, "self", None), getattr(attn, "output", None)
    if (sa is not None and out is not None and _modules_at(sa, "query", "key", "value") and _modules_at(out, "dense")
            and isinstance(getattr(sa, "logit_scale", None), nn.Parameter)
            and isinstance(getattr(sa, "continuous_position_bias_mlp", None), nn.Module)
            and getattr(sa, "relative_coords_table", None) is not None
            and getattr(sa, "relative_position_index", None) is not None
            and isinstance(getattr(m, "intermediate", None), nn.Module) and isinstance(getattr(m, "output", None),
                                                                                        nn.Module)):
        return 2
    return 0


def _v1_reason(m: nn.Module) -> Optional[str]:
    reason = _library_forward(type(m), _V1_MODULE, "SwinLayer", _FusedSwinLayer.forward)
    if reason:
        return reason
    attn = m.attention
    rpb = attn.relative_position_bias
    ws, heads = m.window_size, attn.num_attention_heads
    C = attn.q_proj.in_features
    if not isinstance(ws, int) or tuple(rpb.window_size) != (ws, ws):
        return f"window {ws} does not match the position table's {tuple(rpb.window_size)}"
    if rpb.relative_position_index.numel() != (ws * ws) ** 2 or \
            tuple(rpb.relative_position_bias_table.shape) != ((2 * ws - 1) ** 2, heads):
        return "relative position table or index does not match window_size and num_heads"
    if any(tuple(p.weight.shape) != (C, C) for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)) \
            or C % heads or attn.head_dim != C // heads:
        return "q / k / v / o projection widths do not split into num_heads heads of the block's width"
    if float(attn.attention_dropout) > 0:
        return (f"attention dropout p={attn.attention_dropout} > 0: the kernels implement no dropout on the "
                f"attention probabilities")
    if abs(float(attn.scaling) - attn.head_dim ** -0.5) > 1e-12 * attn.head_dim ** -0.5:
        return f"scaling {attn.scaling} is not head_dim ** -0.5"
    backend = hf_attention_backend(getattr(attn, "config", None))
    if backend not in HF_PLAIN_ATTENTION:
        return (f"attention backend {backend!r} (config._attn_implementation): the fused op computes eager / "
                f"sdpa attention, and a registered attention function may compute something else")
    return None


def _v2_mask_count(sa: nn.Module, ws: int) -> Optional[float]:
    """How many times the V2 attention adds the mask it is given (1 or 2), or None: zeros in (so
    q.k is 0 without a key bias), a [1, N, N] mask of 0 / -1, its attention weights compared with
    softmax(16 sigmoid(bias) + c * mask)."""
    w = sa.query.weight
    n, heads = ws * ws, sa.num_attention_heads
    tol = PROBE_TOLERANCE.get(w.dtype)
    if tol is None or w.is_meta:
        return None
    if w.dtype == torch.float16:
        # F.normalize's eps (1e-12) is 0 in fp16, so the zero key gives NaN: probe an fp32 copy
        sa, tol = copy.deepcopy(sa).float(), PROBE_TOLERANCE[torch.float32]
        w = sa.query.weight
    with torch.no_grad():
        x = torch.zeros(1, n, sa.query.in_features, device=w.device, dtype=w.dtype)
        mask = -(torch.arange(n, device=w.device) % 2).to(w.dtype).expand(1, n, n)
        try:
            probs = sa.forward(x, mask, output_attentions=True)[1]   # its own hooks not run
        except Exception:   # noqa: BLE001 - a forward of another signature: not the library's attention
            return None
        table = 16 * torch.sigmoid(sa.continuous_position_bias_mlp(sa.relative_coords_table).view(-1, heads))
        bias = table[sa.relative_position_index.view(-1)].view(n, n, heads).permute(2, 0, 1).float()
        for count in (2.0, 1.0):
            expected = torch.softmax(bias + count * mask.float(), dim=-1)
            if probs.shape[-3:] == expected.shape and torch.allclose(probs[0].float(), expected, atol=tol, rtol=tol):
                return count
    return None


def _v2_reason(m: nn.Module) -> Tuple[Optional[str], float]:
    reason = _library_forward(type(m), _V2_MODULE, "Swinv2Layer", _FusedSwinv2Layer.forward)
    if reason:
        return reason, 0.0
    sa, dense = m.attention.self, m.attention.output.dense
    ws, heads = m.window_size, sa.num_attention_heads
    C = sa.query.in_features
    if not isinstance(ws, int) or tuple(sa.window_size) != (ws, ws):
        return f"window {ws} does not match the attention's {tuple(sa.window_size)}", 0.0
    if tuple(sa.relative_position_index.shape) != (ws * ws, ws * ws) or tuple(sa.logit_scale.shape) != (heads, 1, 1):
        return "relative position index or logit_scale does not match window_size and num_heads", 0.0
    if any(tuple(p.weight.shape) != (C, C) for p in (sa.query, sa.key, sa.value, dense)) or C % heads:
        return "query / key / value / output widths do not split into num_heads heads of the block's width", 0.0
    if sa.key.bias is not None:
        return "key projection with a bias: Swin V2's fused path takes cat(q_bias, 0, v_bias)", 0.0
    if (sa.query.bias is None) != (sa.value.bias is None):
        return "query and value projections must both have a bias or neither", 0.0
    if sa.dropout.p > 0:
        return (f"attention dropout p={sa.dropout.p} > 0: the kernels implement no dropout on the attention "
                f"probabilities"), 0.0
    count = _v2_mask_count(sa, ws)
    if count is None:
        return "the attention's probe does not match Swin V2 cosine attention with an additive shift mask", 0.0
    return None, count


def _hf_swin_layer(old: nn.Module, site: Optional[Site] = None) -> Result:
    if _is_fastnote(old):
        return None
    version = _version(old)
    if version == 0:
        return None
    # hooks, and modules the fused layer bypasses that have a forward of their own, first: the V2
    # probe runs the attention, and the fused layer would never call it
    hooked = (_hook_reason(old.attention, "Swin layer", "the fused path reads the attention's parameters and calls "
                           "none of its modules, so the hook would stop running")
              or _bypassed_forward_reason(old, _BYPASSED[version]))
    attention = old.attention if version == 1 else old.attention.self
    if hooked is not None:
        reason, count = hooked, 1.0
    elif version == 1:
        reason, count = _v1_reason(old), 1.0
    else:
        reason, count = _v2_reason(old)
    if reason is not None:
        _LEFT[attention] = reason   # reported where the walk meets the attention
        return None
    cls = fused_layer_class(type(old), version)
    if version == 2 and -100.0 * count != HF_SWIN_V2_MASK_VALUE:
        old._fastnote_mask_value = -100.0 * count
    op = "swin_window_attention" if version == 1 else "swin_window_attention_v2"
    return cls, f"pad, roll, partition, attention, reverse fused ({op}, the library's order: pad, then roll)"


def _left_attention(old: nn.Module, site: Optional[Site] = None) -> Result:
    """The attention of a block the converter above left: its reason, once."""
    return _LEFT.pop(old, None)


register("hf_swin", (_hf_swin_layer, _left_attention))
