"""Hugging Face transformers' Swin (``SwinLayer``) and Swin V2 (``Swinv2Layer``) blocks on
fastnote's fused window attention.

``fused_layer_class(cls)`` gives a subclass of the library's block class whose ``forward`` runs the
block's windowed attention (pad, roll, partition, attention with the relative position bias and the
shift mask, output projection, reverse, roll back, crop) as one fused op, in the library's order
(pad, then roll: ``roll_first=False``), on the block's own parameters:

- ``SwinLayer`` -> ``fastnote.swin_window_attention``: ``q_proj``, ``k_proj``, ``v_proj`` are
  concatenated into one ``[3C, C]`` weight per call (their gradients flow back through the
  concatenation), ``o_proj`` is the projection, the table and index come from the attention's
  ``relative_position_bias``; the scale is the attention's ``scaling``.
- ``Swinv2Layer`` -> ``fastnote.swin_window_attention_v2``: ``query``, ``key`` (no bias),
  ``value``; the table is ``16 * sigmoid(continuous_position_bias_mlp(relative_coords_table))``;
  ``logit_scale`` as it is; the projection is ``attention.output.dense``. The library adds the
  shift mask twice in its V2 attention (so -200 across regions): the block's ``_fastnote_mask_value``
  (set by ``fastnote.patch`` from a probe of the attention) carries the value.

The rest of each block (norms, residuals, drop path, MLP, dropouts) runs as the library writes it.
Same submodules, parameters and state_dict; ``fastnote.patch`` switches a block's class in place.

The library's own ``forward`` runs instead (same results, nothing fused) where the fused op would
not compute what it does: attention weights requested (``output_attentions``), attention dropout
active in training, a window that no longer matches the position table (V1 shrinks its window to a
small input), a shifted block on a map whose padded side equals the window (the library rolls
there; the fused op, following torchvision, drops the shift along such an axis), and a V1 attention
backend other than eager or sdpa selected after patching (``config._attn_implementation``: a
function registered with transformers' ``AttentionInterface`` may compute something else), and an
attention module or projection changed after patching (a LoRA layer, another class, a hook:
``fastnote.nn._reads``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from ..ops.window_attention import swin_window_attention
from ..ops.window_attention_v2 import swin_window_attention_v2
from ._reads import LINEAR, compile_reads, intact

HF_SWIN_V2_MASK_VALUE = -200.0   # the library's V2 attention adds its -100 mask twice
# The V1 attention's backends (``config._attn_implementation``, transformers' ``AttentionInterface``)
# that compute softmax(q k^T * scaling + bias + mask) v, the fused op's maths. Any other (a function
# a user registered) may compute something else: the library's forward runs it.
HF_PLAIN_ATTENTION = (None, "eager", "sdpa")
HF_SWIN_MODULES = {1: "transformers.models.swin.modeling_swin", 2: "transformers.models.swinv2.modeling_swinv2"}


def hf_attention_backend(config) -> Optional[str]:
    """The attention backend a V1 block's config selects (None where the config has no such setting)."""
    return getattr(config, "_attn_implementation", None)


