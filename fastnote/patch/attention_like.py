"""Attention that no family recognises is reported under "left", not passed over.

A module looks like attention when

1. it is torch's ``nn.MultiheadAttention``; or
2. it holds a position bias by one of the names the published vision transformers use: a
   parameter, buffer, submodule or plain attribute (not None) named
   ``relative_position_bias_table``, ``relative_position_bias`` or ``cpb_mlp``; or
3. it has query/key/value projections as child modules: ``q``, ``k``, ``v``; ``q_proj``,
   ``k_proj``, ``v_proj``; ``query``, ``key``, ``value``; SAGAN's ``query_conv``, ``key_conv``,
   ``value_conv``; or one fused ``qkv``, together with a softmax: an ``nn.Softmax`` child, or a
   ``forward`` (the one Python resolves for the class) whose code uses a name containing
   "softmax" or "attention" (``F.softmax``, ``torch.softmax``, ``x.softmax``,
   ``F.scaled_dot_product_attention``, an attention function looked up by name): names the code
   calls or reads, not its argument names or comments.

The projection names alone already keep plain MLP blocks out (``fc1``, ``fc2``: no query, key or
value); the softmax keeps out a module that only projects (returns q, k and v for its parent to
use). Such a module, when neither converted nor left with a reason by a converter, is reported as
``Left(path, "attention", "attention-like module not recognised: <ClassName> (...)")`` if one of
the attention families (``WindowAttention``, ``ShiftedWindowAttention``, ``SelfAttention``) is
patched and no attention family's converter, included or not, claims it (one left out by
``include`` is excluded, not unrecognised).

One entry per module: inside a left attention-like module (reported here, or left with a reason
by a converter), no descendant is reported here again, but the walk still goes in and the
families still replace what they recognise there (a squeeze-excitation inside one is replaced as
anywhere else).
"""
from __future__ import annotations

import functools
import inspect
import re
from typing import Optional

from torch import nn

from .registry import register_reporter

_BIAS_NAMES = ("relative_position_bias_table", "relative_position_bias", "cpb_mlp")
_PROJECTIONS = (("q", "k", "v"), ("q_proj", "k_proj", "v_proj"), ("query", "key", "value"),
                ("query_conv", "key_conv", "value_conv"), ("qkv",))
_SOFTMAX_NAME = re.compile(r"softmax|attention", re.IGNORECASE)
ATTENTION_FAMILIES = ("WindowAttention", "ShiftedWindowAttention", "SelfAttention")


def _holds(m: nn.Module, name: str) -> bool:
    for table in (m._parameters, m._buffers, m._modules, vars(m)):
        if table.get(name) is not None:
            return True
    return False


def _names(code) -> set:
    """The global and attribute names a code object (and the functions defined in it) use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _names(const)
    return names


@functools.lru_cache(maxsize=None)
def _forward_calls_softmax(forward) -> bool:
    code = getattr(inspect.unwrap(forward), "__code__", None)
    return code is not None and any(_SOFTMAX_NAME.search(n) for n in _names(code))


def _has_softmax(m: nn.Module) -> bool:
    if any(isinstance(c, nn.Softmax) for c in m._modules.values()):
        return True
    forward = getattr(type(m), "forward", None)
    return callable(forward) and forward is not nn.Module.forward and _forward_calls_softmax(forward)


def attention_evidence(m: nn.Module) -> Optional[str]:
    """Why ``m`` looks like attention (``"has relative_position_bias_table"``), or None."""
    if isinstance(m, nn.MultiheadAttention):
        return "torch's nn.MultiheadAttention"
    for name in _BIAS_NAMES:
        if _holds(m, name):
            return f"has {name}"
    for names in _PROJECTIONS:
        if all(m._modules.get(n) is not None for n in names):
            return f"has {', '.join(names)} and a softmax" if _has_softmax(m) else None
    return None


def _check(m: nn.Module) -> Optional[str]:
    evidence = attention_evidence(m)
    if evidence is None:
        return None
    return f"attention-like module not recognised: {type(m).__name__} ({evidence}); fastnote has no drop-in for it"


register_reporter("attention", ATTENTION_FAMILIES, _check)