def _padded(n: int, ws: int) -> int:
    return -(-n // ws) * ws


def _shift_ok(height: int, width: int, ws: int, shift: int) -> bool:
    """Whether the fused op rolls as the library does: with a shift, both padded sides exceed the window."""
    return shift == 0 or (_padded(height, ws) > ws and _padded(width, ws) > ws)


def _cat_bias(*biases: Optional[Tensor]) -> Optional[Tensor]:
    if all(b is None for b in biases):
        return None
    like = next(b for b in biases if b is not None)
    return torch.cat([b if b is not None else torch.zeros_like(like) for b in biases])


class _FusedSwinLayer:
    """``forward`` of a fused ``SwinLayer`` (transformers' Swin V1 block)."""

    _fastnote_fused_children = ("attention",)   # read by fastnote.patch: the block uses attention's parameters
    # what the fused path reads without calling (fastnote.nn._reads), checked by fastnote.patch and on every call
    _fastnote_reads = (("attention", (HF_SWIN_MODULES[1], "SwinAttention.forward")),
                       ("attention.relative_position_bias", (HF_SWIN_MODULES[1], "SwinRelativePositionBias.forward")),
                       ("attention.q_proj", LINEAR), ("attention.k_proj", LINEAR), ("attention.v_proj", LINEAR),
                       ("attention.o_proj", LINEAR))

    def forward(self, hidden_states, input_dimensions, always_partition: bool = False, **kwargs):
        if not always_partition:
            self.set_shift_and_window_size(input_dimensions)
        attn = self.attention
        rpb = attn.relative_position_bias
        height, width = (int(d) for d in input_dimensions)
        ws, shift = self.window_size, self.shift_size
        wants_weights = kwargs.get("output_attentions") or getattr(attn.config, "output_attentions", False)
        if (wants_weights or (attn.training and attn.attention_dropout > 0) or not isinstance(ws, int)
                or tuple(rpb.window_size) != (ws, ws) or not _shift_ok(height, width, ws, int(shift))
                or hf_attention_backend(attn.config) not in HF_PLAIN_ATTENTION
                or not intact(self, self._fastnote_compiled_reads)):
            return super().forward(hidden_states, input_dimensions, always_partition=True, **kwargs)
        batch_size, _, channels = hidden_states.shape
        shortcut = hidden_states
        x = self.layernorm_before(hidden_states).view(batch_size, height, width, channels)
        n = ws * ws
        out = swin_window_attention(
            x, torch.cat((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)),
            _cat_bias(attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias), attn.o_proj.weight, attn.o_proj.bias,
            rpb.relative_position_bias_table, ws, attn.num_attention_heads, shift_size=int(shift),
            relative_position_index=rpb.relative_position_index.view(n, n), scale=attn.scaling, roll_first=False)
        out = self.dropout(out).view(batch_size, height * width, channels)
        hidden_states = shortcut + self.drop_path(out)
        residual = hidden_states
        hidden_states = self.dropout(self.mlp(self.layernorm_after(hidden_states))) + residual
        return hidden_states, None


class _FusedSwinv2Layer:
    """``forward`` of a fused ``Swinv2Layer`` (transformers' Swin V2 block, post-norm)."""

    _fastnote_fused_children = ("attention",)
    _fastnote_mask_value = HF_SWIN_V2_MASK_VALUE
    _fastnote_reads = (("attention", (HF_SWIN_MODULES[2], "Swinv2Attention.forward")),
                       ("attention.self", (HF_SWIN_MODULES[2], "Swinv2SelfAttention.forward")),
                       ("attention.output", (HF_SWIN_MODULES[2], "Swinv2SelfOutput.forward")),
                       ("attention.self.query", LINEAR), ("attention.self.key", LINEAR),
                       ("attention.self.value", LINEAR), ("attention.output.dense", LINEAR))

    def forward(self, hidden_states, input_dimensions, output_attentions: Optional[bool] = False):
        sa = self.attention.self
        height, width = (int(d) for d in input_dimensions)
        ws, shift = self.window_size, self.shift_size
        if (output_attentions or (sa.training and sa.dropout.p > 0)
                or tuple(sa.window_size) != (ws, ws) or not _shift_ok(height, width, ws, int(shift))
                or not intact(self, self._fastnote_compiled_reads)):
            return super().forward(hidden_states, input_dimensions, output_attentions)
        batch_size, _, channels = hidden_states.shape
        shortcut = hidden_states
        heads = sa.num_attention_heads
        table = 16 * torch.sigmoid(sa.continuous_position_bias_mlp(sa.relative_coords_table).view(-1, heads))
        dense = self.attention.output.dense
        out = swin_window_attention_v2(
            hidden_states.view(batch_size, height, width, channels),
            torch.cat((sa.query.weight, sa.key.weight, sa.value.weight)), sa.query.bias, sa.value.bias,
            dense.weight, dense.bias, sa.logit_scale, table, ws, heads, shift_size=int(shift),
            relative_position_index=sa.relative_position_index, mask_value=self._fastnote_mask_value,
            roll_first=False)
        out = self.attention.output.dropout(out).view(batch_size, height * width, channels)
        hidden_states = shortcut + self.drop_path(self.layernorm_before(out))
        layer_output = self.output(self.intermediate(hidden_states))
        layer_output = hidden_states + self.drop_path(self.layernorm_after(layer_output))
        return (layer_output,)


_FUSED: Dict[type, type] = {}


def fused_layer_class(cls: type, version: int) -> type:
    """The fused subclass of transformers' Swin block class ``cls`` (``version`` 1: ``SwinLayer``,
    2: ``Swinv2Layer``), made once per class."""
    if cls not in _FUSED:
        mixin = _FusedSwinLayer if version == 1 else _FusedSwinv2Layer
        name = "Fused" + cls.__name__
        doc = f"transformers' {cls.__name__} on fastnote's fused window attention."
        _FUSED[cls] = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name, "__doc__": doc,
                                                "_fastnote_compiled_reads": compile_reads(mixin._fastnote_reads)})
    return _FUSED[cls]


def __getattr__(name: str):
    # Resolves the names pickling records (FusedSwinLayer, FusedSwinv2Layer) without importing
    # transformers when fastnote is imported.
    if name == "FusedSwinLayer":
        from transformers.models.swin.modeling_swin import SwinLayer

        return fused_layer_class(SwinLayer, 1)
    if name == "FusedSwinv2Layer":
        from transformers.models.swinv2.modeling_swinv2 import Swinv2Layer

        return fused_layer_class(Swinv2Layer, 2)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
